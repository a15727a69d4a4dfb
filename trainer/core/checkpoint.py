"""Checkpoint folders on disk: atomic publication (shared with the demo assets), the marker that
makes a folder a complete checkpoint, and pruning old ones.

A folder is written completely under a temporary name beside its destination, then renamed into
place, so a reader (or a crash) never sees half of it. An existing destination is first moved
aside and removed only after the new folder is in place.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

#: Written last into a learner checkpoint: a folder without it is not a complete checkpoint.
CHECKPOINT_MARKER = "papo_checkpoint.json"
#: The driver's state (step, sampler position, best eval) inside a checkpoint, written with it atomically.
TRAINER_STATE = "trainer_state.json"


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final`` (same filesystem), replacing any old one."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(parent: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints in ``parent``; return the deleted.

    Only folders holding :data:`CHECKPOINT_MARKER` count (newest by the marker's
    ``optimizer_steps``, then its write time); leftovers of crashed saves (``.*.tmp-*``) are deleted too.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = []
    for d in parent.iterdir():
        m = d / CHECKPOINT_MARKER
        if d.is_dir() and not d.name.startswith(".") and m.is_file():
            info = json.loads(m.read_text())
            done.append(((info.get("optimizer_steps", 0), info.get("time", 0.0)), d))
    done.sort(key=lambda x: x[0])
    deleted = [d for _, d in done[:-keep_last]]
    deleted += [d for d in parent.iterdir() if d.is_dir() and d.name.startswith(".") and ".tmp-" in d.name]
    for d in deleted:
        shutil.rmtree(d, ignore_errors=True)
    return deleted
