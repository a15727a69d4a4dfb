"""The learner: the PAPO policy update of one rank over a DeepSpeed engine (no Ray).

This module owns :class:`Learner`, a plain class (no Ray) holding one DeepSpeed rank: the policy model wrapped in
  a ZeRO 0-3 engine (fp32/bf16, torch AdamW, LR schedule, grad-norm clipping, optional gradient
  checkpointing and frozen vision tower). It computes ``old_logp`` (:meth:`Learner.compute_logprobs`),
  runs every optimiser step of one rollout batch (:meth:`Learner.train_step`), publishes the
  weights under their HF names (:meth:`Learner.publish_weights`) and saves/loads checkpoints
  atomically (:meth:`Learner.save_checkpoint` / :meth:`Learner.load_checkpoint`).


Loss scaling (docs/algorithm.md: "scale once, not twice"). The objective of a mini-batch is that
of its fixed layout of ``learner.micro_batch_size``-row micro-batches (k of them per rank): each
row's tokens are divided by the row's denominator from
:func:`trainer.core.algos.layout_denominators` (``token``: k x its layout micro-batch's tokens;
``seq``: k x rows x its own tokens; ``token_global``: the mini-batch's response tokens summed
over ranks, an all-reduce per mini-batch). The rows that actually run together may differ
(``learner.max_tokens_per_micro_batch`` groups them by length, and their count may differ from k
and between mini-batches): the per-row denominators make the sum the same, and the learner sets
DeepSpeed's accumulation boundary itself. ``engine.backward`` divides every loss by DeepSpeed's
configured accumulation steps (k), so each loss is multiplied by k first; its data-parallel
reduction then averages over ranks, the official definition for ``token``/``seq``, which
``token_global`` undoes with a further factor world_size, so its gradient is exactly that of
the global token mean. Ranks run the same number of micro-batches (the largest any rank needs):
ZeRO's forward and backward passes are collectives.

Non-finite gradient norms skip the step (see :mod:`trainer.learner.engine`).

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
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from trainer.core.algos import LossSettings, layout_denominators, papo_loss
from trainer.core.batch import RolloutBatch
from trainer.core.checkpoint import CHECKPOINT_MARKER, TRAINER_STATE, prune_checkpoints, replace_dir
from trainer.core.config import AlgoConfig, LearnerConfig, MaskedLogpPlacement, MaskedPass
from trainer.core.families import family_of
from trainer.core.microbatch import fixed_plan, split_to_count
from trainer.core.modeling import load_model, load_processor, micro_batch_plan, model_inputs, token_logprobs
from trainer.core.weights import BROADCAST_TRANSPORTS, WeightsHandle, digest, pack_state_dict
from trainer.learner.engine import GuardedAdamW, ds_config, hf_state_dict, init_distributed, lr_factor
from trainer.transport.broadcast import current_weight_group, join_weight_group
from trainer.transport.cuda_ipc import share_cuda_ipc

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DS_SUBDIR = "deepspeed"
_DS_TAG = "state"
# Files of a model folder that are weights (rewritten from the trained parameters on save);
# everything else (config, tokenizer, processor, chat template) is copied as it is.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")


# --------------------------------------------------------------------------------------------
# The learner (one rank)
# --------------------------------------------------------------------------------------------


class Learner:
    """One DeepSpeed data-parallel rank of the policy (no Ray; see :class:`LearnerGroup`).

    Args:
        model_path: local HF folder of the policy (model + processor).
        learner: optimiser, batch geometry, ZeRO stage, precision.
        algo: loss coefficients and averaging (the :class:`LossSettings` are built from it once).
        masked_logp: ``perception.masked_logp``; with ``learner_grad`` the masked log-probs are
            recomputed inside the loss with gradient (from ``masked_images``). What a step's loss
            takes is decided by :attr:`masked_pass` (:meth:`MaskedPass.loss_source`).
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
        self.masked_pass = MaskedPass(placement=masked_logp)
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
            for p in family_of(model).vision_tower(model).parameters():
                p.requires_grad_(False)
        if learner.freeze_language_model:
            visual = {id(p) for p in family_of(model).vision_tower(model).parameters()}
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

    def _all_reduce_max(self, value: int) -> int:
        import torch.distributed as dist

        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def _plan(self, batch: RolloutBatch, micro_batch_size: int) -> list[list[int]]:
        """This rank's micro-batches of ``batch``: fixed rows, or grouped by length within
        ``learner.max_tokens_per_micro_batch``; refined to the largest count of any rank (a
        collective), because ZeRO's forward and backward passes are collectives."""
        plan = micro_batch_plan(
            batch,
            micro_batch_size=micro_batch_size,
            max_tokens=self.cfg.max_tokens_per_micro_batch,
            field="learner.max_tokens_per_micro_batch",
        )
        if self.cfg.max_tokens_per_micro_batch is None:
            return plan  # equal shards: every rank has the same count already
        prompt_lens = batch.prompt_mask.sum(dim=1).tolist()
        return split_to_count(plan, self._all_reduce_max(len(plan)), prompt_lens, batch.response_lengths.tolist())

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
        # Forward through the engine (ZeRO-3 gathers parameters in its modules' hooks; the chunked
        # path calls the backbone and the head modules); the inputs are built from the bare module
        # because the engine's own ``.config`` is DeepSpeed's.
        return token_logprobs(
            self.engine,
            self._inputs(batch, images),
            batch.response_ids.to(self.device),
            batch.response_mask.to(self.device),
            temperature=self.temperature,
            with_entropy=with_entropy,
            chunk_size=self.cfg.logits_chunk_size,
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
        plan = self._plan(batch, micro_batch_size or self.cfg.micro_batch_size)
        was_training = self.module.training
        self.module.eval()
        out = torch.zeros(batch.response_ids.shape, dtype=torch.float32)
        try:
            for rows in plan:
                lp, _ = self._logp(batch.select(rows), [images[i] for i in rows])
                out[torch.as_tensor(rows), : lp.shape[1]] = lp.float().cpu()  # select() trims padding columns
        finally:
            self.module.train(was_training)
        return out

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
        visual = {id(p) for p in family_of(model).vision_tower(model).parameters()}
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

    def step_settings(
        self, *, gamma: float | None = None, eta1: float | None = None, eta2: float | None = None
    ) -> LossSettings:
        """The loss settings of one step: the configured ones with the given (scheduled) coefficients."""
        overrides = {k: float(v) for k, v in (("gamma", gamma), ("eta1", eta1), ("eta2", eta2)) if v is not None}
        return dataclasses.replace(self.loss, **overrides) if overrides else self.loss

    def masked_source(self, loss: LossSettings) -> Literal["batch", "recompute"] | None:
        """Where a step with ``loss`` takes the masked log-probs from (:meth:`MaskedPass.loss_source`):
        ``recompute`` (needs the masked images), ``batch`` (needs ``masked_logp``) or None."""
        return self.masked_pass.loss_source(loss.gamma, loss.eta2)

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
        source = self.masked_source(loss)
        if source == "recompute" and masked_images is None:
            raise ValueError(
                "perception.masked_logp=learner_grad recomputes the masked log-probs in the loss: "
                "train_step needs masked_images"
            )
        if source == "batch":
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
        """Every optimiser step of one rollout batch (this rank's shard): docs/design.md step 5.

        ``learner.ppo_epochs`` passes over consecutive mini-batches of ``mini_batch_size / world``
        rows; each is split into micro-batches with gradient accumulation, then clipped and
        stepped (or skipped on a non-finite norm). ``gamma``/``eta1``/``eta2`` override the
        configured coefficients (the driver's perception schedule). Returns metrics: token-weighted
        means of the loss statistics, the mean pre-clip ``grad_norm`` of the applied steps,
        ``lr``, ``optimizer_steps``/``skipped_steps`` of this call and their running totals.
        """
        loss_cfg = self.step_settings(gamma=gamma, eta1=eta1, eta2=eta2)
        self._check_inputs(batch, masked_images, loss_cfg)
        if len(images) != len(batch) or (masked_images is not None and len(masked_images) != len(batch)):
            raise ValueError("images (and masked_images) need one list per row")
        recompute_masked = self.masked_source(loss_cfg) == "recompute"
        t0 = time.perf_counter()
        self.module.train()
        weighted: dict[str, float] = {}  # token-weighted sums of per-micro-batch statistics
        objective = {"loss": 0.0, "pg_loss": 0.0}  # sums of the micro-batch terms as they enter backward
        tokens_total, slots, n_minis, norms, lrs, skipped = 0.0, 0, 0, [], [], 0
        for _epoch in range(self.cfg.ppo_epochs):
            for start in range(0, len(batch), self.rows_per_mini_batch):
                rows = list(range(start, start + self.rows_per_mini_batch))
                mini = batch.select(rows)
                n_minis += 1
                # The loss is that of the fixed micro_batch_size layout whatever rows run together
                # (trainer.core.algos.layout_denominators), so token budgets change memory, not math.
                layout = fixed_plan(len(rows), self.cfg.micro_batch_size)
                if len(layout) != self.grad_accum:
                    raise RuntimeError(
                        f"{len(layout)} micro-batches per mini-batch, DeepSpeed expects {self.grad_accum}"
                    )
                num_tokens = self._all_reduce_sum(mini.num_response_tokens) if loss_cfg.avg == "token_global" else None
                d_avg, d_tok = layout_denominators(mini.response_lengths, layout, loss_cfg.avg, num_tokens=num_tokens)
                plan = self._plan(mini, self.cfg.micro_batch_size)
                for k, sub in enumerate(plan):
                    micro_rows = [rows[i] for i in sub]
                    boundary = k == len(plan) - 1
                    # The plan's length may differ from DeepSpeed's accumulation steps: we own the boundary.
                    self.engine.set_gradient_accumulation_boundary(boundary)
                    idx = torch.as_tensor(sub)
                    metrics = self._micro_backward(
                        mini.select(sub),
                        [images[i] for i in micro_rows],
                        [masked_images[i] for i in micro_rows] if recompute_masked else None,
                        loss_cfg,
                        (d_avg[idx], d_tok[idx]),
                    )
                    w = metrics.pop("response_tokens")
                    tokens_total += w
                    slots += metrics.pop("response_slots")
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
            # Share of the processed response positions that were padding (micro-batch layout).
            response_pad_frac=1.0 - tokens_total / slots if slots else 0.0,
            step_time_s=time.perf_counter() - t0,
        )
        return out

    def _micro_backward(
        self,
        micro: RolloutBatch,
        images: Sequence[Sequence[Any]],
        masked_images: Sequence[Sequence[Any]] | None,
        loss_cfg: LossSettings,
        denominators: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, float]:
        """Forward, ``papo_loss`` and ``engine.backward`` of one micro-batch; returns its metrics.

        ``denominators`` are the rows' (d_avg, d_tok) from the mini-batch's loss layout.
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
            settings=loss_cfg,
            row_denominators=denominators,
        )
        # The denominators already carry the layout's 1/k: undo engine.backward's division by its
        # accumulation steps. token/seq: the data-parallel average over ranks is the official
        # definition. token_global: normalised by the global token count, so undo that average too.
        scale = self.grad_accum * (self.world_size if loss_cfg.avg == "token_global" else 1)
        if loss_cfg.avg == "token_global":
            # This rank's share of the global objective, times world size: the group's rank mean
            # of the metric is then the mini-batch objective itself.
            metrics["loss"] *= self.world_size
            metrics["pg_loss"] *= self.world_size
        self.engine.backward(loss * scale)
        # Exact entropy of the temperature-scaled distribution, token mean after weighting.
        n_tok = max(metrics["response_tokens"], 1.0)
        metrics["exact_entropy"] = float(entropy.sum()) / n_tok if entropy is not None else float("nan")
        metrics["response_slots"] = int(micro.response_mask.numel())
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
        """The sending half of the weight sync (docs/design.md step 6). Collective; rank 0 returns the handle.

        ``transport`` (default ``learner.weight_transport``) picks how (trainer/core/weights.py):
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
