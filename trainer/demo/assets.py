"""The demo's asset folder: ``model/`` (the tiny Qwen2.5-VL of :mod:`trainer.demo.model`) and
``data/`` (the synthetic VQA set of :mod:`trainer.demo.dataset`), built deterministically from a seed.

Owns the cache: :func:`recipe` hashes the arguments that determine the assets, and
:func:`build_demo_assets` builds into a temporary folder, optionally runs a :class:`WarmStart` on it
(its ``recipe`` string enters the cache key), renames it into place, and returns at once when the
folder already holds the same recipe. :func:`cli_main` is ``papo demo-assets DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from trainer.core.checkpoint import replace_dir
from trainer.demo.dataset import (
    COLORS,
    DEFAULT_TEMPLATES,
    DEMO_TEMPLATES,
    RECIPE_VERSION,
    DatasetSizes,
    check_templates,
    write_dataset,
)
from trainer.demo.model import (
    DEMO_FAMILIES,
    SPECIAL_TOKENS,
    check_family,
    check_pixels,
    tokenizer_corpus,
    write_tiny_model,
)
from trainer.demo.warmstart import demo_warm_start


@runtime_checkable
class WarmStart(Protocol):
    """Extension point: supervised warm start of the tiny model on the ``sft`` split.

    docs/demo.md: RL from random weights gets no reward signal; the demo must start from
    a model that already half-sees. An implementation (:class:`trainer.demo.warmstart.SFTWarmStart`)
    trains the model in ``model_dir`` in place on ``data_dir/sft.parquet`` (never on train/validation) and saves it
    back in the same format. It runs inside the temporary build folder, before the atomic
    rename, so a failed warm start never leaves a half-built asset folder behind.
    """

    #: A stable description of everything that changes the warm start's result (steps, lr,
    #: target accuracy, response format...). It enters the recipe hash, so changing it rebuilds.
    recipe: str

    def __call__(self, model_dir: Path, data_dir: Path, *, seed: int) -> dict[str, Any]:
        """Train in place; return facts to record in the manifest (steps, accuracy, seconds)."""
        ...


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Where the demo's assets are, and how they came to be."""

    root: Path
    model_dir: Path
    data_dir: Path
    recipe_hash: str
    recipe: dict[str, Any]
    """The arguments the assets were built from (see :func:`recipe`)."""
    built: bool
    """True when this call built the assets, False when an existing folder was reused."""
    seconds: float


MANIFEST = "recipe.json"


def recipe(
    *,
    seed: int,
    min_pixels: int,
    max_pixels: int,
    sizes: DatasetSizes,
    templates: Sequence[str],
    image_size: int,
    warm_start: WarmStart | None,
    family: str = "qwen2_5_vl",
) -> tuple[dict[str, Any], str]:
    """The arguments that determine the assets, and their hash (the cache key)."""
    spec = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "sizes": sizes.as_dict(),
        "templates": list(templates),
        "image_size": image_size,
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "warm_start": None if warm_start is None else warm_start.recipe,
    }
    if family != "qwen2_5_vl":  # the default family's key is the one it had before families existed
        spec["family"] = family
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec, digest


