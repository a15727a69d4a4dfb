"""The ``cuda_ipc`` transport: the publisher's GPU buckets opened by receivers on the same GPU.

The publisher packs the weights into a few flat ``uint8`` buckets on its GPU and the handle
carries CUDA IPC handles of them (``torch.multiprocessing``'s own reduction), the publisher's GPU
UUID and the tensor layout. A receiver opens the buckets as device memory shared with the
publisher and copies views of them: device to device, no host copy. The publisher keeps the
buckets alive until its next publish, so receivers copy before then (the step order guarantees
it). The digest is a checksum of the buckets computed on the GPU on both sides.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from trainer.core.weights import TensorSlot, WeightsHandle, bucket_checksum, pack_buckets, unpack_buckets

#: Buckets published by this process, by token: kept alive for receivers, and read directly by a
#: receiver in the same process (CUDA cannot open a process's own IPC handle).
_PUBLISHED: dict[str, list[torch.Tensor]] = {}


#: The arguments of ``rebuild_cuda_tensor`` that are classes, the same for every bucket.
_IPC_FIXED: dict[str, Any] = {
    "tensor_cls": torch.Tensor,
    "storage_cls": torch.storage.TypedStorage,
    "dtype": torch.uint8,
    "requires_grad": False,
}


def gpu_uuid(device: torch.device | int) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


def share_cuda_ipc(
    state_dict: Mapping[str, torch.Tensor], version: int, bucket_bytes: int = 512 << 20
) -> WeightsHandle:
    """Pack ``state_dict`` (CUDA tensors) into buckets and return a ``cuda_ipc`` handle to them.

    Buckets of earlier publishes from this process are released first: one version is shared at a
    time, so the extra GPU memory is one copy of the weights.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    tensors = list(state_dict.values())
    if not tensors or any(not t.is_cuda for t in tensors):
        raise ValueError("cuda_ipc publishes CUDA tensors only (the learner's module is not on a GPU)")
    device = tensors[0].device
    release_cuda_ipc()
    buckets, slots = pack_buckets(state_dict, bucket_bytes, device=device)
    torch.cuda.synchronize(device)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
    _PUBLISHED[token] = buckets
    ipc = []
    for b in buckets:
        rebuild, args = reduce_tensor(b)
        fields = dict(zip(inspect.signature(rebuild).parameters, args))
        # Plain values only (bytes, ints, lists), so the handle also crosses msgpack channels
        # such as vLLM's collective_rpc; the classes are fixed and re-supplied by the receiver.
        ipc.append({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if k not in _IPC_FIXED})
    extra = {
        "token": token,
        "pid": os.getpid(),
        "gpu_uuid": gpu_uuid(device),
        "ipc": ipc,
        "slots": [dataclasses.astuple(s) for s in slots],
    }
    return WeightsHandle(
        version=int(version),
        transport="cuda_ipc",
        num_tensors=len(slots),
        num_bytes=sum(int(b.numel()) for b in buckets),
        digest=bucket_checksum(buckets),
        extra=extra,
    )


def release_cuda_ipc() -> None:
    """Drop this process's published buckets (their memory returns once no receiver holds them)."""
    _PUBLISHED.clear()
    if torch.cuda.is_available():
        torch.cuda.ipc_collect()


def _local_device_of(uuid_str: str) -> int:
    for i in range(torch.cuda.device_count()):
        if gpu_uuid(i) == uuid_str:
            return i
    raise RuntimeError(
        f"cuda_ipc weights live on GPU {uuid_str}, which this process cannot see "
        f"({torch.cuda.device_count()} visible GPUs): the transport needs every receiver "
        "on the learner's GPU; use learner.weight_transport object_store (or colocate)"
    )


def open_cuda_ipc(handle: WeightsHandle) -> dict[str, torch.Tensor]:
    """The named tensors of a ``cuda_ipc`` handle: views of the publisher's buckets, checksum verified."""
    if handle.transport != "cuda_ipc":
        raise ValueError(f"not a cuda_ipc handle: transport {handle.transport!r}")
    if not torch.cuda.is_available():
        raise RuntimeError(
            "a cuda_ipc weights handle reached a process without a GPU; use learner.weight_transport object_store"
        )
    extra = handle.extra
    slots = [TensorSlot(n, d, tuple(s), b, o) for n, d, s, b, o in extra["slots"]]
    if extra["pid"] == os.getpid():
        buckets = _PUBLISHED.get(extra["token"])
        if buckets is None:
            raise RuntimeError(f"cuda_ipc weights of version {handle.version} were released by their publisher")
    else:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        device = _local_device_of(extra["gpu_uuid"])  # the publisher's device index means nothing here
        buckets = [
            rebuild_cuda_tensor(
                **{
                    **fields,
                    **_IPC_FIXED,
                    "tensor_size": torch.Size(fields["tensor_size"]),
                    "tensor_stride": tuple(fields["tensor_stride"]),
                    "storage_device": device,
                }
            )
            for fields in extra["ipc"]
        ]
    if len(slots) != handle.num_tensors:
        raise RuntimeError(
            f"cuda_ipc handle of version {handle.version}: {len(slots)} slots, announces {handle.num_tensors} tensors"
        )
    got = bucket_checksum(buckets)
    if got != handle.digest:
        raise ValueError(
            f"cuda_ipc weights of version {handle.version} do not match their handle's checksum "
            f"({got} != {handle.digest}): the publisher released or overwrote them"
        )
    return unpack_buckets(buckets, slots)
