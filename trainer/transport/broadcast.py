"""The ``nccl`` / ``gloo`` transports: a bucketed broadcast from learner rank 0 to every receiver.

All members join one process group (:class:`WeightGroup`, rank 0 = the publisher) with its own
TCP store, outside torch's default group, so DeepSpeed's and vLLM's groups are untouched. The
publisher broadcasts from a background thread so the receivers' calls, launched right after,
meet it; the handle carries the layout, the group id and the buckets' checksum, which every
receiver verifies. Every member must receive every version (a collective), so the driver
re-forms the group whenever a member process changes. ``gloo`` is what the CPU tests run;
``nccl`` shares the code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Mapping, Sequence

import torch

from trainer.core.weights import (
    BROADCAST_TRANSPORTS,
    BroadcastFailed,
    TensorSlot,
    WeightsHandle,
    bucket_checksum,
    pack_buckets,
    unpack_buckets,
)


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
