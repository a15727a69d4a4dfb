"""The environment `make` builds is exactly the one pinned in requirements/cpu.txt, and it works."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

PINS = Path(__file__).resolve().parents[2] / "requirements" / "cpu.txt"


def pinned() -> dict[str, str]:
    out = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==([^\s;]+)", line)
        assert m, f"requirements/cpu.txt: {line!r} is not an exact pin (name==version)"
        out[m.group(1)] = m.group(3)
    return out


def test_every_pin_is_installed_at_its_version():
    wrong = {}
    for name, version in pinned().items():
        installed = md.version(name)
        if installed.split("+")[0] != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements/cpu.txt: {wrong}"


def test_torch_is_the_cpu_build_and_cuda_only_wheels_are_gone():
    import torch

    assert torch.__version__.endswith("+cpu")
    for mod in ("torchaudio", "torchcodec"):
        assert importlib.util.find_spec(mod) is None, f"{mod} (CUDA-linked) should have been uninstalled"


def test_torchvision_transforms_import_beside_cpu_torch():
    # In a fresh interpreter: the failure mode is an import-time RuntimeError.
    code = "import torchvision.transforms.v2 as T, torch; print(T.Resize(8)(torch.zeros(3, 16, 16)).shape)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([3, 8, 8])" in out.stdout


@pytest.mark.parametrize("module", ["vllm", "deepspeed", "ray", "math_verify", "trainer", "services", "rewards"])
def test_stack_modules_import(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]


def test_papo_console_script_is_on_the_venv():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "papo"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "demo-assets" in out.stdout
