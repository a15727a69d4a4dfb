"""Weight-sync payload: HF-named tensors survive packing bit-exactly; a wrong digest is refused."""

from __future__ import annotations

import contextlib

import pytest
import torch

from trainer.core.weights import digest, pack_state_dict, unpack_state_dict


def test_pack_round_trip_is_bit_exact_and_verified():
    sd = {
        "model.language_model.embed_tokens.weight": torch.randn(7, 3),
        "model.visual.blocks.0.attn.qkv.bias": torch.randn(9, dtype=torch.bfloat16),
        "lm_head.weight": torch.randn(3, 7)[:, 1:3],
    }  # a non-contiguous view
    blob = pack_state_dict(sd)
    out = unpack_state_dict(blob, expected_digest=digest(blob))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    with pytest.raises(ValueError, match="does not match its handle's digest"):
        unpack_state_dict(blob, expected_digest=digest(blob + b"x"))


def test_fetch_blob_accepts_inline_blobs_and_refuses_other_transports():
    from trainer.core.weights import WeightsHandle
    from trainer.transport.object_store import fetch_blob
    from trainer.transport.receive import load_handle

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    blob = pack_state_dict(sd)
    handle = WeightsHandle(
        version=3, transport="object_store", num_tensors=1, num_bytes=len(blob), digest=digest(blob), ref=blob
    )
    assert fetch_blob(handle) == blob
    assert torch.equal(load_handle(handle)["w"], sd["w"])
    with pytest.raises(ValueError, match="version 3 has no ref"):
        fetch_blob(WeightsHandle(3, "object_store", 1, 0, "x", ref=None))
    with pytest.raises(NotImplementedError, match="'nccl'"):
        fetch_blob(WeightsHandle(3, "nccl", 1, 0, "x"))


def test_buckets_round_trip_bit_exactly_with_aligned_slots():
    from trainer.core.weights import ALIGN, bucket_checksum, pack_buckets, plan_buckets, unpack_buckets

    sd = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7, dtype=torch.bfloat16),
        "big": torch.randn(200),
        "c": torch.arange(5, dtype=torch.int64),
        "view": torch.randn(4, 6)[:, 1:4],
    }
    slots, sizes = plan_buckets(sd, bucket_bytes=600)
    # "big" (800 bytes) exceeds the bucket size and gets a bucket of its own; others share.
    by_name = {s.name: s for s in slots}
    assert [s.name for s in slots] == list(sd)
    assert by_name["big"].offset == 0 and sizes[by_name["big"].bucket] == 1024
    assert all(s.offset % ALIGN == 0 for s in slots) and all(n % ALIGN == 0 for n in sizes)
    assert by_name["a"].bucket == by_name["b"].bucket != by_name["big"].bucket != by_name["c"].bucket
    assert sizes == [512, 1024, 512]
    buckets, slots2 = pack_buckets(sd, bucket_bytes=600)
    assert slots2 == slots and [b.numel() for b in buckets] == sizes
    out = unpack_buckets(buckets, slots)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k
    # Views, not copies: the checksum sees a write through them.
    before = bucket_checksum(buckets)
    out["c"][0] += 1
    assert bucket_checksum(buckets) != before


def test_plan_rejects_a_bucket_smaller_than_the_alignment():
    from trainer.core.weights import plan_buckets

    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets({"w": torch.zeros(2)}, bucket_bytes=16)


def test_cuda_ipc_handles_are_refused_clearly_without_a_gpu():
    from trainer.core.weights import WeightsHandle
    from trainer.transport.cuda_ipc import share_cuda_ipc
    from trainer.transport.receive import load_handle

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/gpu covers the transport")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        share_cuda_ipc({"w": torch.zeros(2)}, version=1)
    handle = WeightsHandle(1, "cuda_ipc", 1, 256, "sum32:0", extra={"slots": [], "pid": 0, "token": "x"})
    with pytest.raises(RuntimeError, match="without a GPU"):
        load_handle(handle)
    with pytest.raises(RuntimeError, match="a nccl weights handle reached a process that is in no weight group"):
        load_handle(WeightsHandle(1, "nccl", 1, 1, ""))


def test_only_cuda_ipc_handles_become_plain_values():
    from trainer.core.weights import WeightsHandle, handle_from_dict, handle_to_dict

    h = WeightsHandle(3, "cuda_ipc", 2, 512, "sum32:1,2", extra={"slots": [["w", "float32", [2], 0, 0]], "pid": 7})
    d = handle_to_dict(h)
    assert "ref" not in d and handle_from_dict(d) == h
    with pytest.raises(ValueError, match="only cuda_ipc"):
        handle_to_dict(WeightsHandle(3, "object_store", 1, 1, "x", ref=b"blob"))


