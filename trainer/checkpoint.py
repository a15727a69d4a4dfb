"""Atomic folder publication shared by checkpoints and demo assets.

A folder is written completely under a temporary name beside its destination, then renamed into
place, so a reader (or a crash) never sees half of it. An existing destination is first moved
aside and removed only after the new folder is in place.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished folder ``tmp`` to ``final`` (same filesystem), replacing any old one."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
