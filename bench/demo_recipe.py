"""The demo's RL recipe without the distributed stack: a one-process GRPO loop (and a supervised
ceiling) on the demo assets, several variants side by side.

Why it exists: ``papo train`` on the demo takes ~6 minutes per seed and mixes five Ray services,
so "the demo does not learn" could be the stack or the recipe. This loop uses the same pieces
that decide the numbers (``trainer.core.modeling`` scoring, ``trainer.core.algos.papo_loss`` and
``group_advantages``, ``rewards.score("exact")``, the demo's prompts and images) but samples
with HF ``generate`` and steps a plain ``torch.optim.AdamW`` in one process, about twice as fast
per step as the stack. When a variant does not learn here either, the recipe is the problem.

Modes (the part before ``:`` of a ``--variant``):

* ``grpo``: sample ``n`` responses for each of ``prompts`` train prompts, reward them, GRPO
  advantages, one on-policy step of the clipped loss plus ``beta`` times the k3 reference KL
  (the reference is the starting model), gradient clipping at 1.0;
* ``sft``: supervised steps on the same train prompts with their true answers in the warm
  start's response format (what the policy could learn from ``prompts`` labelled rows a step).

Variant options (``name:mode:key=value,...``): ``lr``, ``beta2``, ``beta`` (reference KL),
``prompts``, ``n``, ``steps``, ``max_new`` (tokens per response), ``warmup`` (steps of linear
LR warm-up: the first steps of a fresh Adam move every weight by about ``lr``, whatever its
gradient's size). Every variant starts from the
same weights (``--assets``/model) and seed. Greedy accuracy on the validation split, and on
fully black images, is measured every ``--eval-every`` steps.

Prints a table (start, best and final accuracy, gain of the best over start, black accuracy,
seconds per step) and writes JSON (default ``bench/results/demo_recipe.json``) with every
variant's eval curve and train statistics every 5 steps.

Run (about 2-3 minutes per 200-step GRPO variant on a quiet 2-core machine)::

    .venv/bin/python bench/demo_recipe.py                       # grpo default vs sft ceiling
    .venv/bin/python bench/demo_recipe.py --variant a:grpo:lr=1e-3 --variant b:grpo:lr=1e-3,beta2=0.99
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import machine_info, warn_if_loaded, write_report  # noqa: E402

DEFAULTS: dict[str, float] = {
    "lr": 1e-3,
    "beta2": 0.999,
    "beta": 0.04,
    "prompts": 16,
    "n": 8,
    "steps": 200,
    "max_new": 16,
    "warmup": 0,
}
INT_KEYS = {"prompts", "n", "steps", "max_new", "warmup"}


@dataclass
class Example:
    prompt_ids: list[int]
    text: str
    image: Any
    answer: str


def parse_variant(spec: str) -> tuple[str, str, dict[str, float]]:
    """``name:mode:key=value,...`` -> (name, mode, options with defaults filled in)."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or parts[1] not in ("grpo", "sft"):
        raise SystemExit(f"--variant {spec!r}: expected NAME:grpo|sft[:key=value,...]")
    opts = dict(DEFAULTS)
    for item in parts[2].split(",") if len(parts) == 3 and parts[2] else []:
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"--variant {spec!r}: unknown option {key!r}; allowed: {', '.join(DEFAULTS)}")
        opts[key] = int(value) if key in INT_KEYS else float(value)
    return parts[0], parts[1], opts


def load_examples(processor: Any, data_dir: Path, split: str) -> list[Example]:
    from trainer.core.data import load_image, load_split

    out = []
    for ex in load_split(data_dir, split).examples:
        image = load_image(ex.image_paths[0])
        text = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        out.append(Example(ids, text, image, ex.answer))
    return out


