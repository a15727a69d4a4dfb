"""Config: presets resolve to docs/algorithm.md's values; bad input fails naming the field; baselines stay baselines."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import yaml

from trainer.core.algos import LossSettings
from trainer.core.config import (
    PRESETS,
    AlgoConfig,
    ConfigError,
    ConfigWarning,
    JobConfig,
    MaskedPass,
    dump_config,
    named_config,
    parse_override,
    resolve_config,
)

# docs/algorithm.md "Presets" table, written out independently of trainer/core/config/schema.py.
PAPER = {
    #          beta  gamma  eta1  eta2  clip_low clip_high dual  dynamic sampling
    "grpo": (0.01, 0.0, 0.0, 0.0, 0.2, 0.3, 3.0, False),
    "papo": (0.01, 0.02, 0.0, 0.0, 0.2, 0.3, 3.0, False),
    "dapo": (0.0, 0.0, 0.0, 0.0, 0.2, 0.28, 3.0, True),
    "papo_d": (0.0, 0.01, 0.03, 0.03, 0.2, 0.28, 3.0, True),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_preset_resolves_to_paper_values(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = resolve_config(overrides=[f"algo.name={name}"])
    a = cfg.algo
    assert (a.beta, a.gamma, a.eta1, a.eta2, a.clip_low, a.clip_high, a.clip_dual, a.dynamic_sampling) == PAPER[name]
    assert a.loss_avg == "token" and a.kl_kind == "low_var_kl" and a.perception_kl_kind == "low_var_kl"
    assert cfg.rollout.n == 5 and cfg.rollout.temperature == 1.0 and cfg.rollout.top_p == 0.99
    assert cfg.corruption.patch_size == 14 and cfg.corruption.prob == 0.6
    assert cfg.learner.lr == 1e-6 and cfg.learner.weight_decay == 1e-2 and cfg.learner.grad_clip == 1.0
    assert cfg.needs_reference == (PAPER[name][0] > 0)
    assert cfg.masked_pass.runs == (PAPER[name][1] > 0)


def test_default_algorithm_is_papo_and_overrides_beat_the_preset():
    cfg = resolve_config(overrides=["algo.gamma=0.01", "algo.beta=0.05"])
    assert cfg.algo.name == "papo" and cfg.algo.gamma == 0.01 and cfg.algo.beta == 0.05
    assert cfg.algo.clip_high == 0.3  # from the preset


def test_yaml_files_merge_in_order_then_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"algo": {"name": "dapo"}, "rollout": {"n": 4, "temperature": 0.7}}))
    b.write_text(yaml.safe_dump({"rollout": {"n": 6}}))
    cfg = resolve_config([a, b], ["rollout.temperature=0.9", "learner.mini_batch_size=384"])
    assert cfg.algo.name == "dapo" and cfg.algo.clip_high == 0.28 and cfg.algo.beta == 0.0
    assert cfg.rollout.n == 6 and cfg.rollout.temperature == 0.9


@pytest.mark.parametrize("name", ["grpo", "dapo"])
@pytest.mark.parametrize("term", ["gamma=0.02", "eta2=0.03"])
def test_baseline_with_a_papo_term_fails(name, term):
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=[f"algo.name={name}", f"algo.{term}"])
    msg = str(e.value)
    assert f"algo.{term.split('=')[0]}" in msg and name in msg and "baseline" in msg


def test_algo_by_preset_tunes_one_preset_and_leaves_the_others_alone(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump(
            {"algo": {"beta": 0.04}, "algo_by_preset": {"papo": {"gamma": 0.01}, "dapo": {"clip_high": 0.25}}}
        )
    )
    papo = resolve_config([f])
    assert papo.algo.gamma == 0.01 and papo.algo.beta == 0.04 and papo.algo.clip_high == 0.3
    grpo = resolve_config([f], ["algo.name=grpo"])  # a baseline again: no PAPO term, no error
    assert grpo.algo.gamma == 0.0 and grpo.algo.beta == 0.04 and not grpo.masked_pass.runs
    assert resolve_config([f], ["algo.name=dapo"]).algo.clip_high == 0.25
    # algo.* given by the user beats the config's per-preset value, which beats the built-in preset.
    assert resolve_config([f], ["algo.gamma=0.03"]).algo.gamma == 0.03
    assert resolve_config([f], ["algo_by_preset.papo.gamma=0.005"]).algo.gamma == 0.005
    assert "algo_by_preset" not in dump_config(papo)  # the resolved config holds the values themselves


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"papoo": {"gamma": 0.01}}, "algo_by_preset.papoo: 'papoo' is not a preset"),
        ({"grpo": {"gamma": 0.01}}, "algo_by_preset.grpo.gamma=0.01 switches on a PAPO term"),
        ({"papo": {"gama": 0.01}}, "algo_by_preset.papo.gama: unknown key; did you mean 'algo_by_preset.papo.gamma'"),
        ({"papo": {"gamma": -1}}, "algo_by_preset.papo.gamma: Input should be greater than or equal to 0"),
        ({"papo": {"name": "grpo"}}, "algo_by_preset.papo.name: an entry applies to its preset"),
        ({"papo": 0.01}, "algo_by_preset.papo: expected a mapping"),
        (3, "algo_by_preset: expected a mapping"),
    ],
)
def test_bad_algo_by_preset_names_the_entry(tmp_path, entry, message):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"algo_by_preset": entry}))
    with pytest.raises(ConfigError) as e:  # even an entry for a preset the job does not use is checked
        resolve_config([f], ["algo.name=dapo"] if "papo" in str(entry) else [])
    assert message in str(e.value), str(e.value)


def test_dynamic_sampling_chunks_may_be_smaller_than_the_batch():
    base = ["algo.dynamic_sampling=true", "rollout.batch_size=32", "learner.mini_batch_size=160"]
    cfg = resolve_config(overrides=[*base, "algo.dynamic_sampling_gen_batch_size=16"])
    assert cfg.algo.dynamic_sampling_gen_batch_size == 16
    with pytest.warns(ConfigWarning, match="no step can fill its batch"):
        resolve_config(overrides=[*base, "algo.dynamic_sampling_gen_batch_size=8", "algo.dynamic_sampling_max_tries=3"])
    with pytest.warns(ConfigWarning, match="no effect without algo.dynamic_sampling"):
        resolve_config(overrides=[*base[1:], "algo.dynamic_sampling_gen_batch_size=96"])
    with pytest.raises(ConfigError, match="dynamic_sampling_gen_batch_size"):
        resolve_config(overrides=[*base, "algo.dynamic_sampling_gen_batch_size=0"])


def test_token_budgets_and_chunk_sizes_are_validated_naming_the_field():
    for field in ("learner.max_tokens_per_micro_batch", "logprob.max_tokens_per_micro_batch"):
        with pytest.raises(ConfigError, match=rf"{field}=4096 is smaller than the longest row.*max_model_len=8192"):
            resolve_config(overrides=[f"{field}=4096"])
        assert resolve_config(overrides=[f"{field}=8192"]) is not None
    for field in ("learner.logits_chunk_size", "logprob.logits_chunk_size"):
        with pytest.raises(ConfigError, match=field.split(".")[1]):
            resolve_config(overrides=[f"{field}=0"])
        assert resolve_config(overrides=[f"{field}=null"]) is not None


def test_baseline_with_diagnostic_is_fine():
    cfg = resolve_config(overrides=["algo.name=grpo", "perception.diagnostic=true"])
    assert cfg.algo.gamma == 0 and cfg.masked_pass.runs


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("algo.gamma=-0.1", "algo.gamma", "0 <= x"),
        ("corruption.prob=1.5", "corruption.prob", "0 <= x <= 1"),
        ("corruption.prob=-0.01", "corruption.prob", "0 <= x <= 1"),
        ("algo.clip_low=1.0", "algo.clip_low", "0 <= x < 1"),
        ("algo.clip_dual=1.0", "algo.clip_dual", "1 < x"),
        ("corruption.patch_size=0", "corruption.patch_size", "1 <= x"),
        ("rollout.n=1", "rollout.n", "2 <= x"),
        ("rollout.top_p=0", "rollout.top_p", "0 < x <= 1"),
        ("learner.zero_stage=4", "learner.zero_stage", "0 <= x <= 3"),
        ("algo.loss_avg=mean", "algo.loss_avg", "'token', 'seq', 'token_global'"),
        ("rollout.n=abc", "rollout.n", "2 <= x"),
        ("perception.masked_logp=gpu", "perception.masked_logp", "'pool', 'learner', 'learner_grad'"),
        ("algo.dynamic_sampling_exhausted=skip", "algo.dynamic_sampling_exhausted", "'error' or 'fill'"),
        ("learner.omp_threads=0", "learner.omp_threads", "1 <= x"),
        ("learner.weight_broadcast_timeout_s=0", "learner.weight_broadcast_timeout_s", "0 < x"),
        ("learner.vision_lr=-1e-3", "learner.vision_lr", "0 < x"),
        ("demo.asset_seed=-1", "demo.asset_seed", "0 <= x"),
        ("demo.family=llava", "demo.family", "'qwen2_5_vl', 'qwen2_vl', 'qwen3_vl', 'qwen3_vl_moe' or 'qwen3_5'"),
        ("model.image_resize=bilinear", "model.image_resize", "'easyr1', 'processor'"),
        ("data.prompt_style=verl", "data.prompt_style", "'easyr1', 'papo'"),
        ("corruption.patch_size=big", "corruption.patch_size", "1 <= x or 'auto'"),
    ],
)
def test_bad_values_name_field_and_range(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=[override])
    line = next(p for p in e.value.problems if p.startswith(field))
    assert allowed in line, line
    assert "got" in line


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=["algo.gama=0.01"])
    assert "algo.gama: unknown key" in str(e.value) and "'algo.gamma'" in str(e.value)
    f = tmp_path / "c.yaml"
    f.write_text("rollouts:\n  n: 4\n")
    with pytest.raises(ConfigError, match="rollouts: unknown key; did you mean 'rollout'"):
        resolve_config([f])


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides=["algo.gamma=-1", "corruption.prob=2", "rollout.n=1"])
    assert len(e.value.problems) == 3


def test_cross_field_checks_name_fields():
    with pytest.raises(ConfigError, match=r"learner.mini_batch_size=100"):
        resolve_config(overrides=["rollout.batch_size=16", "rollout.n=8", "learner.mini_batch_size=100"])
    with pytest.raises(ConfigError, match=r"micro_batch_size \* learner.num_ranks"):
        resolve_config(overrides=["learner.micro_batch_size=7"])
    with pytest.raises(ConfigError, match=r"model.min_pixels=20000 > model.max_pixels=10000"):
        resolve_config(overrides=["model.min_pixels=20000", "model.max_pixels=10000"])
    with pytest.raises(ConfigError, match=r"algo.name: 'ppo' is not a preset"):
        resolve_config(overrides=["algo.name=ppo"])


@pytest.mark.parametrize("bad", ["algo.gamma", "=3", "algo..gamma=1", "algo.gamma=[1"])
def test_malformed_overrides(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_override_into_a_value_fails():
    with pytest.raises(ConfigError, match="algo.gamma is a value, not a section"):
        resolve_config(overrides=["algo.gamma=0.01", "algo.gamma.x=1"])
    with pytest.raises(ConfigError, match="algo.gamma: Input should be a valid number"):
        resolve_config(overrides=["algo.gamma.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config([tmp_path / "missing.yaml"])
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config([f])
    with pytest.raises(ConfigError, match="not a shipped config"):
        named_config("no-such-config")


def test_eta2_without_gradient_warns():
    with pytest.warns(ConfigWarning, match="algo.eta2=0.03 has no effect with perception.masked_logp='pool'"):
        resolve_config(overrides=["algo.name=papo_d"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        cfg = resolve_config(overrides=["algo.name=papo_d", "perception.masked_logp=learner_grad"])
    assert cfg.algo.eta2 == 0.03


def test_pixel_limits_are_one_field():
    fields = [name for name, f in JobConfig.model_fields.items()]
    pixel_fields = [
        f"{sec}.{k}"
        for sec in fields
        for k in getattr(JobConfig.model_fields[sec].annotation, "model_fields", {})
        if "pixels" in k and k in ("min_pixels", "max_pixels")
    ]
    assert pixel_fields == ["model.min_pixels", "model.max_pixels"]


def test_demo_config_resolves_and_round_trips(tmp_path):
    cfg = resolve_config([named_config("demo")])
    assert cfg.algo.name == "papo" and cfg.algo.gamma == 0.01 and cfg.algo.beta == 0.04 and cfg.algo.kl_kind == "k2"
    # The same file runs the baseline (bench/papo_vs_grpo.py, `papo train algo.name=grpo`).
    grpo = resolve_config([named_config("demo")], ["algo.name=grpo"])
    assert grpo.algo.gamma == 0.0 and grpo.algo.beta == 0.04 and grpo.algo.kl_kind == "k2"
    assert cfg.model.max_pixels == 112 * 112
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(cfg))
    assert resolve_config([dumped]) == cfg


def test_presets_cover_every_algo_name():
    assert set(PRESETS) == {"grpo", "dapo", "papo", "papo_d"}


def test_kl_masked_grad_outside_learner_grad_warns():
    with pytest.warns(ConfigWarning, match="algo.perception_kl_masked_grad=true has no effect"):
        resolve_config(overrides=["algo.perception_kl_masked_grad=true"])


def test_annealed_gamma_and_learner_grad_diagnostic_are_refused_for_baselines():
    with pytest.raises(ConfigError, match=r"algo.gamma_end=0.02 \(linear schedule\)"):
        resolve_config(overrides=["algo.name=grpo", "algo.gamma_schedule=linear", "algo.gamma_end=0.02"])
    with pytest.raises(ConfigError, match="diagnostic=true under a baseline needs a no-grad masked pass"):
        resolve_config(
            overrides=["algo.name=dapo", "perception.diagnostic=true", "perception.masked_logp=learner_grad"]
        )


def test_precomputed_masks_need_their_column_and_pool_sizes_are_checked():
    with pytest.raises(ConfigError, match="corruption.strategy=precomputed reads each row's pre-masked images"):
        resolve_config([], ["corruption.strategy=precomputed"])
    cfg = resolve_config(
        [],
        [
            "corruption.strategy=precomputed",
            "data.masked_image_key=images_masked",
            "perception.num_gpus=0.25",
            "corruption.num_cpus=0.5",
        ],
    )
    assert cfg.data.masked_image_key == "images_masked" and cfg.perception.num_gpus == 0.25
    with pytest.raises(ConfigError, match="corruption.num_cpus"):
        resolve_config([], ["corruption.num_cpus=0"])
    with pytest.raises(ConfigError, match="perception.num_cpus"):
        resolve_config([], ["perception.num_cpus=-1"])


def test_weight_transport_fields_reject_bad_values_naming_them():
    with pytest.raises(ConfigError, match=r"learner\.weight_transport.*'cuda_ipc', 'nccl' or 'gloo'"):
        resolve_config(overrides=["learner.weight_transport=mpi"])
    with pytest.raises(ConfigError, match=r"learner\.weight_bucket_mb"):
        resolve_config(overrides=["learner.weight_bucket_mb=0"])
    for transport in ("cuda_ipc", "nccl", "gloo"):
        assert resolve_config(overrides=[f"learner.weight_transport={transport}"]).learner.weight_transport == transport
    for transport in ("cuda_ipc", "nccl"):  # GPU transports on a CPU learner: named, with the way out
        with pytest.raises(
            ConfigError,
            match=rf"learner.weight_transport={transport} moves weights between GPUs, "
            r"but learner.num_gpus=0; use object_store, or gloo",
        ):
            resolve_config(overrides=[f"learner.weight_transport={transport}", "learner.num_gpus=0"])


# --------------------------------------------------------------------------------------------
# The masked-pass plan: whether, where and with gradient
# --------------------------------------------------------------------------------------------

# (preset, perception.masked_logp, perception.diagnostic) -> what runs, written out by hand:
# "-" nothing (no corruption pool, no masked log-probs), "pool" the perception pool (no grad),
# "learner" the learner's no-grad pass after old_logp, "grad" recomputed in the loss with grad,
# "refused" a ConfigError.
MASKED_PLAN = {
    ("grpo", "pool", False): "-",
    ("grpo", "learner", False): "-",
    ("grpo", "learner_grad", False): "-",
    ("grpo", "pool", True): "pool",
    ("grpo", "learner", True): "learner",
    ("grpo", "learner_grad", True): "refused",
    ("dapo", "pool", False): "-",
    ("dapo", "learner", False): "-",
    ("dapo", "learner_grad", False): "-",
    ("dapo", "pool", True): "pool",
    ("dapo", "learner", True): "learner",
    ("dapo", "learner_grad", True): "refused",
    ("papo", "pool", False): "pool",
    ("papo", "learner", False): "learner",
    ("papo", "learner_grad", False): "grad",
    ("papo", "pool", True): "pool",
    ("papo", "learner", True): "learner",
    ("papo", "learner_grad", True): "grad",
    ("papo_d", "pool", False): "pool",
    ("papo_d", "learner", False): "learner",
    ("papo_d", "learner_grad", False): "grad",
    ("papo_d", "pool", True): "pool",
    ("papo_d", "learner", True): "learner",
    ("papo_d", "learner_grad", True): "grad",
}


@pytest.mark.parametrize("preset, placement, diagnostic", sorted(MASKED_PLAN))
def test_masked_pass_plan_of_every_preset_and_placement(preset, placement, diagnostic):
    expected = MASKED_PLAN[(preset, placement, diagnostic)]
    overrides = [f"algo.name={preset}", f"perception.masked_logp={placement}", f"perception.diagnostic={diagnostic}"]
    if expected == "refused":
        with pytest.raises(ConfigError) as err:
            resolve_config(overrides=overrides, warn=False)
        assert "perception.diagnostic=true" in str(err.value) and "perception.masked_logp" in str(err.value)
        return
    plan = resolve_config(overrides=overrides, warn=False).masked_pass
    assert plan == MaskedPass(placement=placement, in_loss=preset.startswith("papo"), diagnostic=diagnostic)
    assert plan.runs == (expected != "-")
    assert (plan.on_pool, plan.on_learner, plan.with_grad) == (
        expected == "pool",
        expected == "learner",
        expected == "grad",
    )
    assert plan.before_update == (expected in ("pool", "learner"))
    # What the preset's loss takes: the batch's no-grad masked_logp, a recompute, or nothing.
    gamma, eta2 = PAPER[preset][1], PAPER[preset][3]
    source = {"-": None, "pool": "batch", "learner": "batch", "grad": "recompute"}[expected]
    assert plan.loss_source(gamma, eta2) == (source if gamma or eta2 else None)


def test_masked_pass_follows_the_schedule_and_the_entropy_term():
    # eta2 alone (gamma 0) needs the pass; a linear schedule that starts at 0 and rises does too.
    eta2_only = resolve_config(overrides=["algo.name=papo_d", "algo.gamma=0", "perception.masked_logp=learner_grad"])
    assert eta2_only.masked_pass.runs and eta2_only.masked_pass.loss_source(0.0, 0.03) == "recompute"
    rising = resolve_config(overrides=["algo.gamma=0", "algo.gamma_schedule=linear", "algo.gamma_end=0.02"])
    assert rising.masked_pass.on_pool
    # a step whose scheduled coefficients are all 0 uses no masked log-probs (measured only if present)
    assert rising.masked_pass.loss_source(0.0, 0.0) is None and rising.masked_pass.loss_source(0.01, 0.0) == "batch"
    # a learner knows only its placement: the step's coefficients decide
    assert MaskedPass("learner_grad").loss_source(0.02, 0.0) == "recompute"
    assert MaskedPass("learner_grad").loss_source(0.0, 0.0) is None
    assert MaskedPass("pool").loss_source(0.0, 0.03) == "batch"
    # "no effect" warnings ask the plan: eta2 and the KL's masked gradient act only with grad
    with pytest.warns(ConfigWarning, match="algo.eta2=0.03 has no effect with perception.masked_logp='learner'"):
        resolve_config(overrides=["algo.name=papo_d", "perception.masked_logp=learner"])


def test_masked_pass_refuses_a_bad_combination_naming_the_fields():
    with pytest.raises(ValueError, match=r"perception.masked_logp: 'gpu' is not a placement; allowed: pool, learner"):
        MaskedPass("gpu")
    with pytest.raises(ValueError, match=r"perception.diagnostic=true under a baseline .* perception.masked_logp"):
        MaskedPass("learner_grad", in_loss=False, diagnostic=True)
    assert MaskedPass("learner_grad", in_loss=True, diagnostic=True).with_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        MaskedPass().placement = "learner"  # type: ignore[misc]


def test_loss_settings_read_every_loss_field_of_the_algo_section():
    """LossSettings.from_algo copies each loss field of AlgoConfig (``loss_avg`` is ``avg``)."""
    names = {"avg": "loss_avg"}
    fields = [f.name for f in dataclasses.fields(LossSettings)]
    assert all(names.get(f, f) in AlgoConfig.model_fields for f in fields)
    values = dict(
        gamma=0.011, beta=0.012, eta1=0.013, eta2=0.014, clip_low=0.15, clip_high=0.25, clip_dual=2.5,
        kl_kind="k2", loss_avg="token_global", perception_kl_kind="abs", perception_top_p=0.3,
        perception_kl_clip=0.7, perception_kl_masked_grad=True,
    )  # fmt: skip
    algo = AlgoConfig(name="papo", **values)
    s = LossSettings.from_algo(algo)
    assert {f: getattr(s, f) for f in fields} == {f: values[names.get(f, f)] for f in fields}
    assert all(getattr(LossSettings(), f) != getattr(s, f) for f in fields)  # each one is really copied
