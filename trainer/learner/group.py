"""The learner's Ray side: one rank per actor of the one actor group, in a placement group.

This module owns :class:`LearnerWorker`, the plain body of one DeepSpeed rank (joins the process
group, then wraps a :class:`~trainer.learner.learner.Learner` and resolves the batch's image refs),
and :class:`LearnerGroup`, the data-parallel group on services/group.py that shards batches over
the ranks, gathers results and lets rank 0 publish the weights (docs/design.md steps 4-6).
"""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from services.group import ActorGroup, Resources
from trainer.core.algos import LossSettings
from trainer.core.batch import RolloutBatch
from trainer.core.config import AlgoConfig, LearnerConfig, MaskedLogpPlacement
from trainer.core.weights import WeightsHandle
from trainer.learner.engine import free_port
from trainer.learner.learner import Learner
from trainer.transport.object_store import resolve_image_refs

logger = logging.getLogger(__name__)


class LearnerWorker:
    """One rank: joins the process group in :meth:`setup`, then serves its :class:`Learner`.

    Every method the group calls is spelled out here (no dispatch by name to the learner).
    """

    def __init__(self, rank: int, world_size: int, get_timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout = rank, world_size, get_timeout_s
        self._learner: Learner | None = None

    @property
    def learner(self) -> Learner:
        if self._learner is None:
            raise RuntimeError(f"learner rank {self.rank} is not set up")
        return self._learner

    def node_and_port(self) -> tuple[str, str, int]:
        """(Ray node id, node IP, a free port here): rank 0's become MASTER_ADDR/MASTER_PORT."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), free_port()

    def setup(self, master_addr: str, master_port: int, kwargs: dict[str, Any]) -> int:
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",
        )
        self._learner = Learner(**kwargs)
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
        recompute = learner.masked_source(learner.step_settings(**coefs)) == "recompute"
        masked = self._images(batch, True) if recompute else None
        return learner.train_step(batch, self._images(batch, False), masked, **coefs)

    def publish_weights(self, version: int, transport: str | None = None) -> WeightsHandle | None:
        return self.learner.publish_weights(version, transport)

    def join_weight_group(self, group_id: str, host: str, port: int, world_size: int) -> int:
        return self.learner.join_weight_group(group_id, host, port, world_size)

    def wait_weights_sent(self, timeout_s: float | None = None) -> None:
        self.learner.wait_weights_sent(timeout_s)

    def save_checkpoint(self, path: Path, *, keep_last: int | None = None, extra: dict[str, Any] | None = None) -> Path:
        return self.learner.save_checkpoint(path, keep_last=keep_last, extra=extra)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        return self.learner.load_checkpoint(path)

    def param_digest(self) -> str:
        return self.learner.param_digest()

    def peak_rss_mb(self) -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


class LearnerGroup:
    """N ranks on one :class:`~services.group.ActorGroup`, one DeepSpeed rank each, in one placement group.

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
        self.world_size = learner.num_ranks
        self.timeout = get_timeout_s
        env = {"OMP_NUM_THREADS": str(omp_threads), "TOKENIZERS_PARALLELISM": "false"}
        if learner.num_gpus == 0:
            env["DS_ACCELERATOR"] = "cpu"
        # A dead rank loses the group (its peers wait in collectives): no restart, the run resumes
        # from its last checkpoint.
        self.group = ActorGroup(
            "learner group",
            LearnerWorker,
            lambda rank: dict(rank=rank, world_size=self.world_size, get_timeout_s=get_timeout_s),
            num_actors=self.world_size,
            resources=Resources(
                num_cpus=learner.num_cpus,
                num_gpus=learner.num_gpus,
                env=env,
                max_restarts=0,
                placement_group=True,
            ),
            get_timeout_s=get_timeout_s,
        )
        try:
            nodes = self.group.run_all("node_and_port")
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
            self.pids = self.group.run_all("setup", addr, port, kwargs)
        except BaseException:
            self.shutdown()
            raise

    @property
    def actors(self) -> list[Any]:
        return self.group.actors

    def _per_rank(self, method: str, shards: list[Any], *args: Any) -> list[Any]:
        return self.group.get([self.group.call(r, method, s, *args) for r, s in enumerate(shards)])

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
        parts = self._per_rank("compute_logprobs", self._shards(full), masked)
        logp = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])
        return logp[:n]

    def train_step(
        self, batch: RolloutBatch, *, gamma: float | None = None, eta1: float | None = None, eta2: float | None = None
    ) -> dict[str, float]:
        """All optimiser steps of one rollout batch; metrics averaged over ranks."""
        if len(batch) % self.world_size:
            raise ValueError(f"{len(batch)} rows do not split evenly over {self.world_size} learner ranks")
        coefs = {"gamma": gamma, "eta1": eta1, "eta2": eta2}
        per_rank = self._per_rank("train_step", self._shards(batch), coefs)
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
        return self.group.run_all("publish_weights", version, transport)[0]

    def weight_group_address(self) -> tuple[str, int]:
        """Where rank 0 hosts the weight group's store: its node's IP and a free port there."""
        _, ip, port = self.group.get(self.group.call(0, "node_and_port"))
        return ip, port

    def join_weight_group(self, group_id: str, host: str, port: int, world_size: int) -> Any:
        """Start rank 0's join (an ObjectRef): every member must be joining at the same time."""
        return self.group.call(0, "join_weight_group", group_id, host, port, world_size)

    def wait_weights_sent(self) -> None:
        self.group.get(self.group.call(0, "wait_weights_sent", self.timeout))

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
            return self.group.run_all("save_checkpoint", final, keep_last=keep_last, extra=extra)[0]
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(
                f"a learner rank died while saving checkpoint {final}; nothing was written under "
                f"that name and the earlier checkpoints are intact. The learner group is lost: "
                f"restart the run with --resume ({type(e).__name__})"
            ) from e

    def load_checkpoint(self, path: str | os.PathLike) -> dict[str, Any]:
        return self.group.run_all("load_checkpoint", Path(path).absolute())[0]

    def peak_rss_mb(self) -> list[float]:
        """Peak resident memory of each rank's process, MiB."""
        return self.group.run_all("peak_rss_mb")

    def param_digests(self) -> list[str]:
        return self.group.run_all("param_digest")

    def shutdown(self) -> None:
        """Kill the ranks and free the placement group (idempotent)."""
        if getattr(self, "group", None) is not None:
            self.group.shutdown()
