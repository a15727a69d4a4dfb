"""The forward-only scorer (no Ray): a transformers model in eval mode that scores response tokens.

This module owns :class:`LogProbWorker`, the plain worker of the perception and reference pools
(docs/design.md step 4): no optimiser, scoring a :class:`~trainer.core.batch.RolloutBatch`'s response
tokens with :func:`trainer.core.modeling.response_logprobs` (the same function the learner's
``old_logp`` uses, so the two can only differ by weights), and its half of weight sync (step 6):
the perception role follows the policy and reports the version it holds; the reference role keeps
the frozen initial weights (version 0) and refuses updates. The Ray pools are services/logprob/pool.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

from services.follower import catch_up
from trainer.core.batch import RolloutBatch
from trainer.core.modeling import load_model, load_processor, response_logprobs
from trainer.core.weights import WeightsHandle, hf_name_map, load_hf_named_weights
from trainer.transport.broadcast import join_weight_group
from trainer.transport.object_store import resolve_image_refs
from trainer.transport.receive import load_handle

Role = Literal["perception", "reference"]
ROLES: tuple[str, ...] = ("perception", "reference")


class LogProbWorker:
    """One forward-only scorer: a transformers model, its processor, a role and a weight version."""

    def __init__(
        self,
        model_path: str,
        *,
        role: Role = "perception",
        dtype: str = "float32",
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        temperature: float = 1.0,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: int | None = None,
        logits_chunk_size: int | None = 1024,
        trust_remote_code: bool = False,
        get_timeout_s: float = 900.0,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        budgets = {"max_tokens_per_micro_batch": max_tokens_per_micro_batch, "logits_chunk_size": logits_chunk_size}
        for name, value in budgets.items():
            if value is not None and value < 1:
                raise ValueError(f"logprob.{name} must be >= 1 or null, got {value}")
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        self.logits_chunk_size = logits_chunk_size
        self.role = role
        self.temperature = float(temperature)
        self.micro_batch_size = micro_batch_size
        self.timeout = get_timeout_s
        # On a GPU machine the worker scores on its GPU (the pool gives each actor its num_gpus).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.processor = load_processor(
            model_path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code
        )
        self._name_map = hf_name_map(self.model)
        self.version = 0  # the initial weights of model_path

    def held_version(self) -> int:
        return self.version

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "weight_version": self.version, "weight_group_ranks": 1}

    def compute_logprobs(self, batch: RolloutBatch, images: Sequence[Sequence[Any]]) -> torch.Tensor:
        """No-grad log-probs (N, R) of the response tokens under ``images`` (same interface as the learner's)."""
        logp, _ = response_logprobs(
            self.model,
            self.processor.image_processor,
            batch,
            images,
            temperature=self.temperature,
            micro_batch_size=self.micro_batch_size,
            max_tokens_per_micro_batch=self.max_tokens_per_micro_batch,
            chunk_size=self.logits_chunk_size,
        )
        return logp.float()

    def compute_from_refs(
        self, batch: RolloutBatch, masked: bool, handle: WeightsHandle | None = None
    ) -> tuple[torch.Tensor, int]:
        """Resolve the batch's image refs (``masked_image_refs`` if ``masked``) and score; returns (logp, version).

        ``handle`` is the pool's current weights: a worker that holds another version (one Ray just
        restarted with the folder's weights) loads it first.
        """
        catch_up(self, handle)
        refs = batch.masked_image_refs if masked else batch.image_refs
        if refs is None:
            raise ValueError("batch has no masked_image_refs (filled by the corruption service)")
        return self.compute_logprobs(batch, resolve_image_refs(refs, self.timeout)), self.version

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the learner's weight-broadcast group as rank ``first_rank`` (collective); returns the pid."""
        join_weight_group(
            group_id,
            host,
            port,
            first_rank,
            world_size,
            backend,
            timeout_s,
            device=self.device if backend == "nccl" else None,
        )
        return os.getpid()

    def receive_weights(self, handle: WeightsHandle) -> int:
        """Load a published policy version (perception role only); returns the version now held."""
        if self.role == "reference":
            raise RuntimeError("the reference pool holds the frozen initial weights; it does not receive updates")
        weights = load_handle(handle, self.timeout)
        load_hf_named_weights(self.model, weights, self._name_map)
        del weights  # cuda_ipc: views of the publisher's buckets; the copies must land before we let go
        if handle.transport == "cuda_ipc":
            torch.cuda.synchronize()
        self.version = int(handle.version)
        return self.version

    def receive(self, handle: WeightsHandle) -> int:
        """:meth:`receive_weights` (every transport fetches its own tensors)."""
        return self.receive_weights(handle)
