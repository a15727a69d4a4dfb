"""`papo train` resume and fault handling on the real stack (tiny steps, small assets):

* N steps straight vs N/2 + resume to N: the same prompts, samples and masks (metrics match);
* a rollout worker killed mid-run: Ray restarts it, it re-syncs, the run completes;
* the reward server going away: bounded retries, then `RewardServerError` (never a step on missing
  rewards); a server that is down at start fails before any engine starts;
* SIGTERM: exit 143, engines and the run's own Ray cluster gone, the last checkpoint intact;
* bad model / dataset paths: named, exit 2, before Ray starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainer.core.config import named_config, resolve_config
from trainer.core.metrics import read_metrics

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
    "trainer.tensorboard=false",
    "trainer.plot=false",
]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes

    assets = build_demo_assets(
        tmp_path_factory.mktemp("resume") / "assets",
        seed=0,
        sizes=DatasetSizes(train=64, validation=16, sft=16, sft_eval=16, sft_easy=16),
    )
    return [f"model.path={assets.model_dir}", f"data.train_path={assets.data_dir}", f"data.val_path={assets.data_dir}"]


def config(small_assets, out: Path, *extra: str):
    return resolve_config([named_config("demo")], TINY + small_assets + [f"trainer.output_dir={out}", *extra])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_resume_continues_the_same_run_and_survives_a_killed_rollout_worker(ray_cluster, small_assets, tmp_path):
    from rewards.client import RewardServerError
    from services.reward_server.serve import LocalRewardServer
    from trainer.driver import Trainer
    from trainer.rundir import latest_checkpoint

    ray = ray_cluster
    steps = ["trainer.total_steps=4", "trainer.save_every=2", "trainer.eval_every=0"]
    straight = Trainer(config(small_assets, tmp_path / "a", *steps))
    try:
        straight.run()
    finally:
        straight.close()
    a_rows = {r["step"]: r for r in read_metrics(tmp_path / "a" / "demo" / "metrics.jsonl")}
    half = tmp_path / "a" / "demo" / "checkpoints" / "step_000002"
    assert latest_checkpoint(tmp_path / "a" / "demo").name == "step_000004"
    assert json.loads((half / "trainer_state.json").read_text())["step"] == 2

    # Resume a copy of the run from its middle checkpoint: the run continues in its own folder.
    shutil.copytree(tmp_path / "a" / "demo", tmp_path / "b" / "demo")
    half = tmp_path / "b" / "demo" / "checkpoints" / "step_000002"
    # The resumed run talks to an external reward server (the path other trainers use too), so
    # the test can take it away afterwards. Its output_dir points elsewhere: the run folder comes
    # from the checkpoint.
    with LocalRewardServer(fn="exact", workers=1) as url:
        resumed = Trainer(config(small_assets, tmp_path / "elsewhere", *steps, f"reward.url={url}"), resume=half)
        try:
            assert (resumed.start_step, resumed.version) == (2, 2)
            assert resumed.services.rollout.versions() == [2]
            old_pid = resumed.services.rollout.worker_info()[0]["pid"]
            step = resumed.step

            def step_then_kill(n: int) -> dict:
                out = step(n)
                if n == 3:  # the next generate call finds the worker dead
                    ray.kill(resumed.services.rollout.actors[0], no_restart=False)
                return out

            resumed.step = step_then_kill
            summary = resumed.run()
            assert resumed.services.rollout.worker_info()[0]["pid"] != old_pid
            assert resumed.services.rollout.resubmissions >= 1
            assert summary["best"]["step"] is None  # no eval ran (eval_every=0), so no best checkpoint
        except BaseException:
            resumed.close()
            raise
    # Reward server gone: bounded retries, then a clear error; the step trains nothing.
    try:
        with pytest.raises(RewardServerError, match="failed after 4 attempts"):
            resumed.step(5)
    finally:
        resumed.close()

    assert resumed.run_dir == tmp_path / "b" / "demo" and not (tmp_path / "elsewhere").exists()
    rows = read_metrics(tmp_path / "b" / "demo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # steps 3-4 were dropped, then redone once
    b_rows = {r["step"]: r for r in rows}
    for s in (3, 4):
        a, b = a_rows[s], b_rows[s]
        # Same prompts and samples (seeded per step, same weights after the restore) ...
        assert b["train/reward"] == a["train/reward"] and b["train/response_length"] == a["train/response_length"]
        assert b["train/epoch"] == a["train/epoch"] and b["train/weight_version"] == a["train/weight_version"]
        # ... same masks and optimiser state (the losses follow from all of them).
        for key in ("train/perception_kl", "train/pg_loss", "train/ref_kl", "train/entropy", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
def test_reward_server_down_at_start_fails_before_engines_start(ray_cluster, small_assets, tmp_path, capsys):
    from trainer.driver import train

    url = f"http://127.0.0.1:{free_port()}"
    t = time.monotonic()
    assert train(config(small_assets, tmp_path, f"reward.url={url}", "trainer.total_steps=1")) == 1
    err = capsys.readouterr().err
    assert f"GET {url}/healthz failed after 4 attempts" in err and "reward server failed" in err
    assert time.monotonic() - t < 30  # no vLLM engine was started


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for p in pids:
        try:
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.slow
def test_sigterm_shuts_down_cleanly_and_keeps_the_last_checkpoint(small_assets, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own cluster, not the session's
    cmd = [
        sys.executable,
        "-m",
        "trainer.cli",
        "train",
        *TINY,
        *small_assets,
        f"trainer.output_dir={tmp_path}",
        "trainer.total_steps=200",
        "trainer.save_every=1",
        "trainer.eval_every=0",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    run = tmp_path / "demo"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            ckpts = [d for d in (run / "checkpoints").glob("step_*")] if (run / "checkpoints").exists() else []
            if any(d.name >= "step_000002" for d in ckpts):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        family = _children(proc.pid)
        assert family, "the run should have started Ray processes"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: shutting down" in err
    deadline = time.monotonic() + 30
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(family), f"processes outlived the run: {_alive(family)}"
    # The newest checkpoint is complete and resumable (saves are atomic).
    from trainer.rundir import latest_checkpoint

    last = latest_checkpoint(run)
    assert (last / "papo_checkpoint.json").is_file() and (last / "model.safetensors").is_file()
    done = json.loads((last / "trainer_state.json").read_text())["step"]

    # `papo train --resume RUN` continues it with the run's own config.yaml (overrides on top).
    cmd = [sys.executable, "-m", "trainer.cli", "train", "--resume", str(run), f"trainer.total_steps={done + 1}"]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    assert steps == list(range(done + 2)), steps  # no gap, no duplicate
    # Resuming a finished run says what to do, before any engine starts.
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nothing left to train" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    "override,needle",
    [
        ("model.path=/nonexistent/model", "model.path=/nonexistent/model: no such model folder"),
        ("data.train_path=/nonexistent/data", "/nonexistent/data"),
    ],
)
def test_bad_paths_fail_before_ray_starts(small_assets, tmp_path, override, needle):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "trainer.cli",
        "train",
        *TINY,
        *small_assets,
        override,
        f"trainer.output_dir={tmp_path}",
    ]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert needle in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
    shutil.rmtree(tmp_path, ignore_errors=True)
