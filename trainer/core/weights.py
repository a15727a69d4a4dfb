"""Published policy weights, independent of how they travel (docs/design.md, step 6).

Owns the :class:`WeightsHandle` that ``LearnerGroup.publish_weights(version)`` returns and every
receiver consumes (small, by value through Ray; the tensors never travel in it), the safetensors
packing of the ``object_store`` payload, the 256-byte-aligned bucket layout that the GPU and
broadcast transports move (:func:`pack_buckets` / :func:`unpack_buckets`, with a checksum every
receiver verifies), the errors a receiver reports, and copying saved-name tensors into a live
transformers model (:func:`load_hf_named_weights`; vLLM's ``load_weights`` takes saved names as
they are). The tensors are the full policy weights named exactly as ``save_pretrained`` names
them. How a handle's tensors move is :mod:`trainer.transport`'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

Transport = Literal["object_store", "cuda_ipc", "nccl", "gloo"]
BROADCAST_TRANSPORTS = ("nccl", "gloo")


@dataclass(frozen=True)
class WeightsHandle:
    """One published policy version."""

    version: int
    transport: Transport
    num_tensors: int
    num_bytes: int
    digest: str  # object_store: sha256 of the blob; the others: bucket checksum — receivers verify it
    ref: Any = None  # ObjectRef[bytes] for object_store
    extra: Mapping[str, Any] = field(default_factory=dict)  # layout; cuda_ipc: IPC handles; nccl/gloo: group id


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise HF-named tensors to one safetensors blob (contiguous CPU copies)."""
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()})


