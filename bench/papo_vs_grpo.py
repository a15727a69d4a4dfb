"""PAPO vs GRPO on the demo task: our small-scale reproduction of the paper's claim.

For each seed, the demo job (configs/demo.yaml unless ``--config``) is trained twice with the same
steps and everything else equal: GRPO with ``perception.diagnostic=true`` (the masked pass runs
and its KL is logged, but stays out of the loss) and PAPO (the Implicit Perception Loss on). Runs
are sequential, one :class:`trainer.driver.Trainer` each, on one local Ray cluster this script
starts; GRPO and PAPO alternate within a seed so that a change in machine load between runs hits
both alike. Each run writes its own run directory (config, ``metrics.jsonl``, ``curves.png``, the
best checkpoint) under ``--out-dir``/runs/``<algo>_seed<k>``.

Per run, from ``Trainer.run()``'s summary and the run's ``metrics.jsonl``: eval accuracy at the
start (step 0), at the end and at its best, with its step (the driver's ``best``: the best
periodic eval during training, whose checkpoint it keeps; the step-0 eval does not count),
black-image and masked-image accuracy at the end (``eval/masked_accuracy`` when the evaluator
logs it), and the perception KL (at the last step, and the mean over the last tenth of the steps,
less noisy). Per algorithm: mean and sample standard deviation over seeds, and PAPO minus GRPO.
Prints the tables, writes JSON (``--out-dir``/papo_vs_grpo.json, rewritten after every run so an
interrupted benchmark keeps what it finished) and a PNG of the curves (eval accuracy, black- and
masked-image accuracy, perception KL vs step; one line per run, GRPO blue, PAPO orange, one line
style per seed). Exits 1 if a run failed (the others still run and are reported).

Sizing: the demo step takes about 2-2.5 s on the quiet 2-core machine (docs/demo.md: 200 steps in about
8.5 min including start-up and 9 evals). The default, 3 seeds x 2 algorithms x 150 steps with an eval
every 15 steps, is 6 runs of about 5.5-6 minutes (about 290 s of steps, 11 evals, about 30 s of
service start-up): about 35 minutes in all on a quiet machine; much longer on a loaded one (the
script warns when the load average exceeds the core count). ``--steps 200`` matches the demo
(about 50 minutes).

Run::

    .venv/bin/python bench/papo_vs_grpo.py                                  # ~30 min, quiet machine
    .venv/bin/python bench/papo_vs_grpo.py --seeds 1 --steps 6 --eval-every 3 --tiny   # a quick check
    .venv/bin/python bench/papo_vs_grpo.py --set algo.gamma=0.01 ...        # any config override
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_info  # noqa: E402
from bench._common import warn_if_loaded as _warn_if_loaded  # noqa: E402

# The tiny job of the end-to-end tests with a small validation set, for checking the script; it
# keeps the config's rollout.max_tokens (24 in the demo): eval uses it too, and 8 tokens cut the
# demo's answers short (eval accuracy 0 from the start, nothing to compare).
TINY = [
    "rollout.batch_size=4",
    "rollout.n=4",
    "learner.mini_batch_size=16",
    "learner.micro_batch_size=8",
    "logprob.micro_batch_size=16",
    "data.val_size=16",
]
# The baseline logs the perception KL through the diagnostic masked pass (no loss term).
ALGOS: dict[str, list[str]] = {"grpo": ["algo.name=grpo", "perception.diagnostic=true"], "papo": ["algo.name=papo"]}
COLOURS = {"grpo": "tab:blue", "papo": "tab:orange"}
PLOT_KEYS = ("eval/accuracy", "eval/black_accuracy", "eval/masked_accuracy", "train/perception_kl")
# Per-run quantities summarised per algorithm (mean, std over seeds) and compared PAPO - GRPO.
SUMMARY_KEYS = (
    "start_accuracy",
    "final_accuracy",
    "best_accuracy",
    "gain_final",
    "final_black_accuracy",
    "final_masked_accuracy",
    "perception_kl_last",
    "perception_kl_tail",
)


def warn_if_loaded(when: str) -> str | None:
    return _warn_if_loaded(when, "runs are slow")


def _get(d: dict[str, Any], key: str) -> float | None:
    v = d.get(key)
    return None if v is None else float(v)


def run_one(algo: str, seed: int, base: list[str], args: argparse.Namespace, runs_dir: Path) -> dict[str, Any]:
    """Train one (algo, seed) run to the end; its numbers from the summary and metrics.jsonl."""
    from trainer.core.config import named_config, resolve_config
    from trainer.core.metrics import read_metrics
    from trainer.driver import Trainer

    name = f"{algo}_seed{seed}"
    overrides = (
        base
        + ALGOS[algo]
        + [
            f"seed={seed}",
            f"trainer.output_dir={runs_dir}",
            f"trainer.name={name}",
            f"trainer.total_steps={args.steps}",
            f"trainer.eval_every={args.eval_every}",
            "trainer.save_every=0",
        ]
    )
    cfg = resolve_config([named_config(args.config)], overrides)
    print(f"\n=== {name}: {args.steps} steps, eval every {args.eval_every} ===", flush=True)
    load_before = list(os.getloadavg())
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    wall_s = time.perf_counter() - t0
    rows = read_metrics(Path(summary["run_dir"]) / "metrics.jsonl")
    kl = [(r["step"], r["train/perception_kl"]) for r in rows if r.get("train/perception_kl") is not None]
    tail = kl[-max(1, math.ceil(len(kl) / 10)) :]
    start, end, best = summary["start"], summary["end"], summary["best"]
    result = {
        "algo": algo,
        "seed": seed,
        "run_dir": summary["run_dir"],
        "wall_s": wall_s,
        "train_s": summary["wall_s"],
        "start_accuracy": _get(start, "eval/accuracy"),
        "final_accuracy": _get(end, "eval/accuracy"),
        "best_accuracy": _get(best, "accuracy") if best.get("step") is not None else None,
        "best_step": best.get("step"),
        "start_black_accuracy": _get(start, "eval/black_accuracy"),
        "final_black_accuracy": _get(end, "eval/black_accuracy"),
        "start_masked_accuracy": _get(start, "eval/masked_accuracy"),
        "final_masked_accuracy": _get(end, "eval/masked_accuracy"),
        "perception_kl_last": kl[-1][1] if kl else None,
        "perception_kl_tail": statistics.mean(v for _, v in tail) if tail else None,
        "perception_kl_tail_steps": len(tail),
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        # The curves, so the JSON alone can be re-plotted or re-analysed.
        "curves": {k: [[r["step"], r[k]] for r in rows if r.get(k) is not None] for k in PLOT_KEYS},
    }
    if result["start_accuracy"] is not None and result["final_accuracy"] is not None:
        result["gain_final"] = result["final_accuracy"] - result["start_accuracy"]
    else:
        result["gain_final"] = None
    return result


def aggregate(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per algorithm: mean and sample std over seeds of each summary key; PAPO - GRPO of the means."""
    out: dict[str, Any] = {}
    for algo in ALGOS:
        done = [r for r in results if r["algo"] == algo and "error" not in r]
        stats = {}
        for key in SUMMARY_KEYS:
            vals = [r[key] for r in done if r.get(key) is not None]
            stats[key] = {
                "mean": statistics.mean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "n": len(vals),
            }
        out[algo] = stats
    out["papo_minus_grpo"] = {
        k: (out["papo"][k]["mean"] - out["grpo"][k]["mean"])
        if out["papo"][k]["mean"] is not None and out["grpo"][k]["mean"] is not None
        else None
        for k in SUMMARY_KEYS
    }
    return out


