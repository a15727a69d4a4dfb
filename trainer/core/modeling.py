"""The policy forward pass that every log-prob consumer shares.

Owns: loading a vision-language model and its processor with the job's pixel limits, turning a
prompt's images into pixel inputs, and the (temperature-scaled) log-probs and exact entropies of
a :class:`~trainer.core.batch.RolloutBatch`'s response tokens under given images. The learner
(``old_logp`` and the loss's ``logp``), the perception pool (``masked_logp``: same token ids,
attention mask and positions, only the pixels differ) and the reference pool all call
:func:`response_logprobs`, so the three can never disagree about how a token is scored.

Qwen2.5-VL's m-RoPE positions are computed here explicitly with the model's own
``get_rope_index``: transformers 5 computes them inside ``forward`` only when it is handed
``mm_token_type_ids`` and otherwise silently falls back to 1-D positions, and it caches
``rope_deltas`` on the module between calls. Passing ``position_ids`` avoids both traps.

No Ray here: callers resolve image ObjectRefs to PIL images first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from trainer.core.batch import RolloutBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, *, dtype: str = "bfloat16", trust_remote_code: bool = False) -> Any:
    """``AutoModelForImageTextToText.from_pretrained(path)`` in ``dtype`` (a local folder or hub id)."""
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)


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


def image_token_ids(model: Any) -> tuple[int, int]:
    """(image pad id, video pad id) of a Qwen2-VL-family model."""
    cfg = model.config
    return int(cfg.image_token_id), int(cfg.video_token_id)


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
    image_id, video_id = image_token_ids(model)
    merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
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
        token_type = (input_ids == image_id).int() + 2 * (input_ids == video_id).int()
        position_ids, _ = model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_type, image_grid_thw=grid, attention_mask=attention_mask
        )
        kwargs.update(position_ids=position_ids, pixel_values=pixel_values, image_grid_thw=grid)
    return kwargs


def token_logprobs(
    model: Any,
    inputs: dict[str, torch.Tensor],
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs ``log softmax(logits / T)[token]`` of the response tokens, (N, R), 0 at padding.

    Differentiable when called with grad enabled. Only the last R + 1 positions' logits are
    materialised (``logits_to_keep``): the response occupies the last R columns because it is
    right-padded after a left-padded prompt. ``with_entropy`` also returns the exact entropy of
    the temperature-scaled distribution at each response position (for logging).
    """
    R = response_ids.shape[1]
    if R == 0:
        empty = torch.zeros(response_ids.shape, dtype=torch.float32)
        return empty, (empty.clone() if with_entropy else None)
    logits = model(**inputs, use_cache=False, logits_to_keep=R + 1).logits[:, :-1]
    logits = logits.float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(response_mask, logp, torch.zeros_like(logp))
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        entropy = torch.where(response_mask, entropy, torch.zeros_like(entropy))
    return logp, entropy


@torch.no_grad()
def response_logprobs(
    model: Any,
    image_processor: Any,
    batch: RolloutBatch,
    images: Sequence[Sequence[Image.Image]],
    *,
    temperature: float = 1.0,
    micro_batch_size: int = 8,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """No-grad log-probs of every response token of ``batch`` (N, R), micro-batched.

    ``images[i]`` are row i's images: the originals for ``old_logp``/``ref_logp``, the masked
    ones for ``masked_logp``. Returns (logp, entropy or None), 0 at padding.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    device = next(model.parameters()).device
    logps, ents = [], []
    for start in range(0, len(batch), micro_batch_size):
        rows = list(range(start, min(start + micro_batch_size, len(batch))))
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
        )
        width = batch.response_ids.shape[1]  # select() trims padding columns: pad back
        logps.append(torch.nn.functional.pad(lp.cpu(), (0, width - lp.shape[1])))
        if ent is not None:
            ents.append(torch.nn.functional.pad(ent.cpu(), (0, width - ent.shape[1])))
    logp = torch.cat(logps) if logps else torch.zeros(batch.response_ids.shape)
    return logp, (torch.cat(ents) if with_entropy and ents else None)
