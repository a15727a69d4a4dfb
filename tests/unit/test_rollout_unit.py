"""Ray-free parts of services/rollout/ and services/rollout/vllm_ext.py.

Sampling specs, request checks, error classification, the vision-token block list, the CPU GEMM
patch that makes in-place weight reloads visible, and a plain ``RolloutWorker`` on the ``hf``
backend (no Ray, no vLLM engine): generation, per-request errors and weight-handle checks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from services.rollout.types import (
    ERR_IMAGE_TOKEN_MISMATCH,
    ERR_INVALID_REQUEST,
    ERR_MISSING_IMAGE,
    ERR_PROMPT_TOO_LONG,
    RolloutRequest,
    SamplingSpec,
    blocked_token_ids,
    classify_engine_error,
    count_image_items,
)
from services.rollout.worker import RolloutWorker, worker_kwargs_from_config
from trainer.core.config import ModelConfig, RolloutConfig
from trainer.core.data import load_image, load_split
from trainer.core.weights import WeightsHandle, digest, hf_name_map, pack_state_dict
from trainer.demo.assets import build_demo_assets
from trainer.demo.dataset import DatasetSizes
from trainer.demo.model import VISION_TOKEN_IDS

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
# A stable folder, not pytest's tmp_path: pytest deletes all but its 3 newest basetemp folders,
# so a concurrent pytest session on the same machine could remove the model mid-run. The build
# is cached by recipe and locked, so sessions share it safely.
ASSETS_DIR = Path(tempfile.gettempdir()) / "papo-test-assets" / "rollout"


@pytest.fixture(scope="module")
def assets():
    return build_demo_assets(
        ASSETS_DIR,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        sizes=DatasetSizes(train=16, validation=4, sft=4, sft_eval=4, sft_easy=4),
    )


@pytest.fixture(scope="module")
def worker(assets):
    w = RolloutWorker(
        assets.model_dir, backend="hf", dtype="float32", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, max_model_len=256
    )
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def examples(assets):
    return load_split(assets.data_dir, "train").examples[:3]


def test_sampling_spec_validates_and_spaces_seeds_by_n():
    spec = SamplingSpec(n=8, seed=100)
    assert [spec.request_seed(i) for i in range(3)] == [100, 108, 116]
    assert SamplingSpec(n=8).request_seed(5) is None
    for bad in (
        dict(n=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(max_tokens=0),
        dict(max_tokens=4, min_tokens=5),
    ):
        with pytest.raises(ValueError):
            SamplingSpec(**bad)
    cfg = RolloutConfig(n=5, temperature=0.9, top_p=0.99, max_tokens=77)
    spec = SamplingSpec.from_config(cfg, seed=3)
    assert (spec.n, spec.temperature, spec.top_p, spec.max_tokens, spec.seed) == (5, 0.9, 0.99, 77, 3)
    val = SamplingSpec.from_config(cfg, validation=True)
    assert (val.n, val.temperature) == (1, cfg.val_temperature)


def test_count_image_items_and_error_classification():
    messages = [
        {"role": "system", "content": "plain"},
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image", "image": "x.png"}],
        },
    ]
    assert count_image_items(messages) == 2
    assert count_image_items([{"role": "user", "content": "no images"}]) == 0
    too_long = ValueError(
        "This model's maximum context length is 512 tokens. However, your prompt contains at "
        "least 513 input tokens (parameter=input_tokens, value=513)"
    )
    assert classify_engine_error(too_long).startswith(ERR_PROMPT_TOO_LONG)
    assert classify_engine_error(
        RuntimeError("Failed to apply prompt replacement for mm items['image'][0]")
    ).startswith(ERR_IMAGE_TOKEN_MISMATCH)
    assert classify_engine_error(ValueError("top_k must be -1")).startswith(ERR_INVALID_REQUEST)


def test_blocked_tokens_are_the_vision_tokens(worker):
    assert tuple(blocked_token_ids(worker.engine.hf_config())) == VISION_TOKEN_IDS


def test_vision_tokens_are_blocked_by_bad_words_only_where_vllm_maps_them_back_exactly(assets):
    """The vLLM engine's block: bad words where vLLM's own conversion gives exactly the blocked ids
    (each alone), else None (the engine then uses the whitelist)."""
    pytest.importorskip("vllm")
    from vllm.tokenizers.registry import get_tokenizer

    from services.rollout.engines import vllm_bad_words

    tok = get_tokenizer(str(assets.model_dir))
    assert vllm_bad_words(tok, VISION_TOKEN_IDS) == [
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    assert vllm_bad_words(tok, [100]) == ["~"]  # " ~" is two tokens: vLLM adds no spaced variant
    # Token 200's text is a byte-level form ("ą") that encodes to two other tokens: no exact block.
    assert tok.convert_ids_to_tokens([200]) == ["ą"] and len(tok.encode("ą", add_special_tokens=False)) == 2
    assert vllm_bad_words(tok, [200]) is None and vllm_bad_words(tok, [*VISION_TOKEN_IDS, 200]) is None


def test_request_from_example_keeps_ids_and_paths(examples):
    ex = examples[0]
    req = RolloutRequest.from_example(ex, epoch=2)
    assert (req.row_id, req.answer, req.epoch, req.images) == (ex.row_id, ex.answer, 2, list(ex.image_paths))
    assert count_image_items(req.messages) == len(req.images) == 1


def test_hf_worker_generates_and_reports_per_request_errors(worker, examples, tmp_path):
    good = [RolloutRequest.from_example(ex, images=[load_image(ex.image_paths[0])]) for ex in examples[:2]]
    missing = RolloutRequest.from_example(examples[2], images=[tmp_path / "gone.png"])
    mismatch = RolloutRequest(messages=examples[2].messages, images=[])
    too_long = RolloutRequest(
        messages=[
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " ".join(["red blue"] * 300)}]}
        ],
        images=list(good[0].images),
    )
    spec = SamplingSpec(n=3, temperature=0.8, top_p=0.9, max_tokens=12, seed=4)
    result = worker.generate([good[0], missing, mismatch, too_long, good[1]], spec, request_offset=10)
    assert sorted(result.errors) == [11, 12, 13]
    assert result.errors[11].startswith(ERR_MISSING_IMAGE) and "gone.png" in result.errors[11]
    assert result.errors[12].startswith(ERR_IMAGE_TOKEN_MISMATCH)
    assert result.errors[13].startswith(ERR_PROMPT_TOO_LONG)
    batch = result.batch
    assert batch.group_ids.tolist() == [10] * 3 + [14] * 3
    assert batch.weight_versions == {0} and len(batch.finish_reasons) == 6
    assert not any(t in VISION_TOKEN_IDS for t in batch.response_ids[batch.response_mask].tolist())
    assert bool((batch.rollout_logp[batch.response_mask] < 0).all())
    again = worker.generate([good[0], missing, mismatch, too_long, good[1]], spec, request_offset=10)
    assert torch.equal(again.batch.response_ids, batch.response_ids)


def _handle(state: dict, version: int, blob: bytes | None = None) -> tuple[WeightsHandle, bytes]:
    blob = pack_state_dict(state) if blob is None else blob
    return WeightsHandle(
        version=version, transport="object_store", num_tensors=len(state), num_bytes=len(blob), digest=digest(blob)
    ), blob


def test_receive_weights_checks_digest_names_and_transport(worker):
    # Published weights carry save_pretrained's names (what Learner.publish_weights sends).
    internal = worker.engine.model.state_dict()
    state = {saved: internal[name].clone() for saved, name in hf_name_map(worker.engine.model).items()}
    assert any(k.startswith("visual.") for k in state) and not any(k.startswith("model.visual.") for k in state)
    handle, blob = _handle(state, version=0)
    assert worker.receive_weights(handle, b"not even read") == 0  # version already held: no-op
    handle, blob = _handle(state, version=7)
    with pytest.raises(ValueError, match="digest"):
        worker.receive_weights(handle, blob + b"x")
    with pytest.raises(ValueError, match="blob"):
        worker.receive_weights(handle, None)
    with pytest.raises(NotImplementedError, match="'mpi' is not implemented"):
        worker.receive_weights(WeightsHandle(7, "mpi", 1, 1, ""), None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a gloo weights handle reached a process that is in no weight group"):
        worker.receive_weights(WeightsHandle(0, "gloo", 1, 1, ""), None)  # a broadcast is received even at v0
    bad_handle, bad_blob = _handle({"not.a.param": torch.zeros(2)}, version=7)
    with pytest.raises(RuntimeError, match="1 tensors, the handle announces 2"):
        worker.receive_weights(WeightsHandle(7, "object_store", 2, len(bad_blob), digest(bad_blob)), bad_blob)
    with pytest.raises(ValueError, match="unknown \\['not.a.param'\\]"):
        worker.receive_weights(bad_handle, bad_blob)
    assert worker.weight_version == 0
    # A real update: version moves, parameters change to the published values.
    key = next(k for k in state if k.endswith("mlp.down_proj.weight"))
    state[key] = state[key] + 1.0
    handle, blob = _handle(state, version=7)
    assert worker.receive_weights(handle, blob) == 7 and worker.weight_version == 7
    assert torch.equal(worker.engine.model.state_dict()[hf_name_map(worker.engine.model)[key]], state[key])


def test_cpu_gemm_patch_reads_the_live_weight():
    pytest.importorskip("vllm")
    from vllm.model_executor.layers import utils as layer_utils

    from services.rollout import vllm_ext

    if not vllm_ext.CPU_GEMM_PATCHED:
        pytest.skip("vLLM does not run on CPU here")
    assert layer_utils.dispatch_cpu_unquantized_gemm is vllm_ext._plain_cpu_gemm_dispatch
    layer = torch.nn.Linear(64, 32)
    layer_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    assert layer.weight.numel() == 64 * 32, "the weight must survive for in-place reloads"
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = layer_utils.cpu_unquantized_gemm(layer, x, layer.weight, layer.bias)
        layer.weight.mul_(2.0)
        after = layer_utils.cpu_unquantized_gemm(layer, x, layer.weight, layer.bias)
    assert torch.allclose(after - layer.bias, 2 * (before - layer.bias), atol=1e-5)


def test_worker_kwargs_come_from_the_config_models(assets):
    rollout = RolloutConfig(
        backend="hf",
        max_model_len=1024,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        enforce_eager=True,
        cpu_kvcache_space_gb=3,
    )
    model = ModelConfig(
        path="/models/x", dtype="float32", min_pixels=28 * 28, max_pixels=64 * 28 * 28, image_resize="processor"
    )
    kw = worker_kwargs_from_config(rollout, model, seed=5, initial_version=2, model_path="/resolved")
    assert kw == dict(
        model_path="/resolved",
        backend="hf",
        dtype="float32",
        min_pixels=28 * 28,
        max_pixels=64 * 28 * 28,
        max_model_len=1024,
        max_images_per_prompt=1,
        tensor_parallel_size=2,
        gpu_memory_utilization=0.5,
        enforce_eager=True,
        cpu_kvcache_space_gb=3,
        seed=5,
        initial_version=2,
        trust_remote_code=False,
    )
    assert worker_kwargs_from_config(rollout, model)["model_path"] == "/models/x"
    # image_resize=easyr1: images are fitted into model.min/max_pixels beforehand and the engine
    # keeps the model's own processor limits (the demo model's: 56 x 56 to 112 x 112).
    easyr1 = ModelConfig(path=str(assets.model_dir), min_pixels=28 * 28, max_pixels=64 * 28 * 28)
    kw = worker_kwargs_from_config(rollout, easyr1)
    assert (kw["min_pixels"], kw["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS) == (56 * 56, 112 * 112)
