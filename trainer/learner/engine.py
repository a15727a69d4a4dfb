"""DeepSpeed set-up for one learner rank: the process group, the engine config, the guarded AdamW,
the LR schedule, and HF-named state dicts of the trained module.

Non-finite gradients: DeepSpeed's own skip belongs to fp16 loss scaling, and which other
configurations it covers depends on version and stage (0.19.8 with NaN gradients: ZeRO 1-3 and
bf16 skip, fp32 ZeRO 0 steps and writes NaN into the weights). So the learner computes the
global gradient norm itself at every accumulation boundary and, when it is not finite, sets
:attr:`GuardedAdamW.skip_next`, whose ``step`` then leaves parameters and moments untouched while
the engine still does its bookkeeping. The LR schedule is a pure function of the optimiser-step
count (:func:`lr_factor`), so it checkpoints as one integer and never advances on a skipped step.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from trainer.core.config import LearnerConfig

logger = logging.getLogger(__name__)


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
