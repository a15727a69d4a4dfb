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
