"""Datasets for training and evaluation: reading prompts and formatting them as chat messages.

The package's API, re-exported here (``from trainer.core.data import load_split``):
:mod:`~trainer.core.data.readers` reads a split (parquet, jsonl, ``save_to_disk`` folder, hub id)
into :mod:`~trainer.core.data.examples`' objects, formatted by :mod:`~trainer.core.data.prompts`,
with images handled by :mod:`~trainer.core.data.images`; :mod:`~trainer.core.data.filtering` drops
prompts over ``data.max_prompt_length`` tokens and loads a split as a job's config says.
"""

from __future__ import annotations

from trainer.core.data.examples import (
    SKIP_BAD_ID,
    SKIP_BAD_IMAGE_ENTRY,
    SKIP_BAD_JSON,
    SKIP_BAD_PROBLEM,
    SKIP_EMPTY_ANSWER,
    SKIP_EXAMPLES,
    SKIP_MASKED_MISMATCH,
    SKIP_MISSING_IMAGE,
    SKIP_OVERLONG,
    SKIP_PLACEHOLDER_MISMATCH,
    SKIP_REASONS,
    SKIP_UNREADABLE_IMAGE,
    DataError,
    ImageItem,
    LoadedSplit,
    PromptExample,
)
from trainer.core.data.filtering import filter_overlong, image_token_count, load_split_from_config, prompt_lengths
from trainer.core.data.images import (
    BadPrompt,
    Fit,
    decode_images,
    easyr1_fit,
    easyr1_size,
    load_image,
    prompt_images,
    prompt_masked_images,
)
from trainer.core.data.prompts import (
    IMAGE_PLACEHOLDER,
    PAPO_FORMAT_PROMPT,
    PROMPT_STYLES,
    TEMPLATE_SUFFIX,
    PromptFormatter,
    build_messages,
    easyr1_messages,
    load_prompt_template,
    resolve_template_path,
    templates_dir,
)
from trainer.core.data.readers import (
    _row_id,  # noqa: F401  (the stable row-id hash; tests pin ids with it)
    is_saved_dataset,
    load_split,
    looks_like_hub_id,
    resolve_split_files,
)

__all__ = [
    "BadPrompt",
    "DataError",
    "Fit",
    "IMAGE_PLACEHOLDER",
    "ImageItem",
    "LoadedSplit",
    "PAPO_FORMAT_PROMPT",
    "PROMPT_STYLES",
    "PromptExample",
    "PromptFormatter",
    "SKIP_BAD_ID",
    "SKIP_BAD_IMAGE_ENTRY",
    "SKIP_BAD_JSON",
    "SKIP_BAD_PROBLEM",
    "SKIP_EMPTY_ANSWER",
    "SKIP_EXAMPLES",
    "SKIP_MASKED_MISMATCH",
    "SKIP_MISSING_IMAGE",
    "SKIP_OVERLONG",
    "SKIP_PLACEHOLDER_MISMATCH",
    "SKIP_REASONS",
    "SKIP_UNREADABLE_IMAGE",
    "TEMPLATE_SUFFIX",
    "build_messages",
    "decode_images",
    "easyr1_fit",
    "easyr1_messages",
    "easyr1_size",
    "filter_overlong",
    "image_token_count",
    "is_saved_dataset",
    "load_image",
    "load_prompt_template",
    "load_split",
    "load_split_from_config",
    "looks_like_hub_id",
    "prompt_images",
    "prompt_lengths",
    "prompt_masked_images",
    "resolve_split_files",
    "resolve_template_path",
    "templates_dir",
]