def _cached(root: Path, digest: str) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("recipe_hash") == digest
        and (root / "model" / "model.safetensors").is_file()
        and (root / "data" / "train.parquet").is_file()
    )


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialises builders of the same folder (parallel test workers, Ray actors)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_demo_assets(
    out_dir: str | Path,
    *,
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    sizes: DatasetSizes = DatasetSizes(),  # noqa: B008 (a frozen dataclass)
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    image_size: int = 56,
    warm_start: WarmStart | None = None,
    force: bool = False,
    family: str = "qwen2_5_vl",
) -> DemoAssets:
    """Write ``out_dir/model/`` (the tiny model of ``family``, default Qwen2.5-VL) and ``out_dir/data/``
    (synthetic VQA splits).

    Cached: when ``out_dir/recipe.json`` holds the hash of these arguments (and
    ``RECIPE_VERSION``), returns at once. Otherwise builds into a temporary sibling folder and
    renames it into place, so readers never see a half-written folder. A folder with another
    recipe is replaced; a non-empty folder that is not a demo-assets folder is refused.
    ``min_pixels``/``max_pixels`` go into the processor config: pass the trainer's
    ``model.min_pixels``/``model.max_pixels``. ``warm_start`` is the extension point described
    in :class:`WarmStart`.
    """
    t0 = time.perf_counter()
    root = Path(out_dir).expanduser().resolve()
    check_pixels(min_pixels, max_pixels)
    check_family(family)
    check_templates(templates)
    templates = tuple(templates)
    spec, digest = recipe(
        seed=seed,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        sizes=sizes,
        templates=templates,
        image_size=image_size,
        warm_start=warm_start,
        family=family,
    )

    def assets(built: bool) -> DemoAssets:
        return DemoAssets(
            root=root,
            model_dir=root / "model",
            data_dir=root / "data",
            recipe_hash=digest,
            recipe=spec,
            built=built,
            seconds=time.perf_counter() - t0,
        )

    if not force and _cached(root, digest):
        return assets(False)
    with _build_lock(root):
        if not force and _cached(root, digest):  # another process finished it while we waited
            return assets(False)
        if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
            raise FileExistsError(f"{root} is not empty and is not a demo-assets folder; refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            rows = write_dataset(tmp / "data", seed=seed, sizes=sizes, templates=templates, image_size=image_size)
            write_tiny_model(
                tmp / "model",
                seed=seed,
                corpus=tokenizer_corpus(rows["train"] + rows["sft"]),
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                family=family,
            )
            warm_start_info = warm_start(tmp / "model", tmp / "data", seed=seed) if warm_start is not None else None
            manifest = {
                "recipe_hash": digest,
                "recipe": spec,
                "warm_start_info": warm_start_info,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "versions": _versions(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _normalise_permissions(tmp)
            replace_dir(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return assets(True)


def _normalise_permissions(folder: Path) -> None:
    """Plain umask permissions everywhere: mkdtemp creates the folder 0700 and safetensors
    writes 0600, which would hide the assets from other users (a shared cache, a container)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _versions() -> dict[str, str]:
    """Library versions the assets were built with (recorded, not part of the cache key)."""
    out = {}
    for dist in ("transformers", "tokenizers", "torch", "pillow", "numpy", "pyarrow"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def cli_main(argv: list[str]) -> int:
    """``papo demo-assets DIR [--seed N] [--force] [--no-warm-start]``; ``argv`` excludes the
    sub-command name."""
    parser = argparse.ArgumentParser(
        prog="papo demo-assets",
        description="Write the demo's tiny Qwen2.5-VL (DIR/model, warm-started on the sft split unless "
        "--no-warm-start) and synthetic vision-dependent VQA dataset (DIR/data). Reuses DIR when it "
        "already holds the same recipe.",
    )
    parser.add_argument("dir", type=Path, help="output folder")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="asset seed: weights, tokenizer corpus, data and warm start (default 0; `papo train demo.asset_seed=S` "
        "uses the same assets)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds the same recipe")
    parser.add_argument(
        "--family",
        default="qwen2_5_vl",
        choices=DEMO_FAMILIES,
        help="model family of the tiny model (default qwen2_5_vl; `papo train demo.family=NAME` uses the same)",
    )
    parser.add_argument("--min-pixels", type=int, default=56 * 56, help="image processor min_pixels (default 3136)")
    parser.add_argument("--max-pixels", type=int, default=112 * 112, help="image processor max_pixels (default 12544)")
    parser.add_argument(
        "--no-warm-start",
        action="store_true",
        help="leave the model's weights random (default: a short supervised warm start on the sft split, "
        "stopped at partial held-out accuracy, so RL has a policy that already half-sees)",
    )
    args = parser.parse_args(argv)
    if args.seed < 0:
        parser.error(f"--seed {args.seed}: an asset seed is an integer >= 0")
    # The same task and warm start as `papo train`'s demo:// paths (trainer.driver), so both
    # share one cache entry for the same pixel limits.
    warm_start = None if args.no_warm_start else demo_warm_start(args.min_pixels, args.max_pixels)
    try:
        out = build_demo_assets(
            args.dir,
            seed=args.seed,
            force=args.force,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            templates=DEMO_TEMPLATES,
            warm_start=warm_start,
            family=args.family,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"papo demo-assets: error: {exc}", file=sys.stderr)
        return 2
    verb = "built" if out.built else "up to date (recipe unchanged), reused"
    sizes = ", ".join(f"{k} {v}" for k, v in out.recipe["sizes"].items())
    print(f"demo assets {verb} in {out.seconds:.1f} s (recipe {out.recipe_hash})")
    print(f"  model: {out.model_dir}")
    print(f"  data:  {out.data_dir} ({sizes} rows)")
    info = json.loads((out.root / MANIFEST).read_text()).get("warm_start_info")
    if info and "skipped" in info:
        print(f"  warm start skipped: {info['skipped']}")
    elif info:
        print(
            f"  warm start: {info['steps']} steps in {info['seconds']:.0f} s, held-out sft_eval accuracy "
            f"{info['heldout_accuracy']:.2f} (black images {info['black_accuracy']:.2f}), coverage "
            f"{info['coverage']:.2f} (the least likely colour's mean probability of its right answer)\n"
            f"  weights sha256 {info['weights_sha256']}"
        )
    return 0


#: ``SPECIAL_TOKENS`` is re-exported: tests/unit/test_demo.py reads it through this module.
__all__ = ["MANIFEST", "SPECIAL_TOKENS", "DemoAssets", "WarmStart", "build_demo_assets", "cli_main", "recipe"]
