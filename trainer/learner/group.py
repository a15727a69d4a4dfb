"""The learner's Ray side: one actor per rank in a placement group, and the data-parallel group
that shards batches over them, gathers results and lets rank 0 publish the weights.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.core.batch import RolloutBatch
from trainer.core.config import AlgoConfig, LearnerConfig, MaskedLogpPlacement
from trainer.core.weights import WeightsHandle
from trainer.learner.engine import LossSettings, free_port
from trainer.learner.learner import Learner
from trainer.transport.object_store import resolve_image_refs

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Ray: images, the rank actor, the group
# --------------------------------------------------------------------------------------------


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
