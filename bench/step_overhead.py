"""What PAPO's masked (perception) pass costs per training step, by where it runs.

The same job config is trained as three variants, one :class:`trainer.driver.Trainer` each, all
on one local Ray cluster that this script starts (so only the services start per variant, not
Ray):

- ``grpo``: the GRPO baseline (no corruption, no masked pass);
- ``papo_learner``: PAPO with ``perception.masked_logp=learner``: the masked pass runs on the
  learner after ``old_logp`` (the official serial order, "colocated");
- ``papo_pool``: PAPO with ``perception.masked_logp=pool``: the masked pass runs on its own
  perception LogProbPool in parallel with ``old_logp`` and the reference pass (off the learner's
  critical path).

(``papo_learner_grad``, the masked pass recomputed with gradient inside the loss, can be added
with ``--variants``.) Each variant runs ``--warmup`` steps (engine and allocator warm-up, not
measured) then ``--steps`` measured steps through ``Trainer.step`` (no eval, no checkpoints, no
metrics files: the step only). Reported per variant: the mean per step of every ``timing/*``
phase the driver records (``gen``, ``corruption_submit``, ``reward``, ``logprobs``, ``update``,
``sync``, ``step``) and the step-time ratio PAPO/GRPO per placement (mean and median), the number
the separate pool is meant to push toward 1.0. Prints a table and writes JSON (default
``bench/results/step_overhead.json``) with every step's timings, the CPU count and the load
average before and after each variant.

On a shared machine the absolute times are noisy and the variants run one after another, so a
load change between them skews the ratios: the script warns when the 1-minute load average
exceeds the core count; rerun on a quiet machine for numbers to quote. ``--rounds R`` repeats the
variants R times, order reversed every other round, and pools the steps (each round pays the
service start-ups again).

Run (defaults: the demo config, 16 prompts x n=8 x 24 tokens; 2 warm-up + 15 measured steps;
about 3-5 minutes on a quiet 2-core machine: three service start-ups of 20-60 s and 51 steps of
about 1.45 s)::

    .venv/bin/python bench/step_overhead.py
    .venv/bin/python bench/step_overhead.py --warmup 1 --steps 3 --tiny     # a quick check
    .venv/bin/python bench/step_overhead.py --set rollout.num_gpus=1 ...    # any config override
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_info, write_report  # noqa: E402
from bench._common import warn_if_loaded as _warn_if_loaded  # noqa: E402

# The tiny job of the end-to-end tests: a step in a couple of seconds, for checking the script.
TINY = [
    "rollout.batch_size=4",
    "rollout.n=4",
    "rollout.max_tokens=8",
    "learner.mini_batch_size=16",
    "learner.micro_batch_size=8",
    "logprob.micro_batch_size=16",
]

# Variant -> overrides on top of the shared config. beta (the reference pass) comes from the
# config, so every variant pays the same reference pass and only the masked pass differs.
VARIANTS: dict[str, list[str]] = {
    "grpo": ["algo.name=grpo"],
    "papo_learner": ["algo.name=papo", "perception.masked_logp=learner"],
    "papo_pool": ["algo.name=papo", "perception.masked_logp=pool"],
    "papo_learner_grad": ["algo.name=papo", "perception.masked_logp=learner_grad"],
}
DEFAULT_VARIANTS = ["grpo", "papo_learner", "papo_pool"]
# Phases in the order of a step (docs/design.md); any other timing/* key the driver adds is appended.
PHASES = ["gen", "corruption_submit", "reward", "logprobs", "update", "sync", "step"]
SHORT = {"corruption_submit": "corrupt_sub"}  # table headers are 11 wide


def warn_if_loaded(when: str) -> str | None:
    return _warn_if_loaded(when, "timings are noisy and variants measured at different times are not comparable")


def run_variant(name: str, base: list[str], args: argparse.Namespace, out_dir: Path, rnd: int) -> dict[str, Any]:
    """Start a Trainer for one variant on the running Ray cluster, time its steps, close it."""
    from trainer.core.config import named_config, resolve_config
    from trainer.driver import Trainer

    overrides = (
        base
        + VARIANTS[name]
        + [
            f"trainer.output_dir={out_dir}",
            f"trainer.name={name}_r{rnd}",
            f"trainer.total_steps={args.warmup + args.steps}",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.tensorboard=false",
            "trainer.plot=false",
        ]
    )
    cfg = resolve_config([named_config(args.config)], overrides)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    start_s = time.perf_counter() - t0
    steps: list[dict[str, float]] = []
    try:
        for k in range(1, args.warmup + args.steps + 1):
            m = trainer.step(k)
            timing = {key.removeprefix("timing/"): float(v) for key, v in m.items() if key.startswith("timing/")}
            tag = "warm-up" if k <= args.warmup else "measured"
            print(
                f"  {name} round {rnd} step {k} ({tag}): {timing.get('step', float('nan')):.2f} s",
                file=sys.stderr,
                flush=True,
            )
            if k > args.warmup:
                steps.append(timing)
    finally:
        trainer.close()
    return {
        "variant": name,
        "round": rnd,
        "masked_logp": cfg.perception.masked_logp,
        "needs_masked_pass": cfg.masked_pass.runs,
        "start_s": start_s,
        "steps": steps,
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
    }


def summarise(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant over all its rounds: mean per phase, median and stdev of the step time."""
    steps = [s for r in runs for s in r["steps"]]
    phases = PHASES + sorted({p for s in steps for p in s} - set(PHASES))
    # A phase absent from a step (e.g. corruption_submit under GRPO) costs 0 there.
    mean = {p: statistics.mean(s.get(p, 0.0) for s in steps) for p in phases}
    return {
        "variant": name,
        "overrides": VARIANTS[name],
        "masked_logp": runs[0]["masked_logp"],
        "needs_masked_pass": runs[0]["needs_masked_pass"],
        "start_s": statistics.mean(r["start_s"] for r in runs),
        "mean_s": mean,
        "median_step_s": statistics.median(s["step"] for s in steps),
        "stdev_step_s": statistics.stdev(s["step"] for s in steps) if len(steps) > 1 else 0.0,
        "measured_steps": len(steps),
        "rounds": runs,
    }


def ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Step time (and the log-prob phase) of each PAPO variant over GRPO's."""
    base = next((r for r in rows if r["variant"] == "grpo"), None)
    if base is None:
        return {}

    def div(a: float, b: float) -> float:
        return a / b if b > 0 else float("nan")

    def mean_step(run: dict[str, Any]) -> float:
        return statistics.mean(s["step"] for s in run["steps"])

    base_by_round = {run["round"]: run for run in base["rounds"]}
    out = {}
    for r in rows:
        if r is base:
            continue
        out[r["variant"]] = {
            "step_mean": div(r["mean_s"]["step"], base["mean_s"]["step"]),
            "step_median": div(r["median_step_s"], base["median_step_s"]),
            "logprobs_mean": div(r["mean_s"]["logprobs"], base["mean_s"]["logprobs"]),
            "added_s_per_step": r["mean_s"]["step"] - base["mean_s"]["step"],
            # The spread of the ratio across rounds says how much the load moved it.
            "step_mean_by_round": [
                div(mean_step(a), mean_step(base_by_round[a["round"]]))
                for a in r["rounds"]
                if a["round"] in base_by_round
            ],
        }
    return out


def print_table(rows: list[dict[str, Any]], rat: dict[str, dict[str, float]], title: str) -> None:
    phases = PHASES + sorted({p for r in rows for p in r["mean_s"]} - set(PHASES))
    print(f"\n{title}")
    print(
        "mean seconds per measured step, by phase as the driver times it (the phases follow one another "
        "and add up to about the step; start s = the variant's service start-up)"
    )
    head = (
        f"{'variant':<18} {'start s':>7} "
        + " ".join(f"{SHORT.get(p, p)[:11]:>11}" for p in phases)
        + f" {'median step':>11}"
    )
    print(head)
    for r in rows:
        cells = " ".join(f"{r['mean_s'].get(p, 0.0):>11.3f}" for p in phases)
        print(f"{r['variant']:<18} {r['start_s']:>7.1f} {cells} {r['median_step_s']:>11.3f}")
    if rat:
        print(f"\n{'PAPO / GRPO':<18} {'step (mean)':>11} {'step (median)':>13} {'logprobs':>9} {'added s/step':>12}")
        for name, q in rat.items():
            by_round = q["step_mean_by_round"]
            rounds = "  by round: " + " ".join(f"{x:.2f}x" for x in by_round) if len(by_round) > 1 else ""
            print(
                f"{name:<18} {q['step_mean']:>10.2f}x {q['step_median']:>12.2f}x {q['logprobs_mean']:>8.2f}x "
                f"{q['added_s_per_step']:>+12.3f}{rounds}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dotted config override for every variant (repeatable)",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="4 prompts x n=4 x 8 tokens (the e2e tests' job): a quick check"
    )
    ap.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: %(default)s)",
    )
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=15, help="measured steps per variant (default: %(default)s)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the variants this many times, order reversed every other round, and pool the "
        "steps (each round restarts the services; default: %(default)s)",
    )
    ap.add_argument(
        "--ray-cpus",
        type=float,
        default=4,
        help="logical CPUs of the local Ray cluster (fractional actor requests share the real cores)",
    )
    ap.add_argument("--run-dir", default=None, help="where the variants' run folders go (default: a temp folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1 and --warmup >= 0")
    base = (TINY if args.tiny else []) + args.overrides

    import ray

    machine = machine_info()
    warnings = [w for w in [warn_if_loaded("start")] if w]
    # One cluster for all variants: each Trainer joins it (and leaves it running on close).
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    runs: dict[str, list[dict[str, Any]]] = {}
    failures: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="papo-step-overhead-") as tmp:
            out_dir = Path(args.run_dir) if args.run_dir else Path(tmp)
            for rnd in range(args.rounds):
                # Reversed every other round (A B C, C B A, ...): a load that drifts steadily over
                # the run then weighs on every variant alike.
                for name in names if rnd % 2 == 0 else names[::-1]:
                    try:
                        runs.setdefault(name, []).append(run_variant(name, base, args, out_dir, rnd))
                    except Exception as e:  # reported; the other variants still give their numbers
                        print(f"{name} round {rnd} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                        failures.append({"variant": name, "round": rnd, "error": f"{type(e).__name__}: {e}"})
                    w = warn_if_loaded(f"after {name} round {rnd}")
                    if w:
                        warnings.append(w)
    finally:
        ray.shutdown()
    rows = [summarise(name, runs[name]) for name in names if runs.get(name)]

    rat = ratios(rows)
    title = (
        f"step overhead: config {args.config}{' --tiny' if args.tiny else ''} {' '.join(args.overrides)}; "
        f"{args.rounds} round(s) x ({args.warmup} warm-up + {args.steps} measured steps) per variant; "
        f"{machine['cpus']} CPUs, load {machine['loadavg'][0]:.1f} at start"
    )
    print_table(rows, rat, title)
    for f in failures:
        print(f"FAILED: {f['variant']} round {f['round']}: {f['error']}")
    if warnings:
        print(f"{len(warnings)} load warning(s): treat these numbers as a check of the script, not a result")
    report = {
        "config": {
            "config": args.config,
            "tiny": args.tiny,
            "overrides": base,
            "variants": names,
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "ray_cpus": args.ray_cpus,
        },
        "machine": machine,
        "loadavg_end": list(os.getloadavg()),
        "warnings": warnings,
        "results": rows,
        "ratios_over_grpo": rat,
        "failures": failures,
    }
    write_report(args.out, report)
    return 1 if failures else 0


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the guard
    raise SystemExit(main())
