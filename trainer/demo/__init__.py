"""The embedded demo fixture: a tiny Qwen2.5-VL and a synthetic VQA set, built from code and cached.

:mod:`~trainer.demo.model` builds the model, :mod:`~trainer.demo.dataset` the data,
:mod:`~trainer.demo.warmstart` the supervised warm start and :mod:`~trainer.demo.assets` the cached
asset folder; :mod:`~trainer.demo.paths` resolves a job's ``demo://`` paths. The main names are
re-exported here, and :func:`cli_main` is ``papo demo-assets``.
"""

from __future__ import annotations

from trainer.demo.assets import MANIFEST, DemoAssets, WarmStart, build_demo_assets, cli_main, recipe
from trainer.demo.dataset import (
    COLORS,
    DEFAULT_TEMPLATES,
    DEMO_TEMPLATES,
    RECIPE_VERSION,
    SPLITS,
    TEMPLATES,
    DatasetSizes,
    write_dataset,
)
from trainer.demo.model import SPECIAL_TOKENS, VISION_TOKEN_IDS, write_tiny_model
from trainer.demo.warmstart import SFTWarmStart, demo_warm_start

__all__ = [
    "COLORS",
    "DEFAULT_TEMPLATES",
    "DEMO_TEMPLATES",
    "MANIFEST",
    "RECIPE_VERSION",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TEMPLATES",
    "VISION_TOKEN_IDS",
    "DatasetSizes",
    "DemoAssets",
    "SFTWarmStart",
    "WarmStart",
    "build_demo_assets",
    "cli_main",
    "demo_warm_start",
    "recipe",
    "write_dataset",
    "write_tiny_model",
]
