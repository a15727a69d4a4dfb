"""The `papo` command line: help, --print-config, errors that name the field."""

from __future__ import annotations

import subprocess
import sys

import yaml

from trainer.core.config import resolve_config


def run_papo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_the_commands():
    out = run_papo("--help")
    assert out.returncode == 0
    for command in ("train", "eval", "reward-server", "demo-assets"):
        assert command in out.stdout


def test_print_config_prints_the_resolved_config(tmp_path):
    out = run_papo("train", "--print-config", "algo.name=dapo", "rollout.temperature=0.7")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["algo"]["name"] == "dapo" and printed["algo"]["clip_high"] == 0.28
    assert printed["rollout"]["temperature"] == 0.7
    # What is printed is a complete config: it resolves back to the same job.
    f = tmp_path / "printed.yaml"
    f.write_text(out.stdout)
    assert resolve_config([f]).model_dump(mode="json") == printed


def test_bad_override_exits_2_naming_the_field():
    out = run_papo("train", "--print-config", "corruption.prob=3")
    assert out.returncode == 2
    assert "corruption.prob" in out.stderr and "0 <= x <= 1" in out.stderr
    assert "Traceback" not in out.stderr


def test_overrides_may_stand_between_options():
    out = run_papo("train", "rollout.n=16", "--config", "demo", "algo.gamma=0.01", "--print-config")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["rollout"]["n"] == 16 and printed["algo"]["gamma"] == 0.01
    bad = run_papo("train", "--print-config", "--no-such-flag")
    assert bad.returncode == 2 and "unrecognized arguments: --no-such-flag" in bad.stderr