def plot(results: list[dict[str, Any]], png: Path) -> list[str]:
    """One panel per logged key, one line per run; colour = algorithm, line style = seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if "error" not in r]
    keys = [k for k in PLOT_KEYS if any(r["curves"].get(k) for r in done)]
    if not keys:
        return []
    styles = ["-", "--", ":", "-."]
    seeds = sorted({r["seed"] for r in done})
    ncols = min(2, len(keys))  # a 2-column grid stays readable with 3-4 panels
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 3.6 * nrows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(flat, keys):
        for r in done:
            pts = r["curves"].get(key) or []
            if not pts:
                continue
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=COLOURS[r["algo"]],
                linestyle=styles[seeds.index(r["seed"]) % len(styles)],
                alpha=0.85,
                marker="." if len(pts) < 50 else None,
                label=f"{r['algo'].upper()} seed {r['seed']}",
            )
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return keys


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_tables(results: list[dict[str, Any]], agg: dict[str, Any], title: str) -> None:
    print(f"\n{title}")
    head = (
        f"{'run':<12} {'start':>6} {'final':>6} {'best':>6} {'@step':>6} {'black':>6} {'masked':>6} "
        f"{'KL last':>8} {'KL tail':>8} {'wall s':>7}"
    )
    print(head)
    for r in results:
        name = f"{r['algo']}_seed{r['seed']}"
        if "error" in r:
            print(f"{name:<12} FAILED: {r['error']}")
            continue
        print(
            f"{name:<12} {_f(r['start_accuracy']):>6} {_f(r['final_accuracy']):>6} {_f(r['best_accuracy']):>6} "
            f"{str(r['best_step']):>6} {_f(r['final_black_accuracy']):>6} {_f(r['final_masked_accuracy']):>6} "
            f"{_f(r['perception_kl_last'], '.4f'):>8} {_f(r['perception_kl_tail'], '.4f'):>8} {r['wall_s']:>7.0f}"
        )
    print("\nmean +- std over seeds (final/black/masked: at the last step; KL tail: mean over the last tenth of steps)")
    cols = [
        ("final_accuracy", "final acc"),
        ("best_accuracy", "best acc"),
        ("gain_final", "gain"),
        ("final_black_accuracy", "black acc"),
        ("final_masked_accuracy", "masked acc"),
        ("perception_kl_tail", "KL tail"),
    ]
    print(f"{'algo':<12} {'n':>2} " + " ".join(f"{c:>17}" for _, c in cols))
    for algo in ALGOS:
        s = agg[algo]
        n = max(s[k]["n"] for k, _ in cols)
        cells = []
        for k, _ in cols:
            m, sd = s[k]["mean"], s[k]["std"]
            spec = ".4f" if k.startswith("perception") else ".3f"
            cells.append(f"{_f(m, spec)} +- {_f(sd, spec)}" if sd is not None else _f(m, spec))
        print(f"{algo.upper():<12} {n:>2} " + " ".join(f"{c:>17}" for c in cells))
    d = agg["papo_minus_grpo"]
    print(
        f"{'PAPO - GRPO':<12} {'':>2} "
        + " ".join(f"{_f(d[k], '+.4f' if k.startswith('perception') else '+.3f'):>17}" for k, _ in cols)
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
        help="a dotted config override for every run (repeatable)",
    )
    ap.add_argument("--tiny", action="store_true", help="4 prompts x n=4, 16 eval prompts: a quick check")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per algorithm (default: %(default)s)")
    ap.add_argument("--seed-list", type=int, nargs="+", default=None, help="explicit seeds (overrides --seeds)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per run (default: %(default)s)")
    ap.add_argument("--eval-every", type=int, default=15, help="eval period in steps (default: %(default)s)")
    ap.add_argument("--ray-cpus", type=float, default=4)
    ap.add_argument(
        "--out-dir",
        default=str(Path(__file__).parent / "results" / "papo_vs_grpo"),
        help="run directories, JSON and PNG go here (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    seeds = args.seed_list if args.seed_list is not None else list(range(args.seeds))
    if not seeds or args.steps < 1 or args.eval_every < 1:
        ap.error("need at least one seed, --steps >= 1 and --eval-every >= 1")
    base = (TINY if args.tiny else []) + args.overrides
    out_dir = Path(args.out_dir)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "papo_vs_grpo.json", out_dir / "papo_vs_grpo.png"

    import ray

    machine = machine_info()
    warnings = [w for w in [warn_if_loaded("start")] if w]
    config = {
        "config": args.config,
        "tiny": args.tiny,
        "overrides": base,
        "seeds": seeds,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "ray_cpus": args.ray_cpus,
        "algos": ALGOS,
    }
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def write() -> dict[str, Any]:
        agg = aggregate(results)
        report = {
            "config": config,
            "machine": machine,
            "loadavg_now": list(os.getloadavg()),
            "warnings": warnings,
            "wall_s": time.perf_counter() - t0,
            "results": results,
            "summary": agg,
            "png": str(png_path),
            "complete": len(results) == len(seeds) * len(ALGOS),
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        return agg

    # One cluster for every run: each Trainer joins it and leaves it running on close.
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for seed in seeds:
            for algo in ALGOS:
                try:
                    results.append(run_one(algo, seed, base, args, runs_dir))
                except Exception as e:  # a failed run is reported; the others still say something
                    print(f"{algo}_seed{seed} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                    results.append({"algo": algo, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                w = warn_if_loaded(f"after {algo}_seed{seed}")
                if w:
                    warnings.append(w)
                write()
    finally:
        ray.shutdown()

    agg = write()
    drawn = plot(results, png_path)
    title = (
        f"PAPO vs GRPO (diagnostic KL): config {args.config}{' --tiny' if args.tiny else ''} "
        f"{' '.join(args.overrides)}; seeds {seeds}; {args.steps} steps, eval every {args.eval_every}; "
        f"{machine['cpus']} CPUs, load {machine['loadavg'][0]:.1f} at start; "
        f"{time.perf_counter() - t0:.0f} s in all"
    )
    print_tables(results, agg, title)
    if warnings:
        print(f"{len(warnings)} load warning(s): wall times are inflated")
    print(f"wrote {json_path}" + (f" and {png_path} ({', '.join(drawn)})" if drawn else " (nothing to plot)"))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the guard
    raise SystemExit(main())
