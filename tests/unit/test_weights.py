"""Weight-sync payload: HF-named tensors survive packing bit-exactly; a wrong digest is refused."""

from __future__ import annotations

import pytest
import torch

from trainer.weights import digest, pack_state_dict, unpack_state_dict


def test_pack_round_trip_is_bit_exact_and_verified():
    sd = {"model.language_model.embed_tokens.weight": torch.randn(7, 3),
          "model.visual.blocks.0.attn.qkv.bias": torch.randn(9, dtype=torch.bfloat16),
          "lm_head.weight": torch.randn(3, 7)[:, 1:3]}  # a non-contiguous view
    blob = pack_state_dict(sd)
    out = unpack_state_dict(blob, expected_digest=digest(blob))
    assert set(out) == set(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    with pytest.raises(ValueError, match="does not match its handle's digest"):
        unpack_state_dict(blob, expected_digest=digest(blob + b"x"))


def test_fetch_blob_accepts_inline_blobs_and_refuses_other_transports():
    from trainer.weights import WeightsHandle, fetch_blob, load_handle

    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    blob = pack_state_dict(sd)
    handle = WeightsHandle(version=3, transport="object_store", num_tensors=1, num_bytes=len(blob),
                           digest=digest(blob), ref=blob)
    assert fetch_blob(handle) == blob
    assert torch.equal(load_handle(handle)["w"], sd["w"])
    with pytest.raises(ValueError, match="version 3 has no ref"):
        fetch_blob(WeightsHandle(3, "object_store", 1, 0, "x", ref=None))
    with pytest.raises(NotImplementedError, match="'nccl'"):
        fetch_blob(WeightsHandle(3, "nccl", 1, 0, "x"))


def test_buckets_round_trip_bit_exactly_with_aligned_slots():
    from trainer.weights import ALIGN, bucket_checksum, pack_buckets, plan_buckets, unpack_buckets

    sd = {"a": torch.randn(3, 5), "b": torch.randn(7, dtype=torch.bfloat16), "big": torch.randn(200),
          "c": torch.arange(5, dtype=torch.int64), "view": torch.randn(4, 6)[:, 1:4]}
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
    from trainer.weights import plan_buckets

    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets({"w": torch.zeros(2)}, bucket_bytes=16)


def test_cuda_ipc_handles_are_refused_clearly_without_a_gpu():
    from trainer.weights import WeightsHandle, load_handle, share_cuda_ipc

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; tests/gpu covers the transport")
    with pytest.raises(ValueError, match="CUDA tensors only"):
        share_cuda_ipc({"w": torch.zeros(2)}, version=1)
    handle = WeightsHandle(1, "cuda_ipc", 1, 256, "sum32:0", extra={"slots": [], "pid": 0, "token": "x"})
    with pytest.raises(RuntimeError, match="without a GPU"):
        load_handle(handle)
    with pytest.raises(NotImplementedError, match="'nccl'"):
        load_handle(WeightsHandle(1, "nccl", 1, 1, ""))


def test_only_cuda_ipc_handles_become_plain_values():
    from trainer.weights import WeightsHandle, handle_from_dict, handle_to_dict

    h = WeightsHandle(3, "cuda_ipc", 2, 512, "sum32:1,2", extra={"slots": [["w", "float32", [2], 0, 0]], "pid": 7})
    d = handle_to_dict(h)
    assert "ref" not in d and handle_from_dict(d) == h
    with pytest.raises(ValueError, match="only cuda_ipc"):
        handle_to_dict(WeightsHandle(3, "object_store", 1, 1, "x", ref=b"blob"))
