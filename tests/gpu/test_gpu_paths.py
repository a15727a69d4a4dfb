"""The GPU code paths, run on a CUDA machine (``pytest tests/gpu``); skipped where there is no GPU.

- DeepSpeed on GPU (NCCL, one rank) trains the tiny model under ZeRO 0 and 3, fp32 and bf16;
- the ``cuda_ipc`` weight transport: the learner publishes GPU buckets, receivers in another
  process (a perception-pool worker, an HF rollout worker) open them and then hold exactly the
  published values; their log-probs match the learner's.

What a one-GPU machine cannot run: the NCCL weight broadcast between two devices (its gloo twin,
the same code in trainer/transport/broadcast.py, runs in the CPU tests) and multi-rank DeepSpeed
(tests/integration run it on CPU).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest tests/gpu there)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tests.helpers_model import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("gpu"))


def _in_child(kind: str, handle: Any, payload: dict[str, Any] | None = None, timeout: float = 300) -> dict[str, Any]:
    from tests.gpu._child import receive

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receive, args=(child, kind, handle, payload or {}))
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{kind} receiver sent nothing in {timeout} s")
        out = pickle.loads(parent.recv_bytes())
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    assert "error" not in out, out.get("error")
    return out


def test_cuda_ipc_buckets_reach_another_process_bit_exactly():
    import msgpack

    from trainer.core.weights import handle_to_dict
    from trainer.transport.cuda_ipc import release_cuda_ipc, share_cuda_ipc
    from trainer.transport.receive import load_handle

    g = torch.Generator(device="cuda").manual_seed(0)
    sd = {
        "model.layers.0.w": torch.randn(300, 70, device="cuda", generator=g),
        "visual.b": torch.randn(33, device="cuda", generator=g).to(torch.bfloat16),
        "big": torch.randn(1 << 20, device="cuda", generator=g),
    }
    handle = share_cuda_ipc(sd, version=5, bucket_bytes=1 << 20)
    assert handle.transport == "cuda_ipc" and handle.num_tensors == 3 and len(handle.extra["ipc"]) == 2
    same_process = load_handle(handle)  # served from this process's registry
    got = _in_child("raw", handle)
    # Plain values only: the handle also survives msgpack (vLLM's collective_rpc channel).
    got_msgpack = _in_child("raw", msgpack.packb(handle_to_dict(handle)))
    for k, v in sd.items():
        assert torch.equal(same_process[k], v), k
        assert got[k].dtype == v.dtype and torch.equal(got[k], v.cpu()), k
        assert torch.equal(got_msgpack[k], v.cpu()), k
    release_cuda_ipc()
    with pytest.raises(RuntimeError, match="released"):
        load_handle(handle)


@pytest.mark.parametrize("stage,dtype", [(0, "float32"), (3, "float32"), (2, "bfloat16")])
def test_deepspeed_on_gpu_trains_and_publishes_over_cuda_ipc(tiny, stage, dtype):
    from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, filled, make_learner
    from trainer.learner.engine import hf_state_dict

    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=stage, dtype=dtype, weight_transport="cuda_ipc", num_gpus=1)
    assert learner.device.type == "cuda"
    first = filled(learner, batch, images, masked)
    losses = [learner.train_step(first, images)["loss"]]
    for _ in range(4):
        losses.append(learner.train_step(first, images)["loss"])
    assert losses[-1] < losses[0], losses
    handle = learner.publish_weights(version=3)
    assert handle.transport == "cuda_ipc" and handle.version == 3
    with learner._gathered():
        published = {k: v.cpu() for k, v in hf_state_dict(learner.module).items()}
    payload = {
        "model_path": str(path),
        "dtype": dtype,
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "batch": batch,
        "images": images,
    }

    rollout = _in_child("rollout_hf", handle, payload)
    assert rollout["version"] == 3 and rollout["device"].startswith("cuda")
    assert set(rollout["state"]) == set(published)
    for name, value in published.items():
        assert torch.equal(rollout["state"][name], value), name

    scored = _in_child("logprob", handle, payload)
    assert scored["version"] == 3 and scored["device"].startswith("cuda")
    ours = learner.compute_logprobs(batch, images).cpu()
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert (scored["before"] - ours).abs().max() > 10 * tol  # the pool started from other weights
    assert (scored["after"] - ours).abs().max() < tol


def test_zero3_loads_the_model_into_partitions_with_the_folders_weights(tiny, monkeypatch):
    pytest.importorskip("accelerate")  # transformers' ZeRO-3 loading needs it (the GPU stack has it)
    import transformers.integrations.deepspeed as hf_ds

    import trainer.learner.learner as learner_mod
    from services.logprob.scorer import LogProbWorker
    from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, make_learner

    path, _, batch, images, _ = tiny
    seen = []
    real_load = learner_mod.load_model

    def spy(*args, **kwargs):
        seen.append(hf_ds.is_deepspeed_zero3_enabled())
        return real_load(*args, **kwargs)

    monkeypatch.setattr(learner_mod, "load_model", spy)
    learner = make_learner(path, zero_stage=3, dtype="float32")
    assert seen == [True]  # from_pretrained ran under deepspeed.zero.Init
    assert not hf_ds.is_deepspeed_zero3_enabled()  # and the config is gone again
    plain = LogProbWorker(str(path), role="reference", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ours = learner.compute_logprobs(batch, images).cpu()
    assert (plain.compute_logprobs(batch, images) - ours).abs().max() < 1e-5  # the folder's weights, not a fresh init
