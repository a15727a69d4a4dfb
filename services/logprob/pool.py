"""Forward-only log-prob pools: the perception pool (masked images) and the reference pool.

This module owns
- :class:`LogProbWorker`, a plain class (no Ray): a transformers model in eval mode, no optimiser,
  scoring a :class:`~trainer.core.batch.RolloutBatch`'s response tokens with
  :func:`trainer.core.modeling.response_logprobs` (the same function the learner's ``old_logp`` uses, so
  the two can only differ by weights);
- :class:`LogProbPool`: N workers as Ray actors with fractional CPUs, each batch split over them in
  contiguous chunks;

Roles (docs/design.md steps 4 and 6):
- ``perception``: computes ``masked_logp`` from ``masked_image_refs`` with the rollout policy's
  weights; it follows the policy through ``receive_weights(handle)`` and reports the version it
  holds, so the driver can check the contract that ``masked_logp`` uses the version that generated
  the rollouts.
- ``reference``: computes ``ref_logp`` from ``image_refs`` with the frozen initial weights (version
  0 for ever); ``receive_weights`` is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from trainer.core.batch import RolloutBatch
from trainer.core.modeling import load_model, load_processor, response_logprobs
from trainer.core.weights import BROADCAST_TRANSPORTS, StaleWeights, WeightsHandle, hf_name_map, load_hf_named_weights
from trainer.transport.broadcast import join_weight_group
from trainer.transport.receive import load_handle

logger = logging.getLogger(__name__)

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
        trust_remote_code: bool = False,
        get_timeout_s: float = 900.0,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
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

    def ping(self) -> int:
        return os.getpid()

    def get_version(self) -> int:
        return self.version

    def compute_logprobs(self, batch: RolloutBatch, images: Sequence[Sequence[Any]]) -> torch.Tensor:
        """No-grad log-probs (N, R) of the response tokens under ``images`` (same interface as the learner's)."""
        logp, _ = response_logprobs(
            self.model,
            self.processor.image_processor,
            batch,
            images,
            temperature=self.temperature,
            micro_batch_size=self.micro_batch_size,
        )
        return logp.float()

    def compute_from_refs(
        self, batch: RolloutBatch, masked: bool, handle: WeightsHandle | None = None
    ) -> tuple[torch.Tensor, int]:
        """Resolve the batch's image refs (``masked_image_refs`` if ``masked``) and score; returns (logp, version).

        ``handle`` is the pool's current weights: a worker that holds another version (one Ray just
        restarted with the folder's weights) loads it first.
        """
        from trainer.transport.object_store import resolve_image_refs

        if handle is not None and handle.version != self.version:
            if handle.transport in BROADCAST_TRANSPORTS:  # a broadcast cannot reach one process alone
                raise StaleWeights(self.version, handle.version)
            self.receive_weights(handle)
        refs = batch.masked_image_refs if masked else batch.image_refs
        if refs is None:
            raise ValueError("batch has no masked_image_refs (filled by the corruption service)")
        return self.compute_logprobs(batch, resolve_image_refs(refs, self.timeout)), self.version

    def join_weight_group(
        self, group_id: str, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float
    ) -> int:
        """Join the learner's weight-broadcast group as ``rank`` (collective); returns the pid."""
        join_weight_group(
            group_id,
            host,
            port,
            rank,
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


@dataclass
class PendingScores:
    """What :meth:`LogProbPool.submit` started: one ObjectRef per (worker, contiguous rows) chunk."""

    batch: RolloutBatch
    masked: bool
    parts: list[tuple[Any, int, list[int]]]  # (ref, worker index, rows of batch)


class LogProbPool:
    """N :class:`LogProbWorker` Ray actors of one role; each batch is split over them in contiguous chunks.

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
        get_timeout_s: float = 900.0,
        omp_threads: int = 1,
        max_restarts: int = 3,
        max_resubmits: int = 3,
        trust_remote_code: bool = False,
    ) -> None:
        import ray

        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; allowed: {', '.join(ROLES)}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._ray = ray
        self.role = role
        self.timeout = get_timeout_s
        self.max_resubmits = max_resubmits
        self.resubmissions = 0
        self.current_handle: WeightsHandle | None = None
        #: Publishes a version by the object store, for a worker that restarted after a broadcast
        #: (the driver sets it; see services.rollout.pool.resync_handle).
        self.fallback_publish: Callable[[int], WeightsHandle] | None = None
        self._fallback: WeightsHandle | None = None
        actor_cls = ray.remote(LogProbWorker).options(
            num_cpus=float(num_cpus),
            num_gpus=float(num_gpus),
            max_restarts=max_restarts,
            max_task_retries=0,  # we resubmit ourselves, with the current weights
            runtime_env={"env_vars": {"OMP_NUM_THREADS": str(omp_threads), "TOKENIZERS_PARALLELISM": "false"}},
        )
        self.actors = [
            actor_cls.remote(
                model_path,
                role=role,
                dtype=dtype,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                temperature=temperature,
                micro_batch_size=micro_batch_size,
                get_timeout_s=get_timeout_s,
                trust_remote_code=trust_remote_code,
            )
            for _ in range(num_workers)
        ]
        try:
            self.pids = ray.get([a.ping.remote() for a in self.actors], timeout=get_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _chunks(self, n: int) -> list[list[int]]:
        k = min(len(self.actors), max(n, 1))
        bounds = [round(i * n / k) for i in range(k + 1)]
        return [list(range(bounds[i], bounds[i + 1])) for i in range(k)]

    def _submit_rows(
        self, w: int, batch: RolloutBatch, rows: list[int], masked: bool, handle: WeightsHandle | None = None
    ) -> Any:
        return self.actors[w].compute_from_refs.remote(batch.select(rows), masked, handle or self.current_handle)

    def submit(self, batch: RolloutBatch, *, masked: bool = False) -> PendingScores:
        """Start scoring ``batch`` (``masked``: under ``masked_image_refs``); :meth:`collect` gathers it."""
        parts = [
            (self._submit_rows(w, batch, rows, masked), w, rows)
            for w, rows in enumerate(self._chunks(len(batch)))
            if rows
        ]
        return PendingScores(batch, masked, parts)

    def _await_ready(self, w: int, deadline: float) -> None:
        from services.rollout.pool import await_restart

        self.pids[w] = await_restart(lambda: self.actors[w].ping.remote(), deadline, f"{self.role} worker {w}")

    def collect(self, pending: PendingScores) -> tuple[torch.Tensor, set[int]]:
        """(logp (N, R) aligned with the submitted batch, the weight versions that computed it).

        A chunk whose worker died is resubmitted to it once Ray has restarted it.
        """
        from ray.exceptions import RayActorError

        deadline = time.monotonic() + self.timeout
        width = pending.batch.response_ids.shape[1]
        logps, versions = [], set()
        for ref, w, rows in pending.parts:
            for attempt in range(self.max_resubmits + 1):
                try:
                    logp, version = self._ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                    break
                except StaleWeights as e:
                    if attempt == self.max_resubmits:
                        raise
                    from services.rollout.pool import resync_handle

                    logger.warning(
                        "%s worker %d restarted after the last broadcast (%s); resubmitting with the "
                        "weights from the object store",
                        self.role,
                        w,
                        e,
                    )
                    ref = self._submit_rows(w, pending.batch, rows, pending.masked, resync_handle(self, self.role))
                except RayActorError as e:
                    if attempt == self.max_resubmits:
                        raise RuntimeError(
                            f"{self.role} chunk of rows {rows[0]}-{rows[-1]} failed "
                            f"{attempt + 1} times; last error: {e}"
                        ) from e
                    logger.warning(
                        "%s worker %d died while scoring (%s); resubmitting %d rows",
                        self.role,
                        w,
                        type(e).__name__,
                        len(rows),
                    )
                    self.resubmissions += 1
                    self._await_ready(w, deadline)
                    ref = self._submit_rows(w, pending.batch, rows, pending.masked)
            logps.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
            versions.add(version)
        return torch.cat(logps), versions

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

    def weight_group_ranks(self) -> int:
        return len(self.actors)

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[Any]:
        """Start every worker's join (ObjectRefs): the learner and the other pools must join at the same time."""
        return [
            a.join_weight_group.remote(group_id, host, port, first_rank + w, world_size, backend, timeout_s)
            for w, a in enumerate(self.actors)
        ]

    def current_pids(self) -> list[int]:
        """The worker processes now (a restarted worker has a new one)."""
        self.pids = self._ray.get([a.ping.remote() for a in self.actors], timeout=self.timeout)
        return list(self.pids)

    def receive_weights(self, handle: WeightsHandle) -> list[int]:
        """Every worker loads ``handle``; returns their versions (perception role only)."""
        return self.finish_receive(handle, self.start_receive(handle))

    def start_receive(self, handle: WeightsHandle) -> list[Any]:
        """Start loading ``handle`` on every worker (ObjectRefs for :meth:`finish_receive`).

        The handle becomes the pool's current version first; a worker that dies here reports -1
        and loads it when it next scores (after Ray restarts it).
        """
        if self.role == "reference":
            raise RuntimeError("the reference pool holds the frozen initial weights; it does not receive updates")
        self.current_handle = handle
        return [a.receive_weights.remote(handle) for a in self.actors]

    def finish_receive(self, handle: WeightsHandle, refs: list[Any]) -> list[int]:
        from services.rollout.pool import gather_sync_versions

        return gather_sync_versions(refs, self.timeout, f"{self.role} worker")

    def versions(self) -> list[int]:
        return self._ray.get([a.get_version.remote() for a in self.actors], timeout=self.timeout)

    def shutdown(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                self._ray.kill(a)
        self.actors = []
