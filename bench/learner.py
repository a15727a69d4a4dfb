"""Benchmark of the DeepSpeed learner group on the tiny Qwen2.5-VL (CPU, gloo).

For each world size (Ray actors, one rank each) and ZeRO stage, on one fixed rollout batch:
- ``init_s``: group start (actors, process group, model load, DeepSpeed engine);
- ``logp_s``: one no-grad pass over the batch with the original images (``old_logp``);
- ``masked_s``: one no-grad pass with the masked images (the PAPO ``masked_logp`` pass when it
  runs colocated on the learner, ``perception.masked_logp: learner``);
- ``step_s``: one ``train_step`` (all optimiser steps of the batch), mean of the timed steps after
  one warm-up step;
- ``masked/step``: the overhead PAPO's masked pass adds to a step when colocated;
- ``peak_rss_mb``: peak resident memory of each rank's process.

The JIT build of ``deepspeed_shm_comm`` (once per environment) is not part of any number here.
Prints a table and writes JSON (default ``bench/results/learner.json``).
Run: ``.venv/bin/python bench/learner.py [--world-sizes 1 2] [--stages 0 2 3] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.core.batch import RolloutBatch  # noqa: E402
from trainer.core.config import PRESETS, AlgoConfig, LearnerConfig  # noqa: E402
from trainer.core.modeling import load_processor  # noqa: E402
from trainer.demo.model import VISION_TOKEN_IDS, write_tiny_model  # noqa: E402
from trainer.learner.group import LearnerGroup  # noqa: E402

MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def build_batch(ray, processor, prompts: int, n: int, response_len: int, seed: int = 0) -> RolloutBatch:
    """``prompts * n`` rows; each prompt one random 112x112 image (16 image tokens) and its black copy."""
    rng = np.random.default_rng(seed)
    allowed = [t for t in range(512) if t not in VISION_TOKEN_IDS]
    p_ids, r_ids, refs, masked_refs, groups = [], [], [], [], []
    for g in range(prompts):
        img = Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[img], return_tensors="pt")["input_ids"][0].tolist()
        ref, mref = [ray.put(img)], [ray.put(Image.new("RGB", img.size))]
        for _ in range(n):
            p_ids.append(ids)
            r_ids.append(rng.choice(allowed, size=response_len).tolist())
            refs.append(ref)
            masked_refs.append(mref)
            groups.append(g)
    batch = RolloutBatch.from_sequences(
        p_ids,
        r_ids,
        [[0.0] * len(r) for r in r_ids],
        group_ids=groups,
        row_ids=groups,
        weight_version=0,
        image_refs=refs,
        answers=["x"] * len(r_ids),
    )
    batch.masked_image_refs = masked_refs
    batch.advantages = torch.as_tensor(rng.standard_normal(len(batch)), dtype=torch.float32)
    return batch


def run_one(ray, model: Path, batch: RolloutBatch, world_size: int, stage: int, steps: int, micro: int) -> dict:
    cfg = LearnerConfig(
        num_ranks=world_size,
        num_cpus=0.5,
        num_gpus=0,
        zero_stage=stage,
        dtype="float32",
        lr=1e-5,
        mini_batch_size=len(batch),
        micro_batch_size=micro,
    )
    t0 = time.perf_counter()
    algo = AlgoConfig(name="papo_d", **PRESETS["papo_d"])  # PAPO-D: gamma 0.01, eta 0.03, no ref
    group = LearnerGroup(str(model), cfg, algo, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, get_timeout_s=600)
    init_s = time.perf_counter() - t0
    try:
        b = batch.select(range(len(batch)))
        t0 = time.perf_counter()
        b.old_logp = group.compute_logprobs(b)
        logp_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        b.masked_logp = group.compute_logprobs(b, masked=True)
        masked_s = time.perf_counter() - t0
        group.train_step(b)  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            group.train_step(b)
            times.append(time.perf_counter() - t0)
        rss = group.peak_rss_mb()
    finally:
        group.shutdown()
    step_s = statistics.mean(times)
    return {
        "world_size": world_size,
        "zero_stage": stage,
        "rows": len(batch),
        "micro_batch_size": micro,
        "init_s": init_s,
        "logp_s": logp_s,
        "masked_s": masked_s,
        "step_s": step_s,
        "step_s_all": times,
        "masked_over_step": masked_s / step_s,
        "peak_rss_mb": rss,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--response-len", type=int, default=32)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "learner.json"))
    args = ap.parse_args(argv)

    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "model"
            write_tiny_model(
                model,
                seed=0,
                corpus=["What color is the circle? \\boxed{red}"] * 20,
                min_pixels=MIN_PIXELS,
                max_pixels=MAX_PIXELS,
            )
            processor = load_processor(str(model), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
            batch = build_batch(ray, processor, args.prompts, args.n, args.response_len)
            for ws in args.world_sizes:
                for stage in args.stages:
                    if len(batch) % (args.micro * ws):
                        continue
                    row = run_one(ray, model, batch, ws, stage, args.steps, args.micro)
                    rows.append(row)
                    print(f"ws={ws} zero={stage}: step {row['step_s']:.3f} s", file=sys.stderr, flush=True)
    finally:
        ray.shutdown()

    header = (
        f"{'ranks':>5} {'zero':>4} {'init s':>7} {'logp s':>7} {'masked s':>8} {'step s':>7} "
        f"{'masked/step':>11} {'peak RSS MiB/rank':>18}"
    )
    print(header)
    for r in rows:
        rss = "/".join(f"{x:.0f}" for x in r["peak_rss_mb"])
        print(
            f"{r['world_size']:>5} {r['zero_stage']:>4} {r['init_s']:>7.2f} {r['logp_s']:>7.3f} "
            f"{r['masked_s']:>8.3f} {r['step_s']:>7.3f} {r['masked_over_step']:>11.2f} {rss:>18}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "rows": rows and rows[0]["rows"],
        "response_len": args.response_len,
        "omp_threads": 1,
    }
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
