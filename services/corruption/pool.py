"""The corruption pool: N :class:`~services.corruption.service.CorruptionService` s on the one actor group.

This module owns what is the corruption role's own on top of services/group.py (docs/design.md
step 2): packing prompts into calls whose images travel as top-level ObjectRefs, and handing back
one ObjectRef per masked image without waiting for it.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import ray

from services.corruption.service import CorruptionService, Layout, MaskRequest
from services.group import ActorGroup, Resources
from trainer.core.corruption import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_NOISE_STD,
    DEFAULT_PATCH_SIZE,
    DEFAULT_PROB,
    DEFAULT_STRATEGY,
    ImageLike,
)


class CorruptionPool:
    """N ``CorruptionService`` actors with fractional CPUs, least-loaded dispatch.

    ``submit`` returns at once with one list of ObjectRefs per prompt (masked images, in order),
    so the driver can start generation alongside and hand the refs straight to the perception
    pool: nothing waits on corruption unless a consumer needs the pixels. Each masked image is
    its own return object of the actor call, so the driver owns it (it survives an actor
    restart and Ray can rebuild it by re-running the deterministic call), yet its bytes stay in
    the object store: Ray only inlines return values under 100 KB into the caller.
    Errors raised while masking surface when a ref is fetched (``get`` or the consumer).
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        patch_size: int = DEFAULT_PATCH_SIZE,
        prob: float = DEFAULT_PROB,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        noise_std: float = DEFAULT_NOISE_STD,
        num_workers: int = 2,
        num_cpus: float = 0.25,
        prompts_per_call: int = 8,
        max_restarts: int = 3,
        start_timeout_s: float = 120.0,
    ) -> None:
        # Validate here so a bad config fails in the driver, not inside N actors.
        CorruptionService(strategy, patch_size, prob, max_pixels, noise_std)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
        if not (isinstance(num_cpus, numbers.Real) and num_cpus > 0):
            raise ValueError(f"num_cpus must be a number > 0, got {num_cpus!r}")
        if isinstance(prompts_per_call, bool) or not isinstance(prompts_per_call, int) or prompts_per_call < 1:
            raise ValueError(f"prompts_per_call must be an integer >= 1, got {prompts_per_call!r}")
        self.num_workers = num_workers
        self.prompts_per_call = prompts_per_call
        # Fails fast (instead of hanging the first step) when the actors cannot be placed.
        self.group = ActorGroup(
            "corruption pool",
            CorruptionService,
            dict(strategy=strategy, patch_size=patch_size, prob=prob, max_pixels=max_pixels, noise_std=noise_std),
            num_actors=num_workers,
            resources=Resources(
                num_cpus=float(num_cpus),
                # One OpenMP thread per actor (set before numpy loads in the worker process): on a
                # 2-core machine every pool shares the same cores.
                env={"OMP_NUM_THREADS": "1"},
                # Masking is a pure function of its arguments, so Ray retrying it after a crash is
                # safe, and the refs go on to the perception pool without being awaited here.
                max_restarts=max_restarts,
                max_task_retries=max_restarts,
            ),
            start_timeout_s=start_timeout_s,
        )

    @property
    def pids(self) -> list[int]:
        return self.group.pids

    @property
    def calls_per_worker(self) -> list[int]:
        """Actor calls dispatched to each worker so far (for load-balance checks and metrics)."""
        return self.group.calls_per_actor

    def submit(self, requests: Sequence[MaskRequest]) -> list[list[ray.ObjectRef]]:
        """Start masking; one list of masked-image ObjectRefs per request, in order."""
        # Check everything before submitting anything, so a bad request leaves no half batch.
        for request in requests:
            if request.precomputed is not None and len(request.precomputed) != len(request.images):
                raise ValueError(
                    f"row {request.row_id}: {len(request.precomputed)} precomputed masked "
                    f"images for {len(request.images)} images"
                )
        results: list[list[Any]] = [[] for _ in requests]
        # Prompts without images (text-only) need no call.
        work = [i for i, request in enumerate(requests) if len(request.images) > 0]
        # Spread a small batch over all workers; cap a call's size so large batches still
        # balance (and one slow call does not hold many prompts).
        per_call = min(self.prompts_per_call, max(1, -(-len(work) // self.num_workers)))
        for start in range(0, len(work), per_call):
            chunk = work[start : start + per_call]
            layout: list[Layout] = []
            flat: list[Any] = []
            for i in chunk:
                request = requests[i]
                has_precomputed = request.precomputed is not None
                count = len(request.images)
                layout.append((request.run_seed, request.row_id, request.epoch, count, has_precomputed))
                flat.extend(request.images)
                if request.precomputed is not None:
                    flat.extend(request.precomputed)
            total = sum(entry[3] for entry in layout)
            refs = self.group.submit(None, "mask_flat", layout, *flat, num_returns=total)
            refs = [refs] if total == 1 else list(refs)
            position = 0
            for i, entry in zip(chunk, layout):
                results[i] = refs[position : position + entry[3]]
                position += entry[3]
        return results

    def get(self, refs: list[list[ray.ObjectRef]], timeout_s: float = 60.0) -> list[list[ImageLike]]:
        """Fetch masked images (tests, eval, debugging); the training step passes refs on."""
        flat = [ref for prompt in refs for ref in prompt]
        values = iter(self.group.get(flat, timeout_s=timeout_s))
        return [[next(values) for _ in prompt] for prompt in refs]

    def mask(self, requests: Sequence[MaskRequest], timeout_s: float = 60.0) -> list[list[ImageLike]]:
        """``submit`` then ``get``: masked images by value."""
        return self.get(self.submit(requests), timeout_s=timeout_s)

    def shutdown(self) -> None:
        """Kill the actors (idempotent)."""
        self.group.shutdown()

    def __enter__(self) -> CorruptionPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
