"""A receiver process of tests/unit/test_weights.py's broadcast test (spawned: it must be importable)."""

from __future__ import annotations

import pickle
from typing import Any


def member(conn: Any, group_id: str, port: int, rank: int, world: int, timeout_s: float = 60) -> None:
    """Join the group, then receive each handle the parent sends (None ends); reply (version, tensors) or the
    error text per handle."""
    try:
        from trainer.transport.broadcast import join_weight_group
        from trainer.transport.receive import load_handle

        # Imports done: join only when the parent says every member is up, so the group's
        # (short) timeout measures the broadcast, not how long a loaded machine takes to import torch.
        conn.send_bytes(b"ready")
        conn.recv_bytes()
        join_weight_group(group_id, "127.0.0.1", port, rank, world, "gloo", timeout_s=timeout_s)
        conn.send_bytes(b"joined")
        out = []
        while (h := pickle.loads(conn.recv_bytes())) is not None:
            try:
                out.append((h.version, {k: v.clone() for k, v in load_handle(h).items()}))
            except Exception as e:  # noqa: BLE001 - reported to the parent
                out.append((h.version, f"{type(e).__name__}: {e}"))
        conn.send_bytes(pickle.dumps(out))
    except BaseException as e:  # noqa: BLE001
        conn.send_bytes(pickle.dumps(f"{type(e).__name__}: {e}"))
