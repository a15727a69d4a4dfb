"""Run metrics: JSONL rows, TensorBoard events, PNG curves, the step line's ETA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from trainer.core.metrics import MetricsWriter, StepLine, format_duration, plot_curves, read_metrics


def test_jsonl_rows_and_non_finite_values(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"train/reward": 0.5, "train/pg_loss": torch.tensor(0.25)})
        w.log(2, {"train/reward": float("nan"), "train/pg_loss": math.inf})
        assert w.non_finite == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON: no NaN tokens
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["train/reward"] == 0.5 and rows[0]["train/pg_loss"] == 0.25
    assert rows[1]["train/reward"] is None and rows[1]["train/pg_loss"] is None


def test_bad_values_and_reserved_keys_are_refused(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        with pytest.raises(TypeError, match="must be numbers"):
            w.log(1, {"train/reward": "high"})
        with pytest.raises(ValueError, match="reserved"):
            w.log(1, {"step": 3})


def test_append_survives_a_torn_last_line(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"a/b": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "a/b"')  # a run killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1]


def test_tensorboard_events_hold_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        for step in range(3):
            w.log(step, {"train/reward": step / 2})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/reward")] == [(0, 0.0), (1, 0.5), (2, 1.0)]


def test_plot_curves_draws_the_logged_keys(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(5):
            w.log(step, {"train/reward": step * 0.1, "train/entropy": 1 - step * 0.1})
    drawn = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert drawn == ["train/reward", "train/entropy"]
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=["eval/accuracy"])


def test_step_line_eta_uses_steps_after_the_first():
    t = iter([100.0, 130.0, 132.0, 134.0])  # the first step took 30 s of start-up
    line = StepLine(10, keys=["train/reward"], clock=lambda: next(t))
    assert line(1, {"train/reward": 0.25}) == "step 1/10 | train/reward 0.25"
    line(2, {})
    line(3, {})
    assert line(4, {}).endswith("| 11.33 s/step | ETA 1m08s")
    assert format_duration(3725) == "1h02m05s"
