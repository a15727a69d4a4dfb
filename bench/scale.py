"""Scale proxy: the real code paths at real-model shapes, with a tiny hidden size so it runs on 2 cores.

The shapes are the paper configs' (configs/paper/qwen2_5_vl_*.yaml). The vocabulary is Qwen2.5-VL's
151,936 tokens. Each prompt has one image drawn between ``model.min_pixels`` and ``max_pixels``
(256-1280 image tokens). Response lengths are long-tailed (log-normal, mean about 700, capped at
2048). The micro-batches are the paper configs', scaled down only in row count. The model is the
tiny Qwen2.5-VL (hidden 128, 2 layers) with the real vocabulary, so what grows with the shapes is
what this measures: the vocabulary logits and the padding.

Passes, each variant in a fresh process (its own peak):

- ``learner``: one ``Learner.train_step`` (DeepSpeed, one rank) over ``--learner-rows`` responses
  (one mini-batch, layout micro-batches of ``--learner-micro``, on-policy);
- ``logprob``: one forward-only ``response_logprobs`` pass (the perception/reference pools' code)
  over ``--logprob-rows`` responses;
- ``vllm``: generation with the real engine at the real vocabulary (``--gen-prompts`` x n=5,
  ``--gen-tokens`` tokens each), as the rollout pool runs it, once per way to keep vision tokens
  out of samples (``block: bad_words``, the engine's default; ``block: whitelist``, every other
  token id per request; ``block: none``), alternated; the overhead is against ``none``.

Variants: ``before`` = whole-micro-batch logits, fixed row micro-batches (what papo did before
chunked log-probs); ``chunked`` = logits in chunks of tokens, fixed rows; ``budget`` = chunks plus
token-budget micro-batches (rows grouped by length). ``logprob`` also runs ``budget x2``, twice
the rows per pass, to show that the peak does not grow with rows x width x vocabulary.

Per pass: peak memory increase over the state before the pass (RSS high-water mark on CPU,
``torch.cuda.max_memory_allocated`` on GPU), response tokens/s, and the padding fraction of the
processed response positions. Prints a table with ratios against ``before`` and writes JSON.
The same command runs on a GPU machine (the passes then run on the GPU in bf16).

    .venv/bin/python bench/scale.py                      # about 6 minutes on 2 cores
    .venv/bin/python bench/scale.py --passes learner --vocab 512   # the small-vocabulary row
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import machine_info, warn_if_loaded, write_report  # noqa: E402

QWEN_VOCAB = 151_936
MIN_PIXELS, MAX_PIXELS = 256 * 28 * 28, 1280 * 28 * 28  # the paper configs' model.min_pixels/max_pixels
VARIANTS: dict[str, dict[str, Any]] = {
    "before": {"chunk": None, "budget": False},
    "chunked": {"chunk": True, "budget": False},
    "budget": {"chunk": True, "budget": True},
    "budget x2": {"chunk": True, "budget": True, "scale": 2},
}
PASS_VARIANTS = {
    "learner": ["before", "chunked", "budget"],
    "logprob": ["before", "chunked", "budget", "budget x2"],
    "vllm": ["blocks"],  # one process: each way to block the vision tokens, side by side
}
BLOCK_MODES = ["bad_words", "whitelist", "none"]  # services/rollout/engines.py VllmEngine.block_mode


# ---- the proxy's model and batch ----------------------------------------------------------------


def write_proxy_model(folder: Path, vocab: int, seed: int = 0) -> Path:
    """The tiny Qwen2.5-VL (tokenizer, processor, chat template) with a ``vocab``-row embedding and head."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from trainer.demo.model import write_tiny_model

    corpus = ["What color is the circle? Answer with \\boxed{red}.", "<think> the shape is blue </think>"] * 20
    write_tiny_model(folder, seed=seed, corpus=corpus, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    config = AutoConfig.from_pretrained(folder)
    config.text_config.vocab_size = vocab
    config.text_config.max_position_embeddings = 8192  # prompt (up to ~1300) + response (up to 2048)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.save_pretrained(folder)
    return folder


def response_lengths(rows: int, seed: int, mean: float = 700.0, sigma: float = 0.9, cap: int = 2048) -> list[int]:
    """Long-tailed response lengths: log-normal with the given mean, at least 8, at most ``cap``."""
    import numpy as np

    mu = math.log(mean) - sigma**2 / 2
    draws = np.random.default_rng(seed).lognormal(mu, sigma, rows)
    return [int(min(cap, max(8, round(x)))) for x in draws]


def proxy_batch(processor: Any, rows: int, n: int, vocab: int, seed: int) -> tuple[Any, list, list]:
    """``rows`` responses (n per prompt); each prompt one random image of 256-1280 image tokens.

    Returns (batch with advantages and masked_logp, images per row, black images per row).
    """
    import numpy as np
    import torch
    from PIL import Image

    from trainer.core.batch import RolloutBatch
    from trainer.demo.model import VISION_TOKEN_IDS

    rng = np.random.default_rng(seed)
    lengths = response_lengths(rows, seed)
    p_ids, r_ids, imgs, masked, groups = [], [], [], [], []
    for g in range(math.ceil(rows / n)):
        tokens = int(rng.integers(256, 1281))  # image tokens (28 x 28 pixels each after merging)
        h = int(rng.integers(16, 33))
        w = max(1, tokens // h)
        im = Image.fromarray(rng.integers(0, 256, (28 * h, 28 * w, 3), dtype=np.uint8))
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[im], return_tensors="pt")["input_ids"][0].tolist()
        for _ in range(n):
            if len(r_ids) == rows:
                break
            length = lengths[len(r_ids)]
            resp = rng.integers(0, vocab, length)
            resp[np.isin(resp, list(VISION_TOKEN_IDS))] = 100  # never a vision token, as the engine ensures
            p_ids.append(ids)
            r_ids.append(resp.tolist())
            imgs.append([im])
            masked.append([Image.new("RGB", im.size)])
            groups.append(g)
    batch = RolloutBatch.from_sequences(
        p_ids,
        r_ids,
        [[0.0] * len(r) for r in r_ids],
        group_ids=groups,
        row_ids=groups,
        weight_version=0,
        image_refs=[[] for _ in r_ids],
        answers=["x"] * len(r_ids),
    )
    batch.advantages = torch.as_tensor(rng.standard_normal(len(batch)), dtype=torch.float32)
    batch.masked_logp = torch.where(batch.response_mask, torch.full(batch.response_ids.shape, -11.5), 0.0)
    return batch, imgs, masked


# ---- peak memory of one pass ----------------------------------------------------------------------


class PeakMemory:
    """Peak memory above the state at ``__enter__``: CUDA allocator stats on GPU, the process's RSS
    high-water mark on CPU (reset through /proc/self/clear_refs; sampled every 2 ms where that is
    not allowed)."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()
        self.increase_gb = float("nan")
        self.kind = "cuda_max_allocated" if self.cuda else "rss_hwm"

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def __enter__(self) -> PeakMemory:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._status("VmRSS")
        self._sampled = self.base
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._reset = self._status("VmHWM") <= self.base + (64 << 20)
        except OSError:
            self._reset = False
        if not self._reset:
            self.kind = "rss_sampled"
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, self._status("VmRSS"))

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self._reset:
            peak = self._status("VmHWM")
        else:
            self._stop.set()
            self._thread.join()
            peak = self._sampled
        self.increase_gb = (peak - self.base) / 2**30


# ---- the passes (each in its own process) ----------------------------------------------------------


def _budget(args: argparse.Namespace, rows_per_pass: int, mean_row: float, longest: int) -> int:
    """A token budget of about ``rows_per_pass`` average rows, never below the longest row."""
    return max(longest, int(rows_per_pass * mean_row))


def run_pass(name: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.core.microbatch import response_padding
    from trainer.core.modeling import load_processor, micro_batch_plan

    spec = VARIANTS.get(variant, {})
    on_gpu = torch.cuda.is_available()
    dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    processor = load_processor(args.model, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    if name == "vllm":
        return run_vllm(args, processor)
    rows = args.learner_rows if name == "learner" else args.logprob_rows
    micro = args.learner_micro if name == "learner" else args.logprob_micro
    batch, images, masked = proxy_batch(processor, rows, 5, args.vocab, args.seed)
    totals = (batch.prompt_mask.sum(1) + batch.response_lengths).tolist()
    mean_row = sum(totals) / len(totals)
    budget = _budget(args, micro * spec.get("scale", 1), mean_row, max(totals)) if spec.get("budget") else None
    chunk = (args.learner_chunk if name == "learner" else args.logprob_chunk) if spec.get("chunk") else None
    plan = micro_batch_plan(batch, micro_batch_size=micro, max_tokens=budget)
    slots, real = response_padding(batch.response_lengths.tolist(), plan)
    out: dict[str, Any] = {
        "pass": name,
        "variant": variant,
        "device": "cuda" if on_gpu else "cpu",
        "dtype": dtype,
        "vocab": args.vocab,
        "rows": rows,
        "micro_batch_size": micro,
        "max_tokens_per_micro_batch": budget,
        "logits_chunk_size": chunk,
        "micro_batches": len(plan),
        "response_tokens": real,
        "response_width": int(batch.response_ids.shape[1]),
        "prompt_tokens_mean": round(float(batch.prompt_mask.sum(1).float().mean()), 1),
        "pad_frac": round(1 - real / slots, 4),
    }
    if name == "learner":
        from trainer.core.config import AlgoConfig, LearnerConfig
        from trainer.learner.learner import Learner

        learner = Learner(
            args.model,
            LearnerConfig(
                num_gpus=1 if on_gpu else 0,
                zero_stage=0,
                dtype=dtype,
                lr=1e-6,
                mini_batch_size=rows,
                micro_batch_size=micro,
                max_tokens_per_micro_batch=budget,
                logits_chunk_size=chunk,
            ),
            AlgoConfig(name="papo", gamma=0.02, beta=0.0),
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
        )
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            metrics = learner.train_step(batch, images)
            seconds = time.perf_counter() - t0
        assert math.isfinite(metrics["loss"]), metrics
        out["loss"] = metrics["loss"]
    else:
        from trainer.core.modeling import load_model, response_logprobs

        device = "cuda" if on_gpu else "cpu"
        model = load_model(args.model, dtype=dtype).to(device).eval()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            logp, _ = response_logprobs(
                model, processor.image_processor, batch, masked, micro_batch_size=micro, plan=plan, chunk_size=chunk
            )
            seconds = time.perf_counter() - t0
        out["logp_sum"] = float(logp.double().sum())
    out.update(
        peak_increase_gb=round(mem.increase_gb, 3),
        memory_kind=mem.kind,
        seconds=round(seconds, 2),
        tokens_per_s=round(real / seconds, 1),
    )
    return out


def run_vllm(args: argparse.Namespace, processor: Any) -> dict[str, Any]:
    import torch

    from services.rollout.types import RolloutRequest, SamplingSpec
    from services.rollout.worker import RolloutWorker

    batch, images, _ = proxy_batch(processor, args.gen_prompts * 5, 5, args.vocab, args.seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}]
    requests = [RolloutRequest(messages=messages, images=images[i * 5]) for i in range(args.gen_prompts)]
    spec = SamplingSpec(n=5, temperature=1.0, top_p=0.99, max_tokens=args.gen_tokens, min_tokens=args.gen_tokens)
    on_gpu = torch.cuda.is_available()
    worker = RolloutWorker(
        args.model,
        backend="vllm",
        dtype=args.dtype or ("bfloat16" if on_gpu else "float32"),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        max_model_len=4096,
        **({} if on_gpu else {"cpu_kvcache_space_gb": 2}),
    )
    engine = worker.engine
    rows = []
    try:
        worker.generate(requests[:1], spec)  # warm-up
        # The vision-token block two ways (the engine's bad words, the vocabulary-sized whitelist)
        # against no block at all, alternating so drift in the machine's speed falls on all three.
        default = engine.block_mode
        times: dict[str, list[float]] = {mode: [] for mode in BLOCK_MODES}
        peaks: dict[str, PeakMemory] = {}
        for _ in range(args.gen_repeats):
            for variant in times:
                engine.block_mode = variant
                with PeakMemory() as peaks[variant]:
                    t0 = time.perf_counter()
                    result = worker.generate(requests, spec)
                    times[variant].append(time.perf_counter() - t0)
                if result.errors:
                    raise RuntimeError(f"vLLM errors: {result.errors}")
                sampled = result.batch.response_ids[result.batch.response_mask]
                if variant != "none" and bool(torch.isin(sampled, torch.tensor(engine.blocked)).any()):
                    raise RuntimeError(f"a vision token was sampled with block_mode={variant}")
        engine.block_mode = default
        tokens = int(result.num_tokens)
        for variant, ts in times.items():
            seconds, mem = min(ts), peaks[variant]
            rows.append(
                {
                    "pass": "vllm",
                    "variant": f"block: {variant}" + (" (default)" if variant == default else ""),
                    "device": "cuda" if on_gpu else "cpu",
                    "vocab": args.vocab,
                    "rows": args.gen_prompts * 5,
                    "response_tokens": tokens,
                    "pad_frac": 0.0,
                    "peak_increase_gb": round(mem.increase_gb, 3),
                    "memory_kind": mem.kind + ("" if on_gpu else " (the driver process; engine core not counted)"),
                    "seconds": round(seconds, 3),
                    "seconds_all": [round(t, 3) for t in ts],
                    "tokens_per_s": round(tokens / seconds, 1),
                }
            )
    finally:
        worker.shutdown()
    free = rows[BLOCK_MODES.index("none")]
    for row in rows:
        row["block_overhead_pct"] = round(100 * (row["seconds"] / free["seconds"] - 1), 2)
    return {"results": rows}


# ---- driver -------------------------------------------------------------------------------------------


def _child(name: str, variant: str, args: argparse.Namespace, model: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, variant, "--model", str(model)]
    for key in (
        "vocab",
        "seed",
        "learner_rows",
        "learner_micro",
        "learner_chunk",
        "logprob_rows",
        "logprob_micro",
        "logprob_chunk",
        "gen_prompts",
        "gen_tokens",
        "gen_repeats",
    ):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout_s)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{name}/{variant} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--passes", nargs="+", default=["learner", "logprob", "vllm"], choices=list(PASS_VARIANTS))
    ap.add_argument("--variants", nargs="+", default=None, help="default: every variant of each pass")
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--learner-rows", type=int, default=16, help="responses in the learner's mini-batch")
    ap.add_argument("--learner-micro", type=int, default=2, help="7B config: learner.micro_batch_size 2")
    ap.add_argument("--learner-chunk", type=int, default=512, help="learner.logits_chunk_size")
    ap.add_argument("--logprob-rows", type=int, default=32)
    ap.add_argument("--logprob-micro", type=int, default=4, help="3B config: 16, 7B: 8; scaled to the rows")
    ap.add_argument("--logprob-chunk", type=int, default=1024, help="logprob.logits_chunk_size")
    ap.add_argument("--gen-prompts", type=int, default=4)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--gen-repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--model", default=None, help="an existing proxy model folder (default: written to a temp dir)")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    ap.add_argument("--child", nargs=2, metavar=("PASS", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        out = run_pass(args.child[0], args.child[1], args)
        print(json.dumps(out if "results" in out else {"results": [out]}), flush=True)
        return 0

    load = warn_if_loaded("before the scale proxy", "times and tokens/s are then not comparable")
    with tempfile.TemporaryDirectory(prefix="papo-scale-") as tmp:
        model = Path(args.model) if args.model else write_proxy_model(Path(tmp) / "model", args.vocab, args.seed)
        rows = []
        for name in args.passes:
            for variant in PASS_VARIANTS[name]:
                if args.variants and variant not in args.variants and name != "vllm":
                    continue
                t0 = time.perf_counter()
                for row in _child(name, variant, args, model)["results"]:
                    rows.append(row)
                    print(
                        f"  {name:<8} {row['variant']:<20} {row['peak_increase_gb']:>7.3f} GB  "
                        f"{row['tokens_per_s']:>9.1f} tok/s  pad {100 * row['pad_frac']:5.1f}%  "
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
    base = {r["pass"]: r for r in rows if r["variant"] == "before"}
    for r in rows:
        ref = base.get(r["pass"])
        if ref is not None:
            r["peak_vs_before"] = round(r["peak_increase_gb"] / ref["peak_increase_gb"], 3)
            r["tokens_per_s_vs_before"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 2)
    print(
        f"\n{'pass':<8} {'variant':<20} {'rows':>4} {'tokens':>6} {'pad %':>6} {'peak GB':>8} {'x before':>8} "
        f"{'time s':>7} {'tok/s':>8} {'x before':>8}"
    )
    for r in rows:
        print(
            f"{r['pass']:<8} {r['variant']:<20} {r['rows']:>4} {r['response_tokens']:>6} {100 * r['pad_frac']:>6.1f} "
            f"{r['peak_increase_gb']:>8.3f} {r.get('peak_vs_before', float('nan')):>8.2f} {r['seconds']:>7.2f} "
            f"{r['tokens_per_s']:>8.1f} {r.get('tokens_per_s_vs_before', float('nan')):>8.2f}"
        )
    for r in rows:
        if "block_overhead_pct" in r:
            print(f"vision-token {r['variant']}: {r['block_overhead_pct']:+.2f}% of generation time against no block")
    write_report(
        args.out,
        {"machine": machine_info(), "load_warning": load, "args": vars(args), "rows": rows},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
