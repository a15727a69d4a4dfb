"""Does the embedded demo learn on every asset seed and run seed? The demo's acceptance matrix.

For each asset seed (``demo.asset_seed``: the random weights, tokenizer corpus, images and
supervised warm start of the demo assets) the assets are built first, into ``$PAPO_CACHE`` (a
fresh temporary cache with ``--fresh-cache``), and their build time is reported (the first-run
cost: data, model and warm start). Then every run seed trains the demo job (configs/demo.yaml)
once per algorithm: PAPO as shipped and the GRPO baseline (``algo.name=grpo`` with the
perception KL logged as a diagnostic), each run through :func:`bench.papo_vs_grpo.run_one`, on
one local Ray cluster, sequentially.

Per run: asset seed, seed, start accuracy (step 0), best accuracy and its step (the kept
checkpoint), end accuracy, black- and masked-image accuracy at the best checkpoint, wall time.
A run passes when its best checkpoint gains at least ``--min-gain`` (0.25) greedy accuracy over
its start, its black-image accuracy lies within 0.1 of chance (1/6) and its masked-image
accuracy lies at least 0.1 below its real-image accuracy. Per algorithm: passes, mean, std and
worst of the gain and the best accuracy; PAPO and GRPO side by side. Prints the tables, writes
JSON (``--out-dir``/demo_robustness.json, rewritten after every run) and exits 1 when a run
failed or did not pass.

Sizing: one demo run (100 steps, 5 evals) is about 6-7 minutes on the quiet 2-core machine, so
the default matrix (2 asset seeds x 5 seeds x 2 algorithms) is about 2 hours and 15 minutes;
``--algos papo`` halves it.

Run::

    .venv/bin/python bench/demo_robustness.py --fresh-cache              # the whole matrix
    .venv/bin/python bench/demo_robustness.py --algos papo --seeds 0 1   # a part of it
    .venv/bin/python bench/demo_robustness.py --tiny --steps 4 --eval-every 2 --seeds 0 --asset-seeds 0
"""

from __future__ import annotations

import argparse
import json
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

from bench._common import machine_info, warn_if_loaded  # noqa: E402
from bench.papo_vs_grpo import ALGOS, TINY, run_one  # noqa: E402

CHANCE = 1 / 6  # six colours, balanced
BLACK_TOLERANCE = 0.1
MASKED_MARGIN = 0.1


def build_assets(asset_seed: int, config: str, overrides: list[str]) -> dict[str, Any]:
    """Build (or find cached) the assets of ``asset_seed`` exactly as ``papo train`` would."""
    from trainer.core.config import named_config, resolve_config
    from trainer.demo.assets import MANIFEST
    from trainer.demo.paths import demo_assets_dir, resolve_demo_paths

    cfg = resolve_config([named_config(config)], [*overrides, f"demo.asset_seed={asset_seed}"])
    t0 = time.perf_counter()
    resolve_demo_paths(cfg)
    seconds = time.perf_counter() - t0
    manifest = json.loads((demo_assets_dir(asset_seed) / MANIFEST).read_text())
    info = manifest.get("warm_start_info") or {}
    return {
        "asset_seed": asset_seed,
        "seconds": seconds,
        "build_seconds": manifest.get("build_seconds"),
        "warm_start_seconds": info.get("seconds"),
        "warm_start_steps": info.get("steps"),
        "warm_start_accuracy": info.get("heldout_accuracy"),
        "warm_start_coverage": info.get("coverage"),
        "weights_sha256": info.get("weights_sha256"),
    }


def judge(r: dict[str, Any], min_gain: float) -> dict[str, Any]:
    """The acceptance criteria of one finished run (at its best checkpoint)."""
    best, start = r.get("best_accuracy"), r.get("start_accuracy")
    black, masked = r.get("best_black_accuracy"), r.get("best_masked_accuracy")
    gain = None if best is None or start is None else best - start
    checks = {
        "gain": gain is not None and gain >= min_gain,
        "black_near_chance": black is not None and abs(black - CHANCE) <= BLACK_TOLERANCE,
        "masked_below_real": masked is not None and best is not None and masked <= best - MASKED_MARGIN,
    }
    return {"gain_best": gain, "checks": checks, "passed": all(checks.values())}


def summarise(results: list[dict[str, Any]], algos: list[str]) -> dict[str, Any]:
    """Per algorithm: passes, and mean, std and worst of the best-checkpoint gain and accuracy."""
    out: dict[str, Any] = {}
    for algo in algos:
        runs = [r for r in results if r["algo"] == algo]
        done = [r for r in runs if "error" not in r]
        stats: dict[str, Any] = {"runs": len(runs), "passed": sum(bool(r.get("passed")) for r in runs)}
        for key in ("gain_best", "best_accuracy", "final_accuracy"):
            vals = [r[key] for r in done if r.get(key) is not None]
            stats[key] = {
                "mean": statistics.mean(vals) if vals else None,
                "std": statistics.stdev(vals) if len(vals) > 1 else None,
                "worst": min(vals) if vals else None,
            }
        out[algo] = stats
    return out


