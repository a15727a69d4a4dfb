"""The policy forward pass that every log-prob consumer shares.

Owns: loading a vision-language model and its processor with the job's pixel limits
(:func:`processor_pixels`), turning a
prompt's images into pixel inputs, and the (temperature-scaled) log-probs and exact entropies of
a :class:`~trainer.core.batch.RolloutBatch`'s response tokens under given images. The learner
(``old_logp`` and the loss's ``logp``), the perception pool (``masked_logp``: same token ids,
attention mask and positions, only the pixels differ) and the reference pool all call
:func:`response_logprobs`, so the three can never disagree about how a token is scored.

What differs between model families (token ids, merge size, m-RoPE positions) comes from the
model's adapter (trainer/core/families.py). Positions are passed explicitly: transformers 5
computes m-RoPE positions inside ``forward`` only when it is handed ``mm_token_type_ids`` and
otherwise silently falls back to 1-D positions, and it caches ``rope_deltas`` between calls.

No Ray here: callers resolve image ObjectRefs to PIL images first.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from trainer.core.batch import RolloutBatch
from trainer.core.families import family_of
from trainer.core.microbatch import fixed_plan, token_budget_plan

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, *, dtype: str = "bfloat16", trust_remote_code: bool = False) -> Any:
    """``AutoModelForImageTextToText.from_pretrained(path)`` in ``dtype`` (a local folder or hub id)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)


@functools.lru_cache(maxsize=8)
def _own_pixel_limits(path: str, trust_remote_code: bool) -> tuple[int, int]:
    from transformers import AutoImageProcessor

    ip = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    size = dict(getattr(ip, "size", None) or {})
    lo = size.get("shortest_edge", getattr(ip, "min_pixels", None))
    hi = size.get("longest_edge", getattr(ip, "max_pixels", None))
    if lo is None or hi is None:
        raise ValueError(
            f"model.image_resize=easyr1 needs the image processor's own pixel limits, but {path}'s "
            f"{type(ip).__name__} has none (size={size}); set model.image_resize=processor"
        )
    return int(lo), int(hi)


def processor_pixels(model: Any, path: str | None = None) -> tuple[int, int]:
    """The ``(min_pixels, max_pixels)`` every processor call and the vLLM engine get, from a job's
    ``ModelConfig``: ``model.min_pixels``/``max_pixels`` under ``image_resize=processor``; under
    ``easyr1`` (images already fitted into those limits) the model's own processor limits, as
    EasyR1 leaves them (read once per model folder; ``path`` overrides ``model.path``)."""
    if model.image_resize == "processor":
        return int(model.min_pixels), int(model.max_pixels)
    return _own_pixel_limits(str(path or model.path), bool(model.trust_remote_code))


