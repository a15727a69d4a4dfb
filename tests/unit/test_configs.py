"""Every shipped config resolves, and the paper configs carry docs/algorithm.md's hyperparameters.

The expected values are written out here from docs/algorithm.md ("Defaults", "Presets") and the authors'
EasyR1 scripts, independently of the YAML files, so a drifting file fails a test.
"""

from __future__ import annotations

import warnings

import pytest

from trainer.core.config import ConfigError, ConfigWarning, configs_dir, named_config, resolve_config, shipped_configs
from trainer.core.data import load_prompt_template, looks_like_hub_id

MODELS = {
    "qwen2_5_vl_3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2_5_vl_7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "qwen3_vl_2b": "Qwen/Qwen3-VL-2B-Instruct",  # untested on GPUs (the files say so)
    "qwen3_vl_8b": "Qwen/Qwen3-VL-8B-Instruct",
}
ALGOS = ("grpo", "papo", "dapo", "papo_d")
GPUS = (2, 4, 8)

# docs/algorithm.md "Presets":  beta  gamma  eta1  eta2  clip_low clip_high dual  dynamic sampling
PRESET = {
    "grpo": (0.01, 0.0, 0.0, 0.0, 0.2, 0.3, 3.0, False),
    "papo": (0.01, 0.02, 0.0, 0.0, 0.2, 0.3, 3.0, False),
    "dapo": (0.0, 0.0, 0.0, 0.0, 0.2, 0.28, 3.0, True),
    "papo_d": (0.0, 0.01, 0.03, 0.03, 0.2, 0.28, 3.0, True),
}

#: docs/algorithm.md "prompt": the question, then this sentence.
PAPER_PROMPT = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)

#: What a config may warn about: only the documented eta2 note of papo_d (the official default
#: computes the masked log-probs without gradient, docs/algorithm.md).
ALLOWED_WARNING = "algo.eta2=0.03 has no effect with perception.masked_logp='pool'"


