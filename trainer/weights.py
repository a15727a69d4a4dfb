"""The weight-sync handle: what ``LearnerGroup.publish_weights(version)`` returns and what
``pool.receive_weights(handle)`` consumes (DESIGN.md, step 6).

A handle is small and travels by value through Ray; the weights themselves do not travel in it.
On CPU (``transport="object_store"``) it holds an ObjectRef of the full policy weights serialised
as one safetensors blob, named exactly as ``save_pretrained`` names them in ``model.safetensors``
(so the vLLM engine's ``load_weights`` and an HF ``from_pretrained`` model both read them). On
GPU the same handle carries the rendezvous of an NCCL broadcast / CUDA IPC that publisher and
receivers join (``transport="nccl"`` / ``"cuda_ipc"``), filled in by the learner's GPU path.

Every receiver must report the version it holds; the driver compares those versions with the
rollouts' ``weight_version`` (the contract that ``masked_logp`` is computed with the weights that
generated the rollout).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

Transport = Literal["object_store", "nccl", "cuda_ipc"]


@dataclass(frozen=True)
class WeightsHandle:
    """One published policy version."""

    version: int
    transport: Transport
    num_tensors: int
    num_bytes: int
    digest: str  # sha256 of the serialised blob (object_store) — receivers verify it
    ref: Any = None  # ObjectRef[bytes] for object_store
    extra: Mapping[str, Any] = field(default_factory=dict)  # rendezvous info for GPU transports


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise HF-named tensors to one safetensors blob (contiguous CPU copies)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})


def unpack_state_dict(blob: bytes, expected_digest: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`; verifies the digest when given."""
    if expected_digest is not None and digest(blob) != expected_digest:
        raise ValueError("weights blob does not match its handle's digest (corrupted or mixed-up version)")
    return st_load(blob)


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def fetch_blob(handle: WeightsHandle, timeout_s: Optional[float] = None) -> bytes:
    """The serialised weights of an ``object_store`` handle.

    ``handle.ref`` is an ObjectRef when the publisher runs under Ray (the product path) and the
    blob itself when it does not (a plain-process learner); both are accepted.
    """
    if handle.transport != "object_store":
        raise NotImplementedError(f"transport {handle.transport!r}: only object_store is implemented")
    ref = handle.ref
    if ref is None:
        raise ValueError(f"object_store handle of version {handle.version} has no ref")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    import ray

    return ray.get(ref, timeout=timeout_s)


def load_handle(handle: WeightsHandle, timeout_s: Optional[float] = None) -> dict[str, torch.Tensor]:
    """Fetch and verify a handle's weights: HF-named tensors."""
    return unpack_state_dict(fetch_blob(handle, timeout_s), expected_digest=handle.digest)