def load_processor(path: str, *, min_pixels: int, max_pixels: int, trust_remote_code: bool = False) -> Any:
    """``AutoProcessor`` of ``path`` with the job's pixel limits (``model.min_pixels``/``max_pixels``).

    The limits are set on the image processor's ``size`` so every later call, ours or a
    library's, makes the same number of image tokens as the vLLM engine does.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    ip = processor.image_processor
    ip.size = {**dict(ip.size or {}), "shortest_edge": min_pixels, "longest_edge": max_pixels}
    for attr, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if hasattr(ip, attr):
            setattr(ip, attr, value)
    return processor


def pixel_inputs(
    image_processor: Any, images: Sequence[Sequence[Image.Image]], merge_size: int = 2
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pixel inputs of several rows' images, concatenated in row order.

    Returns ``(pixel_values, image_grid_thw, image_tokens_per_row)``. Rows that share one list
    object (the n responses of a prompt) are processed once.
    """
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pv, grids, counts = [], [], []
    for row_images in images:
        key = id(row_images)
        if key not in cache:
            if len(row_images) == 0:
                cache[key] = (torch.empty(0), torch.empty(0, 3, dtype=torch.long))
            else:
                out = image_processor(images=list(row_images), return_tensors="pt")
                cache[key] = (out["pixel_values"], out["image_grid_thw"])
        p, g = cache[key]
        if len(g):
            pv.append(p)
            grids.append(g)
        counts.append(int((g.prod(-1) // (merge_size**2)).sum()) if len(g) else 0)
    if not grids:
        return torch.empty(0), torch.empty(0, 3, dtype=torch.long), counts
    return torch.cat(pv), torch.cat(grids), counts


def model_inputs(
    model: Any, image_processor: Any, batch: RolloutBatch, images: Sequence[Sequence[Image.Image]]
) -> dict[str, torch.Tensor]:
    """Forward kwargs for ``batch`` with ``images`` (one list per row, in placeholder order).

    Raises ValueError naming the row when a prompt's image-token count does not match its
    images under the processor's pixel limits (the engine and the processor disagreed).
    """
    if len(images) != len(batch):
        raise ValueError(f"{len(images)} image lists for {len(batch)} rows")
    family = family_of(model)
    image_id = family.image_token_id(model.config)
    merge = family.merge_size(model.config)
    pixel_values, grid, counts = pixel_inputs(image_processor, images, merge_size=merge)
    in_prompt = (batch.prompt_ids == image_id).sum(dim=1).tolist()
    for row, (have, want) in enumerate(zip(in_prompt, counts)):
        if have != want:
            raise ValueError(
                f"row {row}: the prompt holds {have} image tokens but its {len(images[row])} image(s) make {want} "
                "under the processor's pixel limits; the rollout engine and this processor must share "
                "model.min_pixels/model.max_pixels"
            )
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if len(grid):
        position_ids = family.position_ids(model, input_ids, attention_mask, grid)
        kwargs.update(position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=grid)
    return kwargs


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probs are computed in float32 (float64 for a float64 model, so tests can be exact)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_BLOCK_ROWS = 32  # tokens whose temperature-scaled logits exist at once inside a chunk's reductions


class _TokenLogProb(torch.autograd.Function):
    """``log softmax(logits / T)[ids]`` of a chunk of tokens (and, without gradient, the exact entropy).

    Autograd's ``log_softmax`` + ``gather`` keeps two (chunk x vocabulary) fp32 tensors for the
    backward and makes more in it. Here the reductions run over blocks of :data:`_BLOCK_ROWS`
    tokens, so the chunk's logits are the only (chunk x vocabulary) tensor of the forward, and the
    backward computes ``(onehot(ids) - softmax(logits / T)) * g / T`` in place of the (recomputed)
    logits when they are fp32.
    """

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, ids: torch.Tensor, inv_t: float, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _score_dtype(logits.dtype)
        n = logits.shape[0]
        lse = torch.empty(n, dtype=dtype, device=logits.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=dtype, device=logits.device)
        for b in range(0, n, _BLOCK_ROWS):
            x = logits[b : b + _BLOCK_ROWS].to(dtype) * inv_t
            block_lse = torch.logsumexp(x, dim=-1)
            lse[b : b + _BLOCK_ROWS] = block_lse
            if with_entropy:
                p = (x - block_lse.unsqueeze(-1)).exp_()
                entropy[b : b + _BLOCK_ROWS] = block_lse - (p * x).sum(-1)
        logp = logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1).to(dtype) * inv_t - lse
        ctx.save_for_backward(logits, ids, lse)
        ctx.inv_t = inv_t
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _entropy_grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        logits, ids, lse = ctx.saved_tensors
        inv_t = ctx.inv_t
        g = grad.to(lse.dtype).unsqueeze(-1)
        # The logits are only ours (the head's own backward needs its input, not its output), and
        # under checkpointing they were recomputed for this backward: fp32 ones become the gradient.
        buf = logits if logits.dtype == lse.dtype else logits.to(lse.dtype)
        buf.mul_(inv_t).sub_(lse.unsqueeze(-1)).exp_().mul_(-g)
        buf.scatter_add_(-1, ids.unsqueeze(-1), g)
        buf.mul_(inv_t)
        return buf.to(logits.dtype), None, None, None


def output_head(model: Any) -> torch.nn.Module | None:
    """The module that turns final hidden states into logits, when the logits are exactly its output.

    transformers' ``*ForConditionalGeneration``/``*ForCausalLM`` classes hold it as a direct child
    (their output embeddings). Models that transform the head's output (Gemma's final logit
    soft-capping) have none: they are scored whole.
    """
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    get_head = getattr(module, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    cfg = getattr(module, "config", None)
    text_cfg = getattr(cfg, "text_config", None) or cfg
    if head is None or getattr(text_cfg, "final_logit_softcapping", None):
        return None
    if sum(child is head for child in module.children()) != 1:
        return None
    return head


@contextlib.contextmanager
def _head_detached(model: Any) -> Iterator[None]:
    """Inside the block the model's output-embedding module is an identity (restored after)."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings()
    names = [name for name, child in module.named_children() if child is head]
    setattr(module, names[0], torch.nn.Identity())
    try:
        yield
    finally:
        setattr(module, names[0], head)


def _chunked_head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    ids: torch.Tensor,
    inv_t: float,
    chunk_size: int,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and no-grad entropies) of ``T`` tokens from their final hidden states (T, H).

    At most ``chunk_size`` tokens' vocabulary logits exist at a time. With grad, each chunk runs
    under activation checkpointing: its logits are dropped after the forward and recomputed in
    the backward, so the graph holds only the (T, H) hidden states.
    """
    from torch.utils.checkpoint import checkpoint

    grad = torch.is_grad_enabled() and hidden.requires_grad

    def chunk(h: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _TokenLogProb.apply(head(h), tok, inv_t, with_entropy)

    lps, ents = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        h, tok = hidden[start : start + chunk_size], ids[start : start + chunk_size]
        lp, ent = checkpoint(chunk, h, tok, use_reentrant=False) if grad else chunk(h, tok)
        lps.append(lp)
        if with_entropy:
            ents.append(ent.detach())
    dtype = _score_dtype(hidden.dtype)
    logp = torch.cat(lps) if lps else hidden.new_zeros(0, dtype=dtype)
    entropy = (torch.cat(ents) if ents else hidden.new_zeros(0, dtype=dtype)) if with_entropy else None
    return logp, entropy


def token_logprobs(
    model: Any,
    inputs: dict[str, torch.Tensor],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``log softmax(logits / T)[token]`` of the response tokens, (N, R), 0 at padding.

    Differentiable when called with grad enabled. The response occupies the last R columns (it
    is right-padded after a left-padded prompt), so only the last R + 1 positions are scored.
    ``with_entropy`` also returns the exact entropy of the temperature-scaled distribution at
    each response position, without gradient (for logging).

    ``chunk_size`` (tokens): the backbone and the head run apart (:func:`output_head`) and the
    vocabulary logits exist for at most ``chunk_size`` real response tokens at a time (padding
    positions are never scored), so memory is O(chunk x vocabulary) instead of
    O(rows x width x vocabulary); with grad the chunks are recomputed in the backward. ``None``
    (or a model whose head cannot be split off) materialises the whole micro-batch's logits.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    R = response_ids.shape[1]
    if R == 0:
        empty = torch.zeros(response_ids.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    inv_t = 1.0 / float(temperature)
    head = output_head(model) if chunk_size is not None else None
    if head is None:
        logits = model(**inputs, use_cache=False, logits_to_keep=R + 1).logits[:, :-1]
        logits = logits.to(_score_dtype(logits.dtype)) * inv_t
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
        logp = torch.where(response_mask, logp, torch.zeros_like(logp))
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = -(logp_all.exp() * logp_all).sum(-1)
                entropy = torch.where(response_mask, entropy, torch.zeros_like(entropy))
        return logp, entropy
    with _head_detached(model):
        # The model's own forward (through a DeepSpeed engine, its hooks) with the head an
        # identity: its "logits" are the final hidden states of the last R + 1 positions.
        hidden = model(**inputs, use_cache=False, logits_to_keep=R + 1).logits[:, :-1]
    rows, cols = response_mask.nonzero(as_tuple=True)
    flat_lp, flat_ent = _chunked_head_logprobs(
        head, hidden[rows, cols], response_ids[rows, cols], inv_t, int(chunk_size), with_entropy
    )
    logp = torch.zeros(response_ids.shape, dtype=flat_lp.dtype, device=hidden.device).index_put((rows, cols), flat_lp)
    entropy = None
    if flat_ent is not None:
        entropy = torch.zeros(response_ids.shape, dtype=flat_ent.dtype, device=hidden.device)
        entropy[rows, cols] = flat_ent
    return logp, entropy


def micro_batch_plan(
    batch: RolloutBatch, *, micro_batch_size: int, max_tokens: int | None, field: str = "max_tokens_per_micro_batch"
) -> list[list[int]]:
    """The rows of each forward pass over ``batch``: fixed chunks of ``micro_batch_size`` rows, or
    with ``max_tokens`` rows grouped by length within that padded-token budget
    (:mod:`trainer.core.microbatch`); ``field`` names the budget in errors."""
    if max_tokens is None:
        return fixed_plan(len(batch), micro_batch_size)
    prompt_lens = batch.prompt_mask.sum(dim=1).tolist()
    return token_budget_plan(prompt_lens, batch.response_lengths.tolist(), max_tokens, field=field)


@torch.no_grad()
def response_logprobs(
    model: Any,
    image_processor: Any,
    batch: RolloutBatch,
    images: Sequence[Sequence[Image.Image]],
    *,
    temperature: float = 1.0,
    micro_batch_size: int = 8,
    max_tokens_per_micro_batch: int | None = None,
    chunk_size: int | None = None,
    with_entropy: bool = False,
    plan: list[list[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs of every response token of ``batch`` (N, R), micro-batched.

    ``images[i]`` are row i's images: the originals for ``old_logp``/``ref_logp``, the masked
    ones for ``masked_logp``. Rows run in fixed micro-batches of ``micro_batch_size``, or grouped
    by length within ``max_tokens_per_micro_batch`` padded tokens (:func:`micro_batch_plan`), or
    as ``plan`` says; ``chunk_size`` is :func:`token_logprobs`'. Returns (logp, entropy or None),
    in row order, 0 at padding.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if plan is None:
        plan = micro_batch_plan(batch, micro_batch_size=micro_batch_size, max_tokens=max_tokens_per_micro_batch)
    device = next(model.parameters()).device
    logp = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
    entropy = torch.zeros(batch.response_ids.shape, dtype=torch.float32) if with_entropy else None
    for rows in plan:
        mb = batch.select(rows)
        # Built on the host (processor, RoPE index), then moved to the model's device.
        inputs = {
            k: v.to(device) for k, v in model_inputs(model, image_processor, mb, [images[i] for i in rows]).items()
        }
        lp, ent = token_logprobs(
            model,
            inputs,
            mb.response_ids.to(device),
            mb.response_mask.to(device),
            temperature=temperature,
            with_entropy=with_entropy,
            chunk_size=chunk_size,
        )
        idx = torch.as_tensor(rows, dtype=torch.long)
        width = lp.shape[1]  # select() trims padding columns
        logp[idx, :width] = lp.float().cpu()
        if entropy is not None and ent is not None:
            entropy[idx, :width] = ent.float().cpu()
    return logp, entropy
