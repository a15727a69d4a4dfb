"""The demo's supervised warm start: teach the tiny random model to half-see before RL.

Owns :class:`SFTWarmStart`, the :class:`trainer.demo.assets.WarmStart` implementation that
:func:`trainer.demo.assets.build_demo_assets` runs on a freshly built asset folder. docs/demo.md
measured that RL from random weights never produces the answer format (no reward signal), and
the paper starts RL from an instruction-tuned model; so the demo's policy starts from a short
supervised run with true labels on the ``sft`` split (disjoint from train/validation by
construction), stopped once it is well above chance but far from solved.

What it does, in place on ``model_dir``:

* prompts are exactly what the trainer sends (``trainer.core.data.load_split`` with PAPO's format
  prompt, the chat template with ``add_generation_prompt=True``, image pads expanded by the
  processor under the job's pixel limits); the target is a short response in the reward's format,
  ``<think> </think> \\boxed{ANSWER}`` followed by ``<|im_end|>``;
* loss: mean negative log-likelihood of the response tokens only, through the shared forward
  (:func:`trainer.core.modeling.model_inputs` + :func:`trainer.core.modeling.token_logprobs`), so training
  and RL score tokens identically (explicit m-RoPE positions);
* plain torch AdamW on CPU in float32, deterministic under ``torch.manual_seed(seed)``;
* every ``eval_every`` steps: greedy HF ``generate`` on a held-out slice of the ``sft`` split
  (its last ``eval_size`` rows, never trained on), graded by ``rewards.score("exact", ...)``;
  stops at the first check inside the target band, or at ``max_steps``;
* saves with ``save_pretrained`` (weights and model config only; tokenizer and processor files are
  not touched) and returns facts for the manifest, including accuracy on fully black images (the
  model must use the image: that one stays near chance).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Sequence
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


@dataclasses.dataclass(frozen=True)
class SFTWarmStart:
    """Supervised warm start of the demo's tiny model on the ``sft`` split (a ``WarmStart``).

    Defaults follow docs/demo.md (batch 64, lr 2e-3: chance until ~100 steps, 0.42 at
    125, 0.81 at 175), so checks every 10 steps land inside the 0.35-0.55 band rather than
    jumping over it. ``min_pixels``/``max_pixels`` must be the trainer's ``model.min_pixels``/
    ``model.max_pixels`` (the prompts' image-token counts depend on them).
    """

    max_steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    target_band: tuple[float, float] = (0.35, 0.55)
    """Stop at the first check whose held-out greedy accuracy lies in [low, high]."""
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
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")

    @property
    def recipe(self) -> str:
        """Every field plus the response format and the implementation version: the cache key
        part of ``build_demo_assets`` (changing any of them rebuilds the assets)."""
        fields = ",".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))
        return f"sft-v1({fields},response={RESPONSE_TEMPLATE!r})"

    def __call__(self, model_dir: Path, data_dir: Path, *, seed: int) -> dict[str, Any]:
        """Train ``model_dir`` in place on ``data_dir``'s ``sft`` split; return manifest facts."""
        return _run(self, Path(model_dir), Path(data_dir), seed)


def demo_warm_start(min_pixels: int, max_pixels: int) -> SFTWarmStart:
    """The embedded demo's warm start: stopped on the slope of the learning curve, not at its foot.

    Held-out accuracy sits near chance for a few hundred steps, then climbs. Measured on colour +
    count (docs/demo.md): from a model stopped just after the plateau (0.35), neither RL nor more
    supervised steps gained anything for ~100 steps, because its visual features had not formed
    yet. From one stopped at ~0.45-0.5, RL climbs. 256 held-out rows keep a single lucky
    check on the plateau from stopping it (standard error 0.03).
    """
    return SFTWarmStart(min_pixels=min_pixels, max_pixels=max_pixels, target_band=(0.45, 0.55), eval_size=256)


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


def _templates_by_id(data_dir: Path) -> dict[int, str]:
    """Row id -> template name from ``sft.parquet`` (the trainer's loader does not read it), for
    per-template accuracy in the facts; empty when the column is absent."""
    path = data_dir / "sft.parquet"
    if not path.is_file() or "template" not in pq.read_schema(path).names:
        return {}
    table = pq.read_table(path, columns=["id", "template"])
    return dict(zip(table.column("id").to_pylist(), table.column("template").to_pylist()))


def _prepare(processor: Any, data_dir: Path) -> list[_Example]:
    split = load_split(data_dir, "sft")  # PAPO's format prompt, exactly as the trainer builds prompts
    templates = _templates_by_id(data_dir)
    out = []
    for ex in split.examples:
        if len(ex.image_paths) != 1:
            raise ValueError(f"sft row {ex.row_id} has {len(ex.image_paths)} images; the warm start expects one")
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
def _greedy_accuracy(
    model: Any,
    processor: Any,
    examples: Sequence[_Example],
    *,
    black: bool,
    max_new_tokens: int,
    chunk: int = 64,
) -> tuple[float, dict[str, float]]:
    """Greedy HF ``generate`` graded by ``rewards.score("exact")``: (accuracy, per template).

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
    by_template: dict[str, list[float]] = {}
    for e, c in zip(examples, correct):
        if e.template is not None:
            by_template.setdefault(e.template, []).append(c)
    acc = sum(correct) / max(len(correct), 1)
    return acc, {k: round(sum(v) / len(v), 4) for k, v in sorted(by_template.items())}


def _run(cfg: SFTWarmStart, model_dir: Path, data_dir: Path, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    processor = load_processor(str(model_dir), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    tok = processor.tokenizer
    examples = _prepare(processor, data_dir)
    n_train = len(examples) - cfg.eval_size
    if n_train < cfg.batch_size:
        # Too few rows to hold out a slice and still train: a warm start here would measure
        # nothing. Leave the weights as built and say so in the manifest (tiny test assets).
        reason = (
            f"sft split has {len(examples)} usable rows; need eval_size + batch_size = {cfg.eval_size + cfg.batch_size}"
        )
        logger.warning("supervised warm start skipped: %s", reason)
        return {"skipped": reason, "seconds": round(time.perf_counter() - t0, 2)}
    train, held_out = examples[:n_train], examples[n_train:]
    responses = [_response_ids(tok, e.answer) for e in train]
    pad_id = int(tok.pad_token_id or 0)
    image_processor = _CachedImageProcessor(processor.image_processor)

    low, high = cfg.target_band
    checks: list[tuple[int, float]] = []
    # fork_rng: the build must not disturb the caller's global RNG; the seed fixes the order of
    # rows and nothing else is random (no dropout), so the run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(str(model_dir), dtype="float32")
        optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        order = torch.randperm(n_train)
        pos, step, loss_value = 0, 0, float("nan")
        prev: tuple[int, float, dict[str, torch.Tensor]] | None = None
        chosen: tuple[int, float] | None = None
        while step < cfg.max_steps:
            if pos + cfg.batch_size > n_train:  # a fresh permutation per epoch; drop the ragged tail
                order, pos = torch.randperm(n_train), 0
            rows = order[pos : pos + cfg.batch_size].tolist()
            pos += cfg.batch_size
            model.train()
            batch = _batch([train[i] for i in rows], [responses[i] for i in rows], pad_id)
            inputs = model_inputs(model, image_processor, batch, [[train[i].image] for i in rows])
            logp, _ = token_logprobs(model, inputs, batch.response_ids, batch.response_mask)
            loss = -(logp.sum() / batch.response_mask.sum())
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optim.step()
            step += 1
            loss_value = float(loss.detach())
            if step % cfg.eval_every and step < cfg.max_steps:
                continue
            acc, _ = _greedy_accuracy(model, processor, held_out, black=False, max_new_tokens=cfg.max_new_tokens)
            checks.append((step, round(acc, 4)))
            logger.info("warm start step %d: loss %.4f, held-out accuracy %.3f", step, loss_value, acc)
            if acc >= low:
                chosen = (step, acc)
                # Jumped over the band between two checks: keep whichever checkpoint is closer.
                if acc > high and prev is not None and low - prev[1] < acc - high:
                    model.load_state_dict(prev[2])
                    chosen = (prev[0], prev[1])
                break
            prev = (step, acc, copy.deepcopy(model.state_dict()))
        if chosen is None:
            chosen = checks[-1]
            logger.warning(
                "supervised warm start stopped at max_steps=%d with held-out accuracy %.3f, below the target band %s",
                cfg.max_steps,
                chosen[1],
                cfg.target_band,
            )

    black_acc, black_by_t = _greedy_accuracy(model, processor, held_out, black=True, max_new_tokens=cfg.max_new_tokens)
    acc, acc_by_t = _greedy_accuracy(model, processor, held_out, black=False, max_new_tokens=cfg.max_new_tokens)
    # Weights only: the tokenizer and processor files are not written at all, and config.json
    # gets its built bytes back because loading with an explicit dtype stamps ``dtype`` into the
    # vision sub-config (same architecture, but the folder should differ only in its weights).
    config_bytes = (model_dir / "config.json").read_bytes()
    model.save_pretrained(model_dir)
    (model_dir / "config.json").write_bytes(config_bytes)
    return {
        "steps": chosen[0],
        "steps_trained": step,
        "heldout_accuracy": round(acc, 4),
        "black_accuracy": round(black_acc, 4),
        "heldout_accuracy_by_template": acc_by_t,
        "black_accuracy_by_template": black_by_t,
        "in_band": low <= acc <= high,
        "checks": checks,
        "final_loss": round(loss_value, 4),
        "train_rows": n_train,
        "heldout_rows": len(held_out),
        "seconds": round(time.perf_counter() - t0, 2),
    }
