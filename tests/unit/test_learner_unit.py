"""The Learner without Ray: one DeepSpeed rank (gloo, world size 1) in the test process.

Real DeepSpeed engines over the tiny Qwen2.5-VL. The first engine in a fresh environment
JIT-builds deepspeed_shm_comm (~40-90 s, cached in ~/.cache/torch_extensions); later engines in
the session reuse the process group and start in about a second.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, algo_cfg, filled, learner_cfg, make_learner, tiny_setup
from trainer.core.algos import LossSettings, papo_loss
from trainer.core.checkpoint import CHECKPOINT_MARKER, prune_checkpoints
from trainer.core.modeling import load_model, load_processor, model_inputs, token_logprobs
from trainer.learner.engine import lr_factor
from trainer.learner.learner import Learner
from trainer.transport.receive import load_handle


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("learner"))


def test_lr_factor_schedules():
    assert lr_factor(0, schedule="constant", warmup_steps=0, total_steps=None) == 1.0
    assert lr_factor(0, schedule="constant", warmup_steps=4, total_steps=None) == 0.25
    assert lr_factor(3, schedule="constant", warmup_steps=4, total_steps=None) == 1.0
    assert lr_factor(7, schedule="linear", warmup_steps=2, total_steps=12) == pytest.approx(0.5)
    assert lr_factor(12, schedule="linear", warmup_steps=2, total_steps=12) == 0.0
    assert lr_factor(7, schedule="cosine", warmup_steps=2, total_steps=12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="total"):
        lr_factor(5, schedule="cosine", warmup_steps=0, total_steps=None)


def reference_grad_norm(path: Path, batch, images, loss: LossSettings, micro: int) -> float:
    """The mini-batch gradient norm computed by hand with a plain transformers model.

    token/seq: sum over micro-batches of papo_loss(grad_accum=k); token_global: sum of
    papo_loss(num_tokens = the whole batch's tokens). This is the objective docs/design.md defines; a
    learner that scaled twice (or not at all) reports a norm k times off.
    """
    model = load_model(str(path), dtype="float32").train()
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    k = len(batch) // micro
    for start in range(0, len(batch), micro):
        rows = list(range(start, start + micro))
        mb = batch.select(rows)
        inputs = model_inputs(model, processor.image_processor, mb, [images[i] for i in rows])
        logp, _ = token_logprobs(model, inputs, mb.response_ids, mb.response_mask)
        out, _ = papo_loss(
            logp,
            mb.old_logp,
            mb.advantages,
            mb.response_mask,
            masked_logp=mb.masked_logp,
            settings=loss,
            grad_accum=1 if loss.avg == "token_global" else k,
            num_tokens=batch.num_response_tokens,
        )
        out.backward()
    sq = sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None)
    return math.sqrt(sq)


@pytest.mark.parametrize(
    "avg,stage,offload", [("token", 0, False), ("seq", 2, False), ("token_global", 3, False), ("token", 2, True)]
)
def test_loss_is_scaled_once_under_gradient_accumulation(tiny, avg, stage, offload):
    path, _, batch, images, masked = tiny
    algo = algo_cfg(loss_avg=avg, gamma=0.01)
    learner = make_learner(
        path, algo=algo, zero_stage=stage, mini_batch_size=8, micro_batch_size=2, cpu_offload=offload
    )
    assert learner.grad_accum == 4
    b = filled(learner, batch, images, masked)
    metrics = learner.train_step(b, images)
    expected = reference_grad_norm(path, b, images, LossSettings.from_algo(algo), micro=2)
    assert metrics["optimizer_steps"] == 1 and metrics["skipped_steps"] == 0
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-4)
    if stage > 0:  # our pre-step norm is the one DeepSpeed's own step computed
        assert float(learner.engine.get_global_grad_norm()) == pytest.approx(metrics["grad_norm"], rel=1e-6)


@pytest.mark.parametrize(
    "stage,dtype", [(0, "float32"), (2, "float32"), (3, "float32"), (0, "bfloat16"), (2, "bfloat16"), (3, "bfloat16")]
)
def test_non_finite_gradient_skips_the_step_without_touching_parameters(tiny, stage, dtype):
    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=stage, dtype=dtype)
    b = filled(learner, batch, images, masked)
    before = learner.export_weights()
    poisoned = b.select(range(len(b)))
    poisoned.advantages = poisoned.advantages.clone()
    poisoned.advantages[5] = float("nan")  # a NaN loss in the second micro-batch: NaN gradients
    metrics = learner.train_step(poisoned, images)
    assert metrics["skipped_steps"] == 1 and metrics["optimizer_steps"] == 0
    assert learner.skipped_steps == 1 and learner.optimizer_steps == 0
    after = learner.export_weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The optimiser state is clean: the next good step applies finite updates.
    metrics = learner.train_step(b, images)
    assert metrics["optimizer_steps"] == 1 and metrics["skipped_steps"] == 0 and math.isfinite(metrics["grad_norm"])
    final = learner.export_weights()
    assert all(torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(before[k], final[k]) for k in before)
    assert metrics["total_skipped_steps"] == 1


@pytest.mark.parametrize("placement,expect_grad", [("pool", False), ("learner", False), ("learner_grad", True)])
def test_only_learner_grad_gives_the_masked_entropy_term_a_gradient(tiny, placement, expect_grad):
    path, _, batch, images, masked = tiny
    # Only the eta2 term: zero advantages silence the policy term, gamma = eta1 = beta = 0.
    algo = algo_cfg(gamma=0.0, eta2=1.0)
    learner = make_learner(path, algo=algo, masked_logp=placement, zero_stage=2)
    b = filled(learner, batch, images, masked)
    b.advantages = torch.zeros(len(b))
    metrics = learner.train_step(b, images, masked if placement == "learner_grad" else None)
    assert metrics["masked_entropy"] > 0
    if expect_grad:
        assert metrics["grad_norm"] > 1e-3
    else:
        assert metrics["grad_norm"] == 0.0


def test_learner_grad_requires_masked_images(tiny):
    path, _, batch, images, masked = tiny
    learner = make_learner(path, algo=algo_cfg(gamma=0.01), masked_logp="learner_grad", zero_stage=0)
    b = filled(learner, batch, images, masked)
    with pytest.raises(ValueError, match="masked_images"):
        learner.train_step(b, images)


def test_the_steps_coefficients_decide_what_the_loss_takes(tiny):
    """The masked pass is asked per step (MaskedPass.loss_source): a scheduled gamma of 0 needs no
    masked images even under learner_grad; a no-grad placement needs the batch's masked_logp."""
    path, _, batch, images, masked = tiny
    learner = make_learner(path, algo=algo_cfg(gamma=0.01), masked_logp="learner_grad", zero_stage=0)
    assert learner.step_settings() is learner.loss and learner.masked_source(learner.loss) == "recompute"
    zero = learner.step_settings(gamma=0.0, eta2=0.0)
    assert (zero.gamma, zero.clip_high) == (0.0, learner.loss.clip_high) and learner.masked_source(zero) is None
    b = filled(learner, batch, images, masked)
    metrics = learner.train_step(b, images, gamma=0.0)  # no masked_images: no term uses them
    assert metrics["optimizer_steps"] == 1 and "perception_kl" in metrics  # the batch's are measured
    pool = make_learner(path, algo=algo_cfg(gamma=0.01), masked_logp="pool", zero_stage=0)
    assert pool.masked_source(pool.loss) == "batch"
    b.masked_logp = None
    with pytest.raises(ValueError, match="masked_logp"):
        pool.train_step(b, images)


def test_published_weights_carry_save_pretrained_names_and_the_trained_values(tiny):
    from safetensors import safe_open

    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=3)
    learner.train_step(filled(learner, batch, images, masked), images)
    handle = learner.publish_weights(version=7)
    assert handle.version == 7 and handle.transport == "object_store"
    weights = load_handle(handle, timeout_s=60)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        saved_names = set(f.keys())
    assert set(weights) == saved_names  # e.g. "model.layers.0...", "visual.blocks.0...", no lm_head
    assert handle.num_tensors == len(weights)
    initial = load_model(str(path), dtype="float32")
    from trainer.core.weights import hf_name_map

    internal = initial.state_dict()
    changed = [n for n, i in hf_name_map(initial).items() if not torch.equal(weights[n], internal[i])]
    assert changed  # the trained values, not the initial ones


