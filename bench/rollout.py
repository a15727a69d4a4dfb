"""Rollout throughput and weight-sync time: vLLM vs transformers backends on the tiny demo model.

Measures one :class:`services.rollout.worker.RolloutWorker` per backend, in this process (the engine,
not Ray dispatch): engine start, tokens/s and requests/s for ``--prompts`` prompts x ``--n``
samples x ``--max-tokens`` new tokens (EOS ignored via ``min_tokens`` so every run generates the
same number of tokens) with one image each, and the time of an in-place weight update from a
safetensors blob (``receive_weights``). Prints a table and writes JSON.

    .venv/bin/python bench/rollout.py --out bench/results/rollout.json
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
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def bench_backend(backend: str, args: argparse.Namespace, assets: Any) -> dict[str, Any]:
    import torch

    from services.rollout.types import RolloutRequest, SamplingSpec
    from services.rollout.worker import RolloutWorker
    from trainer.core.data import load_image, load_split
    from trainer.core.weights import WeightsHandle, digest, pack_state_dict

    examples = load_split(assets.data_dir, "train").examples
    examples = [examples[i % len(examples)] for i in range(args.prompts)]
    requests = [RolloutRequest.from_example(ex, images=[load_image(p) for p in ex.image_paths]) for ex in examples]
    spec = SamplingSpec(
        n=args.n, temperature=1.0, top_p=1.0, max_tokens=args.max_tokens, min_tokens=args.max_tokens, seed=0
    )
    t0 = time.perf_counter()
    worker = RolloutWorker(
        assets.model_dir,
        backend=backend,
        dtype=args.dtype,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        max_model_len=args.max_model_len,
    )
    start_s = time.perf_counter() - t0
    try:
        worker.generate(requests[:2], spec)  # warm-up (first-call allocations, caches)
        times, tokens = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = worker.generate(requests, spec)
            times.append(time.perf_counter() - t0)
            if result.errors:
                raise RuntimeError(f"{backend}: errors {result.errors}")
            tokens.append(result.num_tokens)
        # Weight sync: the full HF state dict (tied lm_head dropped, as save_pretrained does).
        from trainer.core.modeling import load_model

        model = load_model(str(assets.model_dir), dtype=args.dtype)
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        sync = []
        for version in range(1, args.repeats + 1):
            with torch.no_grad():
                for v in state.values():
                    v.add_(1e-3)
            blob = pack_state_dict(state)
            handle = WeightsHandle(version, "object_store", len(state), len(blob), digest(blob))
            t0 = time.perf_counter()
            worker.receive_weights(handle, blob)
            sync.append(time.perf_counter() - t0)
        gen_s = statistics.median(times)
        tok = statistics.median(tokens)
        return {
            "backend": backend,
            "engine_start_s": round(start_s, 2),
            "generate_s": round(gen_s, 3),
            "tokens": int(tok),
            "tokens_per_s": round(tok / gen_s, 1),
            "requests_per_s": round(args.prompts / gen_s, 2),
            "samples_per_s": round(args.prompts * args.n / gen_s, 1),
            "weight_sync_s": round(statistics.median(sync), 4),
            "weight_bytes": len(blob),
            "generate_s_all": [round(t, 3) for t in times],
        }
    finally:
        worker.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="vllm,hf")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--min-pixels", type=int, default=56 * 56)
    parser.add_argument("--max-pixels", type=int, default=112 * 112)
    parser.add_argument("--assets", default=str(Path(tempfile.gettempdir()) / "papo-bench-assets"))
    parser.add_argument("--out", default="bench/results/rollout.json")
    args = parser.parse_args(argv)

    from trainer.demo.assets import build_demo_assets
    from trainer.demo.dataset import DatasetSizes

    assets = build_demo_assets(
        args.assets,
        min_pixels=args.min_pixels,
        max_pixels=args.max_pixels,
        sizes=DatasetSizes(train=64, validation=8, sft=8, sft_eval=8, sft_easy=8),
    )
    rows = [bench_backend(b.strip(), args, assets) for b in args.backends.split(",") if b.strip()]
    by = {r["backend"]: r for r in rows}
    ratio = (by["vllm"]["tokens_per_s"] / by["hf"]["tokens_per_s"]) if {"vllm", "hf"} <= set(by) else None

    cols = [
        "backend",
        "engine_start_s",
        "generate_s",
        "tokens",
        "tokens_per_s",
        "requests_per_s",
        "samples_per_s",
        "weight_sync_s",
    ]
    print(f"\nrollout: {args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, 1 image each, {args.dtype}")
    print(" | ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print(" | ".join(f"{str(r[c]):>14}" for c in cols))
    if ratio is not None:
        print(f"vllm / hf tokens/s: {ratio:.2f}x")
    import torch

    report = {
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        },
        "results": rows,
        "vllm_over_hf_tokens_per_s": ratio,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # vLLM may start processes with spawn: keep the guard
    raise SystemExit(main())
