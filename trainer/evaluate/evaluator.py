"""The `Evaluator`: plain code, no Ray. Over a *generate* function and a *grade* function it
scores prompts under the greedy / black / masked / sampled conditions and returns a
`DatasetEval`; `evaluate_examples` is the driver's one call (config -> settings -> evaluator).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from PIL import Image

from services.corruption.service import CorruptionService
from services.rollout.types import RolloutRequest, RolloutResult, SamplingSpec
from trainer.core.config import JobConfig
from trainer.core.data import BadPrompt, PromptExample, prompt_images, prompt_masked_images
from trainer.evaluate.report import ConditionStats, DatasetEval, EvalSettings

__all__ = ["CONDITIONS", "Evaluator", "GenerateFn", "GradeFn", "NothingServed", "PutFn", "evaluate_examples"]

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list["RolloutRequest"], "SamplingSpec"], "RolloutResult"]
GradeFn = Callable[[list[tuple[str, str]]], Sequence[Mapping[str, Any]]]
PutFn = Callable[[Any], Any]

CONDITIONS = ("greedy", "black", "masked", "sampled")
# Errors quoted per condition in the report: enough to see the cause, not a wall of text.
_MAX_QUOTED_ERRORS = 3


class NothingServed(RuntimeError):
    """The engine served none of a condition's prompts: a setup problem (e.g. every prompt is
    longer than ``rollout.max_model_len``), not an accuracy of 0."""


def _identity(value: Any) -> Any:
    return value


class _Prompt:
    """One usable prompt of a chunk: its position in the dataset, example and decoded images."""

    __slots__ = ("index", "example", "images")

    def __init__(self, index: int, example: PromptExample, images: list[Image.Image]):
        self.index, self.example, self.images = index, example, images


class Evaluator:
    """Scores a list of :class:`~trainer.core.data.PromptExample` under four conditions.

    ``generate`` is ``(requests, spec) -> RolloutResult`` (the driver passes its Ray
    ``RolloutPool.generate``, ``papo eval`` a local ``RolloutWorker``'s); ``grade`` is
    ``[(response, answer)] -> [{"accuracy", "overall", ...}]``. The conditions:

    - ``greedy``: one greedy answer per prompt with the real images (``rollout.val_temperature``);
    - ``black``: the same with every image replaced by a fully black one of the same size;
    - ``masked``: the same with the *training-style* masked images: the configured corruption
      strategy, patch size and probability, one seed per image from
      :func:`trainer.core.corruption.mask_seed` (run seed, row id, epoch 0) — exactly the mask the
      corruption pool would draw for that row in epoch 0. They are made here with
      :class:`~services.corruption.service.CorruptionService` (the class the corruption pool's
      actors run), not through the pool: evaluation needs them by value once per prompt. The
      ``precomputed`` strategy uses the rows' pre-masked images (``PromptExample.images_masked``);
      without them the masked condition is skipped;
    - ``sampled``: ``k`` samples per prompt at the rollout temperature / top-p: avg@k (mean
      accuracy over all k samples, docs/algorithm.md's headline metric) and pass@k (share of
      prompts with a correct sample, i.e. mean over prompts of the best sample's accuracy).

    A prompt counts as wrong in a condition when its images cannot be used (``bad_prompts``) or
    the engine did not serve it (``unserved_prompts``); both are counted and reported, never
    dropped from the denominator, so a failing engine cannot inflate accuracy.

    ``put`` turns a PIL image into what the generate function's requests carry: identity for a
    local :class:`RolloutWorker`, ``ray.put`` for the Ray pool (each image is put once per
    condition and shared by the greedy and sampled passes).
    """

    def __init__(self, generate: GenerateFn, grade: GradeFn, settings: EvalSettings, put: PutFn | None = None) -> None:
        self.generate = generate
        self.grade = grade
        self.settings = settings
        self.put = put or _identity
        # The same service (and parameters) the training corruption pool runs, so the masked
        # condition sees exactly the training masks.
        self.corruption = (
            CorruptionService(
                strategy=settings.corruption_strategy,
                patch_size=settings.patch_size,
                prob=settings.prob,
                max_pixels=settings.max_raw_pixels,
                noise_std=settings.noise_std,
            )
            if settings.masked
            else None
        )

    def masked_images(self, example: PromptExample, images: Sequence[Image.Image]) -> list[Image.Image]:
        """The training-style masked images of one prompt (epoch 0); ValueError (BadPrompt is
        one) when they cannot be made."""
        assert self.corruption is not None
        precomputed = None
        if self.settings.corruption_strategy == "precomputed":
            precomputed = prompt_masked_images(example, self.settings.max_raw_pixels, self.settings.image_fit)
        return self.corruption.mask_prompt(
            list(images), run_seed=self.settings.seed, row_id=example.row_id, epoch=0, precomputed=precomputed
        )

    def _masked_available(self, examples: Sequence[PromptExample]) -> bool:
        if not self.settings.masked:
            return False
        if self.settings.corruption_strategy == "precomputed" and not all(
            ex.images_masked is not None for ex in examples
        ):
            logger.warning(
                "corruption.strategy=precomputed but the dataset rows carry no pre-masked images "
                "(data.masked_image_key): the masked condition is skipped"
            )
            return False
        return True

    def evaluate(
        self, examples: Sequence[PromptExample], *, name: str = "validation", source: str | None = None
    ) -> DatasetEval:
        t0 = time.perf_counter()
        s = self.settings
        examples = list(examples)
        n = len(examples)
        active = ["greedy"]
        if s.black:
            active.append("black")
        if self._masked_available(examples):
            active.append("masked")
        if s.k > 0:
            active.append("sampled")
        stats = {c: ConditionStats() for c in active}
        correct = {c: 0.0 for c in active}  # summed accuracy (sampled: over all k samples)
        best_sum = 0.0  # pass@k numerator: per prompt, its best sample's accuracy
        unserved: set[int] = set()
        bad = grading_errors = 0
        for start in range(0, n, s.chunk_size):
            prompts: list[_Prompt] = []
            for index in range(start, min(n, start + s.chunk_size)):
                example = examples[index]
                try:
                    prompts.append(_Prompt(index, example, prompt_images(example, s.max_raw_pixels, s.image_fit)))
                except BadPrompt as e:
                    bad += 1
                    logger.warning("evaluation: prompt %d of %s is unusable and counts as wrong: %s", index, name, e)
            if not prompts:
                continue
            originals = [[self.put(im) for im in p.images] for p in prompts]
            for condition in active:
                if condition in ("greedy", "sampled"):
                    images: list[list[Any] | None] = list(originals)
                elif condition == "black":
                    images = [[self.put(Image.new("RGB", im.size)) for im in p.images] for p in prompts]
                else:
                    images = []
                    for p in prompts:
                        try:
                            images.append([self.put(im) for im in self.masked_images(p.example, p.images)])
                        except ValueError as e:  # this prompt only: it counts as unserved
                            images.append(None)
                            self._note_error(stats[condition], f"masking row {p.example.row_id}: {e}")
                spec = s.sample_spec(start) if condition == "sampled" else s.greedy_spec()
                t = time.perf_counter()
                scores, errors = self._run(condition, prompts, images, spec, stats[condition])
                stats[condition].seconds += time.perf_counter() - t
                grading_errors += errors
                for p, acc in zip(prompts, scores):
                    if acc is None:
                        unserved.add(p.index)
                        continue
                    correct[condition] += sum(acc)
                    if condition == "sampled":
                        best_sum += max(acc)
            del originals, images, prompts  # the chunk's images (and ObjectRefs) go before the next chunk's
        for condition, st in stats.items():
            if st.requests and not st.served:
                raise NothingServed(
                    f"evaluation of {name}: the engine served none of {st.requests} prompts in the "
                    f"{condition} condition; first errors: {st.errors}"
                )

        def share(condition: str, per_prompt: int = 1) -> float | None:
            if condition not in correct:
                return None
            return correct[condition] / (n * per_prompt) if n else 0.0

        return DatasetEval(
            name=name,
            source=source,
            num_prompts=n,
            bad_prompts=bad,
            unserved_prompts=len(unserved),
            grading_errors=grading_errors,
            k=s.k,
            accuracy=share("greedy") or 0.0,
            black_accuracy=share("black"),
            masked_accuracy=share("masked"),
            avg_at_k=share("sampled", s.k) if s.k else None,
            pass_at_k=(best_sum / n if n else 0.0) if "sampled" in correct else None,
            conditions=stats,
            seconds=time.perf_counter() - t0,
        )

    @staticmethod
    def _note_error(stats: ConditionStats, message: str) -> None:
        if len(stats.errors) < _MAX_QUOTED_ERRORS:
            stats.errors.append(message)

    def _run(
        self,
        condition: str,
        prompts: Sequence[_Prompt],
        images: Sequence[list[Any] | None],
        spec: SamplingSpec,
        stats: ConditionStats,
    ) -> tuple[list[list[float] | None], int]:
        """Generate and grade one condition for one chunk: per prompt its samples' accuracies
        (None: not served), and the number of grading errors."""
        requests, owners = [], []
        for position, (p, imgs) in enumerate(zip(prompts, images)):
            if imgs is None:
                continue
            requests.append(RolloutRequest.from_example(p.example, images=imgs, epoch=0))
            owners.append(position)
        scores: list[list[float] | None] = [None] * len(prompts)
        stats.requests += len(prompts)
        if not requests:
            return scores, 0
        result = self.generate(requests, spec)
        for message in list(result.errors.values())[:_MAX_QUOTED_ERRORS]:
            self._note_error(stats, message)
        if result.batch is None:
            return scores, 0
        batch = result.batch
        graded = self.grade(list(zip(batch.response_text, batch.answers)))
        if len(graded) != len(batch):
            raise RuntimeError(f"the grader returned {len(graded)} scores for {len(batch)} responses")
        # group id = request index within this call (RolloutResult's contract).
        per_request: dict[int, list[float]] = {}
        for group, score in zip(batch.group_ids.tolist(), graded):
            per_request.setdefault(int(group), []).append(float(score["accuracy"]))
        for request_index, accuracies in per_request.items():
            if not 0 <= request_index < len(requests):
                raise RuntimeError(f"the engine returned group id {request_index} for {len(requests)} requests")
            if len(accuracies) != spec.n:
                raise RuntimeError(f"request {request_index}: {len(accuracies)} responses, expected {spec.n}")
            scores[owners[request_index]] = accuracies
        stats.served += len(per_request)
        return scores, sum(1 for g in graded if g.get("error"))


def evaluate_examples(
    examples: Sequence[PromptExample],
    *,
    generate: GenerateFn,
    grade: GradeFn,
    cfg: JobConfig,
    k: int | None = None,
    put: PutFn | None = None,
    black: bool = True,
    masked: bool = True,
    name: str = "validation",
    source: str | None = None,
) -> DatasetEval:
    """Evaluate ``examples`` with the settings of ``cfg`` (``k`` defaults to ``trainer.eval_k``).

    The driver's call: ``evaluate_examples(val, generate=pool.generate, grade=reward.score,
    cfg=cfg, put=ray.put)``.
    """
    settings = EvalSettings.from_config(cfg, k=cfg.trainer.eval_k if k is None else k, black=black, masked=masked)
    return Evaluator(generate, grade, settings, put=put).evaluate(examples, name=name, source=source)
