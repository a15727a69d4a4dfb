"""What every benchmark records about the machine it ran on, and its warning for a shared one."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any


def machine_info() -> dict[str, Any]:
    """Platform, CPU count, load average and device: the context a benchmark's numbers are read in."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "cpu_model": _cpu_model(),
    }


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def warn_if_loaded(when: str, consequence: str) -> str | None:
    """Print and return a warning when the 1-minute load average exceeds the core count (other
    processes share the machine: ``consequence`` says what that does to this benchmark)."""
    load1, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load1 > cpus:
        msg = f"WARNING ({when}): 1-min load average {load1:.1f} > {cpus} CPUs: the machine is shared, {consequence}"
        print(msg, flush=True)
        return msg
    return None


def write_report(path: str | os.PathLike[str], report: dict[str, Any]) -> Path:
    """Write a benchmark's JSON report (parents created), say where, and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return out