def _f(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(assets: list[dict[str, Any]], results: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print("\nassets (built into the cache the runs read)")
    print(
        f"{'asset seed':>10} {'build s':>8} {'warm s':>7} {'steps':>6} {'sft acc':>8} {'coverage':>9}  weights sha256"
    )
    for a in assets:
        print(
            f"{a['asset_seed']:>10} {_f(a['build_seconds'], '.1f'):>8} {_f(a['warm_start_seconds'], '.1f'):>7} "
            f"{str(a['warm_start_steps']):>6} {_f(a['warm_start_accuracy']):>8} {_f(a['warm_start_coverage']):>9}  "
            f"{(a['weights_sha256'] or '-')[:16]}"
        )
    print("\nruns (black and masked: at the best checkpoint)")
    print(
        f"{'algo':<5} {'asset':>5} {'seed':>4} {'start':>6} {'best':>6} {'@step':>5} {'end':>6} {'gain':>6} "
        f"{'black':>6} {'masked':>6} {'wall s':>7}  verdict"
    )
    for r in results:
        head = f"{r['algo']:<5} {r['asset_seed']:>5} {r['seed']:>4}"
        if "error" in r:
            print(f"{head} FAILED: {r['error']}")
            continue
        verdict = "pass" if r["passed"] else "FAIL: " + ", ".join(k for k, ok in r["checks"].items() if not ok)
        print(
            f"{head} {_f(r['start_accuracy']):>6} {_f(r['best_accuracy']):>6} {str(r['best_step']):>5} "
            f"{_f(r['final_accuracy']):>6} {_f(r['gain_best'], '+.3f'):>6} {_f(r['best_black_accuracy']):>6} "
            f"{_f(r['best_masked_accuracy']):>6} {r['wall_s']:>7.0f}  {verdict}"
        )
    print("\nsummary (gain and accuracy of the best checkpoint: mean +- std, worst)")
    for algo, s in summary.items():
        g, b = s["gain_best"], s["best_accuracy"]
        print(
            f"{algo.upper():<5} {s['passed']}/{s['runs']} pass; gain {_f(g['mean'], '+.3f')} +- {_f(g['std'])} "
            f"(worst {_f(g['worst'], '+.3f')}); best accuracy {_f(b['mean'])} +- {_f(b['std'])} "
            f"(worst {_f(b['worst'])})"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo", help="shipped config name or YAML path (default: demo)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--asset-seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="run seeds")
    ap.add_argument("--algos", nargs="+", choices=sorted(ALGOS), default=["papo", "grpo"])
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the config's)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--min-gain", type=float, default=0.25, help="best minus start accuracy a run must reach")
    ap.add_argument("--tiny", action="store_true", help="4 prompts x n=4, 16 eval prompts: checks the script")
    ap.add_argument("--fresh-cache", action="store_true", help="build the assets into a new empty PAPO_CACHE")
    ap.add_argument("--ray-cpus", type=float, default=4)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results" / "demo_robustness"))
    args = ap.parse_args(argv)
    if args.steps is None:
        from trainer.core.config import named_config, resolve_config

        args.steps = resolve_config([named_config(args.config)], args.overrides).trainer.total_steps
    if args.steps < 1 or args.eval_every < 1:
        ap.error("--steps and --eval-every must be >= 1")
    if args.fresh_cache:
        os.environ["PAPO_CACHE"] = tempfile.mkdtemp(prefix="papo-cache-")
    base = (TINY if args.tiny else []) + args.overrides
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "demo_robustness.json"

    import ray

    machine = machine_info()
    warnings = [w for w in [warn_if_loaded("start", "wall times are inflated")] if w]
    assets: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def write() -> dict[str, Any]:
        summary = summarise(results, args.algos)
        report = {
            "config": {**vars(args), "overrides": base, "papo_cache": os.environ.get("PAPO_CACHE")},
            "machine": machine,
            "warnings": warnings,
            "wall_s": time.perf_counter() - t0,
            "assets": assets,
            "results": results,
            "summary": summary,
            "complete": len(results) == len(args.asset_seeds) * len(args.seeds) * len(args.algos),
        }
        json_path.write_text(json.dumps(report, indent=2) + "\n")
        return summary

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for asset_seed in args.asset_seeds:
            assets.append(build_assets(asset_seed, args.config, base))
            print(f"assets of seed {asset_seed}: {assets[-1]}", flush=True)
            write()
            run_base = [*base, f"demo.asset_seed={asset_seed}"]
            for seed in args.seeds:
                for algo in args.algos:
                    try:
                        r = run_one(algo, seed, run_base, args, out_dir / "runs" / f"assets{asset_seed}")
                        best = _best_eval(Path(r["run_dir"]))
                        r.update(best_black_accuracy=best.get("black"), best_masked_accuracy=best.get("masked"))
                        r.update(judge(r, args.min_gain))
                    except Exception as e:  # a failed run is reported; the others still say something
                        print(f"{algo} seed {seed} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                        r = {"algo": algo, "seed": seed, "error": f"{type(e).__name__}: {e}", "passed": False}
                    r["asset_seed"] = asset_seed
                    r.pop("curves", None)  # the run folder's metrics.jsonl has them
                    results.append(r)
                    if w := warn_if_loaded(f"after {algo} seed {seed}", "wall times are inflated"):
                        warnings.append(w)
                    write()
    finally:
        ray.shutdown()
    summary = write()
    print_report(assets, results, summary)
    print(
        f"\n{machine['cpu_model']}, {machine['cpus']} CPUs; {time.perf_counter() - t0:.0f} s in all; wrote {json_path}"
    )
    return 0 if results and all(r.get("passed") for r in results) else 1


def _best_eval(run_dir: Path) -> dict[str, float | None]:
    """Black- and masked-image accuracy of the eval that made the best checkpoint."""
    from trainer.core.metrics import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("eval/accuracy") is not None]
    rows = [r for r in rows if r["step"] > 0] or rows  # the step-0 eval is the start, not a checkpoint
    if not rows:
        return {}
    best = max(rows, key=lambda r: (r["eval/accuracy"], -r["step"]))  # the driver keeps the first best
    return {"black": best.get("eval/black_accuracy"), "masked": best.get("eval/masked_accuracy")}


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the guard
    raise SystemExit(main())
