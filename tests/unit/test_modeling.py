"""The shared forward: batched, padded response log-probs equal HF's own unpadded forward, row by row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.core.batch import RolloutBatch
from trainer.core.modeling import load_model, load_processor, model_inputs, response_logprobs, token_logprobs
from trainer.demo.model import VISION_TOKEN_IDS, write_tiny_model

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    corpus = [
        "What color is the circle? Answer with \\boxed{red}.",
        "<think> the shape is blue </think> \\boxed{blue}",
    ] * 20
    write_tiny_model(path, seed=0, corpus=corpus, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    model = load_model(str(path), dtype="float32").eval()
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return model, processor


def image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompt_ids(processor, images, question):
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()


def make_batch(processor, vocab: int, n: int = 2):
    rng = np.random.default_rng(1)
    prompts = [
        ([image(0, (56, 56))], "What color is the circle?"),
        ([image(1, (112, 56))], "How many shapes?"),  # a wider image: more image tokens, longer prompt
        ([image(2, (56, 84)), image(3, (56, 56))], "Same color?"),
    ]
    allowed = [t for t in range(vocab) if t not in VISION_TOKEN_IDS]
    p_ids, r_ids, imgs, groups = [], [], [], []
    for g, (ims, q) in enumerate(prompts):
        ids = prompt_ids(processor, ims, q)
        for _ in range(n):
            p_ids.append(ids)
            r_ids.append(rng.choice(allowed, size=int(rng.integers(1, 9))).tolist())
            imgs.append(ims)  # one list object per prompt, shared by its rows
            groups.append(g)
    batch = RolloutBatch.from_sequences(
        p_ids,
        r_ids,
        [[0.0] * len(r) for r in r_ids],
        group_ids=groups,
        row_ids=groups,
        weight_version=0,
        image_refs=[[] for _ in r_ids],
        answers=["x"] * len(r_ids),
        pad_token_id=0,
    )
    return batch, imgs


def reference_logprobs(model, processor, prompt, response, images, temperature):
    """HF's own path: the processor's inputs (with mm_token_type_ids), one unpadded row, full logits."""
    out = processor.image_processor(images=images, return_tensors="pt")
    ids = torch.tensor([prompt + response])
    token_type = (ids == model.config.image_token_id).int()
    with torch.no_grad():
        logits = (
            model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=out["pixel_values"],
                image_grid_thw=out["image_grid_thw"],
                mm_token_type_ids=token_type,
            )
            .logits[0]
            .double()
        )
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return [float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(response)]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_padded_logprobs_match_unpadded_reference(tiny, temperature):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    logp, entropy = response_logprobs(
        model, processor.image_processor, batch, imgs, temperature=temperature, micro_batch_size=4, with_entropy=True
    )
    assert logp.shape == batch.response_ids.shape
    for i in range(len(batch)):
        prompt = batch.prompt_ids[i][batch.prompt_mask[i]].tolist()
        response = batch.response_ids[i][batch.response_mask[i]].tolist()
        ref = reference_logprobs(model, processor, prompt, response, imgs[i], temperature)
        assert np.allclose(logp[i, : len(response)].numpy(), ref, atol=1e-5), (i, logp[i], ref)
        assert torch.all(logp[i, len(response) :] == 0)
    assert torch.all(entropy >= 0) and torch.all(entropy <= math.log(model.config.text_config.vocab_size) + 1e-4)


def test_images_matter_and_temperature_scales(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    base, _ = response_logprobs(model, processor.image_processor, batch, imgs)
    black = [[Image.new("RGB", im.size) for im in row] for row in imgs]
    masked, _ = response_logprobs(model, processor.image_processor, batch, black)
    assert (base - masked).abs().max() > 1e-4  # same tokens, other pixels: other log-probs
    hot, _ = response_logprobs(model, processor.image_processor, batch, imgs, temperature=2.0)
    assert not torch.allclose(base, hot)


def test_micro_batch_size_does_not_change_the_result(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    a, _ = response_logprobs(model, processor.image_processor, batch, imgs, micro_batch_size=1)
    b, _ = response_logprobs(model, processor.image_processor, batch, imgs, micro_batch_size=6)
    assert torch.allclose(a, b, atol=1e-5)


def test_image_token_mismatch_names_the_row(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    wrong = list(imgs)
    wrong[3] = [image(9, (112, 112))]  # 16 image tokens where the prompt has 8
    with pytest.raises(ValueError, match="row 3: the prompt holds 8 image tokens"):
        response_logprobs(model, processor.image_processor, batch, wrong)


def test_gradient_reaches_the_vision_tower(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    model.zero_grad()
    inputs = model_inputs(model, processor.image_processor, batch, imgs)
    logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
    (-logp.sum()).backward()
    vision_grads = [p.grad for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    assert vision_grads and any(g.abs().sum() > 0 for g in vision_grads)
    model.zero_grad()
