"""``demo://`` paths: a job config that names the demo gets the cached demo assets' folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from trainer.core.config import JobConfig
from trainer.demo.assets import build_demo_assets
from trainer.demo.dataset import DEMO_TEMPLATES
from trainer.demo.warmstart import demo_warm_start

logger = logging.getLogger(__name__)


DEMO_PREFIX = "demo://"


def demo_assets_dir(asset_seed: int = 0, family: str = "qwen2_5_vl") -> Path:
    """The cached assets of one asset seed and family: ``$PAPO_CACHE/demo-assets/seed-S`` (another
    family: ``seed-S-FAMILY``; default cache ``~/.cache/papo``); each has its own folder, so
    switching rebuilds nothing."""
    cache = Path(os.environ.get("PAPO_CACHE", Path.home() / ".cache" / "papo"))
    return cache / "demo-assets" / (f"seed-{asset_seed}" + ("" if family == "qwen2_5_vl" else f"-{family}"))


def resolve_demo_paths(cfg: JobConfig) -> JobConfig:
    """Replace ``demo://`` paths by the assets of ``demo.asset_seed``, building them (cached) when needed."""
    paths = [cfg.model.path, cfg.data.train_path, cfg.data.val_path or ""]
    if not any(p.startswith(DEMO_PREFIX) for p in paths):
        return cfg
    assets = build_demo_assets(
        demo_assets_dir(cfg.demo.asset_seed, cfg.demo.family),
        seed=cfg.demo.asset_seed,
        family=cfg.demo.family,
        min_pixels=cfg.model.min_pixels,
        max_pixels=cfg.model.max_pixels,
        templates=DEMO_TEMPLATES,
        warm_start=demo_warm_start(cfg.model.min_pixels, cfg.model.max_pixels),
    )
    root = {"model": assets.model_dir, "data": assets.data_dir}

    def sub(p: str | None) -> str | None:
        if p is None or not p.startswith(DEMO_PREFIX):
            return p
        name = p[len(DEMO_PREFIX) :]
        if name not in root:
            raise ValueError(f"{p!r}: demo:// paths are demo://model and demo://data")
        return str(root[name])

    out = cfg.model_copy(deep=True)
    out.model.path = sub(cfg.model.path)
    out.data.train_path = sub(cfg.data.train_path)
    out.data.val_path = sub(cfg.data.val_path)
    return out
