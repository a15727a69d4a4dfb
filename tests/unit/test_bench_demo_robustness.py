"""The demo's acceptance criteria as bench/demo_robustness.py judges a run (docs/demo.md): the best
checkpoint gains at least the threshold, black images stay near chance, masked images stay clearly
below real ones; a missing number fails rather than passes."""

from __future__ import annotations

import pytest

from bench.demo_robustness import judge, summarise

RUN = {"start_accuracy": 0.50, "best_accuracy": 0.80, "best_black_accuracy": 0.17, "best_masked_accuracy": 0.55}


def test_a_run_that_learns_from_the_image_passes() -> None:
    verdict = judge(RUN, min_gain=0.25)
    assert verdict["passed"] and verdict["gain_best"] == pytest.approx(0.30)


@pytest.mark.parametrize(
    "change, failed",
    [
        ({"best_accuracy": 0.70}, "gain"),  # +0.20 < +0.25
        ({"best_black_accuracy": 0.30}, "black_near_chance"),  # more than 0.1 above 1/6
        ({"best_masked_accuracy": 0.75}, "masked_below_real"),  # within 0.1 of the real images
        ({"best_masked_accuracy": None}, "masked_below_real"),  # not measured is not a pass
    ],
)
def test_each_criterion_fails_on_its_own(change: dict, failed: str) -> None:
    verdict = judge({**RUN, **change}, min_gain=0.25)
    assert not verdict["passed"] and [k for k, ok in verdict["checks"].items() if not ok] == [failed]


def test_the_summary_counts_failed_runs_and_reports_the_worst() -> None:
    runs = [
        {"algo": "papo", **RUN, **judge(RUN, 0.25)},
        {"algo": "papo", **RUN, "best_accuracy": 0.6, **judge({**RUN, "best_accuracy": 0.6}, 0.25)},
        {"algo": "papo", "error": "RuntimeError: boom", "passed": False},
    ]
    s = summarise(runs, ["papo"])["papo"]
    assert (s["runs"], s["passed"]) == (3, 1)
    assert s["gain_best"]["worst"] == pytest.approx(0.10) and s["best_accuracy"]["worst"] == pytest.approx(0.6)
