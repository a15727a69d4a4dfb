"""The perception and reference pools: N forward-only scorers on the one actor group.

This module owns what is the scoring role's own on top of services/group.py (docs/design.md steps
4 and 6): splitting a batch over the workers in contiguous row chunks, starting them (``submit``)
apart from gathering them (``collect``) so the driver overlaps the pools, and the version check of
the perception contract. The workers are :class:`~services.logprob.scorer.LogProbWorker` s.

- ``perception``: computes ``masked_logp`` from ``masked_image_refs`` with the rollout policy's
  weights; it follows the policy as a :class:`~services.group.WeightReceiver` and reports the
  versions it used, so the driver can check that ``masked_logp`` uses the version that generated
  the rollouts.
- ``reference``: computes ``ref_logp`` from ``image_refs`` with the frozen initial weights (version
  0 for ever); receiving weights is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.group import ActorGroup, Resources, Running, Work
from services.logprob.scorer import ROLES, LogProbWorker, Role
from services.receiver import WeightReceivingPool
from trainer.core.batch import RolloutBatch
from trainer.core.weights import WeightsHandle


@dataclass
class PendingScores:
    """What :meth:`LogProbPool.submit` started: the batch and its running chunks."""

    batch: RolloutBatch
    masked: bool
    running: Running


class LogProbPool(WeightReceivingPool):
    """N :class:`LogProbWorker` s of one role; each batch is split over them in contiguous chunks.

    A worker that dies is restarted by Ray (up to ``max_restarts`` times) with the model folder's
    weights; its chunk is resubmitted, and (perception role) it loads the pool's current weights
    before it scores anything, so the version contract holds across restarts.
    """

    def __init__(
        self,
        model_path: str,
        *,
        role: Role = "perception",
        num_workers: int = 1,
        num_cpus: float = 0.5,
        num_gpus: float = 0.0,
        dtype: str = "float32",
        min_pixels: int = 56 * 56,
        max_pixels: int = 1280 * 28 * 28,
        temperature: float = 1.0,
        micro_batch_size: int = 8,
        max_tokens_per_micro_batch: int | None = None,
        logits_chunk_size: int | None = 1024,
        get_timeout_s: float = 900.0,
        omp_threads: int = 1,
        max_restarts: int = 3,
        max_resubmits: int = 3,
        trust_remote_code: bool = False,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        group = ActorGroup(
            f"{role} pool",
            LogProbWorker,
            dict(
                model_path=model_path,
                role=role,
                dtype=dtype,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                temperature=temperature,
                micro_batch_size=micro_batch_size,
                max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                logits_chunk_size=logits_chunk_size,
                get_timeout_s=get_timeout_s,
                trust_remote_code=trust_remote_code,
            ),
            num_actors=num_workers,
            resources=Resources(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                env={"OMP_NUM_THREADS": str(omp_threads), "TOKENIZERS_PARALLELISM": "false"},
                max_restarts=max_restarts,
            ),
            get_timeout_s=get_timeout_s,
            max_resubmits=max_resubmits,
        )
        super().__init__(group, role=role)
        self.timeout = get_timeout_s

    def _chunks(self, n: int) -> list[list[int]]:
        k = min(len(self.group), max(n, 1))
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]

    def submit(self, batch: RolloutBatch, *, masked: bool = False) -> PendingScores:
        """Start scoring ``batch`` (``masked``: under ``masked_image_refs``); :meth:`collect` gathers it."""
        works = [
            Work(
                "compute_from_refs",
                (batch.select(rows), masked),
                {"handle": self.current_handle},
                label=f"chunk of rows {rows[0]}-{rows[-1]}",
            )
            for rows in self._chunks(len(batch))
            if rows
        ]
        return PendingScores(batch, masked, self.group.start(works, resync=self.resync_handle))

    def collect(self, pending: PendingScores) -> tuple[torch.Tensor, set[int]]:
        """(logp (N, R) aligned with the submitted batch, the weight versions that computed it).

        A chunk whose worker died is resubmitted to it once Ray has restarted it.
        """
        width = pending.batch.response_ids.shape[1]
        parts = self.group.finish(pending.running)
        logps = [torch.nn.functional.pad(logp, (0, width - logp.shape[1])) for logp, _ in parts]
        return torch.cat(logps), {version for _, version in parts}

    def compute_logprobs(
        self, batch: RolloutBatch, *, masked: bool = False, expected_version: int | None = None
    ) -> torch.Tensor:
        """Log-probs of every response; with ``expected_version``, fail loudly if a worker held another."""
        logp, versions = self.collect(self.submit(batch, masked=masked))
        if expected_version is not None and versions != {expected_version}:
            raise RuntimeError(
                f"{self.role} pool computed with weight versions {sorted(versions)}, expected {expected_version}"
            )
        return logp

    def start_receive(self, handle: WeightsHandle) -> list:
        if self.role == "reference":
            raise RuntimeError("the reference pool holds the frozen initial weights; it does not receive updates")
        return super().start_receive(handle)
