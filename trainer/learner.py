"""The learner: the PAPO policy update over a DeepSpeed engine, and its data-parallel Ray group.

This module owns
- :class:`Learner`, a plain class (no Ray) holding one DeepSpeed rank: the policy model wrapped in
  a ZeRO 0-3 engine (fp32/bf16, torch AdamW, LR schedule, grad-norm clipping, optional gradient
  checkpointing and frozen vision tower). It computes ``old_logp`` (:meth:`Learner.compute_logprobs`),
  runs every optimiser step of one rollout batch (:meth:`Learner.train_step`), publishes the
  weights under their HF names (:meth:`Learner.publish_weights`) and saves/loads checkpoints
  atomically (:meth:`Learner.save_checkpoint` / :meth:`Learner.load_checkpoint`);
- :class:`LearnerGroup`: N Ray actors, one rank each, in a placement group; it shards batches
  data-parallel and gathers results; rank 0 publishes weights;
- :func:`resolve_image_refs`: per-row image ObjectRefs -> per-row PIL lists, rows of one prompt
  sharing one list object (the pixel cache of ``trainer.modeling`` keys on it).

Loss scaling (PAPO.md: "scale once, not twice"). DeepSpeed is configured with
``gradient_accumulation_steps = micro-batches per rank per mini-batch`` and its
``engine.backward`` divides every loss by that number; its data-parallel reduction then averages
over ranks. So ``papo_loss`` is always called with ``grad_accum=1``:

- ``token``/``seq``: each micro-batch's mean / k (DeepSpeed's division) = the official definition;
  the rank average is the data-parallel mean, as in verl/EasyR1.
- ``token_global``: ``papo_loss`` returns ``sum / num_tokens`` with ``num_tokens`` the mini-batch's
  response tokens summed over ranks (an all-reduce per mini-batch); we multiply by
  ``k * world_size`` before ``engine.backward`` to undo both DeepSpeed divisions, so the gradient
  is exactly that of the global token mean.

Non-finite gradients. DeepSpeed's automatic skip belongs to fp16 loss scaling; which other
configurations it covers depends on version and stage (in 0.19.8 with NaN gradients: the ZeRO 1-3
optimisers and the bf16 optimiser skip, fp32 ZeRO 0 steps and writes NaN into the weights; the
unit test shows it by failing there without our guard). So at every accumulation boundary we compute the
global gradient norm ourselves (collectively, from the
reduced gradients of the configured stage) before ``engine.step()``. A non-finite norm sets a flag
on our AdamW subclass, whose ``step`` then returns without touching parameters or moments; the
engine still runs its bookkeeping (clearing gradients, counters). The step is counted in
``skipped_steps`` and the LR schedule does not advance. The LR schedule is ours (a pure function of
the optimiser-step count, written into the optimiser's param groups before each step), so it
checkpoints as one integer and never advances on a skipped step.

Published and checkpointed weights carry the names ``save_pretrained`` writes (transformers 5
renames Qwen2.5-VL's ``model.language_model.*`` to ``model.*`` and ``model.visual.*`` to
``visual.*`` on save, and drops the tied ``lm_head.weight``): we apply transformers' own
``remove_tied_weights_from_state_dict`` and ``revert_weight_conversion`` so vLLM's ``load_weights``
and ``from_pretrained`` read them as they read a saved folder. Under ZeRO-3 the parameters are
gathered first (a collective: every rank calls the method, rank 0 returns the result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.algos import papo_loss
from trainer.batch import RolloutBatch
from trainer.checkpoint import replace_dir
from trainer.config import AlgoConfig, LearnerConfig, MaskedLogpPlacement
from trainer.modeling import load_model, load_processor, model_inputs, token_logprobs
from trainer.weights import (
    BROADCAST_TRANSPORTS,
    WeightsHandle,
    current_weight_group,
    digest,
    join_weight_group,
    pack_state_dict,
    share_cuda_ipc,
)

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECKPOINT_MARKER = "papo_checkpoint.json"
#: The driver's state (step, sampler position, best eval) inside a checkpoint, written with it atomically.
TRAINER_STATE = "trainer_state.json"
_DS_SUBDIR = "deepspeed"
_DS_TAG = "state"
# Files of a model folder that are weights (rewritten from the trained parameters on save);
# everything else (config, tokenizer, processor, chat template) is copied as it is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


# --------------------------------------------------------------------------------------------
# Loss hyper-parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    """The ``papo_loss`` keyword arguments a learner uses (from :class:`AlgoConfig`)."""

    gamma: float = 0.0
    beta: float = 0.0
    eta1: float = 0.0
    eta2: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_dual: float = 3.0
    kl_kind: str = "low_var_kl"
    perception_kl_kind: str = "low_var_kl"
    avg: str = "token"
    perception_top_p: float | None = None
    perception_kl_clip: float | None = None
    perception_kl_masked_grad: bool = False

    @classmethod
    def from_algo(cls, algo: AlgoConfig) -> LossSettings:
        return cls(
            gamma=algo.gamma,
            beta=algo.beta,
            eta1=algo.eta1,
            eta2=algo.eta2,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            clip_dual=algo.clip_dual,
            kl_kind=algo.kl_kind,
            perception_kl_kind=algo.perception_kl_kind,
            avg=algo.loss_avg,
            perception_top_p=algo.perception_top_p,
            perception_kl_clip=algo.perception_kl_clip,
            perception_kl_masked_grad=algo.perception_kl_masked_grad,
        )


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------


class GuardedAdamW(torch.optim.AdamW):
    """torch AdamW whose ``step`` is a no-op while ``skip_next`` is set.

    DeepSpeed calls the client optimiser's ``step`` from inside ``engine.step()`` (directly under
    ZeRO 0, on the fp32 partitions under ZeRO 1-3). Skipping here keeps parameters and Adam moments
    untouched while the engine still clears gradients and advances its micro-step counter.
    """

    skip_next: bool = False

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if self.skip_next:
            return None
        return super().step(closure)


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """Multiplier of the base LR for optimiser step ``step`` (0 for the first).

    Linear warm-up to 1 over ``warmup_steps`` (the first step already gets ``1/warmup_steps``, not
    0), then ``constant``, ``linear`` decay to 0 at ``total_steps``, or ``cosine`` (half a cosine
    to 0 at ``total_steps``).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"lr_scheduler={schedule!r} needs total_optimizer_steps")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_scheduler {schedule!r}")