@contextlib.contextmanager
def _gloo_group(group_id: str, timeout_s: float):
    """Rank 0 here and two receiver processes (ranks 1, 2) in one gloo weight group: (group, pipes, procs)."""
    import multiprocessing as mp
    import pickle

    from tests.unit._weight_group_member import member
    from trainer.learner.engine import free_port
    from trainer.transport.broadcast import WeightGroup

    port, world = free_port(), 3
    ctx = mp.get_context("spawn")
    pipes, procs, group = [], [], None
    try:
        for rank in (1, 2):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=member, args=(child, group_id, port, rank, world, timeout_s))
            p.start()
            pipes.append(parent)
            procs.append(p)
        for c in pipes:
            assert (c.recv_bytes() if c.poll(120) else "no reply") == b"ready", "a receiver process did not start"
        for c in pipes:
            c.send_bytes(b"go")
        group = WeightGroup(group_id, "127.0.0.1", port, 0, world, "gloo", timeout_s=timeout_s)
        # Rank 0's join returns once its own links are up; the receivers' link to each other may
        # still be connecting, and a test that kills one must not cut it.
        for c in pipes:
            msg = c.recv_bytes() if c.poll(120) else b"no reply"
            assert msg == b"joined", pickle.loads(msg) if msg.startswith(b"\x80") else msg
        yield group, pipes, procs
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
        if group is not None:
            group.close()


def test_gloo_broadcast_reaches_every_member_bit_exactly_and_checks_the_layout():
    """Rank 0 publishes two versions; two receiver processes get both, in order, checksum verified.

    Each handle reaches the receivers while the publisher's background thread is broadcasting.
    """
    import pickle

    from trainer.core.weights import WeightsHandle

    g = torch.Generator().manual_seed(0)
    versions = {
        v: {
            "a.weight": torch.randn(5, 7, generator=g),
            "b.bias": torch.randn(3, generator=g).to(torch.bfloat16),
            "c.idx": torch.arange(4, dtype=torch.int64) * v,
        }
        for v in (1, 2)
    }
    with _gloo_group("g1", timeout_s=60) as (group, pipes, _):
        for v, sd in versions.items():
            handle = group.publish(sd, v, bucket_bytes=256)  # several buckets
            assert len(handle.extra["bucket_sizes"]) > 1
            for c in pipes:
                c.send_bytes(pickle.dumps(handle))
            group.wait_sent(timeout_s=60)
        wrong_group = WeightsHandle(
            3,
            "gloo",
            1,
            256,
            "x",
            extra={"group": "other", "bucket_sizes": [256], "slots": [("w", "uint8", (256,), 0, 0)]},
        )
        for c in pipes:
            c.send_bytes(pickle.dumps(wrong_group))
            c.send_bytes(pickle.dumps(None))
        results = [pickle.loads(c.recv_bytes()) if c.poll(120) else "timeout" for c in pipes]
    for got in results:
        assert not isinstance(got, str), got
        assert [v for v, _ in got] == [1, 2, 3]
        for (v, tensors), sd in zip(got[:2], versions.values()):
            assert tensors.keys() == sd.keys()
            for k in sd:
                assert tensors[k].dtype == sd[k].dtype and torch.equal(tensors[k], sd[k]), (v, k)
        assert "broadcast to group other, this process is in group g1" in got[2][1]


def test_a_member_killed_before_a_broadcast_fails_the_sender_at_once_and_never_hangs_the_others():
    """What the driver relies on: the publisher's wait_sent raises at once, and a surviving receiver either
    holds the version or raises BroadcastFailed (its pool reports it like a dead worker) within the group's
    timeout (learner.weight_broadcast_timeout_s), never hangs."""
    import pickle
    import time

    timeout = 10.0
    with _gloo_group("g2", timeout_s=timeout) as (group, pipes, procs):
        procs[1].kill()
        procs[1].join(30)
        start = time.monotonic()
        sent = {"w": torch.randn(256, 256)}
        handle = group.publish(sent, 1, bucket_bytes=64 << 10)
        pipes[0].send_bytes(pickle.dumps(handle))
        pipes[0].send_bytes(pickle.dumps(None))
        with pytest.raises(RuntimeError, match="weight broadcast to group g2 failed"):
            group.wait_sent(timeout_s=60)
        sender_s = time.monotonic() - start
        got = pickle.loads(pipes[0].recv_bytes()) if pipes[0].poll(60) else "timeout"
        receiver_s = time.monotonic() - start
    assert sender_s < timeout
    assert not isinstance(got, str), got
    assert [v for v, _ in got] == [1]
    # Whether gloo reached the survivor before it failed on the dead member depends on its send order:
    # the survivor holds the exact weights, or reports BroadcastFailed; it never loads a partial copy.
    if isinstance(got[0][1], str):
        assert got[0][1].startswith("BroadcastFailed: receiving weight version 1 over group g2 failed"), got[0][1]
    else:
        assert torch.equal(got[0][1]["w"], sent["w"])
    assert receiver_s < 4 * timeout


def test_weight_group_refuses_an_unknown_backend():
    from trainer.transport.broadcast import WeightGroup

    with pytest.raises(ValueError, match="backend must be one of"):
        WeightGroup("g", "127.0.0.1", 1, 0, 1, "mpi")
