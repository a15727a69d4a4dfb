"""Chunked log-probs (backbone, then the head over a few tokens at a time) equal the whole-logits path.

Values, exact entropies and parameter gradients, in float32 (within 1e-5) and float64 (1e-12),
over several chunk sizes, temperatures and ragged response masks; plus the token-budget plan of
the forward-only pass, which must give the same log-probs as fixed micro-batches.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.unit.test_modeling import make_batch
from trainer.core.modeling import (
    load_model,
    load_processor,
    model_inputs,
    output_head,
    response_logprobs,
    token_logprobs,
)
from trainer.demo.model import write_tiny_model

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chunks") / "model"
    corpus = ["What color is the circle? Answer with \\boxed{red}.", "<think> blue </think> \\boxed{blue}"] * 20
    write_tiny_model(path, seed=0, corpus=corpus, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    model = load_model(str(path), dtype="float32").eval()
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return model, processor


def _scores(model, processor, batch, imgs, *, temperature, chunk_size, grad):
    inputs = model_inputs(model, processor.image_processor, batch, imgs)
    if grad:
        dtype = next(model.parameters()).dtype
        inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    model.zero_grad()
    with torch.set_grad_enabled(grad):
        logp, ent = token_logprobs(
            model,
            inputs,
            batch.response_ids,
            batch.response_mask,
            temperature=temperature,
            with_entropy=True,
            chunk_size=chunk_size,
        )
    grads = None
    if grad:
        # A loss that weights every token differently, so a misplaced token shows in the gradient.
        w = torch.linspace(-1.0, 2.0, logp.numel(), dtype=logp.dtype).reshape(logp.shape)
        (logp * w).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
    return logp.detach(), ent, grads


def test_the_head_of_a_qwen25vl_splits_off_and_is_restored(tiny):
    model, processor = tiny
    assert output_head(model) is model.lm_head
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    _scores(model, processor, batch, imgs, temperature=1.0, chunk_size=4, grad=False)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the identity stands in only during the forward


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 10_000])
def test_chunked_values_and_entropies_equal_the_whole_logits(tiny, temperature, chunk_size):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    assert len(set(batch.response_lengths.tolist())) > 2  # ragged masks
    ref_lp, ref_ent, _ = _scores(model, processor, batch, imgs, temperature=temperature, chunk_size=None, grad=False)
    lp, ent, _ = _scores(model, processor, batch, imgs, temperature=temperature, chunk_size=chunk_size, grad=False)
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=0)
    assert torch.allclose(ent, ref_ent, atol=1e-5, rtol=0)
    assert torch.all(lp[~batch.response_mask] == 0) and torch.all(ent[~batch.response_mask] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunked_gradients_equal_the_whole_logits(tiny, temperature, chunk_size):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    ref_lp, _, ref_g = _scores(model, processor, batch, imgs, temperature=temperature, chunk_size=None, grad=True)
    lp, ent, g = _scores(model, processor, batch, imgs, temperature=temperature, chunk_size=chunk_size, grad=True)
    assert not ent.requires_grad  # the entropy is a metric: no graph of its own
    assert torch.allclose(lp, ref_lp, atol=1e-5, rtol=0)
    assert g.keys() == ref_g.keys() and any("visual" in n for n in g)
    for name in ref_g:
        assert torch.allclose(g[name], ref_g[name], atol=1e-5, rtol=1e-4), name


def test_float64_chunked_gradients_are_exact(tiny):
    model, processor = tiny
    model64 = copy.deepcopy(model).double()
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    ref_lp, ref_ent, ref_g = _scores(model64, processor, batch, imgs, temperature=0.8, chunk_size=None, grad=True)
    lp, ent, g = _scores(model64, processor, batch, imgs, temperature=0.8, chunk_size=3, grad=True)
    assert lp.dtype == ref_lp.dtype == torch.float64
    assert torch.allclose(lp, ref_lp, atol=1e-12, rtol=0)
    assert torch.allclose(ent, ref_ent, atol=1e-12, rtol=0)
    for name in ref_g:
        assert torch.allclose(g[name], ref_g[name], atol=1e-12, rtol=1e-9), name


def test_token_budget_plan_gives_the_fixed_micro_batches_log_probs(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size, n=3)
    fixed, _ = response_logprobs(model, processor.image_processor, batch, imgs, micro_batch_size=4)
    longest = int((batch.prompt_mask.sum(1) + batch.response_lengths).max())
    packed, _ = response_logprobs(
        model, processor.image_processor, batch, imgs, max_tokens_per_micro_batch=2 * longest, chunk_size=4
    )
    assert torch.allclose(packed, fixed, atol=1e-5, rtol=0)


def test_bad_chunk_sizes_and_budgets_are_refused(tiny):
    model, processor = tiny
    batch, imgs = make_batch(processor, model.config.text_config.vocab_size)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        response_logprobs(model, processor.image_processor, batch, imgs, chunk_size=0)
    with pytest.raises(ValueError, match=r"max_tokens_per_micro_batch=10 is smaller than row \d+'s length"):
        response_logprobs(model, processor.image_processor, batch, imgs, max_tokens_per_micro_batch=10)
