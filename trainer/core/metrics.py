"""Run metrics: one JSON line per step, TensorBoard scalars, PNG curves, and the step line with ETA.

Owns the run directory's ``metrics.jsonl`` (one object per logged step: ``{"step": k,
"time": unix seconds, "<group>/<name>": value, ...}``), its TensorBoard events and ``curves.png``.
Keys are ``group/name`` (``train/reward``, ``timing/gen``, ``eval/accuracy``...); the driver
decides which. Non-finite values are written as JSON ``null`` (strict JSON has no NaN) and
counted, so a reader never chokes on a diverged run and the divergence stays visible.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
DEFAULT_CURVES = ("train/reward", "eval/accuracy", "train/perception_kl", "train/entropy")


def _scalar(value: Any) -> float | None:
    """A finite float, or None for NaN/inf; raises TypeError for non-numbers."""
    if hasattr(value, "item"):  # 0-dim tensors and numpy scalars
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"metric values must be numbers, got {type(value).__name__}")
    value = float(value)
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends step metrics to ``run_dir/metrics.jsonl`` and (optionally) TensorBoard."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, append: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.non_finite = 0
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        # A new run truncates (one run per file); appending is for continuing the same run.
        self._fh = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float | None]:
        """Write one step; returns what was written (None where a value was not finite)."""
        row: dict[str, float | None] = {}
        for key, value in metrics.items():
            if key in ("step", "time"):
                raise ValueError(f"metric key {key!r} is reserved")
            v = _scalar(value)
            if v is None:
                self.non_finite += 1
            row[key] = v
        self._fh.write(json.dumps({"step": int(step), "time": time.time(), **row}, allow_nan=False) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, v in row.items():
                if v is not None:
                    self._tb.add_scalar(key, v, global_step=int(step))
        return row

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (a torn last line from a killed run is ignored)."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return rows


def plot_curves(metrics_path: str | Path, out_png: str | Path, keys: Sequence[str] = DEFAULT_CURVES) -> list[str]:
    """Draw each key that the run logged against step, one panel per key; returns the keys drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    present = [k for k in keys if any(r.get(k) is not None for r in rows)]
    if not present:
        raise ValueError(f"none of {list(keys)} was logged in {metrics_path}")
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3), squeeze=False)
    for ax, key in zip(axes[0], present):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return present


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class StepLine:
    """``step 12/250 | train/reward 0.531 | ... | 0.84 s/step | ETA 3m20s``.

    The rate is the mean over the steps since the first one (the first includes start-up and
    would skew the ETA).
    """

    def __init__(self, total_steps: int, keys: Sequence[str] = (), clock=time.monotonic):
        self.total = total_steps
        self.keys = tuple(keys)
        self._clock = clock
        self._first: tuple[int, float] | None = None

    def __call__(self, step: int, metrics: Mapping[str, Any]) -> str:
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        parts = [f"step {step}/{self.total}"]
        for k in self.keys:
            v = metrics.get(k)
            if v is not None:
                parts.append(f"{k} {float(v):.3g}")
        done = step - self._first[0]
        if done > 0:
            rate = (now - self._first[1]) / done
            parts.append(f"{rate:.2f} s/step")
            parts.append(f"ETA {format_duration(rate * (self.total - step))}")
        return " | ".join(parts)