# --------------------------------------------------------------------------------------------
# Distributed set-up
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on this host right now (for MASTER_PORT)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _on_gpu() -> bool:
    return torch.cuda.is_available()


def init_distributed() -> tuple[int, int]:
    """Join (or create) the process group from the RANK/WORLD_SIZE/MASTER_* environment.

    Without those variables this is a single-rank group on 127.0.0.1 (a plain process: tests,
    ``papo eval``). On CPU the DeepSpeed accelerator is forced to CPU and the backend is gloo.
    Returns ``(rank, world_size)``.
    """
    if not _on_gpu():
        # Must be set before deepspeed picks its accelerator (at its first use).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if _on_gpu() else "gloo"
        if "RANK" in os.environ:
            deepspeed.init_distributed(dist_backend=backend)
        else:
            # A plain process: a one-rank group. RANK/WORLD_SIZE/MASTER_* are needed only while the
            # group forms (DeepSpeed's CPU shared-memory comm reads MASTER_*); they are removed again
            # so processes started later from this one (e.g. a local Ray cluster) do not inherit
            # them. LOCAL_RANK=0 stays: deepspeed.initialize asserts it.
            os.environ.setdefault("LOCAL_RANK", "0")
            single = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
            os.environ.update(single)
            try:
                deepspeed.init_distributed(dist_backend=backend)
            finally:
                for key in single:
                    os.environ.pop(key, None)
    return dist.get_rank(), dist.get_world_size()