def generate(
    model: Any, processor: Any, examples: list[Example], *, n: int, max_new: int, sample: bool, black: bool = False
) -> list[list[int]]:
    """Response token ids (up to and including EOS), ``n`` per example, example-major."""
    import torch
    from PIL import Image

    from trainer.demo.model import VISION_TOKEN_IDS

    tok = processor.tokenizer
    images = [Image.new("RGB", e.image.size) if black else e.image for e in examples]
    inputs = processor(
        text=[e.text for e in examples], images=images, padding=True, return_tensors="pt", return_mm_token_type_ids=True
    )
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new,
            do_sample=sample,
            num_return_sequences=n,
            temperature=1.0 if sample else None,
            top_p=1.0 if sample else None,
            bad_words_ids=[[t] for t in VISION_TOKEN_IDS],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    responses = []
    for row in out[:, inputs["input_ids"].shape[1] :].tolist():
        ids = []
        for t in row:
            ids.append(t)
            if t == tok.eos_token_id:
                break
        responses.append(ids)
    return responses


def accuracy(model: Any, processor: Any, examples: list[Example], *, max_new: int, black: bool) -> float:
    import rewards

    model.eval()
    correct = 0.0
    for start in range(0, len(examples), 64):
        part = examples[start : start + 64]
        texts = processor.tokenizer.batch_decode(
            generate(model, processor, part, n=1, max_new=max_new, sample=False, black=black), skip_special_tokens=True
        )
        correct += sum(rewards.score("exact", t, e.answer)["accuracy"] for t, e in zip(texts, part))
    return correct / max(len(examples), 1)


def as_batch(examples: list[Example], responses: list[list[int]], pad_id: int) -> Any:
    from trainer.core.batch import RolloutBatch

    return RolloutBatch.from_sequences(
        [e.prompt_ids for e in examples],
        responses,
        [[0.0] * len(r) for r in responses],
        group_ids=list(range(len(responses))),
        row_ids=list(range(len(responses))),
        weight_version=0,
        image_refs=[[] for _ in responses],
        answers=[e.answer for e in examples],
        pad_token_id=pad_id,
    )