def test_checkpoint_round_trip_resumes_exactly_and_saves_atomically(tiny, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=2)
    b = filled(learner, batch, images, masked)
    learner.train_step(b, images)
    ckpt1 = learner.save_checkpoint(tmp_path / "step-1", keep_last=2)
    saved = learner.export_weights()
    expected = learner.train_step(b, images)
    expected_weights = learner.export_weights()

    fresh = make_learner(path, zero_stage=2)
    marker = fresh.load_checkpoint(ckpt1)
    assert marker["optimizer_steps"] == 1 and fresh.optimizer_steps == 1
    got = fresh.train_step(b, images)
    for key in ("loss", "pg_loss", "perception_kl", "grad_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-9), key
    got_weights = fresh.export_weights()
    assert all(torch.allclose(got_weights[k], expected_weights[k], atol=1e-7) for k in expected_weights)

    # The folder is a plain HF model + processor folder.
    hf = AutoModelForImageTextToText.from_pretrained(str(ckpt1), dtype=torch.float32)
    from trainer.core.weights import hf_name_map

    sd = hf.state_dict()
    assert all(torch.equal(sd[i], saved[n]) for n, i in hf_name_map(hf).items())
    assert AutoProcessor.from_pretrained(str(ckpt1)).image_processor is not None

    # A crash while writing leaves the previous checkpoint intact and no half checkpoint.
    def crash(self, folder, sd):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Learner, "_write_hf_folder", crash)
    with pytest.raises(OSError, match="disk full"):
        fresh.save_checkpoint(tmp_path / "step-2", keep_last=2)
    monkeypatch.undo()
    assert not (tmp_path / "step-2").exists()
    assert json.loads((ckpt1 / CHECKPOINT_MARKER).read_text())["optimizer_steps"] == 1
    assert AutoModelForImageTextToText.from_pretrained(str(ckpt1)) is not None

    # keep_last: only the newest k complete checkpoints stay, crash leftovers are swept.
    fresh.save_checkpoint(tmp_path / "step-2", keep_last=2)
    fresh.train_step(b, images)
    fresh.save_checkpoint(tmp_path / "step-3", keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert prune_checkpoints(tmp_path, 1) == [tmp_path / "step-2"]


def test_frozen_vision_tower_gradient_checkpointing_and_ppo_epochs(tiny):
    path, _, batch, images, masked = tiny
    plain = make_learner(path, zero_stage=0)
    b = filled(plain, batch, images, masked)
    ref = plain.train_step(b, images)
    options = make_learner(
        path,
        zero_stage=0,
        freeze_vision_tower=True,
        gradient_checkpointing=True,
        ppo_epochs=2,
        mini_batch_size=4,
        micro_batch_size=2,
    )
    before = options.export_weights()
    metrics = options.train_step(b, images)
    assert metrics["optimizer_steps"] == 4  # 2 epochs x 2 mini-batches
    after = options.export_weights()
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and all(torch.equal(before[k], after[k]) for k in visual)
    assert any(not torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    # Checkpointed activations give the same gradient as stored ones (same data, same weights).
    checkpointed = make_learner(path, zero_stage=0, gradient_checkpointing=True)
    assert checkpointed.train_step(b, images)["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)


@pytest.mark.parametrize("stage", [2, 3])
def test_lr_schedule_reaches_the_optimizer_that_steps(tiny, stage):
    path, _, batch, images, masked = tiny
    learner = Learner(
        str(path),
        learner_cfg(zero_stage=stage, lr=1e-3, lr_scheduler="linear", warmup_steps=2),
        algo_cfg(),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        total_optimizer_steps=6,
    )
    b = filled(learner, batch, images, masked)
    expected = [1e-3 * lr_factor(s, schedule="linear", warmup_steps=2, total_steps=6) for s in range(4)]
    for step in range(3):
        # The client AdamW (what ZeRO's partitioned step calls) holds the LR of the coming step.
        assert learner._optimizer.param_groups[0]["lr"] == pytest.approx(expected[step])
        learner.train_step(b, images)
    assert learner._optimizer.param_groups[0]["lr"] == pytest.approx(expected[3])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_vision_lr_moves_the_vision_tower_at_its_own_rate(tiny, stage):
    """Adam's first step moves a weight by about its LR whatever the gradient's size, so the largest
    change in each part of the model is that part's LR times the warm-up factor (1/2 here)."""
    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=stage, lr=1e-3, vision_lr=1e-2, warmup_steps=2, weight_decay=0.0)
    assert [g["lr"] for g in learner._optimizer.param_groups] == pytest.approx([5e-4, 5e-3])
    before = learner.export_weights()
    stats = learner.train_step(filled(learner, batch, images, masked), images)
    after = learner.export_weights()
    assert stats["lr"] == pytest.approx(5e-4)  # the language model's, i.e. learner.lr's schedule

    def largest_change(visual: bool) -> float:
        return max(float((after[k] - before[k]).abs().max()) for k in before if k.startswith("visual.") == visual)

    assert largest_change(visual=True) == pytest.approx(5e-3, rel=0.02)
    assert largest_change(visual=False) == pytest.approx(5e-4, rel=0.02)
    assert [g["lr"] for g in learner._optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    with pytest.raises(ValueError, match="the vision tower does not train"):
        learner_cfg(vision_lr=1e-2, freeze_vision_tower=True)


def test_a_plain_process_leaves_no_rank_variables_behind(tiny):
    import os

    import torch.distributed as dist

    from trainer.learner.engine import init_distributed

    assert init_distributed() == (0, 1) and dist.is_initialized()
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_every_loss_field_of_the_config_reaches_the_loss_settings():
    from trainer.core.config import resolve_config

    algo = resolve_config(
        overrides=[
            "algo.perception_kl_masked_grad=true",
            "algo.perception_top_p=0.2",
            "algo.perception_kl_clip=0.2",
            "algo.loss_avg=seq",
        ],
        warn=False,
    ).algo
    s = LossSettings.from_algo(algo)
    assert s.perception_kl_masked_grad and s.perception_top_p == 0.2 and s.perception_kl_clip == 0.2
    assert s.avg == "seq" and (s.gamma, s.beta) == (algo.gamma, algo.beta)


def test_on_policy_update_takes_old_logp_from_its_own_forward(tiny):
    """One epoch over one mini-batch: skipping the old-log-prob pass changes nothing but the time."""
    path, _, batch, images, masked = tiny
    with_pass = make_learner(path, zero_stage=0)
    full = filled(with_pass, batch, images, masked)
    with_pass.train_step(full, images)
    without = make_learner(path, zero_stage=0)
    lean = full.select(range(len(full)))
    lean.old_logp = None
    assert without.on_policy(len(lean))
    stats = without.train_step(lean, images)
    a, b = with_pass.export_weights(), without.export_weights()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    # The rollout/learner gap is reported from the update's forward (the test batch's rollout
    # log-probs are synthetic, so only its consistency with the explicit pass is checked).
    expected = float(((full.rollout_logp - full.old_logp).abs() * full.response_mask).sum() / full.response_mask.sum())
    assert stats["rollout_logp_diff"] == pytest.approx(expected, rel=1e-4)
    two_epochs = make_learner(path, zero_stage=0, ppo_epochs=2)
    with pytest.raises(ValueError, match="only an on-policy update"):
        two_epochs.train_step(lean, images)


def test_frozen_language_model_trains_only_the_vision_tower(tiny):
    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=0, freeze_language_model=True)
    before = learner.export_weights()
    learner.train_step(filled(learner, batch, images, masked), images)
    after = learner.export_weights()
    visual = [k for k in before if k.startswith("visual.")]
    assert visual and any(not torch.equal(before[k], after[k]) for k in visual)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("visual."))
    with pytest.raises(ValueError, match="nothing would train"):
        learner_cfg(freeze_language_model=True, freeze_vision_tower=True)


def test_cuda_ipc_on_a_cpu_learner_is_refused_clearly(tiny):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the transport works (tests/gpu)")
    learner = make_learner(tiny[0], zero_stage=0, weight_transport="cuda_ipc", num_gpus=1)  # asked for, not there
    with pytest.raises(RuntimeError, match="weight_transport=cuda_ipc needs the learner on a GPU"):
        learner.publish_weights(version=1)


def spy_on_reduced_gradients(learner) -> dict[str, torch.Tensor]:
    """Fills (at each accumulation boundary, before the step) the full reduced gradient of every
    trainable parameter, as DeepSpeed's step sees it."""
    from deepspeed.utils import safe_get_full_grad

    grads: dict[str, torch.Tensor] = {}
    norm = learner._global_grad_norm

    def spy() -> float:
        for name, p in learner.module.named_parameters():
            if p.requires_grad:
                grads[name] = safe_get_full_grad(p).detach().clone()
        return norm()

    learner._global_grad_norm = spy
    return grads


@pytest.mark.parametrize("avg,stage", [("token", 0), ("seq", 2), ("token_global", 3)])
def test_token_budget_micro_batches_give_the_fixed_layouts_step(tiny, avg, stage):
    """Rows grouped by length (a different number of micro-batches than DeepSpeed's accumulation
    steps, of uneven sizes) give the fixed micro_batch_size layout's loss, gradient and update."""
    path, _, batch, images, masked = tiny
    algo = algo_cfg(loss_avg=avg, gamma=0.01)
    lengths = (batch.prompt_mask.sum(1) + batch.response_lengths).tolist()
    budget = 3 * max(lengths)  # three rows of the longest kind, more of the short ones
    results = []
    for max_tokens in (None, budget):
        learner = make_learner(
            path,
            algo=algo,
            zero_stage=stage,
            mini_batch_size=8,
            micro_batch_size=2,
            max_tokens_per_micro_batch=max_tokens,
        )
        b = filled(learner, batch, images, masked)
        if max_tokens is not None:
            assert len(learner._plan(b, 2)) != learner.grad_accum  # the boundary is ours to set
        grads = spy_on_reduced_gradients(learner)
        metrics = learner.train_step(b, images)
        results.append((metrics, grads))
    (fixed, g_fixed), (packed, g_packed) = results
    assert packed["optimizer_steps"] == fixed["optimizer_steps"] == 1
    assert packed["loss"] == pytest.approx(fixed["loss"], rel=1e-5, abs=1e-7)
    assert packed["grad_norm"] == pytest.approx(fixed["grad_norm"], rel=1e-5)
    assert packed["response_pad_frac"] < fixed["response_pad_frac"]
    assert g_fixed.keys() == g_packed.keys() and g_fixed
    for name in g_fixed:
        assert torch.allclose(g_packed[name], g_fixed[name], atol=1e-7, rtol=1e-4), name


def test_a_token_budget_below_a_rows_length_names_the_field_and_the_length(tiny):
    path, _, batch, images, masked = tiny
    learner = make_learner(path, zero_stage=0, mini_batch_size=8, micro_batch_size=2, max_tokens_per_micro_batch=20)
    with pytest.raises(ValueError, match=r"learner.max_tokens_per_micro_batch=20 is smaller than row \d+'s length \d+"):
        learner.compute_logprobs(batch, images)
    b = batch.select(range(len(batch)))
    b.advantages = torch.ones(len(b))
    b.masked_logp = torch.zeros(b.response_ids.shape)
    with pytest.raises(ValueError, match=r"learner.max_tokens_per_micro_batch=20 is smaller than row \d+'s length"):
        learner.train_step(b, images)


def reference_gradients(path: Path, batch, images, masked, loss: LossSettings, micro: int) -> dict[str, torch.Tensor]:
    """The mini-batch gradient of the PAPO objective in float64 with a plain transformers model:
    the masked log-probs recomputed with gradient (``learner_grad``), fixed micro-batches of
    ``micro`` rows, each ``papo_loss(grad_accum=k)``; keyed by parameter name."""
    model = load_model(str(path), dtype="float32").double().train()
    if model._can_set_experts_implementation():  # MoE: torch's grouped_mm has no float64 kernel
        model.set_experts_implementation("eager")
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    k = len(batch) // micro
    for start in range(0, len(batch), micro):
        rows = list(range(start, start + micro))
        mb = batch.select(rows)
        logps = []
        for imgs in (images, masked):
            inputs = model_inputs(model, processor.image_processor, mb, [imgs[i] for i in rows])
            logps.append(token_logprobs(model, inputs, mb.response_ids, mb.response_mask)[0])
        out, _ = papo_loss(
            logps[0],
            mb.old_logp.double(),
            mb.advantages.double(),
            mb.response_mask,
            masked_logp=logps[1],
            settings=loss,
            grad_accum=k,
        )
        out.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage", [0, 2, 3])
@pytest.mark.parametrize("masked_grad", [False, True], ids=["kl_masked_detached", "kl_masked_grad"])
def test_learner_grad_gradients_equal_a_float64_reference_of_the_objective(tiny, stage, masked_grad):
    """learner_grad with the perception KL and both entropy terms on, 4 accumulation steps: every
    parameter's reduced gradient is the float64 objective's. DeepSpeed reduces only fp16/bf16/fp32
    gradients ("unsupported grad type: torch.float64"), so the learner runs in fp32 and the match
    is to fp32 precision; the objective's float64 exactness is tests/unit/test_algos.py's."""
    path, _, batch, images, masked = tiny
    algo = algo_cfg(gamma=0.05, eta1=0.03, eta2=0.04, perception_kl_masked_grad=masked_grad)
    learner = make_learner(
        path, algo=algo, masked_logp="learner_grad", zero_stage=stage, mini_batch_size=8, micro_batch_size=2
    )
    assert learner.grad_accum == 4
    b = filled(learner, batch, images, masked)
    grads = spy_on_reduced_gradients(learner)
    learner.train_step(b, images, masked)
    expected = reference_gradients(path, b, images, masked, LossSettings.from_algo(algo), micro=2)
    assert grads.keys() == expected.keys() and grads
    scale = max(float(g.abs().max()) for g in expected.values())
    for name, g in expected.items():
        assert torch.allclose(grads[name].double(), g, rtol=1e-4, atol=1e-6 * scale), name


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"])
def tiny_family(request, tmp_path_factory):
    """The tiny model of each demo family (trainer/demo/model.py DEMO_FAMILIES)."""
    if request.param == "qwen2_5_vl":
        return request.getfixturevalue("tiny")
    return tiny_setup(tmp_path_factory.mktemp(f"learner-{request.param}"), family=request.param)


def test_every_papo_term_reaches_the_gradient(tiny_family):
    """Per model family: gamma (perception KL), eta1 and eta2 (the double entropy, eta2 through the
    masked branch under learner_grad) each change the update; each change is the float64 reference's."""
    path, _, batch, images, masked = tiny_family
    base = dict(gamma=0.0, eta1=0.0, eta2=0.0)
    runs = {}
    for term in ("none", "gamma", "eta1", "eta2"):
        coefs = dict(base, **({} if term == "none" else {term: 0.05}))
        algo = algo_cfg(**coefs)
        learner = make_learner(path, algo=algo, masked_logp="learner_grad", zero_stage=2, micro_batch_size=2)
        b = filled(learner, batch, images, masked)
        grads = spy_on_reduced_gradients(learner)
        learner.train_step(b, images, masked)
        ref = reference_gradients(path, b, images, masked, LossSettings.from_algo(algo), micro=2)
        runs[term] = (grads, ref)

    def norm(grads: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(v.double().square().sum()) for v in grads.values()))

    g0, r0 = runs["none"]
    for term in ("gamma", "eta1", "eta2"):
        g, r = runs[term]
        moved = norm({n: g[n].double() - g0[n].double() for n in g})
        expected = norm({n: r[n] - r0[n] for n in r})
        # The term moves the gradient (a lost term leaves only fp32 noise, ~1e-7 of it) by what it should.
        assert expected > 1e-3 * norm(r0), term
        assert moved == pytest.approx(expected, rel=1e-2), term
