"""The rollout pool: N :class:`~services.rollout.worker.RolloutWorker` s on the one actor group.

This module owns what is the rollout role's own on top of services/group.py (docs/design.md
steps 2 and 6): splitting a generate call into chunks, dispatching them least loaded with the
pool's current weights, results in request order with one weight version, and building the pool
from config. Readiness, restart and resubmission, timeouts, weight receipt (the
:class:`~services.group.WeightReceiver` protocol) and the orderly shutdown that stops the engines
before the actors are killed are the group's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.group import ActorGroup, Resources, Work
from services.receiver import WeightReceivingPool
from services.rollout.types import RolloutRequest, RolloutResult, SamplingSpec
from services.rollout.worker import RolloutWorker, worker_kwargs_from_config
from trainer.core.batch import RolloutBatch
from trainer.core.config import ClusterConfig, ModelConfig, RolloutConfig


class RolloutPool(WeightReceivingPool):
    """N rollout workers: least-loaded dispatch, ordered results, restart + resubmit.

    ``worker_kwargs`` are :class:`RolloutWorker` arguments (plain values; see
    :meth:`from_config`). Actors request ``num_cpus``/``num_gpus`` each (fractional CPUs on small
    machines) and are restarted by Ray up to ``max_restarts`` times; every ``generate`` carries the
    pool's current weights, so a restarted worker re-syncs before it samples anything.
    """

    def __init__(
        self,
        worker_kwargs: dict[str, Any],
        *,
        num_workers: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        get_timeout_s: float = 900.0,
        max_restarts: int = 3,
        max_resubmits: int = 3,
        chunk_size: int | None = None,
        omp_threads: int = 1,
    ) -> None:
        self.worker_kwargs = dict(worker_kwargs)
        self.chunk_size = chunk_size
        group = ActorGroup(
            "rollout pool",
            RolloutWorker,
            {**self.worker_kwargs, "get_timeout_s": get_timeout_s},
            num_actors=num_workers,
            # One OMP thread per actor on small machines (docs/design.md), set before torch loads.
            resources=Resources(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                env={"OMP_NUM_THREADS": str(omp_threads)},
                max_restarts=max_restarts,
            ),
            get_timeout_s=get_timeout_s,
            max_resubmits=max_resubmits,
            stop_workers=True,  # stop each engine before its actor is killed: killing first leaks shared memory
        )
        super().__init__(group, role="rollout", initial_version=int(self.worker_kwargs.get("initial_version", 0)))

    @classmethod
    def from_config(
        cls,
        rollout: RolloutConfig,
        model: ModelConfig,
        cluster: ClusterConfig,
        *,
        seed: int = 0,
        model_path: str | Path | None = None,
        max_images_per_prompt: int = 1,
        initial_version: int = 0,
    ) -> RolloutPool:
        """From ``RolloutConfig``, ``ModelConfig`` and ``ClusterConfig``."""
        if rollout.num_gpus and rollout.num_gpus < rollout.tensor_parallel_size:
            raise ValueError(
                f"rollout.num_gpus={rollout.num_gpus} per worker is less than "
                f"rollout.tensor_parallel_size={rollout.tensor_parallel_size}"
            )
        kwargs = worker_kwargs_from_config(
            rollout,
            model,
            seed=seed,
            initial_version=initial_version,
            max_images_per_prompt=max_images_per_prompt,
            model_path=model_path,
        )
        return cls(
            kwargs,
            num_workers=rollout.num_workers,
            num_cpus=rollout.num_cpus,
            num_gpus=rollout.num_gpus,
            get_timeout_s=cluster.get_timeout_s,
            omp_threads=cluster.omp_threads_per_actor,
        )

    @property
    def calls_per_worker(self) -> list[int]:
        return self.group.calls_per_actor

    def generate(
        self, requests: Sequence[RolloutRequest], sampling: SamplingSpec, timeout_s: float | None = None
    ) -> RolloutResult:
        """Generate for all requests; rows in request order, group id = request index."""
        if self.group.closed:
            raise RuntimeError("the rollout pool is shut down")
        t0 = time.perf_counter()
        requests = list(requests)
        if not requests:
            return RolloutResult(None, {}, self.current_version(), 0, 0.0)
        size = self.chunk_size or math.ceil(len(requests) / len(self.group))
        works = [
            Work(
                "serve",
                (requests[start : start + size], sampling, start),
                {"handle": self.current_handle},
                label=f"chunk at request {start}",
            )
            for start in range(0, len(requests), size)
        ]
        ordered: list[RolloutResult] = self.group.run(works, timeout_s=timeout_s, resync=self.resync_handle)
        batches = [r.batch for r in ordered if r.batch is not None]
        errors = {i: e for r in ordered for i, e in r.errors.items()}
        versions = {r.weight_version for r in ordered}
        if len(versions) != 1:
            raise RuntimeError(f"rollout workers served with different weight versions {sorted(versions)}")
        batch = RolloutBatch.concat(batches) if batches else None
        return RolloutResult(batch, errors, versions.pop(), len(requests), time.perf_counter() - t0)

    def worker_info(self) -> list[dict[str, Any]]:
        """Each worker's readiness answer now: pid, weight version, start seconds, backend, weight-group ranks."""
        return self.group.refresh()

    def __enter__(self) -> RolloutPool:
        return self
