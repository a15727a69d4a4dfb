"""Receiving a published weights handle, whatever its transport (docs/design.md, step 6)."""

from __future__ import annotations

import torch

from trainer.core.weights import BROADCAST_TRANSPORTS, WeightsHandle, unpack_state_dict
from trainer.transport.broadcast import receive_broadcast
from trainer.transport.cuda_ipc import open_cuda_ipc
from trainer.transport.object_store import fetch_blob


def load_handle(handle: WeightsHandle, timeout_s: float | None = None) -> dict[str, torch.Tensor]:
    """Fetch and verify a handle's weights: HF-named tensors.

    ``object_store``: CPU tensors. ``cuda_ipc``: views of the publisher's GPU buckets (valid until
    the publisher's next publish; copy them, then drop them).
    """
    if handle.transport == "cuda_ipc":
        return open_cuda_ipc(handle)
    if handle.transport in BROADCAST_TRANSPORTS:
        return receive_broadcast(handle)
    if handle.transport != "object_store":
        raise NotImplementedError(
            f"weight transport {handle.transport!r} is not implemented; "
            "use learner.weight_transport object_store, cuda_ipc, nccl or gloo"
        )
    return unpack_state_dict(fetch_blob(handle, timeout_s), expected_digest=handle.digest)
