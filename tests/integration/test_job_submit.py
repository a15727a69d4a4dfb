"""`papo submit` for real: a separate `ray start --head` cluster with token auth on its own ports,
the tiny 2-step run submitted as a Ray job and followed to SUCCEEDED, then the run directory the
job wrote.

The cluster is this module's own (not the session's ``ray.init()`` one) and only it is stopped:
``ray stop`` kills every Ray process on the machine, so the teardown instead terminates the
``ray start --block`` process (which shuts its node down) and then every process that carries
this cluster's marker in its environment (the job's driver runs in a session of its own, and
vLLM engine processes would otherwise outlive it), and checks that none remain.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from trainer.core.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(540)]

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
    "trainer.plot=false",
]
MARKER = "PAPO_TEST_RAY_CLUSTER"
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_port_range(size: int) -> int:
    """A base port whose next ``size`` ports are free now, away from Ray's default 10002-19999
    worker range (which the session's ``ray.init()`` cluster uses)."""
    for _ in range(50):
        base = random.randrange(20000, 30000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {size} consecutive free ports in 20000-30000")


def _cluster_processes(marker_value: str) -> list[psutil.Process]:
    """Every live process whose environment carries this cluster's marker (inherited by all its
    Ray processes, workers and job drivers, even ones started in sessions of their own)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker_value and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class RayHead:
    """One `ray start --head --block` cluster with its own ports, temp dir and auth token."""

    def __init__(self, num_cpus: int = 4):
        # Short path: Ray's Unix sockets live under the temp dir (AF_UNIX paths max 107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="papo-rt-", dir="/tmp"))
        self.token_file = self.temp_dir / "auth_token"
        self.token_file.write_text(secrets.token_hex(16))
        self.token_file.chmod(0o600)
        self.marker = uuid.uuid4().hex
        self.gcs_port, self.dashboard_port = _free_port(), _free_port()
        worker_base = _free_port_range(200)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = dict(os.environ)
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            self.env.pop(var, None)
        self.env.update(
            {
                MARKER: self.marker,
                "RAY_AUTH_MODE": "token",
                # Its own token file: never generate or read the user's ~/.ray/auth_token.
                "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                # The job's entrypoint runs `papo`: the cluster's nodes must find this environment's.
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "RAY_USAGE_STATS_ENABLED": "0",
            }
        )
        ray_cli = str(Path(sys.executable).parent / "ray")
        cmd = [
            ray_cli,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            "--node-ip-address=127.0.0.1",
            f"--port={self.gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--dashboard-agent-grpc-port={_free_port()}",
            f"--runtime-env-agent-port={_free_port()}",
            f"--metrics-export-port={_free_port()}",
            f"--node-manager-port={_free_port()}",
            f"--object-manager-port={_free_port()}",
            f"--min-worker-port={worker_base}",
            f"--max-worker-port={worker_base + 199}",
            "--object-store-memory=1000000000",
        ]
        self.log = open(self.temp_dir / "ray-start.log", "wb")
        # Its own session: a signal to the test's process group does not reach it, and back.
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.temp_dir
        )

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        headers = {"Authorization": f"Bearer {self.token_file.read_text()}"}
        deadline, last = time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                r = httpx.get(f"{self.address}/api/version", headers=headers, timeout=5)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                last = e
            time.sleep(1)
        raise RuntimeError(
            f"the job API at {self.address} did not answer in {timeout_s:.0f} s ({last}):\n{self.log_text()}"
        )

    def log_text(self) -> str:
        self.log.flush()
        return (self.temp_dir / "ray-start.log").read_text(errors="replace")[-4000:]

    def stop(self, grace_s: float = 20.0) -> list[str]:
        """Stop this cluster only; return descriptions of processes that survived (should be none)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on exit
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        leftovers = _cluster_processes(self.marker)
        for p in leftovers:
            with _suppress():
                p.terminate()
        _, alive = psutil.wait_procs(leftovers, timeout=10)
        for p in alive:
            with _suppress():
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        self.log.close()
        survivors = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in _cluster_processes(self.marker)]
        if not survivors:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        return exc_type is not None and issubclass(exc_type, psutil.Error)


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead()
    try:
        head.wait_ready()
        yield head
    finally:
        survivors = head.stop()
        assert not survivors, f"processes of the test cluster survived its teardown: {survivors}"


@pytest.fixture(scope="module")
def small_assets(tmp_path_factory):
    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes

    assets = build_demo_assets(
        tmp_path_factory.mktemp("submit") / "assets",
        seed=0,
        sizes=DatasetSizes(train=64, validation=16, sft=16, sft_eval=16, sft_easy=16),
    )
    return [f"model.path={assets.model_dir}", f"data.train_path={assets.data_dir}", f"data.val_path={assets.data_dir}"]


def _submit(head: RayHead, *args: str, token: bool = True, timeout: float = 480) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    auth = ["--token-file", str(head.token_file)] if token else []
    cmd = [sys.executable, "-m", "trainer.cli", "submit", "--address", head.address, *auth, *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_submit_without_token_is_refused_naming_the_address(ray_head):
    r = _submit(ray_head, "trainer.total_steps=1", token=False, timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert ray_head.address in r.stderr and "token" in r.stderr, r.stderr


def test_submit_with_a_wrong_token_is_refused(ray_head, tmp_path):
    bad = tmp_path / "bad_token"
    bad.write_text("not-the-token")
    r = _submit(ray_head, "--token-file", str(bad), "trainer.total_steps=1", token=False, timeout=60)
    assert r.returncode == 2 and ray_head.address in r.stderr, r.stdout + r.stderr


def test_two_step_demo_job_succeeds_and_writes_its_run(ray_head, small_assets, tmp_path):
    out = tmp_path / "runs"
    t0 = time.monotonic()
    r = _submit(
        ray_head,
        "--wait",
        "--poll",
        "1",
        "--timeout",
        "420",
        "--submission-id",
        "papo-submit-test",
        "--env",
        "OMP_NUM_THREADS=1",
        *TINY,
        *small_assets,
        f"trainer.output_dir={out}",
        "trainer.name=submitted",
    )
    took = time.monotonic() - t0
    assert r.returncode == 0, f"papo submit exited {r.returncode} after {took:.0f} s\n{r.stdout}\n{r.stderr}"
    assert "job papo-submit-test submitted" in r.stdout and "SUCCEEDED" in r.stdout, r.stdout
    # The job ran the uploaded working_dir, not only this checkout's installed code.
    # connect() ignores $RAY_ADDRESS, which the session's in-process ray.init() cluster may have set.
    from trainer.submit import connect

    client = connect(ray_head.address, ray_head.token_file.read_text())
    info = client.get_job_info("papo-submit-test")
    assert str(info.status) == "SUCCEEDED"
    assert info.runtime_env.get("working_dir", "").startswith("gcs://"), info.runtime_env
    assert info.metadata.get("papo.run") == "submitted"

    run = out / "submitted"
    assert (run / "config.yaml").is_file(), sorted(p.name for p in out.glob("**/*"))
    rows = read_metrics(run / "metrics.jsonl")
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["train/reward"] is not None for row in rows[1:])
    # The shipped config is what ran: the overrides arrived.
    assert "total_steps: 2" in (run / "config.yaml").read_text()


def test_failed_job_exits_1_with_the_log_tail(ray_head, tmp_path):
    missing = tmp_path / "no-such-model"
    r = _submit(
        ray_head,
        "--wait",
        "--poll",
        "1",
        "--timeout",
        "120",
        "--no-upload",
        "--tail",
        "20",
        "trainer.total_steps=1",
        f"model.path={missing}",
        f"data.train_path={missing}",
        f"trainer.output_dir={tmp_path}",
        timeout=180,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED" in r.stderr and "last 20 log lines" in r.stderr, r.stderr
    assert str(missing) in r.stderr, r.stderr
