"""A run's folder on disk, before and after the step loop: model paths checked before any Ray
work, the checkpoint to resume from, one run per folder (a lock), and an earlier run archived.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import time
from pathlib import Path

from trainer.core.checkpoint import CHECKPOINT_MARKER, TRAINER_STATE
from trainer.core.config import JobConfig
from trainer.core.families import UnsupportedModel, family_of_folder
from trainer.demo.paths import DEMO_PREFIX

logger = logging.getLogger(__name__)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_paths(cfg: JobConfig) -> None:
    """Fail before any Ray work when a model path is neither a model folder nor a hub id, or is a
    folder of a model type no family adapter supports (trainer/core/families.py).

    ``demo://`` paths pass: the demo fixture builds them. Checked before they are built, so a typo'd
    path fails at once instead of after the demo's first-run build (minutes on an empty cache).
    """
    for field, value in (("model.path", cfg.model.path), ("model.ref_path", cfg.model.ref_path)):
        if value is None or value.startswith(DEMO_PREFIX):
            continue
        path = Path(value).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{field}={value}: the folder has no config.json (not a model folder)")
            try:
                family_of_folder(path)
            except UnsupportedModel as e:
                raise UnsupportedModel(f"{field}={value}: {e}") from None
        elif path.exists():
            raise FileNotFoundError(f"{field}={value}: is a file, not a model folder")
        elif not _HUB_ID.match(value) or Path(value.split("/")[0]).is_dir():
            # "models/qwen" with a local models/ folder is a typo'd path, not a hub id.
            raise FileNotFoundError(f"{field}={value}: no such model folder (and not a hub id like org/name)")


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint ``papo train --resume PATH`` continues from.

    ``PATH`` is a checkpoint folder (it holds the learner's marker file) or a run directory, whose
    newest complete checkpoint under ``checkpoints/`` (by the driver step it recorded) is taken.
    Half-written saves never carry the marker (saves are atomic), so they are never picked.
    """
    folder = Path(path)
    if (folder / CHECKPOINT_MARKER).is_file():
        if not (folder / TRAINER_STATE).is_file():
            raise FileNotFoundError(
                f"{folder} is a learner checkpoint without {TRAINER_STATE} (not written by "
                "`papo train`): it cannot be resumed"
            )
        return folder
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume {folder}: no such run directory or checkpoint")
    found = []
    for d in (folder / "checkpoints").glob("*"):
        if (d / CHECKPOINT_MARKER).is_file() and (d / TRAINER_STATE).is_file():
            found.append((json.loads((d / TRAINER_STATE).read_text())["step"], d))
    if not found:
        raise FileNotFoundError(f"--resume {folder}: no complete checkpoint under {folder / 'checkpoints'}")
    return max(found)[1]


class ResumeError(ValueError):
    """A checkpoint this config cannot continue (finished, other data order, other world size)."""


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_X`` or ``<run>/best``)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def archive_earlier_run(run_dir: Path) -> Path | None:
    """A new run under the name of an earlier one moves the earlier one aside (nothing is deleted,
    and its checkpoints can neither be pruned as "newer" nor resumed by mistake)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(run_dir.stat().st_mtime))
    target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}")
    k = 1
    while target.exists():
        k += 1
        target = run_dir.with_name(f"{run_dir.name}.prev-{stamp}-{k}")
    run_dir.rename(target)
    logger.warning(
        "%s held an earlier run: moved it to %s (use --resume %s to continue a run instead)", run_dir, target, run_dir
    )
    print(f"papo train: an earlier run in {run_dir} was moved to {target}", file=sys.stderr, flush=True)
    return target


class RunDirInUse(RuntimeError):
    """Another live ``papo train`` holds the run folder."""


class RunDirLock:
    """An exclusive lock on a run folder for the life of one driver.

    The lock file sits beside the folder (``.<name>.lock``), so a new run can move an earlier
    run's folder aside while holding it. ``flock`` is released by the kernel when the process
    dies, so a crashed run never leaves a stale lock.
    """

    def __init__(self, run_dir: Path) -> None:
        import fcntl

        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "another process"
            self._fh.close()
            raise RunDirInUse(
                f"{run_dir} is in use by a running papo train ({holder}); give this run another "
                "trainer.name (or trainer.output_dir), or wait for that one to end"
            ) from None
        self._fh.seek(0)
        self._fh.truncate()
        self._fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._fh.flush()

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()  # closing the descriptor drops the flock
