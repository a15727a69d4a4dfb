"""Test helpers shared by the learner and log-prob pool tests: the tiny Qwen2.5-VL folder, a
RolloutBatch with real image-token prompts, images and masked images, and small configs.

Pattern from tests/unit/test_modeling.py: prompts go through the processor's chat template (image
pads expanded), responses are random non-vision tokens, the n rows of one prompt share one
image-list object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer.core.batch import RolloutBatch
from trainer.core.config import AlgoConfig, LearnerConfig
from trainer.demo.model import VISION_TOKEN_IDS, write_tiny_model

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
CORPUS = [
    "What color is the circle? Answer with \\boxed{red}.",
    "<think> the shape is blue </think> \\boxed{blue}",
    "How many shapes? Same color?",
] * 20


def write_model(path: Path, seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    write_tiny_model(path, seed=seed, corpus=CORPUS, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, family=family)
    return path


def image(seed: int, size: tuple[int, int] = (56, 56)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def prompt_ids(processor: Any, images: list[Image.Image], question: str) -> list[int]:
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()


def make_batch(
    processor: Any, *, prompts: int = 4, n: int = 2, seed: int = 1, vocab: int = 512, max_response: int = 8
) -> tuple[RolloutBatch, list[list[Image.Image]], list[list[Image.Image]]]:
    """A batch of ``prompts * n`` rows with old_logp/ref_logp/masked_logp = 0 placeholders and
    advantages; returns (batch, images per row, masked images per row)."""
    rng = np.random.default_rng(seed)
    sizes = [(56, 56), (112, 56), (56, 84), (84, 84)]
    allowed = [t for t in range(vocab) if t not in VISION_TOKEN_IDS]
    p_ids, r_ids, imgs, masked, groups = [], [], [], [], []
    for g in range(prompts):
        ims = [image(seed * 100 + g, sizes[g % len(sizes)])]
        black = [Image.new("RGB", im.size) for im in ims]
        ids = prompt_ids(processor, ims, ["What color is the circle?", "How many shapes?", "Same color?"][g % 3])
        for _ in range(n):
            p_ids.append(ids)
            r_ids.append(rng.choice(allowed, size=int(rng.integers(2, max_response + 1))).tolist())
            imgs.append(ims)
            masked.append(black)
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
    batch.advantages = torch.as_tensor(rng.standard_normal(len(batch)), dtype=torch.float32)
    return batch, imgs, masked


def learner_cfg(**kw: Any) -> LearnerConfig:
    base = dict(
        num_ranks=1,
        num_cpus=0.5,
        num_gpus=0,
        zero_stage=2,
        dtype="float32",
        lr=1e-3,
        weight_decay=0.01,
        grad_clip=1.0,
        ppo_epochs=1,
        mini_batch_size=8,
        micro_batch_size=4,
    )
    base.update(kw)
    return LearnerConfig(**base)


def algo_cfg(**kw: Any) -> AlgoConfig:
    base = dict(name="papo_d", gamma=0.01, beta=0.0, eta1=0.0, eta2=0.0)
    base.update(kw)
    return AlgoConfig(**base)


def tiny_setup(folder: Path, family: str = "qwen2_5_vl") -> tuple[Path, Any, RolloutBatch, list, list]:
    """The tiny model of ``family`` written to ``folder/model``, its processor and a
    :func:`make_batch` batch: ``(path, processor, batch, images, masked)``."""
    from trainer.core.modeling import load_processor

    path = write_model(folder / "model", family=family)
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    batch, images, masked = make_batch(processor)
    return path, processor, batch, images, masked


def model_and_ray_batch(ray: Any, folder: Path, *, prompts: int = 2, n: int = 2) -> tuple[Path, RolloutBatch]:
    """The tiny model written to ``folder`` and a batch whose images (real and masked) are in the object store."""
    from trainer.core.modeling import load_processor

    path = write_model(folder)
    batch, images, masked = make_batch(
        load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), prompts=prompts, n=n
    )
    batch.image_refs = [[ray.put(im) for im in row] for row in images]
    batch.masked_image_refs = [[ray.put(im) for im in row] for row in masked]
    return path, batch


def make_learner(path: Path, *, algo: Any = None, masked_logp: str = "pool", **cfg: Any) -> Any:
    """A one-rank :class:`~trainer.learner.learner.Learner` on the tiny model.

    ``cfg`` overrides :func:`learner_cfg`.
    """
    from trainer.learner.learner import Learner

    return Learner(
        str(path),
        learner_cfg(**cfg),
        algo if algo is not None else algo_cfg(),
        masked_logp=masked_logp,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
    )


def filled(learner: Any, batch: RolloutBatch, images: list, masked: list) -> RolloutBatch:
    """The batch with old_logp and masked_logp from the learner's current weights (a copy)."""
    b = batch.select(range(len(batch)))
    b.old_logp = learner.compute_logprobs(b, images)
    b.masked_logp = learner.compute_logprobs(b, masked)
    return b
