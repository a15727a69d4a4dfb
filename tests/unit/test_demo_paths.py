"""``demo://`` paths and asset seeds (trainer/demo/paths.py): ``demo.asset_seed`` picks the cached
assets that ``papo train`` uses, each seed in its own folder, built with that seed.

The builder is replaced by a recorder here (building real assets with a warm start is what
tests/unit/test_warmstart.py does); what is checked is which folder and seed a job asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from trainer.core.config import resolve_config
from trainer.demo import paths
from trainer.demo.assets import DemoAssets


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[dict[str, Any]]:
    monkeypatch.setenv("PAPO_CACHE", str(tmp_path / "cache"))
    calls: list[dict[str, Any]] = []

    def record(out_dir: Path, **kw: Any) -> DemoAssets:
        calls.append({"out_dir": Path(out_dir), **kw})
        root = Path(out_dir)
        return DemoAssets(root, root / "model", root / "data", "hash", {}, built=True, seconds=0.0)

    monkeypatch.setattr(paths, "build_demo_assets", record)
    return calls


@pytest.mark.parametrize("asset_seed", [0, 3])
def test_the_asset_seed_picks_its_own_cached_folder(
    built: list[dict[str, Any]], tmp_path: Path, asset_seed: int
) -> None:
    cfg = resolve_config(
        overrides=["model.path=demo://model", "data.train_path=demo://data", f"demo.asset_seed={asset_seed}"]
    )
    out = paths.resolve_demo_paths(cfg)
    folder = tmp_path / "cache" / "demo-assets" / f"seed-{asset_seed}"
    assert [(c["out_dir"], c["seed"]) for c in built] == [(folder, asset_seed)]
    assert out.model.path == str(folder / "model") and out.data.train_path == str(folder / "data")
    assert cfg.model.path == "demo://model"  # the job's own config is left as written


def test_a_job_without_demo_paths_builds_nothing(built: list[dict[str, Any]]) -> None:
    cfg = resolve_config(
        overrides=["model.path=/models/x", "data.train_path=/data/x", "data.val_path=/data/x", "demo.asset_seed=5"]
    )
    assert paths.resolve_demo_paths(cfg) is cfg and built == []


def test_an_unknown_demo_path_is_named(built: list[dict[str, Any]]) -> None:
    cfg = resolve_config(overrides=["model.path=demo://weights", "data.train_path=demo://data"])
    with pytest.raises(ValueError, match="'demo://weights'"):
        paths.resolve_demo_paths(cfg)