def ds_config(cfg: LearnerConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a learner: batch geometry, ZeRO stage, precision, clipping."""
    per_step = cfg.micro_batch_size * world_size
    if cfg.mini_batch_size % per_step:
        raise ValueError(
            f"learner.mini_batch_size={cfg.mini_batch_size} must be a multiple of "
            f"learner.micro_batch_size * world_size = {cfg.micro_batch_size} * {world_size}"
        )
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.cpu_offload and cfg.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {
        "train_batch_size": cfg.mini_batch_size,
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.mini_batch_size // per_step,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.dtype == "bfloat16"},
        "fp16": {"enabled": cfg.dtype == "float16"},
        # Our GuardedAdamW is a torch AdamW; DeepSpeed only knows the exact class.
        "zero_allow_untested_optimizer": True,
        # With offload, keep torch AdamW instead of DeepSpeedCPUAdam (a 45 s JIT build on CPU).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def hf_state_dict(module: torch.nn.Module, to_cpu: bool = True) -> dict[str, torch.Tensor]:
    """``module``'s weights under the names ``save_pretrained`` writes: CPU copies, or (``to_cpu=False``)
    detached views of the live tensors.

    Tied weights are dropped (safetensors forbids aliases; ``from_pretrained`` and vLLM re-tie them)
    and transformers' load-time renames are reverted. Call with full (gathered) parameters.
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = module.state_dict()
    sd = remove_tied_weights_from_state_dict(sd, module)
    sd = revert_weight_conversion(module, sd)
    if not to_cpu:
        return {k: v.detach() for k, v in sd.items()}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


# --------------------------------------------------------------------------------------------
# The learner (one rank)
# --------------------------------------------------------------------------------------------


class Learner:
    """One DeepSpeed data-parallel rank of the policy (no Ray; see :class:`LearnerGroup`).

    Args:
        model_path: local HF folder of the policy (model + processor).
        learner: optimiser, batch geometry, ZeRO stage, precision.
        algo: loss coefficients and averaging (:class:`LossSettings` is derived from it).
        masked_logp: ``perception.masked_logp``; with ``learner_grad`` the masked log-probs are
            recomputed inside the loss with gradient (from ``masked_images``).
        min_pixels, max_pixels: ``model.min_pixels``/``max_pixels`` (image-token counts must match
            the rollout engine's).
        temperature: rollout temperature; every log-prob is of ``softmax(logits / temperature)``.
        total_optimizer_steps: needed by the ``linear``/``cosine`` LR schedules.
        seed: seeds torch/numpy/random on this rank (offset by rank).

    Every method that touches parameters is collective under world size > 1: all ranks call it
    with their own shard and the same number of rows.
    """

    def __init__(
        self,
        model_path: str,
        learner: LearnerConfig,
        algo: AlgoConfig | LossSettings,
        *,
        masked_logp: MaskedLogpPlacement = "pool",
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        temperature: float = 1.0,
        total_optimizer_steps: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        self.rank, self.world_size = init_distributed()
        import deepspeed

        self.cfg = learner
        self.loss = algo if isinstance(algo, LossSettings) else LossSettings.from_algo(algo)
        self.masked_logp = masked_logp
        self.temperature = float(temperature)
        self.total_optimizer_steps = total_optimizer_steps
        self.model_path = str(model_path)
        self.seed = seed
        if learner.lr_scheduler != "constant" and total_optimizer_steps is None:
            raise ValueError(f"learner.lr_scheduler={learner.lr_scheduler!r} needs total_optimizer_steps")
        self._seed_everything(seed + self.rank)

        self.ds_config = ds_config(learner, self.world_size)
        model = self._load_model(learner, trust_remote_code)
        self.processor = load_processor(
            self.model_path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code
        )
        if learner.freeze_vision_tower:
            for p in model.model.visual.parameters():
                p.requires_grad_(False)
        if learner.freeze_language_model:
            visual = {id(p) for p in model.model.visual.parameters()}
            for p in model.parameters():
                if id(p) not in visual:
                    p.requires_grad_(False)
        if learner.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._optimizer = GuardedAdamW(
            self._param_groups(model, learner),
            lr=learner.lr,
            betas=tuple(learner.betas),
            weight_decay=learner.weight_decay,
        )
        # Each group's LR before the schedule's factor, in the optimiser's group order.
        self._base_lrs = [group["lr"] for group in self._optimizer.param_groups]
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self._optimizer, config=self.ds_config)
        self.module: torch.nn.Module = self.engine.module
        self.grad_accum = int(self.ds_config["gradient_accumulation_steps"])
        self.rows_per_mini_batch = learner.mini_batch_size // self.world_size
        self.optimizer_steps = 0  # applied optimiser steps (the LR schedule's clock)
        self.skipped_steps = 0  # boundaries skipped for a non-finite gradient norm
        self.train_steps = 0  # train_step calls (rollout batches)
        self.weight_version = 0
        self._set_lr()  # the warm-up's first LR, not the base LR AdamW was built with

    # ---- small helpers -----------------------------------------------------------------------

    def _load_model(self, learner: LearnerConfig, trust_remote_code: bool) -> torch.nn.Module:
        """The policy from ``model_path``; under ZeRO-3 loaded straight into this rank's partitions.

        With ZeRO-3, transformers' ``from_pretrained`` builds the model inside ``deepspeed.zero.Init``
        while an ``HfDeepSpeedConfig`` is alive, so no rank ever materialises the whole model (a 7B
        model would otherwise sit in host memory once per rank). The config is dropped right after,
        so later ``from_pretrained`` calls in this process (pools, tests) load plain models.
        transformers needs ``accelerate`` for this (the GPU stack has it; the CPU stack does not, and
        there every rank loads the full model before DeepSpeed partitions it).
        """
        if learner.zero_stage != 3 or importlib.util.find_spec("accelerate") is None:
            return load_model(self.model_path, dtype=learner.dtype, trust_remote_code=trust_remote_code)
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        keep_alive = HfDeepSpeedConfig(self.ds_config)  # noqa: F841 (transformers holds a weak reference)
        try:
            return load_model(self.model_path, dtype=learner.dtype, trust_remote_code=trust_remote_code)
        finally:
            unset_hf_deepspeed_config()

    @staticmethod
    def _seed_everything(seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    @property
    def zero_stage(self) -> int:
        return int(self.cfg.zero_stage)

    def _gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters inside the block (ZeRO-3 gathers them; a collective)."""
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)
        return contextlib.nullcontext()

    def _all_reduce_sum(self, value: float) -> float:
        import torch.distributed as dist

        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)  # NCCL reduces device tensors
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())

    def _barrier(self) -> None:
        import torch.distributed as dist

        if self.world_size > 1:
            dist.barrier()

    @property
    def device(self) -> torch.device:
        return torch.device(self.engine.device)

    def _inputs(self, batch: RolloutBatch, images: Sequence[Sequence[Any]]) -> dict[str, torch.Tensor]:
        inputs = model_inputs(self.module, self.processor.image_processor, batch, images)
        # Built on the host (processor, RoPE index); the engine's module lives on its device.
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _logp(
        self, batch: RolloutBatch, images: Sequence[Sequence[Any]], *, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Forward through the engine (ZeRO-3 gathers parameters in its hooks); the inputs are built
        # from the bare module because the engine's own ``.config`` is DeepSpeed's.
        return token_logprobs(
            self.engine,
            self._inputs(batch, images),
            batch.response_ids.to(self.device),
            batch.response_mask.to(self.device),
            temperature=self.temperature,
            with_entropy=with_entropy,
        )

    # ---- log-probs ---------------------------------------------------------------------------

    @torch.no_grad()
    def compute_logprobs(
        self, batch: RolloutBatch, images: Sequence[Sequence[Any]], *, micro_batch_size: int | None = None
    ) -> torch.Tensor:
        """No-grad, temperature-scaled log-probs (N, R) of ``batch``'s response tokens, 0 at padding.

        ``images`` are the rows' originals (``old_logp``) or masked images (the ``learner``
        placement of ``masked_logp``). Collective under ZeRO-3: every rank must run the same number
        of micro-batches (the group pads shards to equal length).
        """
        if len(images) != len(batch):
            raise ValueError(f"{len(images)} image lists for {len(batch)} rows")
        mbs = micro_batch_size or self.cfg.micro_batch_size
        was_training = self.module.training
        self.module.eval()
        width = batch.response_ids.shape[1]
        out = []
        try:
            for start in range(0, len(batch), mbs):
                rows = list(range(start, min(start + mbs, len(batch))))
                mb = batch.select(rows)
                lp, _ = self._logp(mb, [images[i] for i in rows])
                out.append(torch.nn.functional.pad(lp.float().cpu(), (0, width - lp.shape[1])))
        finally:
            self.module.train(was_training)
        return torch.cat(out) if out else torch.zeros(batch.response_ids.shape)

    # ---- training ----------------------------------------------------------------------------

    def _global_grad_norm(self) -> float:
        """L2 norm of the reduced gradients of this accumulation boundary, before the step.

        A collective under ZeRO 1-3 (each rank holds a partition). Uses the same per-stage
        gradient buffers DeepSpeed's own step reads; an invalid norm (DeepSpeed encodes inf/nan
        group norms as -1) is returned as ``inf``/``nan``.
        """
        opt = self.engine.optimizer
        if self.zero_stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(opt._get_norm_groups())
            norm = float(norm) / float(opt.loss_scale)
        elif self.zero_stage in (1, 2):
            norm = float(opt.scaled_global_norm()) / float(opt.loss_scale)
        else:
            from deepspeed.utils import safe_get_full_grad

            # ZeRO 0: the boundary backward already all-reduced the full gradients on every rank.
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for p in self.module.parameters():
                if p.requires_grad:
                    g = safe_get_full_grad(p)
                    if g is not None:
                        sq = sq + g.detach().double().square().sum()
            norm = float(sq.sqrt())
        if norm < 0:
            return float("inf")
        return norm

    @staticmethod
    def _param_groups(model: torch.nn.Module, learner: LearnerConfig) -> list[dict[str, Any]]:
        """The trainable parameters as AdamW groups: the language model at ``lr``, the vision tower
        (with its merger) at ``vision_lr`` when that is set. One group when the two LRs agree."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        if learner.vision_lr is None or learner.vision_lr == learner.lr:
            return [{"params": trainable, "lr": learner.lr}]
        visual = {id(p) for p in model.model.visual.parameters()}
        groups = [
            {"params": [p for p in trainable if id(p) not in visual], "lr": learner.lr},
            {"params": [p for p in trainable if id(p) in visual], "lr": learner.vision_lr},
        ]
        return [g for g in groups if g["params"]]

    def _lr_factor(self) -> float:
        return lr_factor(
            self.optimizer_steps,
            schedule=self.cfg.lr_scheduler,
            warmup_steps=self.cfg.warmup_steps,
            total_steps=self.total_optimizer_steps,
        )

    def _set_lr(self) -> float:
        """Every group's LR for the next optimiser step; returns the language model's (``learner.lr``'s)."""
        factor = self._lr_factor()
        for group, base in zip(self.engine.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = base * factor
        return self.cfg.lr * factor

    def _check_inputs(
        self, batch: RolloutBatch, masked_images: Sequence[Sequence[Any]] | None, loss: LossSettings
    ) -> None:
        batch.require("advantages")
        if batch.old_logp is None and not self.on_policy(len(batch)):
            raise ValueError(
                "the batch has no old_logp: only an on-policy update (learner.ppo_epochs=1 and one "
                "mini-batch per rollout batch) may take them from its own forward"
            )
        if loss.beta != 0.0:
            batch.require("ref_logp")
        needs_masked = loss.gamma != 0.0 or loss.eta2 != 0.0
        if needs_masked and self.masked_logp == "learner_grad":
            if masked_images is None:
                raise ValueError(
                    "perception.masked_logp=learner_grad recomputes the masked log-probs in the loss: "
                    "train_step needs masked_images"
                )
        elif needs_masked:
            batch.require("masked_logp")
        if len(batch) % self.rows_per_mini_batch:
            raise ValueError(
                f"{len(batch)} rows on this rank do not split into mini-batches of "
                f"{self.rows_per_mini_batch} (learner.mini_batch_size / world size)"
            )

    def on_policy(self, rows: int) -> bool:
        """One optimiser step over ``rows`` rows of this rank: the policy that scores them is the one
        that is updated, so the old log-probs are the update's own forward, detached (ratio 1,
        the same gradient), and the separate old-log-prob pass can be skipped."""
        return self.cfg.ppo_epochs == 1 and rows == self.rows_per_mini_batch

    def train_step(
        self,
        batch: RolloutBatch,
        images: Sequence[Sequence[Any]],
        masked_images: Sequence[Sequence[Any]] | None = None,
        *,
        gamma: float | None = None,
        eta1: float | None = None,
        eta2: float | None = None,
    ) -> dict[str, float]:
        """Every optimiser step of one rollout batch (this rank's shard): DESIGN.md step 5.

        ``learner.ppo_epochs`` passes over consecutive mini-batches of ``mini_batch_size / world``
        rows; each is split into micro-batches with gradient accumulation, then clipped and
        stepped (or skipped on a non-finite norm). ``gamma``/``eta1``/``eta2`` override the
        configured coefficients (the driver's perception schedule). Returns metrics: token-weighted
        means of the loss statistics, the mean pre-clip ``grad_norm`` of the applied steps,
        ``lr``, ``optimizer_steps``/``skipped_steps`` of this call and their running totals.
        """
        overrides = {k: float(v) for k, v in (("gamma", gamma), ("eta1", eta1), ("eta2", eta2)) if v is not None}
        loss_cfg = dataclasses.replace(self.loss, **overrides)
        self._check_inputs(batch, masked_images, loss_cfg)
        if len(images) != len(batch) or (masked_images is not None and len(masked_images) != len(batch)):
            raise ValueError("images (and masked_images) need one list per row")
        recompute_masked = self.masked_logp == "learner_grad" and (loss_cfg.gamma != 0.0 or loss_cfg.eta2 != 0.0)
        t0 = time.perf_counter()
        self.module.train()
        weighted: dict[str, float] = {}  # token-weighted sums of per-micro-batch statistics
        objective = {"loss": 0.0, "pg_loss": 0.0}  # sums of the micro-batch terms as they enter backward
        tokens_total, n_minis, norms, lrs, skipped = 0.0, 0, [], [], 0
        mbs = self.cfg.micro_batch_size
        for _epoch in range(self.cfg.ppo_epochs):
            for start in range(0, len(batch), self.rows_per_mini_batch):
                rows = list(range(start, start + self.rows_per_mini_batch))
                mini = batch.select(rows)
                num_tokens = self._all_reduce_sum(mini.num_response_tokens) if loss_cfg.avg == "token_global" else None
                n_minis += 1
                micro_starts = list(range(0, len(rows), mbs))
                if len(micro_starts) != self.grad_accum:
                    raise RuntimeError(
                        f"{len(micro_starts)} micro-batches per mini-batch, DeepSpeed expects {self.grad_accum}"
                    )
                for k, ms in enumerate(micro_starts):
                    sub = list(range(ms, min(ms + mbs, len(rows))))
                    micro_rows = [rows[i] for i in sub]
                    boundary = k == len(micro_starts) - 1
                    if self.engine.is_gradient_accumulation_boundary() != boundary:
                        raise RuntimeError("DeepSpeed's micro-step counter drifted from the mini-batch layout")
                    metrics = self._micro_backward(
                        mini.select(sub),
                        [images[i] for i in micro_rows],
                        [masked_images[i] for i in micro_rows] if recompute_masked else None,
                        loss_cfg,
                        num_tokens,
                    )
                    w = metrics.pop("response_tokens")
                    tokens_total += w
                    for key in objective:
                        objective[key] += metrics.pop(key)
                    for key, v in metrics.items():
                        weighted[key] = weighted.get(key, 0.0) + v * w
                    if not boundary:
                        self.engine.step()  # only advances DeepSpeed's micro-step counter
                        continue
                    lr, norm = self._boundary_step()
                    if math.isfinite(norm):
                        norms.append(norm)
                        lrs.append(lr)
                    else:
                        skipped += 1
        self.train_steps += 1
        out = {k: v / max(tokens_total, 1.0) for k, v in weighted.items()}
        # loss/pg_loss: the mini-batch objective (sum over its micro-batches), mean over mini-batches.
        out.update({k: v / max(n_minis, 1) for k, v in objective.items()})
        out.update(
            grad_norm=float(np.mean(norms)) if norms else float("nan"),
            lr=lrs[-1] if lrs else self.cfg.lr * self._lr_factor(),
            optimizer_steps=len(norms),
            skipped_steps=skipped,
            total_optimizer_steps=self.optimizer_steps,
            total_skipped_steps=self.skipped_steps,
            response_tokens=tokens_total,
            step_time_s=time.perf_counter() - t0,
        )
        return out

    def _micro_backward(
        self,
        micro: RolloutBatch,
        images: Sequence[Sequence[Any]],
        masked_images: Sequence[Sequence[Any]] | None,
        loss_cfg: LossSettings,
        num_tokens: float | None,
    ) -> dict[str, float]:
        """Forward, ``papo_loss`` and ``engine.backward`` of one micro-batch; returns its metrics.

        ``masked_images`` given: the masked log-probs are recomputed here with gradient
        (``learner_grad``); otherwise the batch's no-grad ``masked_logp`` (if any) is used.
        """
        logp, entropy = self._logp(micro, images, with_entropy=True)
        dev = logp.device
        # On-policy (checked in _check_inputs): the old log-probs are this forward's, detached.
        old_logp = micro.old_logp.to(dev) if micro.old_logp is not None else logp.detach()
        masked_lp = None if micro.masked_logp is None else micro.masked_logp.to(dev)
        if masked_images is not None:
            masked_lp, _ = self._logp(micro, masked_images)
        loss, metrics = papo_loss(
            logp,
            old_logp,
            micro.advantages.to(dev),
            micro.response_mask.to(dev),
            masked_logp=masked_lp,
            ref_logp=None if micro.ref_logp is None else micro.ref_logp.to(dev),
            gamma=loss_cfg.gamma,
            beta=loss_cfg.beta,
            eta1=loss_cfg.eta1,
            eta2=loss_cfg.eta2,
            clip_low=loss_cfg.clip_low,
            clip_high=loss_cfg.clip_high,
            clip_dual=loss_cfg.clip_dual,
            kl_kind=loss_cfg.kl_kind,
            avg=loss_cfg.avg,
            grad_accum=1,
            num_tokens=num_tokens,
            perception_kl_kind=loss_cfg.perception_kl_kind,
            perception_top_p=loss_cfg.perception_top_p,
            perception_kl_clip=loss_cfg.perception_kl_clip,
            perception_kl_masked_grad=loss_cfg.perception_kl_masked_grad,
        )
        if loss_cfg.avg == "token_global":
            # engine.backward divides by grad_accum and the DP reduction averages over ranks;
            # token_global is already normalised by the mini-batch's global token count.
            loss = loss * (self.grad_accum * self.world_size)
            # This rank's share of the global objective, times world size: the group's rank mean
            # of the metric is then the mini-batch objective itself.
            metrics["loss"] *= self.world_size
            metrics["pg_loss"] *= self.world_size
        else:
            # token/seq: DeepSpeed's division by grad_accum is the official "/ grad_accum".
            metrics["loss"] /= self.grad_accum
            metrics["pg_loss"] /= self.grad_accum
        self.engine.backward(loss)
        # Exact entropy of the temperature-scaled distribution, token mean after weighting.
        n_tok = max(metrics["response_tokens"], 1.0)
        metrics["exact_entropy"] = float(entropy.detach().sum()) / n_tok if entropy is not None else float("nan")
        if micro.old_logp is None and micro.rollout_logp is not None:
            # The weights that generated these rollouts scored them here: the engine/learner gap.
            mask = micro.response_mask.to(dev)
            diff = (micro.rollout_logp.to(dev) - old_logp).abs() * mask
            metrics["rollout_logp_diff"] = float(diff.sum()) / n_tok
        return metrics

    def _boundary_step(self) -> tuple[float, float]:
        """Check the reduced gradients' norm, then step or skip; returns (LR used, pre-clip norm)."""
        lr = self._set_lr()
        norm = self._global_grad_norm()
        finite = math.isfinite(norm)
        self._optimizer.skip_next = not finite
        try:
            self.engine.step()  # clips, steps (a no-op when skipping), clears gradients
        finally:
            self._optimizer.skip_next = False
        if finite:
            self.optimizer_steps += 1
            self._set_lr()  # the next step's LR, so the optimiser state always holds it
        else:
            self.skipped_steps += 1
            logger.warning(
                "rank %d: non-finite gradient norm (%s); optimiser step skipped (%d skipped so far)",
                self.rank,
                norm,
                self.skipped_steps,
            )
        return lr, norm

    # ---- weights -----------------------------------------------------------------------------

    def export_weights(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (None elsewhere). Collective under ZeRO-3."""
        with self._gathered():
            if self.rank == 0:
                return hf_state_dict(self.module)
        return None

    def publish_weights(self, version: int, transport: str | None = None) -> WeightsHandle | None:
        """The sending half of the weight sync (DESIGN.md step 6). Collective; rank 0 returns the handle.

        ``transport`` (default ``learner.weight_transport``) picks how (trainer/weights.py):
        ``object_store`` puts the safetensors blob of the HF-named weights into the Ray object store
        and the handle carries its ObjectRef (without a running Ray, the blob itself, so the class
        stays usable in a plain process); ``cuda_ipc`` packs them into GPU buckets that receivers on
        this GPU open directly (packed while gathered under ZeRO-3, no host copy); ``nccl``/``gloo``
        pack them into buckets and start broadcasting them to this rank's weight group
        (:meth:`join_weight_group`); :meth:`wait_weights_sent` joins the broadcast.
        """
        transport = transport or self.cfg.weight_transport
        self.weight_version = int(version)
        with self._gathered():
            if self.rank != 0:
                return None
            if transport == "cuda_ipc":
                if self.device.type != "cuda":
                    raise RuntimeError(
                        "learner.weight_transport=cuda_ipc needs the learner on a GPU; "
                        "this rank runs on " + str(self.device)
                    )
                return share_cuda_ipc(
                    hf_state_dict(self.module, to_cpu=False), int(version), bucket_bytes=self.cfg.weight_bucket_mb << 20
                )
            if transport in BROADCAST_TRANSPORTS:
                group = current_weight_group()
                if group is None or group.backend != transport:
                    raise RuntimeError(
                        f"learner.weight_transport={transport} broadcasts to a weight group; "
                        "learner rank 0 has joined none (the driver forms it before publishing)"
                    )
                if transport == "nccl" and self.device.type != "cuda":
                    raise RuntimeError("learner.weight_transport=nccl needs the learner on a GPU; use gloo on CPU")
                # Packed into the group's buckets while gathered: the broadcast reads the copies.
                return group.publish(
                    hf_state_dict(self.module, to_cpu=False), int(version), bucket_bytes=self.cfg.weight_bucket_mb << 20
                )
            sd = hf_state_dict(self.module)
        blob = pack_state_dict(sd)
        ref: Any = blob
        with contextlib.suppress(ImportError):
            import ray

            if ray.is_initialized():
                ref = ray.put(blob)
        return WeightsHandle(
            version=int(version),
            transport="object_store",
            num_tensors=len(sd),
            num_bytes=len(blob),
            digest=digest(blob),
            ref=ref,
        )

    def join_weight_group(self, group_id: str, host: str, port: int, world_size: int) -> int:
        """Rank 0 joins the weight-broadcast group as its rank 0 (collectively with every receiver)."""
        if self.rank != 0:
            raise RuntimeError("only learner rank 0 publishes weights")
        join_weight_group(
            group_id,
            host,
            port,
            0,
            world_size,
            self.cfg.weight_transport,
            self.cfg.weight_broadcast_timeout_s,
            device=self.device if self.cfg.weight_transport == "nccl" else None,
        )
        return os.getpid()

    def wait_weights_sent(self, timeout_s: float | None = None) -> None:
        """Join the weight broadcast started by :meth:`publish_weights` (a no-op for other transports)."""
        group = current_weight_group()
        if group is not None and self.rank == 0:
            group.wait_sent(timeout_s)

    def param_digest(self) -> str:
        """sha256 of every full parameter (gathered under ZeRO-3) on every rank: ranks must agree."""
        import hashlib

        h = hashlib.sha256()
        with self._gathered():
            for name, p in self.module.named_parameters():
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    # ---- checkpoints -------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}

    @staticmethod
    def _set_rng_state(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])

    def _write_hf_folder(self, folder: Path, sd: dict[str, torch.Tensor]) -> None:
        """model.safetensors (HF names) + config/tokenizer/processor files of the source folder."""
        from safetensors.torch import save_file

        src = Path(self.model_path)
        for f in src.iterdir():
            if (
                f.is_file()
                and not f.name.endswith(_WEIGHT_SUFFIXES)
                and not f.name.endswith(".index.json")
                and f.name != CHECKPOINT_MARKER
            ):
                shutil.copy2(f, folder / f.name)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})

    def save_checkpoint(
        self, path: str | os.PathLike, *, keep_last: int | None = None, extra: dict[str, Any] | None = None
    ) -> Path:
        """Write a checkpoint folder at ``path`` atomically. Collective: every rank calls it.

        ``extra`` (JSON-serialisable, e.g. the driver's step and sampler position) is written by
        rank 0 as ``trainer_state.json`` inside the same atomic folder, so a checkpoint never has
        learner state without the matching driver state.

        The folder is an HF model folder (``model.safetensors`` + config + processor: loads with
        ``from_pretrained``/``AutoProcessor``/vLLM) plus ``deepspeed/`` (module, optimizer and
        partition states of every rank), ``rng/rank{r}.pt`` and ``papo_checkpoint.json`` (step
        counters, written last). Everything is written into a temporary sibling folder that rank 0
        renames to ``path`` only when complete, so a crash never leaves a half checkpoint under a
        checkpoint's name. ``keep_last`` then deletes all but the newest ``keep_last`` complete
        checkpoints (folders holding the marker file) beside ``path``.
        """
        import torch.distributed as dist

        final = Path(path).absolute()
        tmp_name = [f".{final.name}.tmp-{uuid.uuid4().hex[:8]}" if self.rank == 0 else None]
        if self.world_size > 1:
            dist.broadcast_object_list(tmp_name, src=0)
        tmp = final.parent / str(tmp_name[0])
        if self.rank == 0:
            tmp.mkdir(parents=True)
        self._barrier()
        self.engine.save_checkpoint(str(tmp / _DS_SUBDIR), tag=_DS_TAG, save_latest=False)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(self._rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        sd = self.export_weights()
        if self.rank == 0:
            assert sd is not None
            self._write_hf_folder(tmp, sd)
            if extra is not None:
                (tmp / TRAINER_STATE).write_text(json.dumps(extra, indent=2) + "\n")
            marker = {
                "optimizer_steps": self.optimizer_steps,
                "skipped_steps": self.skipped_steps,
                "train_steps": self.train_steps,
                "weight_version": self.weight_version,
                "world_size": self.world_size,
                "zero_stage": self.zero_stage,
                "time": time.time(),
            }
            (tmp / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        self._barrier()
        if self.rank == 0:
            replace_dir(tmp, final)
            if keep_last is not None:
                prune_checkpoints(final.parent, keep_last)
        self._barrier()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        """Restore parameters, optimizer state, step counters and RNG from :meth:`save_checkpoint`.

        Collective. The group's world size and ZeRO stage must match the checkpoint's.
        """
        folder = Path(path)
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
        if marker["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {folder} was written by {marker['world_size']} ranks, this group has {self.world_size}"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(folder / _DS_SUBDIR), tag=_DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {folder / _DS_SUBDIR}")
        self.optimizer_steps = int(marker["optimizer_steps"])
        self.skipped_steps = int(marker["skipped_steps"])
        self.train_steps = int(marker["train_steps"])
        self.weight_version = int(marker["weight_version"])
        rng = folder / "rng" / f"rank{self.rank}.pt"
        if rng.exists():
            self._set_rng_state(torch.load(rng, weights_only=False))
        self._set_lr()
        return marker


def prune_checkpoints(parent: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints in ``parent``; return the deleted.

    Only folders holding :data:`CHECKPOINT_MARKER` count (newest by the marker's
    ``optimizer_steps``, then its write time); leftovers of crashed saves (``.*.tmp-*``) are deleted too.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    done = []
    for d in parent.iterdir():
        m = d / CHECKPOINT_MARKER
        if d.is_dir() and not d.name.startswith(".") and m.is_file():
            info = json.loads(m.read_text())
            done.append(((info.get("optimizer_steps", 0), info.get("time", 0.0)), d))
    done.sort(key=lambda x: x[0])
    deleted = [d for _, d in done[:-keep_last]]
    deleted += [d for d in parent.iterdir() if d.is_dir() and d.name.startswith(".") and ".tmp-" in d.name]
    for d in deleted:
        shutil.rmtree(d, ignore_errors=True)
    return deleted


# --------------------------------------------------------------------------------------------
# Ray: images, the rank actor, the group
# --------------------------------------------------------------------------------------------


def resolve_image_refs(refs_per_row: Sequence[Sequence[Any]], timeout_s: float) -> list[list[Any]]:
    """Per-row image lists from per-row ObjectRefs, fetched once; equal rows share one list object.

    Entries that are not ObjectRefs (already PIL images) pass through unchanged.
    """
    import ray

    unique = {}
    for row in refs_per_row:
        for r in row:
            if isinstance(r, ray.ObjectRef):
                unique.setdefault(r, None)
    keys = list(unique)
    if keys:
        for k, v in zip(keys, ray.get(keys, timeout=timeout_s)):
            unique[k] = v
    shared: dict[tuple, list[Any]] = {}
    out = []
    for row in refs_per_row:
        key = tuple(r if isinstance(r, ray.ObjectRef) else id(r) for r in row)
        if key not in shared:
            shared[key] = [unique[r] if isinstance(r, ray.ObjectRef) else r for r in row]
        out.append(shared[key])
    return out


class LearnerWorker:
    """The body of one rank's Ray actor: joins the process group, then wraps a :class:`Learner`."""

    def __init__(self, rank: int, world_size: int, get_timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, get_timeout_s
        self.learner: Learner | None = None

    def node_and_port(self) -> tuple[str, str, int]:
        """(Ray node id, node IP, a free port here): rank 0's become MASTER_ADDR/MASTER_PORT."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, kwargs: dict[str, Any]) -> int:
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        self.learner = Learner(**kwargs)
        return os.getpid()

    def _images(self, batch: RolloutBatch, masked: bool) -> list[list[Any]]:
        refs = batch.masked_image_refs if masked else batch.image_refs
        if refs is None:
            raise ValueError("batch has no masked_image_refs (filled by the corruption service)")
        return resolve_image_refs(refs, self.timeout)

    def compute_logprobs(self, batch: RolloutBatch, masked: bool) -> torch.Tensor:
        return self.learner.compute_logprobs(batch, self._images(batch, masked))

    def train_step(self, batch: RolloutBatch, coefs: dict[str, float | None]) -> dict[str, float]:
        learner = self.learner
        needs_masked = learner.masked_logp == "learner_grad" and (
            (coefs.get("gamma") if coefs.get("gamma") is not None else learner.loss.gamma) != 0.0
            or (coefs.get("eta2") if coefs.get("eta2") is not None else learner.loss.eta2) != 0.0
        )
        masked = self._images(batch, True) if needs_masked else None
        return learner.train_step(batch, self._images(batch, False), masked, **coefs)

    def peak_rss_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.learner, method)(*args, **kwargs)


class LearnerGroup:
    """N Ray actors, one DeepSpeed rank each, in one placement group (data parallelism).

    Each batch is split into N equal contiguous shards (``RolloutBatch.shard``); results are
    concatenated (log-probs) or averaged over ranks (metrics; counters are rank 0's). Every call
    waits at most ``get_timeout_s``. Images travel as the batch's ObjectRefs and are fetched by
    the actors. Placements of the masked pass: ``pool`` (the driver fills ``masked_logp`` from a
    ``LogProbPool``), ``learner`` (``compute_logprobs(batch, masked=True)`` right after
    ``old_logp``), ``learner_grad`` (``masked_logp="learner_grad"``: ``train_step`` fetches
    ``masked_image_refs`` and recomputes them inside the loss).
    """

    def __init__(
        self,
        model_path: str,
        learner: LearnerConfig,
        algo: AlgoConfig | LossSettings,
        *,
        masked_logp: MaskedLogpPlacement = "pool",
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        temperature: float = 1.0,
        total_optimizer_steps: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
        get_timeout_s: float = 900.0,
        omp_threads: int = 1,
    ) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._ray = ray
        self.world_size = learner.num_ranks
        self.timeout = get_timeout_s
        bundle = {"CPU": float(learner.num_cpus)}
        if learner.num_gpus > 0:
            bundle["GPU"] = float(learner.num_gpus)
        self.placement_group = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=get_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.placement_group)
            raise TimeoutError(
                f"learner placement group of {self.world_size} x {bundle} not ready within "
                f"{get_timeout_s:.0f} s (available: {ray.available_resources()})"
            ) from None
        env = {"OMP_NUM_THREADS": str(omp_threads), "TOKENIZERS_PARALLELISM": "false"}
        if learner.num_gpus == 0:
            env["DS_ACCELERATOR"] = "cpu"
        actor_cls = ray.remote(LearnerWorker)
        self.actors = [
            actor_cls.options(
                num_cpus=float(learner.num_cpus),
                num_gpus=float(learner.num_gpus),
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement_group, placement_group_bundle_index=r
                ),
                runtime_env={"env_vars": env},
            ).remote(r, self.world_size, get_timeout_s)
            for r in range(self.world_size)
        ]
        try:
            nodes = self._get([a.node_and_port.remote() for a in self.actors])
            master_node, master_ip, port = nodes[0]
            # One node (the CPU case): loopback. Several nodes: rank 0's address.
            addr = "127.0.0.1" if all(n == master_node for n, _, _ in nodes) else master_ip
            kwargs = dict(
                model_path=model_path,
                learner=learner,
                algo=algo,
                masked_logp=masked_logp,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                temperature=temperature,
                total_optimizer_steps=total_optimizer_steps,
                seed=seed,
                trust_remote_code=trust_remote_code,
            )
            self.pids = self._get([a.setup.remote(addr, port, kwargs) for a in self.actors])
        except BaseException:
            self.shutdown()
            raise

    def _get(self, refs: Any) -> Any:
        return self._ray.get(refs, timeout=self.timeout)

    def _all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return self._get([a.call.remote(method, *args, **kwargs) for a in self.actors])

    def _shards(self, batch: RolloutBatch) -> list[RolloutBatch]:
        return [batch.shard(r, self.world_size) for r in range(self.world_size)]

    def compute_logprobs(self, batch: RolloutBatch, *, masked: bool = False) -> torch.Tensor:
        """No-grad log-probs (N, R) of every response (``masked``: under ``masked_image_refs``).

        Rows are padded (repeated) to a multiple of the world size so every rank runs the same
        number of forwards (a ZeRO-3 requirement); the padding rows' results are dropped.
        """
        n = len(batch)
        pad = (-n) % self.world_size
        full = batch.select(list(range(n)) + [i % n for i in range(pad)]) if pad else batch
        width = batch.response_ids.shape[1]
        parts = self._get([a.compute_logprobs.remote(s, masked) for a, s in zip(self.actors, self._shards(full))])
        logp = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
        return logp[:n]

    def train_step(
        self, batch: RolloutBatch, *, gamma: float | None = None, eta1: float | None = None, eta2: float | None = None
    ) -> dict[str, float]:
        """All optimiser steps of one rollout batch; metrics averaged over ranks."""
        if len(batch) % self.world_size:
            raise ValueError(f"{len(batch)} rows do not split evenly over {self.world_size} learner ranks")
        coefs = {"gamma": gamma, "eta1": eta1, "eta2": eta2}
        per_rank = self._get([a.train_step.remote(s, coefs) for a, s in zip(self.actors, self._shards(batch))])
        out = {k: float(np.mean([m[k] for m in per_rank])) for k in per_rank[0]}
        for k in ("optimizer_steps", "skipped_steps", "total_optimizer_steps", "total_skipped_steps"):
            out[k] = per_rank[0][k]
        out["response_tokens"] = float(sum(m["response_tokens"] for m in per_rank))
        out["step_time_s"] = float(max(m["step_time_s"] for m in per_rank))
        return out

    def publish_weights(self, version: int, transport: str | None = None) -> WeightsHandle:
        """Rank 0's handle of the full HF-named weights (every rank takes part in the gather).

        With ``nccl``/``gloo`` the broadcast is still running when this returns: the receivers'
        calls complete it, then :meth:`wait_weights_sent`.
        """
        return self._all("publish_weights", version, transport)[0]

    def weight_group_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight group's store: its node's IP and a free port there."""
        _, ip, port = self._get(self.actors[0].node_and_port.remote())
        return ip, port

    def join_weight_group(self, group_id: str, host: str, port: int, world_size: int) -> Any:
        """Start rank 0's join (an ObjectRef): every member must be joining at the same time."""
        return self.actors[0].call.remote("join_weight_group", group_id, host, port, world_size)

    def wait_weights_sent(self) -> None:
        self._get(self.actors[0].call.remote("wait_weights_sent", self.timeout))

    def save_checkpoint(
        self, path: str | os.PathLike, *, keep_last: int | None = None, extra: dict[str, Any] | None = None
    ) -> Path:
        """Every rank writes its part; rank 0 renames the finished folder into place (see Learner).

        A rank that dies during the save fails it at once (the others may be waiting on it in a
        barrier): nothing appears under ``path``, earlier checkpoints are untouched, and the
        crashed save's temporary folder is swept by the next save's pruning.
        """
        # Absolute here: the actors' working directory need not be the driver's.
        final = Path(path).absolute()
        try:
            return self._all("save_checkpoint", final, keep_last=keep_last, extra=extra)[0]
        except self._ray.exceptions.RayActorError as e:
            raise RuntimeError(
                f"a learner rank died while saving checkpoint {final}; nothing was written under "
                f"that name and the earlier checkpoints are intact. The learner group is lost: "
                f"restart the run with --resume ({type(e).__name__})"
            ) from e

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        return self._all("load_checkpoint", Path(path).absolute())[0]

    def peak_rss_mb(self) -> list[float]:
        """Peak resident memory of each rank's process, MiB."""
        return self._get([a.peak_rss_mb.remote() for a in self.actors])

    def param_digests(self) -> list[str]:
        return self._all("param_digest")

    def shutdown(self) -> None:
        ray = self._ray
        for a in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                ray.kill(a)
        with contextlib.suppress(Exception):
            ray.util.remove_placement_group(self.placement_group)
        self.actors = []
