"""LearnerGroup: two DeepSpeed ranks as two Ray actors (gloo), ZeRO 0, 2 and 3, on the tiny model.

One module fixture trains each stage for a few steps on a fixed batch (images travel as
ObjectRefs) and records what the tests check, so each group (two actor processes) starts once.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, algo_cfg, learner_cfg, make_batch, write_model
from trainer.core.modeling import load_processor
from trainer.learner.group import LearnerGroup
from trainer.transport.receive import load_handle

TIMEOUT = 300.0
STEPS = 3


# ZeRO 0 runs token_global averaging over one 16-row mini-batch (4 micro-batches of 2 per rank),
# so its first gradient can be checked against a single-process reference; ZeRO 2 and 3 run the
# official token averaging over two mini-batches of 8 per step.
GLOBAL = dict(mini_batch_size=16, loss_avg="token_global")


def group(path, stage: int, max_tokens: int | None = None) -> LearnerGroup:
    mini = GLOBAL["mini_batch_size"] if stage == 0 else 8
    avg = GLOBAL["loss_avg"] if stage == 0 else "token"
    return LearnerGroup(
        str(path),
        learner_cfg(
            num_ranks=2,
            num_cpus=0.5,
            zero_stage=stage,
            mini_batch_size=mini,
            micro_batch_size=2,
            max_tokens_per_micro_batch=max_tokens,
        ),
        algo_cfg(gamma=0.01, loss_avg=avg),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        get_timeout_s=TIMEOUT,
    )


@pytest.fixture(scope="module")
def runs(ray_cluster, tmp_path_factory):
    ray = ray_cluster
    root = tmp_path_factory.mktemp("learner_group")
    path = write_model(root / "model")
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    batch, images, masked = make_batch(processor, prompts=4, n=4)  # 16 rows: 2 mini-batches of 8
    refs, masked_refs = {}, {}
    for row_images, row_masked in zip(images, masked):  # one put per prompt, shared by its rows
        refs.setdefault(id(row_images), [ray.put(im) for im in row_images])
        masked_refs.setdefault(id(row_masked), [ray.put(im) for im in row_masked])
    batch.image_refs = [refs[id(x)] for x in images]
    batch.masked_image_refs = [masked_refs[id(x)] for x in masked]
    out = {"path": path, "batch": batch, "images": images}
    for stage in (0, 2, 3):
        g = group(path, stage)
        try:
            b = batch.select(range(len(batch)))
            b.old_logp = g.compute_logprobs(b)
            b.masked_logp = g.compute_logprobs(b, masked=True)
            odd = batch.select(range(len(batch) - 1))  # not a multiple of the world size: padded
            res = {"old_logp": b.old_logp, "odd_logp": g.compute_logprobs(odd), "metrics": [], "digests": []}
            for step in range(STEPS):
                if stage == 3 and step == STEPS - 1:
                    res["ckpt"] = g.save_checkpoint(root / f"ckpt-{stage}", keep_last=1)
                res["metrics"].append(g.train_step(b))
                res["digests"].append(g.param_digests())
            res["handle"] = g.publish_weights(version=STEPS)
            res["weights"] = load_handle(res["handle"], TIMEOUT)
            res["batch"] = b
        finally:
            g.shutdown()
        out[stage] = res
    # Token-budget micro-batches (rows grouped by length, counts that differ from DeepSpeed's
    # accumulation steps and between ranks): the same steps as the fixed layout's.
    budget = 3 * int((batch.prompt_mask.sum(1) + batch.response_lengths).max())
    for stage in (0, 3):
        g = group(path, stage, max_tokens=budget)
        try:
            out[f"budget-{stage}"] = [g.train_step(out[stage]["batch"]) for _ in range(STEPS)]
        finally:
            g.shutdown()
    # Resume the ZeRO-3 run from its checkpoint in a fresh group: the last step must repeat exactly.
    g = group(path, 3)
    try:
        g.load_checkpoint(out[3]["ckpt"])
        out["resumed"] = {"metrics": g.train_step(out[3]["batch"]), "digests": g.param_digests()}
    finally:
        g.shutdown()
    return out


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(runs):
    for stage in (0, 2, 3):
        losses = [m["loss"] for m in runs[stage]["metrics"]]
        assert losses[-1] < losses[0] - 1e-3, (stage, losses)
        steps = 1 if stage == 0 else 2
        assert all(m["optimizer_steps"] == steps and m["skipped_steps"] == 0 for m in runs[stage]["metrics"])


def test_parameters_are_identical_across_ranks(runs):
    for stage in (0, 2, 3):
        for digests in runs[stage]["digests"]:
            assert len(digests) == 2 and digests[0] == digests[1], stage


def test_zero2_and_zero3_give_the_same_losses(runs):
    assert torch.allclose(runs[2]["old_logp"], runs[3]["old_logp"], atol=1e-6)
    assert torch.allclose(runs[2]["old_logp"], runs[0]["old_logp"], atol=1e-6)
    for m2, m3 in zip(runs[2]["metrics"], runs[3]["metrics"]):
        for key in ("loss", "pg_loss", "perception_kl", "entropy", "grad_norm"):
            assert m2[key] == pytest.approx(m3[key], rel=1e-4, abs=1e-6), key
    w2, w3 = runs[2]["weights"], runs[3]["weights"]
    assert set(w2) == set(w3)
    assert max(float((w2[k] - w3[k]).abs().max()) for k in w2) < 1e-4


def test_token_budget_micro_batches_over_two_ranks_take_the_fixed_layouts_steps(runs):
    for stage in (0, 3):  # token_global (ZeRO 0) and token (ZeRO 3: collective forwards and backwards)
        for fixed, packed in zip(runs[stage]["metrics"], runs[f"budget-{stage}"]):
            assert packed["optimizer_steps"] == fixed["optimizer_steps"]
            for key in ("loss", "pg_loss", "grad_norm", "perception_kl"):
                assert packed[key] == pytest.approx(fixed[key], rel=1e-4, abs=1e-6), (stage, key)


def test_token_global_gradient_over_two_ranks_equals_the_single_process_gradient(runs):
    """The global token mean is invariant to how rows are split over ranks and micro-batches; a
    missing (or doubled) undo of DeepSpeed's 1/k and rank average shows as a factor 4 or 2."""
    from trainer.core.algos import papo_loss
    from trainer.core.modeling import load_model, model_inputs, token_logprobs

    path, b = runs["path"], runs[0]["batch"]
    model = load_model(str(path), dtype="float32").train()
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    inputs = model_inputs(model, processor.image_processor, b, runs["images"])
    logp, _ = token_logprobs(model, inputs, b.response_ids, b.response_mask)
    loss, _ = papo_loss(
        logp,
        b.old_logp,
        b.advantages,
        b.response_mask,
        masked_logp=b.masked_logp,
        gamma=0.01,
        avg="token_global",
        num_tokens=b.num_response_tokens,
    )
    loss.backward()
    norm = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None) ** 0.5
    assert runs[0]["metrics"][0]["grad_norm"] == pytest.approx(norm, rel=1e-4)


def test_logprobs_of_a_batch_not_divisible_by_the_world_size(runs):
    odd = runs[2]["odd_logp"]
    assert odd.shape[0] == len(runs["batch"]) - 1
    assert torch.allclose(odd, runs[2]["old_logp"][:-1, : odd.shape[1]], atol=1e-6)


def test_rank0_publishes_hf_named_weights(runs):
    from safetensors import safe_open

    handle = runs[3]["handle"]
    assert handle.version == STEPS and handle.num_tensors == len(runs[3]["weights"])
    with safe_open(str(runs["path"] / "model.safetensors"), "pt") as f:
        assert set(runs[3]["weights"]) == set(f.keys())


def test_checkpoint_resumes_in_a_fresh_group(runs):
    expected, got = runs[3]["metrics"][-1], runs["resumed"]["metrics"]
    for key in ("loss", "pg_loss", "perception_kl", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    assert got["total_optimizer_steps"] == expected["total_optimizer_steps"]
    assert runs["resumed"]["digests"] == runs[3]["digests"][-1]
