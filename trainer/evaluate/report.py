"""What an evaluation runs and what it found: `EvalSettings` (read from a job config),
`ConditionStats`, `DatasetEval` and `EvalReport` (pydantic, with the flat ``eval/*`` metric keys,
a markdown table and JSON), and where ``papo eval`` writes them (`report_paths`, `write_report`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, computed_field

from services.rollout.types import SamplingSpec
from trainer.core.config import JobConfig
from trainer.core.families import mask_patch_size

__all__ = [
    "EvalError",
    "EvalSettings",
    "ConditionStats",
    "DatasetEval",
    "EvalReport",
    "report_paths",
    "write_report",
]


class EvalError(ValueError):
    """``papo eval`` cannot start: a missing checkpoint, model folder or dataset (exit code 2)."""


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
    image_fit: tuple[int, int] | None = Field(None, description="model.image_fit(): EasyR1's resize, or None")
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
            patch_size=mask_patch_size(c.patch_size, cfg.model),
            prob=c.prob,
            noise_std=c.noise_std,
            max_raw_pixels=cfg.data.max_raw_pixels,
            image_fit=cfg.model.image_fit(),
        )

    def greedy_spec(self) -> SamplingSpec:
        return SamplingSpec(
            n=1, temperature=self.greedy_temperature, top_p=1.0, max_tokens=self.max_tokens, seed=self.seed
        )

    def sample_spec(self, first_request: int) -> SamplingSpec:
        """k samples; request ``i`` of a chunk starting at prompt ``first_request`` gets seed
        ``seed + (first_request + i) * k``: the prompt's index in the dataset (so the chunk size
        changes nothing) unless an unusable prompt precedes it in its chunk."""
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
    """The evaluation of one dataset. Accuracies are in [0, 1] over ``num_prompts`` prompts.

    Metric keys (``trainer/core/metrics.py`` naming, ``group/name``): ``eval/accuracy``,
    ``eval/black_accuracy``, ``eval/masked_accuracy``, ``eval/vision_gap`` (accuracy - black
    accuracy), ``eval/masked_gap`` (accuracy - masked accuracy), ``eval/avg@{k}``, ``eval/pass@{k}``,
    ``eval/num_prompts``, ``eval/bad_prompts``, ``eval/unserved_prompts``, ``eval/grading_errors``.
    A condition that was not run has no key.
    """

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
    """``papo eval``'s result: one :class:`DatasetEval` per dataset, their mean, the settings.

    With several datasets, :meth:`metrics` gives each one's keys as ``eval/<dataset>/...`` and
    their unweighted mean as ``eval/...``.
    """

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
