"""Driver memory (RSS) over a training run: does the driver hold on to anything per step?

docs/design.md asks that the driver's memory not grow with n or with steps (images travel as ObjectRefs
put once per prompt; batches live in the object store). This runs ``Trainer.run()`` (the real loop:
steps, periodic eval, metrics writer) for ``--steps`` steps of a tiny job (4 prompts x n=4 x 8
tokens by default, so the step count, not the batch size, is what is stressed) and reads the
driver's RSS that the driver logs every step (``perf/driver_rss_mb`` in ``metrics.jsonl``).

Reported: RSS at the first and last step, the maximum, and the slope in MB per 100 steps by least
squares over the second half of the steps (the first half includes one-off growth: lazy imports,
allocator pools, the first evals' caches). Verdict: **flat** when that slope is below
``--threshold`` (default 5 MB per 100 steps, about half a percent of a ~1 GB driver: a leak of even
one small batch per step exceeds it), otherwise **growing**. Prints a table (RSS every
``--every`` steps) and writes JSON (default ``bench/results/driver_memory.json``) with every
step's RSS, the CPU count and the load average. Exits 1 when the verdict is "growing".

Run (defaults: 100 steps, eval every 25 on 16 validation prompts; about 5-6 minutes on a quiet
2-core machine, service start-up included)::

    .venv/bin/python bench/driver_memory.py
    .venv/bin/python bench/driver_memory.py --steps 20       # a quick check (slope is then noise)
    .venv/bin/python bench/driver_memory.py --no-tiny --set rollout.batch_size=8   # other sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_info, write_report  # noqa: E402
from bench._common import warn_if_loaded as _warn_if_loaded  # noqa: E402

# The tiny job of the end-to-end tests: many cheap steps.
TINY = [
    "rollout.batch_size=4",
    "rollout.n=4",
    "rollout.max_tokens=8",
    "learner.mini_batch_size=16",
    "learner.micro_batch_size=8",
    "logprob.micro_batch_size=16",
    "data.val_size=16",
]
RSS_KEY = "perf/driver_rss_mb"


def warn_if_loaded(when: str) -> str | None:
    return _warn_if_loaded(when, "the run is slow")


def slope_per_100(steps: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against ``steps``, in units per 100 steps."""
    n = len(steps)
    if n < 2:
        return 0.0
    mx, my = sum(steps) / n, sum(values) / n
    sxx = sum((x - mx) ** 2 for x in steps)
    sxy = sum((x - mx) * (y - my) for x, y in zip(steps, values))
    return 100.0 * sxy / sxx if sxx else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    ap.add_argument("--algo", default="papo", help="algo.name preset (default: %(default)s: every service runs)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=25, help="0 = no periodic eval (default: %(default)s)")
    ap.add_argument("--no-tiny", dest="tiny", action="store_false", help="keep the config's batch sizes")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted config override (repeatable)",
    )
    ap.add_argument(
        "--threshold",
        type=float,
        default=5.0,
        help="MB per 100 steps under which the second-half slope counts as flat (default: %(default)s)",
    )
    ap.add_argument("--every", type=int, default=10, help="print the RSS every this many steps")
    ap.add_argument("--ray-cpus", type=float, default=4)
    ap.add_argument("--run-dir", default=None, help="where the run folder goes (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "driver_memory.json"))
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be >= 2")

    import ray

    from trainer.core.config import named_config, resolve_config
    from trainer.core.metrics import read_metrics
    from trainer.driver import Trainer

    machine = machine_info()
    warnings = [w for w in [warn_if_loaded("start")] if w]
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="papo-driver-memory-") as tmp:
            out_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
            overrides = (
                (TINY if args.tiny else [])
                + [f"algo.name={args.algo}"]
                + args.overrides
                + [
                    f"trainer.output_dir={out_dir}",
                    "trainer.name=driver_memory",
                    f"trainer.total_steps={args.steps}",
                    f"trainer.eval_every={args.eval_every}",
                    "trainer.save_every=0",
                    "trainer.plot=false",
                ]
            )
            cfg = resolve_config([named_config(args.config)], overrides)
            t0 = time.perf_counter()
            trainer = Trainer(cfg)
            try:
                trainer.run()
            finally:
                trainer.close()
            wall_s = time.perf_counter() - t0
            rows = [
                r
                for r in read_metrics(trainer.run_dir / "metrics.jsonl")
                if r["step"] >= 1 and r.get(RSS_KEY) is not None
            ]
    finally:
        ray.shutdown()
    w = warn_if_loaded("end")
    if w:
        warnings.append(w)

    steps = [int(r["step"]) for r in rows]
    rss = [float(r[RSS_KEY]) for r in rows]
    if len(rss) < 2:
        raise SystemExit(f"driver_memory: only {len(rss)} steps logged {RSS_KEY}")
    half = len(steps) // 2
    slope2 = slope_per_100(steps[half:], rss[half:])
    slope_all = slope_per_100(steps, rss)
    flat = slope2 < args.threshold
    verdict = (
        f"VERDICT: {'flat' if flat else 'GROWING'}: driver RSS slope over steps {steps[half]}-{steps[-1]} "
        f"is {slope2:+.2f} MB per 100 steps ({'<' if flat else '>='} the {args.threshold:g} MB threshold)"
    )
    if len(steps) - half < 20:
        verdict += f"; only {len(steps) - half} steps in the fit: a check of the script, not a result"

    print(
        f"\ndriver memory: config {args.config}{' (tiny)' if args.tiny else ''} algo {args.algo}, "
        f"{args.steps} steps, eval every {args.eval_every}; {machine['cpus']} CPUs, load "
        f"{machine['loadavg'][0]:.1f} at start; {wall_s:.0f} s"
    )
    print(f"{'step':>6} {'RSS MB':>9} {'vs step 1':>10}")
    shown = [i for i, s in enumerate(steps) if s == steps[0] or s % args.every == 0 or s == steps[-1]]
    for i in shown:
        print(f"{steps[i]:>6} {rss[i]:>9.1f} {rss[i] - rss[0]:>+10.1f}")
    print(
        f"\n{'first MB':>9} {'last MB':>9} {'max MB':>9} {'slope 2nd half':>15} {'slope all':>10}"
        "  (slopes: MB per 100 steps)"
    )
    print(f"{rss[0]:>9.1f} {rss[-1]:>9.1f} {max(rss):>9.1f} {slope2:>+15.2f} {slope_all:>+10.2f}")
    print(verdict)
    if warnings:
        print(f"{len(warnings)} load warning(s) (RSS is unaffected; the wall time is not)")

    report = {
        "config": {
            "config": args.config,
            "tiny": args.tiny,
            "algo": args.algo,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "overrides": args.overrides,
            "ray_cpus": args.ray_cpus,
        },
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "warnings": warnings,
        "wall_s": wall_s,
        "first_mb": rss[0],
        "last_mb": rss[-1],
        "max_mb": max(rss),
        "slope_mb_per_100_steps_second_half": slope2,
        "slope_mb_per_100_steps_all": slope_all,
        "threshold_mb_per_100_steps": args.threshold,
        "flat": flat,
        "verdict": verdict,
        "rss_mb": dict(zip(steps, rss)),
    }
    write_report(args.out, report)
    return 0 if flat else 1


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the guard
    raise SystemExit(main())