def unpack_state_dict(blob: bytes, expected_digest: str | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack_state_dict`; verifies the digest when given."""
    if expected_digest is not None and digest(blob) != expected_digest:
        raise ValueError("weights blob does not match its handle's digest (corrupted or mixed-up version)")
    return st_load(blob)


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------------------------
# Buckets: HF-named tensors laid out in a few flat byte buffers (the GPU transports' payload)
# --------------------------------------------------------------------------------------------

#: Every tensor starts at a multiple of this many bytes: any dtype's view is aligned, and so are
#: vectorised copies. Bucket sizes are padded to it too (the checksum reads them as int32).
ALIGN = 256


@dataclass(frozen=True)
class TensorSlot:
    """Where one named tensor lives in the buckets."""

    name: str
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    shape: tuple[int, ...]
    bucket: int
    offset: int  # bytes from the bucket's start


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def plan_buckets(state_dict: Mapping[str, torch.Tensor], bucket_bytes: int) -> tuple[list[TensorSlot], list[int]]:
    """Assign tensors, in order, to buckets of at most ``bucket_bytes`` (a larger tensor gets its own).

    Returns the slots and each bucket's size in bytes (a multiple of :data:`ALIGN`).
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    slots: list[TensorSlot] = []
    sizes: list[int] = []
    for name, t in state_dict.items():
        need = _aligned(_nbytes(t))
        if not sizes or (sizes[-1] + need > bucket_bytes and sizes[-1] > 0):
            sizes.append(0)
        slots.append(TensorSlot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), len(sizes) - 1, sizes[-1]))
        sizes[-1] += need
    return slots, [max(s, ALIGN) for s in sizes]


def _view(bucket: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    dtype = getattr(torch, slot.dtype)
    nbytes = math.prod(slot.shape) * dtype.itemsize
    return bucket[slot.offset : slot.offset + nbytes].view(dtype).view(slot.shape)


@torch.no_grad()
def pack_buckets(
    state_dict: Mapping[str, torch.Tensor], bucket_bytes: int = 512 << 20, device: torch.device | str | None = None
) -> tuple[list[torch.Tensor], list[TensorSlot]]:
    """Copy ``state_dict`` into fresh ``uint8`` buckets on ``device`` (default: the tensors' device)."""
    slots, sizes = plan_buckets(state_dict, bucket_bytes)
    if device is None:
        device = next(iter(state_dict.values())).device if state_dict else "cpu"
    buckets = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
    for slot, t in zip(slots, state_dict.values()):
        _view(buckets[slot.bucket], slot).copy_(t)
    return buckets, slots


def unpack_buckets(buckets: Sequence[torch.Tensor], slots: Sequence[TensorSlot]) -> dict[str, torch.Tensor]:
    """The named tensors of ``buckets`` as views (no copy)."""
    return {slot.name: _view(buckets[slot.bucket], slot) for slot in slots}


def bucket_checksum(buckets: Sequence[torch.Tensor]) -> str:
    """A content checksum computed where the buckets live: each bucket's int32 words summed as int64.

    Not cryptographic; it catches a receiver reading another version's or a freed buffer.
    """
    sums = [int(b.view(torch.int32).sum(dtype=torch.int64)) for b in buckets]
    return "sum32:" + ",".join(str(x) for x in sums)


# --------------------------------------------------------------------------------------------
# Handles as plain values (for msgpack channels)
# --------------------------------------------------------------------------------------------


def handle_to_dict(handle: WeightsHandle) -> dict[str, Any]:
    """A ``cuda_ipc``/``nccl``/``gloo`` handle as plain values (for msgpack channels such as vLLM's
    ``collective_rpc``); :func:`handle_from_dict` inverts it."""
    if handle.transport == "object_store":
        raise ValueError(
            "only cuda_ipc, nccl and gloo handles travel as plain values (object_store ones hold an ObjectRef)"
        )
    return {f.name: getattr(handle, f.name) for f in dataclasses.fields(handle) if f.name != "ref"}


def handle_from_dict(d: Mapping[str, Any]) -> WeightsHandle:
    return WeightsHandle(**d)


# --------------------------------------------------------------------------------------------
# What a receiver reports
# --------------------------------------------------------------------------------------------


class StaleWeights(RuntimeError):
    """A worker holds another version than the one it must serve, and a broadcast cannot reach it alone."""

    def __init__(self, held: int, wanted: int):
        super().__init__(f"this worker holds weight version {held}, the pool serves {wanted} (broadcast)")
        self.held, self.wanted = held, wanted

    def __reduce__(self):  # pickles through Ray with its arguments
        return StaleWeights, (self.held, self.wanted)


class BroadcastFailed(RuntimeError):
    """A receiver's broadcast failed (a member died mid-broadcast, or the group timed out); it keeps its version.

    Its pool reports it like a worker that died during the sync: its next request finds it on an
    old version and it catches up through the object store (:class:`StaleWeights`).
    """

    def __reduce__(self):  # pickles through Ray with its message
        return BroadcastFailed, self.args


# --------------------------------------------------------------------------------------------
# Receiving into a live transformers model
# --------------------------------------------------------------------------------------------


def hf_name_map(model: torch.nn.Module) -> dict[str, str]:
    """saved (``save_pretrained``) name -> the model's own ``state_dict`` name, for every saved tensor.

    Built with transformers' own save-time transforms (tie removal, reverted load-time renames)
    applied to the model's live tensors, then matched back by storage, so it is exactly the
    inverse of what ``save_pretrained`` and ``Learner.publish_weights`` do.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = model.state_dict()
    by_ptr = {}
    for name, t in sd.items():
        by_ptr.setdefault(t.data_ptr(), name)
    saved = revert_weight_conversion(model, remove_tied_weights_from_state_dict(dict(sd), model))
    out = {}
    for name, t in saved.items():
        internal = by_ptr.get(t.data_ptr())
        if internal is None:
            raise RuntimeError(
                f"saved tensor {name!r} is a converted copy, not a renamed parameter; "
                "in-place weight loading does not support this model's weight conversions"
            )
        out[name] = internal
    return out


@torch.no_grad()
def load_hf_named_weights(
    model: torch.nn.Module, weights: Mapping[str, torch.Tensor], name_map: dict[str, str] | None = None
) -> None:
    """Copy ``weights`` (saved names) into ``model``'s tensors in place; every tensor must be covered.

    Tied parameters share storage, so writing the saved one updates its aliases too.
    """
    name_map = name_map or hf_name_map(model)
    missing = sorted(set(name_map) - set(weights))
    unknown = sorted(set(weights) - set(name_map))
    if missing or unknown:
        raise ValueError(f"published weights do not match the model: missing {missing[:5]}, unknown {unknown[:5]}")
    sd = model.state_dict()
    for name, tensor in weights.items():
        target = sd[name_map[name]]
        if target.shape != tensor.shape:
            raise ValueError(f"{name}: published shape {tuple(tensor.shape)}, model has {tuple(target.shape)}")
        target.copy_(tensor.to(dtype=target.dtype, device=target.device))
