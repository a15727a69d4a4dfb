"""The demo's supervised warm start: teach the tiny random model to half-see before RL.

Owns :class:`SFTWarmStart`, the :class:`trainer.demo.assets.WarmStart` implementation that
:func:`trainer.demo.assets.build_demo_assets` runs on a freshly built asset folder. docs/demo.md
measured that RL from random weights never produces the answer format (no reward signal), and
the paper starts RL from an instruction-tuned model; so the demo's policy starts from a short
supervised run with true labels (the ``sft_easy`` and ``sft`` splits, disjoint from
train/validation by construction), stopped once it is well above chance, far from solved, and
gives every answer a real probability.

What it does, in place on ``model_dir``:

* prompts are exactly what the trainer sends (``trainer.core.data.load_split`` with PAPO's format
  prompt, the chat template with ``add_generation_prompt=True``, image pads expanded by the
  processor under the job's pixel limits); the target is a short response in the reward's format,
  ``<think> </think> \\boxed{ANSWER}`` followed by ``<|im_end|>``;
* loss: mean negative log-likelihood of the response tokens only, through the shared forward
  (:func:`trainer.core.modeling.model_inputs` + :func:`trainer.core.modeling.token_logprobs`), so training
  and RL score tokens identically (explicit m-RoPE positions);
* plain torch AdamW on CPU in float32 at a fixed thread count, deterministic under
  ``torch.manual_seed(seed)``; the first ``easy_steps`` steps on ``sft_easy`` (larger shapes),
  then ``sft``;
* every ``eval_every`` steps after that, on the first ``eval_size`` rows of ``sft_eval`` (drawn
  like the RL task, never trained on): each answer's mean probability given its image (one
  forward pass) and, once every answer reaches ``min_coverage``, greedy HF ``generate`` graded
  by ``rewards.score("exact", ...)``; stops at the first check that is covered and at least at
  the target band's low end, or at ``max_steps``;
* saves with ``save_pretrained`` (weights and model config only; tokenizer and processor files are
  not touched) and returns facts for the manifest: accuracy and answer probabilities per answer,
  every check, accuracy on fully black images (the model must use the image: that one stays near
  chance) and the saved weights' sha256, which differs between machines whose float kernels do.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

import rewards
from trainer.core.batch import RolloutBatch
from trainer.core.data import load_image, load_split
from trainer.core.modeling import load_model, load_processor, model_inputs, token_logprobs
from trainer.demo.model import VISION_TOKEN_IDS

logger = logging.getLogger(__name__)

#: The response the model is taught: the reward's format with an empty monologue (the demo's
#: answers need no reasoning, and a short response keeps training and RL generation cheap).
RESPONSE_TEMPLATE = "<think> </think> \\boxed{{{answer}}}"
#: The splits it trains on first (``easy_steps``) and then, and decides on (trainer.demo.dataset:
#: ``sft`` and ``sft_eval`` are drawn like the RL task, ``sft_easy`` on larger shapes).
EASY_SPLIT, TRAIN_SPLIT, EVAL_SPLIT = "sft_easy", "sft", "sft_eval"


@dataclasses.dataclass(frozen=True)
class SFTWarmStart:
    """Supervised warm start of the demo's tiny model on the ``sft`` split (a ``WarmStart``).

    Batch 64 and lr 2e-3 as in docs/demo.md; :func:`demo_warm_start` is the demo's setting of
    the stopping rule. ``min_pixels``/``max_pixels`` must be the trainer's ``model.min_pixels``/
    ``model.max_pixels`` (the prompts' image-token counts depend on them).
    """

    max_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    target_band: tuple[float, float] = (0.35, 0.55)
    """Stop at the first check whose held-out greedy accuracy is at least ``low`` (and covers
    every answer: ``min_coverage``); past ``high``, the closer of it and the check before."""
    min_coverage: float = 0.0
    """Stop only once every answer's mean probability (given the image and the response's format
    up to it) on the held-out rows of that answer is at least this: RL reinforces only answers it
    samples (docs/demo.md)."""
    num_threads: int = 2
    """torch threads for the whole warm start, whatever the machine's core count."""
    easy_steps: int = 0
    """The first steps train on the ``sft_easy`` split (larger shapes) instead of ``sft``; the
    stopping rule applies from then on."""
    """torch threads for the whole warm start, whatever the machine's core count."""
    eval_size: int = 128
    """Held-out rows: the last ``eval_size`` rows of the ``sft`` split, never trained on."""
    eval_every: int = 10
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        low, high = self.target_band
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"target_band={self.target_band} must satisfy 0 <= low <= high <= 1")
        for name in ("max_steps", "batch_size", "eval_size", "eval_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.easy_steps < self.max_steps:
            raise ValueError(f"easy_steps={self.easy_steps} must lie in [0, max_steps={self.max_steps})")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")
        if not 0.0 <= self.min_coverage <= 1.0:
            raise ValueError(f"min_coverage={self.min_coverage} must lie in [0, 1]")
        if self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be >= 1")

    @property
    def recipe(self) -> str:
        """Every field plus the response format and the implementation version: the cache key
        part of ``build_demo_assets`` (changing any of them rebuilds the assets)."""
        fields = ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"sft-v2({fields},response={RESPONSE_TEMPLATE!r})"

    def __call__(self, model_dir: Path, data_dir: Path, *, seed: int) -> dict[str, Any]:
        """Train ``model_dir`` in place on ``data_dir``'s ``sft`` split; return manifest facts."""
        return _run(self, Path(model_dir), Path(data_dir), seed)


def demo_warm_start(min_pixels: int, max_pixels: int) -> SFTWarmStart:
    """The embedded demo's warm start: on the slope of the learning curve, every answer sampled.

    20 steps on ``sft_easy`` (larger shapes) first: on the task's shapes alone the held-out
    accuracy sits at chance, or answers the colours in two groups, for 230 to more than 400 steps
    depending on the seed; after the easy steps it leaves that plateau within a few tens of steps
    (docs/demo.md). Then ``sft``, with a check every 2 steps on ``sft_eval``: it stops at the
    first check that answers at least 0.45 of the task's images right and gives every colour's
    right answer a mean probability of at least 0.2 (a group of 4 samples then holds a rewarded
    one more than half the time). A start stopped near 0.35, on its plateau, did not learn in RL;
    an answer RL never samples it never learns.
    """
    return SFTWarmStart(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        target_band=(0.45, 0.6),
        min_coverage=0.2,
        easy_steps=20,
        eval_size=256,
        eval_every=2,
        max_steps=300,
    )


# ---------------------------------------------------------------------------------------------
# Implementation
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Example:
    prompt_ids: list[int]  # the prompt as the engine sees it: chat template, image pads expanded
    gen_text: str  # the same prompt as text (for batched generation through the processor)
    image: Image.Image
    answer: str
    template: str | None


class _CachedImageProcessor:
    """Wraps the image processor so each sft image is processed once, not once per epoch.

    :func:`trainer.core.modeling.pixel_inputs` calls the processor for every row of every batch; the
    same few hundred images recur every epoch, and processing them again costs a sizeable share
    of a CPU step. The key is the image objects' identity (they live as long as the run).
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._cache: dict[tuple[int, ...], Any] = {}

    def __call__(self, *, images: list[Image.Image], return_tensors: str = "pt") -> Any:
        key = tuple(id(im) for im in images)
        if key not in self._cache:
            self._cache[key] = self._inner(images=images, return_tensors=return_tensors)
        return self._cache[key]


def _templates_by_id(data_dir: Path, split: str) -> dict[int, str]:
    """Row id -> template name from ``{split}.parquet`` (the trainer's loader does not read it),
    for per-template accuracy in the facts; empty when the column is absent."""
    path = data_dir / f"{split}.parquet"
    if not path.is_file() or "template" not in pq.read_schema(path).names:
        return {}
    table = pq.read_table(path, columns=["id", "template"])
    return dict(zip(table.column("id").to_pylist(), table.column("template").to_pylist()))


def _prepare(processor: Any, data_dir: Path, split_name: str = TRAIN_SPLIT) -> list[_Example]:
    if not (data_dir / f"{split_name}.parquet").is_file():
        return []
    split = load_split(data_dir, split_name)  # PAPO's format prompt, exactly as the trainer builds prompts
    templates = _templates_by_id(data_dir, split_name)
    out = []
    for ex in split.examples:
        if len(ex.image_paths) != 1:
            raise ValueError(
                f"{split_name} row {ex.row_id} has {len(ex.image_paths)} images; the warm start expects one"
            )
        image = load_image(ex.image_paths[0])
        text = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        out.append(_Example(ids, text, image, ex.answer, templates.get(ex.row_id)))
    return out


def _response_ids(tokenizer: Any, answer: str) -> list[int]:
    ids = tokenizer.encode(RESPONSE_TEMPLATE.format(answer=answer), add_special_tokens=False)
    return [*ids, int(tokenizer.eos_token_id)]


def _batch(examples: Sequence[_Example], responses: Sequence[list[int]], pad_id: int) -> Any:
    return RolloutBatch.from_sequences(
        [e.prompt_ids for e in examples],
        responses,
        [[0.0] * len(r) for r in responses],
        group_ids=list(range(len(examples))),
        row_ids=list(range(len(examples))),
        weight_version=0,
        image_refs=[[] for _ in examples],
        answers=[e.answer for e in examples],
        pad_token_id=pad_id,
    )


@torch.no_grad()
def _greedy_correct(
    model: Any,
    processor: Any,
    examples: Sequence[_Example],
    *,
    black: bool,
    max_new_tokens: int,
    chunk: int = 64,
) -> list[float]:
    """Greedy HF ``generate`` graded by ``rewards.score("exact")``: one accuracy per example.

    ``black`` replaces every image by an all-black one of the same size (same image-token count),
    which measures how much of the accuracy needs the image.
    """
    tok = processor.tokenizer
    model.eval()
    correct: list[float] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        images = [Image.new("RGB", e.image.size) if black else e.image for e in part]
        # Left padding (the tokenizer's default) keeps every prompt's end at the last column;
        # mm_token_type_ids makes transformers compute m-RoPE positions, as the trainer does.
        inputs = processor(
            text=[e.gen_text for e in part],
            images=images,
            padding=True,
            return_tensors="pt",
            return_mm_token_type_ids=True,
        )
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            # A sampled image/video pad breaks vLLM's prompt checks; never emit one here either.
            bad_words_ids=[[t] for t in VISION_TOKEN_IDS],
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        texts = tok.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += [rewards.score("exact", t, e.answer)["accuracy"] for t, e in zip(texts, part)]
    return correct


def _answer_span(tokenizer: Any, answer: str) -> tuple[int, int]:
    """Where ``answer``'s tokens sit in its taught response (:func:`_response_ids`)."""
    prefix = RESPONSE_TEMPLATE.split("{answer}")[0].replace("{{", "{").replace("}}", "}")
    head = tokenizer.encode(prefix, add_special_tokens=False)
    full = _response_ids(tokenizer, answer)
    tail = len(full) - len(tokenizer.encode(prefix + answer, add_special_tokens=False))
    if full[: len(head)] != head or tail < 1:
        raise ValueError(f"the tokenizer merges the answer {answer!r} into the response's format tokens")
    return len(head), len(full) - tail


@torch.no_grad()
def _answer_prob(
    model: Any,
    image_processor: Any,
    examples: Sequence[_Example],
    responses: Sequence[list[int]],
    spans: Sequence[tuple[int, int]],
    pad_id: int,
    chunk: int = 64,
) -> list[float]:
    """P(the correct answer's tokens | prompt, image, the response's format up to the answer), one
    per example, at temperature 1.

    The answer is the one decision RL has to learn (the format is learnt within about 30
    supervised steps); this is how often a sample that reaches the answer picks the right one,
    so whether RL can see that answer rewarded at all: a group of ``n`` such samples holds a
    right one with probability 1 - (1 - p)^n.
    """
    model.eval()
    out: list[float] = []
    for start in range(0, len(examples), chunk):
        part, resp = examples[start : start + chunk], responses[start : start + chunk]
        batch = _batch(part, resp, pad_id)
        inputs = model_inputs(model, image_processor, batch, [[e.image] for e in part])
        logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
        out += [float(torch.exp(row[a:b].sum())) for row, (a, b) in zip(logp, spans[start : start + chunk])]
    return out


def _by_key(keys: Sequence[str | None], values: Sequence[float]) -> dict[str, float]:
    """Mean of ``values`` per key (``None`` keys left out), keys sorted."""
    groups: dict[str, list[float]] = {}
    for k, v in zip(keys, values):
        if k is not None:
            groups.setdefault(k, []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


@dataclasses.dataclass(frozen=True)
class _Check:
    """One held-out check of the warm start: what the stopping rule looks at."""

    step: int
    accuracy: float | None
    """Greedy held-out accuracy; None where coverage was short and generation was skipped."""
    recall: dict[str, float]
    """Greedy accuracy per answer: how often the right answer is *the* answer."""
    p_answer: dict[str, float]
    """Mean P(correct answer | image, format) per answer: how often a sample picks it."""
    correct: tuple[float, ...] = dataclasses.field(repr=False, default=())
    """Per held-out row: 1.0 where the greedy answer was right."""

    @property
    def coverage(self) -> float:
        """The weakest answer's mean P(correct answer): RL can only reinforce what it samples."""
        return min(self.p_answer.values(), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "accuracy": None if self.accuracy is None else round(self.accuracy, 4),
            "coverage": round(self.coverage, 4),
            "recall": self.recall,
            "p_answer": self.p_answer,
        }


@dataclasses.dataclass(frozen=True)
class _HeldOut:
    """The rows every check scores, with their taught responses and the answer's place in each."""

    examples: list[_Example]
    responses: list[list[int]]
    spans: list[tuple[int, int]]


def _check(
    cfg: SFTWarmStart,
    step: int,
    model: Any,
    processor: Any,
    image_processor: Any,
    held: _HeldOut,
    pad_id: int,
    *,
    final: bool = False,
) -> _Check:
    held_out = held.examples
    answers = [e.answer for e in held_out]
    p = _by_key(answers, _answer_prob(model, image_processor, held_out, held.responses, held.spans, pad_id))
    if min(p.values(), default=0.0) < cfg.min_coverage and not final:
        # An answer is still too rare to stop here, whatever the accuracy: skip the generation
        # (a forward pass is a fraction of its cost) while the warm start is short of coverage.
        return _Check(step, None, {}, p)
    correct = _greedy_correct(model, processor, held_out, black=False, max_new_tokens=cfg.max_new_tokens)
    return _Check(step, sum(correct) / len(correct), _by_key(answers, correct), p, tuple(correct))


def _run(cfg: SFTWarmStart, model_dir: Path, data_dir: Path, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    processor = load_processor(str(model_dir), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    tok = processor.tokenizer
    train = _prepare(processor, data_dir, TRAIN_SPLIT)
    easy = _prepare(processor, data_dir, EASY_SPLIT) if cfg.easy_steps else []
    held_out = _prepare(processor, data_dir, EVAL_SPLIT)[: cfg.eval_size]
    if len(train) < cfg.batch_size or len(held_out) < cfg.eval_size or (cfg.easy_steps and len(easy) < cfg.batch_size):
        # Too few rows to train or to decide: a warm start here would measure nothing. Leave
        # the weights as built and say so in the manifest (tiny test assets).
        reason = (
            f"{TRAIN_SPLIT} has {len(train)} rows (batch_size {cfg.batch_size}), {EASY_SPLIT} {len(easy)} "
            f"(easy_steps {cfg.easy_steps}) and {EVAL_SPLIT} {len(held_out)} (eval_size {cfg.eval_size})"
        )
        logger.warning("supervised warm start skipped: %s", reason)
        return {"skipped": reason, "seconds": round(time.perf_counter() - t0, 2)}
    n_train = len(train)
    # What each stage trains on: (examples, their taught responses).
    stages = {
        name: (rows, [_response_ids(tok, e.answer) for e in rows])
        for name, rows in ((EASY_SPLIT, easy), (TRAIN_SPLIT, train))
    }
    held = _HeldOut(
        held_out, [_response_ids(tok, e.answer) for e in held_out], [_answer_span(tok, e.answer) for e in held_out]
    )
    pad_id = int(tok.pad_token_id or 0)
    image_processor = _CachedImageProcessor(processor.image_processor)

    low, high = cfg.target_band
    checks: list[_Check] = []
    threads = torch.get_num_threads()
    # fork_rng: the build must not disturb the caller's global RNG; the seed fixes the order of
    # rows and nothing else is random (no dropout). A fixed thread count: CPU reductions split
    # by thread, so the same seed on a 2- and a 16-core machine would otherwise drift apart.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(cfg.num_threads)
        try:
            model = load_model(str(model_dir), dtype="float32")
            optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            draws = {name: _epochs(len(rows), cfg.batch_size) for name, (rows, _) in stages.items() if rows}
            step, loss_value = 0, float("nan")
            prev: tuple[_Check, dict[str, torch.Tensor]] | None = None
            chosen: _Check | None = None
            while step < cfg.max_steps:
                stage = EASY_SPLIT if step < cfg.easy_steps else TRAIN_SPLIT
                examples, responses = stages[stage]
                rows = next(draws[stage])
                model.train()
                batch = _batch([examples[i] for i in rows], [responses[i] for i in rows], pad_id)
                inputs = model_inputs(model, image_processor, batch, [[examples[i].image] for i in rows])
                logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
                loss = -(logp.sum() / batch.response_mask.sum())
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optim.step()
                step += 1
                loss_value = float(loss.detach())
                if step <= cfg.easy_steps or (step - cfg.easy_steps) % cfg.eval_every and step < cfg.max_steps:
                    continue
                check = _check(cfg, step, model, processor, image_processor, held, pad_id, final=step == cfg.max_steps)
                checks.append(check)
                logger.info(
                    "warm start step %d: loss %.4f, held-out accuracy %s, coverage %.3f",
                    step,
                    loss_value,
                    "-" if check.accuracy is None else f"{check.accuracy:.3f}",
                    check.coverage,
                )
                if check.accuracy is not None and check.accuracy >= low and check.coverage >= cfg.min_coverage:
                    chosen = check
                    # Jumped over the band between two checks: keep whichever checkpoint is closer,
                    # as long as the earlier one covers every answer too.
                    if (
                        check.accuracy > high
                        and prev is not None
                        and prev[0].accuracy is not None
                        and prev[0].coverage >= cfg.min_coverage
                        and low - prev[0].accuracy < check.accuracy - high
                    ):
                        model.load_state_dict(prev[1])
                        chosen = prev[0]
                    break
                prev = (check, copy.deepcopy(model.state_dict()))
            if chosen is None:
                chosen = checks[-1]
                logger.warning(
                    "supervised warm start stopped at max_steps=%d with held-out accuracy %.3f and coverage "
                    "%.3f (asked: accuracy >= %.2f, coverage >= %.2f)",
                    cfg.max_steps,
                    chosen.accuracy,
                    chosen.coverage,
                    low,
                    cfg.min_coverage,
                )
            # ``chosen`` was measured on exactly the weights that are saved (the loop stops there),
            # and it has an accuracy: it passed the rule, or it is the last check (``final``).
            final = chosen
            assert final.accuracy is not None
            black = _greedy_correct(model, processor, held_out, black=True, max_new_tokens=cfg.max_new_tokens)
        finally:
            torch.set_num_threads(threads)

    # Weights only: the tokenizer and processor files are not written at all, and config.json
    # gets its built bytes back because loading with an explicit dtype stamps ``dtype`` into the
    # vision sub-config (same architecture, but the folder should differ only in its weights).
    config_bytes = (model_dir / "config.json").read_bytes()
    model.save_pretrained(model_dir)
    (model_dir / "config.json").write_bytes(config_bytes)
    templates = [e.template for e in held_out]
    answers = [e.answer for e in held_out]
    return {
        "steps": chosen.step,
        "steps_trained": step,
        "heldout_accuracy": round(final.accuracy, 4),
        "black_accuracy": round(sum(black) / len(black), 4),
        "coverage": round(final.coverage, 4),
        "recall_by_answer": final.recall,
        "p_answer_by_answer": final.p_answer,
        "black_recall_by_answer": _by_key(answers, black),
        "heldout_accuracy_by_template": _by_key(templates, final.correct),
        "black_accuracy_by_template": _by_key(templates, black),
        "in_band": low <= final.accuracy <= high,
        "covered": final.coverage >= cfg.min_coverage,
        "checks": [c.as_dict() for c in checks],
        "final_loss": round(loss_value, 4),
        "train_rows": n_train,
        "easy_rows": len(easy),
        "easy_steps": cfg.easy_steps,
        "heldout_rows": len(held_out),
        "num_threads": cfg.num_threads,
        "weights_sha256": _sha256(model_dir / "model.safetensors"),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _epochs(n: int, batch_size: int) -> Iterator[list[int]]:
    """Batches of row indices, a fresh permutation per epoch (the ragged tail dropped)."""
    while True:
        order = torch.randperm(n).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _sha256(path: Path) -> str:
    """The warm-started weights' checksum: two builds of one recipe on machines whose float
    kernels differ give different weights, and the manifest shows it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