def _resolve(*names: str, overrides: tuple[str, ...] = ()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = resolve_config([named_config(n) for n in names], list(overrides))
    return cfg, [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]


def test_every_shipped_file_resolves_on_its_own() -> None:
    names = shipped_configs()
    assert "demo" in names and {f"paper/{m}" for m in MODELS} <= set(names)
    assert len(names) == 1 + 4 + 4 + 12  # demo, 4 model files, 4 algorithm and 12 GPU overlays
    for model in MODELS:
        if model.startswith("qwen3_vl"):
            for suffix in ("", "_gpus2", "_gpus4", "_gpus8"):
                assert named_config(f"paper/{model}{suffix}").read_text().startswith("# UNTESTED on GPUs")
    for name in names:
        cfg, warned = _resolve(name)
        assert all(ALLOWED_WARNING in w for w in warned), (name, warned)
        assert named_config(name) == configs_dir() / f"{name}.yaml"


@pytest.mark.parametrize("gpus", GPUS)
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("model", sorted(MODELS))
def test_paper_combination_resolves_to_paper_values(model: str, algo: str, gpus: int) -> None:
    cfg, warned = _resolve(f"paper/{model}", f"paper/{algo}", f"paper/{model}_gpus{gpus}")
    if algo == "papo_d":
        assert len(warned) == 1 and ALLOWED_WARNING in warned[0]
    else:
        assert warned == []

    a = cfg.algo
    assert a.name == algo
    assert (a.beta, a.gamma, a.eta1, a.eta2, a.clip_low, a.clip_high, a.clip_dual, a.dynamic_sampling) == PRESET[algo]
    assert a.loss_avg == "token" and a.kl_kind == a.perception_kl_kind == "low_var_kl"
    if a.dynamic_sampling:
        assert (a.dynamic_sampling_acc_low, a.dynamic_sampling_acc_high, a.dynamic_sampling_max_tries) == (
            0.01,
            0.99,
            20,
        )
    assert cfg.perception.masked_logp == "pool"  # the official placement: no gradient, pre-update weights

    # Model: the hub id (never downloaded by resolving) and the authors' pixel limits.
    assert cfg.model.path == MODELS[model] and cfg.model.dtype == "bfloat16"
    assert (cfg.model.min_pixels, cfg.model.max_pixels) == (256 * 28 * 28, 1280 * 28 * 28)
    # Rollout: n = 5, temperature 1.0, top_p 0.99, 2048-token responses, 384 prompts per step.
    r = cfg.rollout
    assert (r.n, r.temperature, r.top_p, r.max_tokens, r.batch_size) == (5, 1.0, 0.99, 2048, 384)
    assert r.max_model_len >= 4096 + 2048
    # Optimiser: AdamW lr 1e-6 constant, wd 1e-2, clip 1.0, 1 PPO epoch, 128 prompts per step,
    # the vision tower trained.
    lr = cfg.learner
    assert (lr.lr, lr.lr_scheduler, lr.warmup_steps, lr.weight_decay, lr.grad_clip, lr.ppo_epochs) == (
        1e-6,
        "constant",
        0,
        1e-2,
        1.0,
        1,
    )
    assert lr.mini_batch_size == 128 * r.n and not lr.freeze_vision_tower
    # Mask and reward.
    assert (cfg.corruption.strategy, cfg.corruption.patch_size, cfg.corruption.prob) == ("patch_blackening", 14, 0.6)
    assert (cfg.reward.fn, cfg.reward.format_weight) == ("math", 0.1)
    # Data: the authors' train/val sets, their prompt, overlong prompts filtered at 4096 tokens.
    d = cfg.data
    assert (d.train_path, d.val_path) == ("PAPOGalaxy/PAPO_ViRL39K_train", "PAPOGalaxy/PAPO_MMK12_test")
    assert looks_like_hub_id(d.train_path) and looks_like_hub_id(d.val_path)
    assert d.prompt_template == "papo_math" and d.format_prompt is None and d.max_prompt_length == 4096
    assert d.prompt_style == "easyr1" and cfg.model.image_resize == "easyr1"  # as the authors (EasyR1)
    assert load_prompt_template(d.prompt_template, strip=True).render(content="<image>How many? ") == (
        f"<image>How many?\n\n{PAPER_PROMPT}"
    )
    # Length: 2 epochs of ViRL39K's 38,870 prompts at 384 per step; runs of different
    # algorithms and models get different directories.
    assert cfg.trainer.total_steps == 2 * (38870 // 384)
    assert (cfg.trainer.output_dir, cfg.trainer.name) == (f"runs/{model}", algo)

    # Resources: the layout fills exactly the GPUs it names when every pool exists (papo); a run
    # without a reference model (or a masked pass) leaves that pool's share idle, never asks for more.
    layout = {
        "learner": lr.num_ranks * lr.num_gpus,
        "rollout": r.num_workers * r.num_gpus,
        "perception": cfg.perception.num_workers * cfg.logprob.num_gpus,
        "reference": cfg.logprob.reference_workers * cfg.logprob.num_gpus,
    }
    assert sum(layout.values()) == gpus, layout
    used = sum(
        v
        for k, v in layout.items()
        if k not in ("perception", "reference")
        or (cfg.masked_pass.on_pool if k == "perception" else cfg.needs_reference)
    )
    assert used <= gpus
    shares = [
        (r.num_gpus, r.num_workers),
        (cfg.logprob.num_gpus, cfg.perception.num_workers),
        (cfg.logprob.num_gpus, cfg.logprob.reference_workers),
    ]
    assert sum(g * n for g, n in shares if g < 1) % 1 == 0  # the fractional pools share whole cards
    assert lr.num_gpus == 1 and r.tensor_parallel_size == 1
    assert lr.mini_batch_size % (lr.micro_batch_size * lr.num_ranks) == 0


def test_resources_overlays_differ_only_in_placement() -> None:
    """A GPU overlay changes where pools run, never what is learned."""
    base, _ = _resolve("paper/qwen2_5_vl_7b", "paper/papo")
    placement = {
        "rollout": {"num_workers", "num_gpus", "gpu_memory_utilization"},
        "learner": {"num_ranks", "num_gpus", "zero_stage", "cpu_offload"},
        "logprob": {"num_gpus", "micro_batch_size", "max_tokens_per_micro_batch", "reference_workers"},
        "perception": {"num_workers"},
    }
    for gpus in GPUS:
        cfg, _ = _resolve("paper/qwen2_5_vl_7b", "paper/papo", f"paper/qwen2_5_vl_7b_gpus{gpus}")
        a, b = base.model_dump(), cfg.model_dump()
        for section, fields in placement.items():
            for f in fields:
                a[section].pop(f), b[section].pop(f)
        assert a == b, gpus


def test_algorithm_overlay_cannot_be_contradicted_silently() -> None:
    # The presets' guard still holds on top of the paper files: a baseline cannot run PAPO.
    with pytest.raises(ConfigError, match="baseline"):
        _resolve("paper/qwen2_5_vl_3b", "paper/grpo", overrides=("algo.gamma=0.02",))


def test_unknown_shipped_name_lists_the_paper_configs() -> None:
    with pytest.raises(ConfigError) as err:
        named_config("paper/qwen2_5_vl_9b")
    assert "paper/qwen2_5_vl_7b" in str(err.value) and "demo" in str(err.value)
