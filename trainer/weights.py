"""The weight-sync handle: what ``LearnerGroup.publish_weights(version)`` returns and what
``pool.receive_weights(handle)`` consumes (DESIGN.md, step 6).

A handle is small and travels by value through Ray; the weights themselves do not travel in it.
The tensors are always the full policy weights named exactly as ``save_pretrained`` names them in
``model.safetensors`` (so the vLLM engine's ``load_weights`` and an HF model both read them).

Transports (``learner.weight_transport``):

- ``object_store`` (CPU and GPU): the handle holds an ObjectRef of one safetensors blob and its
  sha256; receivers fetch, verify and copy. Works across machines; costs a host round trip.
- ``cuda_ipc`` (GPU, receivers on the publisher's GPU): the publisher packs the weights into a few
  flat ``uint8`` buckets on its GPU (:func:`pack_buckets`, each tensor at a 256-byte-aligned offset)
  and the handle carries CUDA IPC handles of the buckets (``torch.multiprocessing``'s own
  reduction), the publisher's GPU UUID and the tensor layout. A receiver opens the buckets as
  device memory shared with the publisher and copies views of them into its parameters:
  device-to-device, no host copy, no serialisation. The publisher keeps the buckets alive until
  its next publish, so receivers must copy before then (the driver's step order guarantees it).
  The digest is a checksum of the buckets' contents, computed on the GPU on both sides.
- ``nccl`` (GPUs on different devices or nodes) and ``gloo`` (CPU processes, also across
  nodes): a bucketed broadcast from learner rank 0 to every receiver process over a process group
  they all join (:class:`WeightGroup`, rank 0 = the publisher; its own TCP store, outside
  torch's default group, so DeepSpeed's group and vLLM's are untouched). The publisher packs the
  weights into buckets on its device and broadcasts them from a background thread, so the
  receivers' calls, launched by the driver right after, meet it; the handle carries the layout,
  the group's id and the buckets' checksum, which every receiver verifies. Every member must
  receive every version (a collective), so the driver re-forms the group whenever a member process
  changes. Both backends share the code; ``gloo`` is what the CPU tests run, ``nccl`` is untested
  (a lent machine has one GPU, where NCCL cannot pair two ranks).

Receivers with a transformers model copy the tensors into it with :func:`load_hf_named_weights`
(saved names mapped back to the model's own by :func:`hf_name_map`); the vLLM engine's
``load_weights`` takes the saved names directly.

Every receiver must report the version it holds; the driver compares those versions with the
rollouts' ``weight_version`` (the contract that ``masked_logp`` is computed with the weights that
generated the rollout).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import math
import os
import threading
import uuid
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


def fetch_blob(handle: WeightsHandle, timeout_s: float | None = None) -> bytes:
    """The serialised weights of an ``object_store`` handle.

    ``handle.ref`` is an ObjectRef when the publisher runs under Ray (the product path) and the
    blob itself when it does not (a plain-process learner); both are accepted.
    """
    if handle.transport != "object_store":
        raise NotImplementedError(f"transport {handle.transport!r} has no blob (only object_store handles do)")
    ref = handle.ref
    if ref is None:
        raise ValueError(f"object_store handle of version {handle.version} has no ref")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    import ray

    return ray.get(ref, timeout=timeout_s)


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
# CUDA IPC: the publisher's GPU buckets opened by receivers on the same GPU
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Broadcast (nccl / gloo): learner rank 0 sends the buckets to every receiver process
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


class WeightGroup:
    """One process's membership in a weight-broadcast group (rank 0 publishes, the others receive).

    The group has its own ``TCPStore`` (hosted by rank 0) and a bare ``ProcessGroupGloo`` /
    ``ProcessGroupNCCL`` over it: it is not torch's default group, so it coexists with the
    DeepSpeed group of the learner and the engine's own groups in vLLM workers.
    """

    def __init__(
        self,
        group_id: str,
        host: str,
        port: int,
        rank: int,
        world_size: int,
        backend: str,
        timeout_s: float = 600.0,
        device: torch.device | str | None = None,
    ):
        import datetime

        import torch.distributed as dist

        if backend not in BROADCAST_TRANSPORTS:
            raise ValueError(f"backend must be one of {BROADCAST_TRANSPORTS}, got {backend!r}")
        self.group_id, self.rank, self.world_size, self.backend = group_id, rank, world_size, backend
        timeout = datetime.timedelta(seconds=timeout_s)
        self._store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
        store = dist.PrefixStore(f"papo-weights/{group_id}", self._store)
        if backend == "nccl":
            self.device = torch.device(device if device is not None else f"cuda:{torch.cuda.current_device()}")
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = dist.ProcessGroupNCCL(store, rank, world_size, opts)
        else:
            self.device = torch.device("cpu")
            self.pg = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self._sender: threading.Thread | None = None
        self._send_error: BaseException | None = None
        self._sending: list[torch.Tensor] = []

    def _broadcast(self, buckets: Sequence[torch.Tensor]) -> None:
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        for b in buckets:
            self.pg.broadcast([b], opts).wait()
        if self.backend == "nccl":
            torch.cuda.synchronize(self.device)

    def publish(
        self, state_dict: Mapping[str, torch.Tensor], version: int, bucket_bytes: int = 512 << 20
    ) -> WeightsHandle:
        """Rank 0: pack ``state_dict`` on this group's device and start broadcasting it; return the handle.

        Returns at once; the broadcasts complete when every receiver calls :meth:`receive`.
        :meth:`wait_sent` joins them (the next ``publish`` does too, first).
        """
        if self.rank != 0:
            raise RuntimeError("only rank 0 of a weight group publishes")
        self.wait_sent()
        buckets, slots = pack_buckets(state_dict, bucket_bytes, device=self.device)
        handle = WeightsHandle(
            version=int(version),
            transport=self.backend,
            num_tensors=len(slots),  # type: ignore[arg-type]
            num_bytes=sum(int(b.numel()) for b in buckets),
            digest=bucket_checksum(buckets),
            extra={
                "group": self.group_id,
                "bucket_sizes": [int(b.numel()) for b in buckets],
                "slots": [dataclasses.astuple(s) for s in slots],
            },
        )
        self._sending = buckets

        def send() -> None:
            try:
                self._broadcast(buckets)
            except BaseException as e:  # noqa: BLE001 - reported by wait_sent in the caller's thread
                self._send_error = e

        self._send_error = None
        self._sender = threading.Thread(target=send, name=f"papo-weights-v{version}", daemon=True)
        self._sender.start()
        return handle

    def wait_sent(self, timeout_s: float | None = None) -> None:
        """Join the running broadcast; raise if it failed (a receiver died, or never came)."""
        if self._sender is not None:
            self._sender.join(timeout_s)
            if self._sender.is_alive():
                raise TimeoutError(f"weight broadcast of group {self.group_id} still running after {timeout_s} s")
            self._sender = None
            self._sending = []
            if self._send_error is not None:
                err, self._send_error = self._send_error, None
                raise RuntimeError(f"weight broadcast to group {self.group_id} failed: {err}") from err

    def receive(self, handle: WeightsHandle) -> dict[str, torch.Tensor]:
        """Rank > 0: receive ``handle``'s buckets; the named tensors (views of fresh buckets), checksum verified."""
        if handle.extra.get("group") != self.group_id:
            raise RuntimeError(
                f"weights of version {handle.version} were broadcast to group "
                f"{handle.extra.get('group')}, this process is in group {self.group_id}"
            )
        buckets = [torch.empty(int(n), dtype=torch.uint8, device=self.device) for n in handle.extra["bucket_sizes"]]
        try:
            self._broadcast(buckets)
        except Exception as e:
            raise BroadcastFailed(
                f"receiving weight version {handle.version} over group {self.group_id} failed "
                f"(a member died mid-broadcast, or it timed out): {e}"
            ) from e
        got = bucket_checksum(buckets)
        if got != handle.digest:
            raise ValueError(
                f"broadcast weights of version {handle.version} do not match their handle's "
                f"checksum ({got} != {handle.digest})"
            )
        slots = [TensorSlot(n, d, tuple(s), b, o) for n, d, s, b, o in handle.extra["slots"]]
        return unpack_buckets(buckets, slots)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a broadcast still running or failed is abandoned with the group
            self.wait_sent(timeout_s=0)
        self.pg = None


#: This process's current weight group (one at a time: joining a new one leaves the old one).
_GROUP: WeightGroup | None = None


def join_weight_group(
    group_id: str,
    host: str,
    port: int,
    rank: int,
    world_size: int,
    backend: str,
    timeout_s: float = 600.0,
    device: torch.device | str | None = None,
) -> WeightGroup:
    """Join (collectively: every member calls it at once) the group that broadcasts weights to this process."""
    global _GROUP
    leave_weight_group()
    _GROUP = WeightGroup(group_id, host, port, rank, world_size, backend, timeout_s, device)
    return _GROUP


def leave_weight_group() -> None:
    global _GROUP
    if _GROUP is not None:
        _GROUP.close()
        _GROUP = None


def current_weight_group() -> WeightGroup | None:
    return _GROUP


def receive_broadcast(handle: WeightsHandle) -> dict[str, torch.Tensor]:
    """The weights of an ``nccl``/``gloo`` handle, received over this process's weight group."""
    if _GROUP is None:
        raise RuntimeError(
            f"a {handle.transport} weights handle reached a process that is in no weight group "
            "(the driver forms it before the first publish)"
        )
    return _GROUP.receive(handle)


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
