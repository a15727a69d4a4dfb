"""Prompt length after image expansion (needs the model's processor) and the
``data.max_prompt_length`` filter; :func:`load_split_from_config` loads a split as a job's config says."""

from __future__ import annotations

import functools
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.core.data.examples import (
    SKIP_EXAMPLES,
    SKIP_OVERLONG,
    SKIP_UNREADABLE_IMAGE,
    DataError,
    LoadedSplit,
    PromptExample,
    skip_summary,
)
from trainer.core.data.images import Fit, easyr1_size, open_image
from trainer.core.data.readers import load_split

logger = logging.getLogger(__name__)


def image_token_count(image_processor: Any, height: int, width: int, *, min_pixels: int, max_pixels: int) -> int:
    """Tokens one image of ``height`` x ``width`` raw pixels becomes in a Qwen2-VL-family prompt.

    The processor resizes the image to a multiple of patch_size * merge_size within
    [min_pixels, max_pixels] (``smart_resize``), cuts it into patch_size patches and merges
    merge_size^2 of them per token. Computed from the size alone, exactly as vLLM does
    (``get_number_of_image_patches``), without running the processor on pixels.
    """
    merge = int(getattr(image_processor, "merge_size", 2))
    kwargs = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if hasattr(image_processor, "get_number_of_image_patches"):
        patches = image_processor.get_number_of_image_patches(height, width, kwargs)
    else:  # older transformers; lazy: importing transformers costs about a second
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        patch = int(image_processor.patch_size)
        h, w = smart_resize(height, width, patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
        patches = (h // patch) * (w // patch)
    return int(patches) // (merge * merge)


def prompt_lengths(
    examples: Sequence[PromptExample],
    processor: Any,
    *,
    min_pixels: int,
    max_pixels: int,
    fit: Fit = None,
    batch_size: int = 256,
) -> list[int | None]:
    """Prompt tokens of each example after image expansion, as the engine will see them
    (chat template with the generation prompt; each image first fitted as ``fit`` says, then
    rounded within the processor's ``min_pixels``/``max_pixels``); ``None`` when an image header
    cannot be read."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    pad_token = getattr(processor, "image_token", None)
    pad_id = tokenizer.convert_tokens_to_ids(pad_token) if pad_token is not None else None
    out: list[int | None] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts = [processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False) for ex in batch]
        ids = tokenizer(texts)["input_ids"]
        for ex, row_ids in zip(batch, ids):
            extra = 0
            try:
                for item in ex.images:
                    with open_image(item) as im:
                        w, h = im.size
                    if fit is not None:
                        w, h = easyr1_size(w, h, *fit)
                    extra += image_token_count(image_processor, h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            except (OSError, SyntaxError, ValueError):
                out.append(None)
                continue
            # The template writes one pad token per image; the processor repeats it per image token.
            pads = row_ids.count(pad_id) if pad_id is not None else len(ex.images)
            out.append(len(row_ids) - pads + extra)
    return out


def filter_overlong(
    split: LoadedSplit,
    processor: Any,
    max_prompt_length: int,
    *,
    min_pixels: int,
    max_pixels: int,
    fit: Fit = None,
) -> LoadedSplit:
    """``split`` without the prompts longer than ``max_prompt_length`` tokens after image
    expansion (EasyR1's ``filter_overlong_prompts``), counted as ``overlong_prompt``; a prompt
    whose image header became unreadable since loading is counted as ``unreadable_image``."""
    lengths = prompt_lengths(split.examples, processor, min_pixels=min_pixels, max_pixels=max_pixels, fit=fit)
    kept: list[PromptExample] = []
    skipped = Counter(split.skipped)
    ids = {k: list(v) for k, v in split.skipped_row_ids.items()}
    for ex, n in zip(split.examples, lengths):
        if n is not None and n <= max_prompt_length:
            kept.append(ex)
            continue
        reason = SKIP_UNREADABLE_IMAGE if n is None else SKIP_OVERLONG
        skipped[reason] += 1
        if len(ids.setdefault(reason, [])) < SKIP_EXAMPLES:
            ids[reason].append(ex.row_id)
    dropped = len(split.examples) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d prompts of %s longer than data.max_prompt_length=%d tokens: %s",
            dropped,
            len(split.examples),
            split.source,
            max_prompt_length,
            skip_summary(
                {k: skipped[k] - split.skipped.get(k, 0) for k in skipped if skipped[k] != split.skipped.get(k, 0)}, ids
            ),
        )
    if split.examples and not kept:
        raise DataError(
            f"every prompt of {split.source} is longer than data.max_prompt_length={max_prompt_length} "
            f"tokens (shortest: {min((n for n in lengths if n is not None), default='n/a')})"
        )
    return split.model_copy(update={"examples": kept, "skipped": dict(skipped), "skipped_row_ids": ids})


@functools.lru_cache(maxsize=2)
def _cached_processor(path: str, min_pixels: int, max_pixels: int, trust_remote_code: bool) -> Any:
    from trainer.core.modeling import load_processor  # torch/transformers: only when filtering

    return load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code)


def load_split_from_config(
    data: Any, path: str | Path, split: str, *, model: Any = None, processor: Any = None
) -> LoadedSplit:
    """:func:`load_split` with a job's ``data`` section (``trainer.core.config.DataConfig``), then the
    ``data.max_prompt_length`` filter when it is set. That filter needs the model's processor:
    ``processor`` if given, else loaded (once per process) from ``model.path`` with the job's
    pixel limits (``model`` is the job's ``ModelConfig``)."""
    loaded = load_split(
        path,
        split,
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        image_key=data.image_key,
        masked_image_key=data.masked_image_key,
        id_key=data.id_key,
        format_prompt=data.format_prompt,
        prompt_template=data.prompt_template,
        prompt_style=data.prompt_style,
        image_root=data.image_root,
        verify_images=data.verify_images,
    )
    if data.max_prompt_length is None:
        return loaded
    if model is None:
        raise ValueError("data.max_prompt_length needs the model's processor: pass model= (the job's model section)")
    from trainer.core.modeling import processor_pixels  # torch/transformers: only when filtering

    lo, hi = processor_pixels(model)
    if processor is None:
        processor = _cached_processor(str(model.path), lo, hi, bool(model.trust_remote_code))
    return filter_overlong(
        loaded, processor, data.max_prompt_length, min_pixels=lo, max_pixels=hi, fit=model.image_fit()
    )