def run_variant(
    name: str,
    mode: str,
    opts: dict[str, float],
    *,
    model_dir: Path,
    processor: Any,
    train: list[Example],
    val: list[Example],
    eval_every: int,
    seed: int,
) -> dict[str, Any]:
    import torch

    import rewards
    from trainer.core.algos import LossSettings, group_advantages, papo_loss
    from trainer.core.modeling import load_model, model_inputs, token_logprobs
    from trainer.demo.warmstart import RESPONSE_TEMPLATE

    torch.manual_seed(seed)
    tok = processor.tokenizer
    model = load_model(str(model_dir), dtype="float32")
    ref = copy.deepcopy(model).eval()
    optim = torch.optim.AdamW(model.parameters(), lr=opts["lr"], betas=(0.9, opts["beta2"]), weight_decay=0.0)
    order = torch.Generator().manual_seed(seed)
    n = int(opts["n"]) if mode == "grpo" else 1
    max_new = int(opts["max_new"])
    curve, stats = [], []
    grpo_loss = LossSettings(beta=opts["beta"])

    def evaluate(step: int) -> None:
        curve.append(
            {
                "step": step,
                "accuracy": accuracy(model, processor, val, max_new=max_new, black=False),
                "black_accuracy": accuracy(model, processor, val, max_new=max_new, black=True),
            }
        )
        print(
            f"  [{name}] step {step}: eval accuracy {curve[-1]['accuracy']:.3f}, "
            f"black {curve[-1]['black_accuracy']:.3f}",
            flush=True,
        )

    evaluate(0)
    t0 = time.perf_counter()
    for step in range(1, int(opts["steps"]) + 1):
        picks = [train[i] for i in torch.randint(len(train), (int(opts["prompts"]),), generator=order).tolist()]
        rows = [e for e in picks for _ in range(n)]
        if mode == "grpo":
            model.eval()
            responses = generate(model, processor, picks, n=n, max_new=max_new, sample=True)
            texts = tok.batch_decode(responses, skip_special_tokens=True)
            scores = [rewards.score("exact", t, e.answer) for t, e in zip(texts, rows)]
            reward = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
            advantages = group_advantages(reward, n)
        else:
            responses = [
                tok.encode(RESPONSE_TEMPLATE.format(answer=e.answer), add_special_tokens=False) + [tok.eos_token_id]
                for e in rows
            ]
        batch = as_batch(rows, responses, int(tok.pad_token_id or 0))
        model.train()
        inputs = model_inputs(model, processor.image_processor, batch, [[e.image] for e in rows])
        logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
        if mode == "grpo":
            with torch.no_grad():
                ref_logp, _ = token_logprobs(ref, inputs, batch.response_ids, batch.response_mask)
            loss, metrics = papo_loss(
                logp, logp.detach(), advantages, batch.response_mask, ref_logp=ref_logp, settings=grpo_loss
            )
        else:
            loss = -(logp.sum() / batch.response_mask.sum())
            metrics = {"entropy": float(loss.detach())}
        for group in optim.param_groups:
            group["lr"] = opts["lr"] * min(1.0, step / opts["warmup"]) if opts["warmup"] else opts["lr"]
        optim.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optim.step()
        if step % 5 == 0:
            row = {
                "step": step,
                "entropy": metrics["entropy"],
                "grad_norm": grad_norm,
                "response_length": float(batch.response_mask.sum(1).float().mean()),
            }
            if mode == "grpo":
                row.update(
                    reward=float(reward.mean()),
                    accuracy=sum(s["accuracy"] for s in scores) / len(scores),
                    ref_kl=metrics.get("ref_kl", 0.0),
                    groups_with_signal=float((advantages.reshape(-1, n).abs().sum(1) > 0).float().mean()),
                )
            stats.append(row)
        if step % eval_every == 0 or step == int(opts["steps"]):
            evaluate(step)
    seconds = time.perf_counter() - t0
    accs = [c["accuracy"] for c in curve]
    return {
        "name": name,
        "mode": mode,
        "options": opts,
        "curve": curve,
        "train": stats,
        "start": accs[0],
        "best": max(accs),
        "final": accs[-1],
        "gain": max(accs) - accs[0],
        "black_final": curve[-1]["black_accuracy"],
        "s_per_step": seconds / max(int(opts["steps"]), 1),
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    from trainer.core.modeling import load_processor
    from trainer.demo.paths import demo_assets_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=Path, default=None, help="demo assets folder (default: the cached one)")
    ap.add_argument(
        "--variant",
        action="append",
        default=None,
        help="NAME:grpo|sft[:key=value,...] (repeatable; default: grpo and an sft ceiling)",
    )
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-pixels", type=int, default=56 * 56)
    ap.add_argument("--max-pixels", type=int, default=112 * 112)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "demo_recipe.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = [parse_variant(v) for v in (args.variant or ["grpo:grpo", "sft:sft:prompts=64"])]
    assets = (args.assets or demo_assets_dir()).expanduser()
    if not (assets / "model").is_dir():
        raise SystemExit(f"{assets}/model not found: run `papo demo-assets {assets}` (or `papo train` once) first")
    warning = warn_if_loaded("start", "seconds per step are inflated")
    processor = load_processor(str(assets / "model"), min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    train = load_examples(processor, assets / "data", "train")
    val = load_examples(processor, assets / "data", "validation")
    results = []
    for name, mode, opts in variants:
        print(f"variant {name} ({mode}, {opts})", flush=True)
        results.append(
            run_variant(
                name,
                mode,
                opts,
                model_dir=assets / "model",
                processor=processor,
                train=train,
                val=val,
                eval_every=args.eval_every,
                seed=args.seed,
            )
        )
    print(
        f"\n{'variant':<14}{'mode':<6}{'steps':>6}{'start':>8}{'best':>8}{'final':>8}{'gain':>8}"
        f"{'black':>8}{'s/step':>8}"
    )
    for r in results:
        print(
            f"{r['name']:<14}{r['mode']:<6}{int(r['options']['steps']):>6}{r['start']:>8.3f}{r['best']:>8.3f}"
            f"{r['final']:>8.3f}{r['gain']:>+8.3f}{r['black_final']:>8.3f}{r['s_per_step']:>8.2f}"
        )
    write_report(
        args.out,
        {
            "machine": machine_info(),
            "assets": str(assets),
            "seed": args.seed,
            "validation_rows": len(val),
            "load_warning": warning,
            "variants": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
