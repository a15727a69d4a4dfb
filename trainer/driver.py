"""The training loop: the only place that knows the order of a PAPO step (docs/design.md, "One training step").

Read :meth:`Trainer.step` top to bottom: sample prompts and put their images into the object
store once; mask them (corruption pool) while the rollout pool generates; grade; (DAPO) keep
informative groups; masked / reference / old log-probs in parallel; advantages; learner update;
weight sync with a version check; metrics. Everything heavy runs in the services; this module
only orders calls and moves ObjectRefs.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from PIL import Image

from rewards.client import RewardClient, RewardServerError
from services.corruption.pool import CorruptionPool
from services.corruption.service import MaskRequest
from services.group import WeightReceiver
from services.logprob.pool import LogProbPool
from services.reward_server.serve import start_ray_serve, stop_ray_serve
from services.rollout.pool import RolloutPool
from services.rollout.types import RolloutRequest, SamplingSpec
from trainer.core.algos import group_advantages, perception_coefs
from trainer.core.batch import RolloutBatch
from trainer.core.checkpoint import TRAINER_STATE
from trainer.core.config import JobConfig, dump_config
from trainer.core.data import (
    BadPrompt,
    DataError,
    PromptExample,
    load_split_from_config,
    prompt_images,
    prompt_masked_images,
)
from trainer.core.families import UnsupportedModel, mask_patch_size
from trainer.core.metrics import CURVES_FILE, MetricsWriter, StepLine, plot_curves, read_metrics
from trainer.core.modeling import processor_pixels
from trainer.core.sampler import PromptSampler
from trainer.core.weights import BROADCAST_TRANSPORTS
from trainer.demo.paths import resolve_demo_paths
from trainer.evaluate import evaluate_examples
from trainer.learner.group import LearnerGroup
from trainer.rundir import (
    ResumeError,
    RunDirInUse,
    RunDirLock,
    archive_earlier_run,
    check_model_paths,
    latest_checkpoint,
    run_dir_of,
)

logger = logging.getLogger(__name__)


@dataclass
class Services:
    """The pools of a run. The rollout and perception pools are the ``WeightReceiver`` s of weight sync."""

    rollout: RolloutPool | None
    learner: LearnerGroup | None
    reward: RewardClient | None
    corruption: CorruptionPool | None = None
    perception: LogProbPool | None = None
    reference: LogProbPool | None = None
    serve_started: bool = False

    def shutdown(self) -> None:
        for pool in (self.rollout, self.perception, self.reference, self.corruption, self.learner):
            if pool is not None:
                try:
                    pool.shutdown()
                except Exception:  # shutting down the rest matters more than one failure
                    logger.exception("shutdown of %s failed", type(pool).__name__)
        if self.reward is not None:
            self.reward.close()
        if self.serve_started:
            stop_ray_serve()


_STARTUP_PARTS = {
    "assets_s": "demo assets",
    "data_s": "data",
    "ray_s": "Ray",
    "reward_server_s": "reward server",
    "engines_s": "engines and pools",
}


def startup_line(parts: dict[str, float]) -> str:
    """``demo assets 0.1 s, data 0.4 s, Ray 4.2 s, ...``: where the start-up time went."""
    return ", ".join(f"{_STARTUP_PARTS.get(k, k)} {v:.1f} s" for k, v in parts.items())


class Trainer:
    """One PAPO/GRPO/DAPO run on a Ray cluster; ``run()`` trains ``trainer.total_steps`` steps."""

    def __init__(self, cfg: JobConfig, resume: str | os.PathLike | None = None, on_ray_init: Any | None = None):
        self._t_created = time.perf_counter()  # start-up (Ray, engines, pools) counts in the summary's total
        # The run folder first: a second live run on the same folder stops here, before any work.
        self.resumed_from: Path | None = latest_checkpoint(resume) if resume is not None else None
        self.run_dir = (
            run_dir_of(self.resumed_from)
            if self.resumed_from is not None
            else Path(cfg.trainer.output_dir) / cfg.trainer.name
        )
        self._lock = RunDirLock(self.run_dir)
        try:
            self._start(cfg, on_ray_init)
        except BaseException:
            self._lock.release()
            raise

    def _start(self, cfg: JobConfig, on_ray_init: Any | None) -> None:

        check_model_paths(cfg)
        # Where start-up time goes (the summary splits it): demo assets, data, Ray, services.
        self.startup: dict[str, float] = {}
        t = time.perf_counter()
        self.cfg = cfg = resolve_demo_paths(cfg)
        self.startup["assets_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # data.max_prompt_length, when set, loads the model's processor to count prompt tokens.
        self.train_set = load_split_from_config(cfg.data, cfg.data.train_path, cfg.data.train_split, model=cfg.model)
        self.val_set = None
        if cfg.data.val_path:
            self.val_set = load_split_from_config(cfg.data, cfg.data.val_path, cfg.data.val_split, model=cfg.model)
        self.sampler = PromptSampler(len(self.train_set.examples), cfg.seed, cfg.data.shuffle)
        self.version = 0
        self._weight_group: tuple | None = None  # receiver pids of the nccl/gloo weight group now formed
        self.bad_prompts = 0
        self.start_step = 0  # the last finished step (a resumed run continues after it)
        self.best: dict[str, Any] = {"step": None, "accuracy": None}
        # Everything about a resume that can be wrong is checked before Ray and the engines start.
        resume_state = self._check_resume(self.resumed_from) if self.resumed_from is not None else None
        if self.resumed_from is None:
            archive_earlier_run(self.run_dir)  # under the lock: never a live run's folder
        self.startup["data_s"] = time.perf_counter() - t
        self.started_ray = not ray.is_initialized()
        try:
            t = time.perf_counter()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(cfg))
            if self.started_ray:
                address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")  # ray.init reads it too
                ray.init(
                    address=address,
                    num_cpus=None if address else cfg.cluster.num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                )
                if on_ray_init is not None:
                    on_ray_init()  # ray.init installs its own SIGTERM handler; the caller re-installs its own
            self.startup["ray_s"] = time.perf_counter() - t
            self.services = self._start_services()
            if resume_state is not None:
                self._restore(self.resumed_from, resume_state)
        except BaseException:
            if getattr(self, "services", None) is not None:
                self.services.shutdown()
            if self.started_ray:
                ray.shutdown()
            raise

    # ---- set-up ------------------------------------------------------------------------------

    def _start_services(self) -> Services:

        cfg = self.cfg
        timeout = cfg.cluster.get_timeout_s
        services = Services(rollout=None, learner=None, reward=None)
        t_reward = time.perf_counter()
        try:
            serve_started = False
            url = cfg.reward.url
            if url is None:
                url = start_ray_serve(
                    fn=cfg.reward.fn,
                    workers=cfg.reward.workers,
                    timeout_s=cfg.reward.timeout_s,
                    format_weight=cfg.reward.format_weight,
                    replicas=cfg.reward.replicas,
                    token=cfg.reward.token,
                    num_cpus=cfg.reward.num_cpus,
                    user_functions=cfg.reward.user_functions,
                )
                serve_started = True
            services.serve_started = serve_started
            services.reward = RewardClient(url, token=cfg.reward.token)
            if not serve_started:
                services.reward.health()  # an external server that is down fails here, before any engine starts
            self.startup["reward_server_s"] = time.perf_counter() - t_reward
            t_pools = time.perf_counter()
            steps_per_rollout = cfg.learner.ppo_epochs * (
                cfg.rollout.batch_size * cfg.rollout.n // cfg.learner.mini_batch_size
            )
            pixels = processor_pixels(cfg.model)  # every processor call's and the engine's limits
            pool_kwargs = dict(
                num_cpus=cfg.logprob.num_cpus,
                num_gpus=cfg.logprob.num_gpus,
                dtype=cfg.model.dtype,
                min_pixels=pixels[0],
                max_pixels=pixels[1],
                temperature=cfg.rollout.temperature,
                micro_batch_size=cfg.logprob.micro_batch_size,
                max_tokens_per_micro_batch=cfg.logprob.max_tokens_per_micro_batch,
                logits_chunk_size=cfg.logprob.logits_chunk_size,
                get_timeout_s=timeout,
                omp_threads=cfg.cluster.omp_threads_per_actor,
                trust_remote_code=cfg.model.trust_remote_code,
            )
            # Each pool's constructor waits for its actors to load the model. They are independent, so
            # they start side by side: the engine's start-up no longer waits for the learner's.
            build: dict[str, Callable[[], Any]] = {
                "rollout": lambda: RolloutPool.from_config(cfg.rollout, cfg.model, cfg.cluster, seed=cfg.seed),
                "learner": lambda: LearnerGroup(
                    cfg.model.path,
                    cfg.learner,
                    cfg.algo,
                    masked_logp=cfg.perception.masked_logp,
                    min_pixels=pixels[0],
                    max_pixels=pixels[1],
                    temperature=cfg.rollout.temperature,
                    total_optimizer_steps=cfg.trainer.total_steps * steps_per_rollout,
                    seed=cfg.seed,
                    trust_remote_code=cfg.model.trust_remote_code,
                    get_timeout_s=timeout,
                    omp_threads=cfg.learner.omp_threads or cfg.cluster.omp_threads_per_actor,
                ),
            }
            if cfg.masked_pass.runs:
                c = cfg.corruption
                build["corruption"] = lambda: CorruptionPool(
                    strategy=c.strategy,
                    patch_size=mask_patch_size(c.patch_size, cfg.model),
                    prob=c.prob,
                    max_pixels=cfg.data.max_raw_pixels,
                    noise_std=c.noise_std,
                    num_workers=c.num_workers,
                    num_cpus=c.num_cpus,
                )
                if cfg.masked_pass.on_pool:
                    p = cfg.perception
                    sizing = {k: v for k, v in (("num_cpus", p.num_cpus), ("num_gpus", p.num_gpus)) if v is not None}
                    build["perception"] = lambda: LogProbPool(
                        cfg.model.path, role="perception", num_workers=p.num_workers, **{**pool_kwargs, **sizing}
                    )
            if cfg.needs_reference:
                build["reference"] = lambda: LogProbPool(
                    cfg.model.ref_path or cfg.model.path,
                    role="reference",
                    num_workers=cfg.logprob.reference_workers,
                    **pool_kwargs,
                )
            futures: dict[str, Future] = {}
            try:
                with ThreadPoolExecutor(len(build), thread_name_prefix="papo-start") as ex:
                    futures = {name: ex.submit(fn) for name, fn in build.items()}
            finally:
                # Leaving the block waited for every constructor, a failed one's too: each pool that
                # started belongs to `services` before anything is raised, so shutdown() stops it.
                for name, f in futures.items():
                    if f.done() and f.exception() is None:
                        setattr(services, name, f.result())
            for f in futures.values():
                if f.exception() is not None:
                    raise f.exception()
            self.startup["engines_s"] = time.perf_counter() - t_pools
        except BaseException:
            services.shutdown()
            raise
        return services

    # ---- checkpoint and resume ---------------------------------------------------------------

    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "step": step,
            "total_steps": self.cfg.trainer.total_steps,
            "weight_version": self.version,
            "sampler": self.sampler.state_dict(),
            "bad_prompts": self.bad_prompts,
            "best": self.best,
        }

    def save(self, step: int) -> Path:
        """Learner state and driver state (step, sampler position, best eval) in one atomic folder."""
        return self.services.learner.save_checkpoint(
            self.run_dir / "checkpoints" / f"step_{step:06d}",
            keep_last=self.cfg.trainer.keep_last,
            extra=self._trainer_state(step),
        )

    def _check_resume(self, ckpt: Path) -> dict[str, Any]:
        """The checkpoint's driver state, if this config can continue it (else ``ResumeError``)."""

        state = json.loads((ckpt / TRAINER_STATE).read_text())
        total = self.cfg.trainer.total_steps
        if state["step"] >= total:
            raise ResumeError(
                f"{ckpt} is at step {state['step']} and trainer.total_steps={total}: nothing left to "
                f"train (raise trainer.total_steps to continue, e.g. trainer.total_steps={2 * total})"
            )
        try:
            PromptSampler(self.sampler.n, self.sampler.seed, self.sampler.shuffle).load_state_dict(state["sampler"])
        except ValueError as e:
            raise ResumeError(f"{ckpt}: {e}") from None
        if state.get("total_steps", total) != total:
            logger.warning(
                "resuming a run planned for %s steps with trainer.total_steps=%d: step-dependent "
                "schedules (learner.lr_scheduler, algo.gamma_schedule) follow the new total from here",
                state["total_steps"],
                total,
            )
        return state

    def _restore(self, ckpt: Path, state: dict[str, Any]) -> None:
        """Continue from ``ckpt``: learner (weights, optimiser, counters, RNG), the pools' weights, the
        sampler position and the step. Rollout seeds and mask seeds are functions of (run seed, step)
        and (run seed, row, epoch), so the resumed run sees the same prompts, samples and masks."""
        try:
            self.services.learner.load_checkpoint(ckpt)
        except ValueError as e:  # e.g. another world size
            raise ResumeError(str(e)) from None
        self.sampler.load_state_dict(state["sampler"])
        self.start_step, self.version = int(state["step"]), int(state["weight_version"])
        self.bad_prompts = int(state.get("bad_prompts", 0))
        self.best = dict(state.get("best") or self.best)
        self._sync_weights("resuming: ")
        logger.info("resumed from %s at step %d (weight version %d)", ckpt, self.start_step, self.version)

    def _sync_weights(self, context: str = "") -> None:
        """Publish ``self.version`` from the learner and load it into the rollout and perception pools."""
        svc = self.services
        receivers: list[WeightReceiver] = [p for p in (svc.rollout, svc.perception) if p is not None]
        broadcast = self.cfg.learner.weight_transport in BROADCAST_TRANSPORTS
        if broadcast:
            self._form_weight_group(receivers)
        handle = svc.learner.publish_weights(self.version)
        # Every pool's receive starts before any is awaited: a broadcast needs all members at once.
        started = [(pool, pool.start_receive(handle)) for pool in receivers]
        held = set()
        for pool, refs in started:
            held |= set(pool.finish_receive(handle, refs))
        if broadcast:
            try:
                svc.learner.wait_weights_sent()
            except Exception as e:  # a member died mid-broadcast: the others hold the version or report -1
                # (their receive failed after learner.weight_broadcast_timeout_s; they catch up on next use)
                logger.warning(
                    "%sweight broadcast of version %d failed (%s); the group is re-formed at the next "
                    "sync and restarted workers catch up by the object store",
                    context,
                    self.version,
                    e,
                )
                self._weight_group = None
        held.discard(-1)  # a worker that died during the sync loads the handle when it restarts
        if held - {self.version}:
            raise RuntimeError(f"{context}after publishing version {self.version} the pools hold {sorted(held)}")

    def _form_weight_group(self, receivers: list[WeightReceiver]) -> None:
        """(Re-)form the nccl/gloo weight group: at the first sync, and whenever a receiver process changed.

        Every member receives every broadcast, so a restarted worker (new process) needs a new
        group; until then it catches up through ``fallback_publish`` (the object store).
        """

        members = tuple(tuple(pool.current_pids()) for pool in receivers)
        if self._weight_group == members:
            return
        learner, backend = self.services.learner, self.cfg.learner.weight_transport
        world = 1 + sum(pool.weight_group_ranks() for pool in receivers)
        host, port = learner.weight_group_address()
        group_id = uuid.uuid4().hex[:12]
        refs, rank = [learner.join_weight_group(group_id, host, port, world)], 1
        for pool in receivers:
            refs += pool.join_weight_group(
                group_id, host, port, rank, world, backend, self.cfg.learner.weight_broadcast_timeout_s
            )
            rank += pool.weight_group_ranks()
            pool.fallback_publish = lambda version: learner.publish_weights(version, transport="object_store")
        ray.get(refs, timeout=self.cfg.cluster.get_timeout_s)
        logger.info("weight group %s (%s): learner rank 0 and %d receiving processes", group_id, backend, world - 1)
        self._weight_group = members

    # ---- one step ----------------------------------------------------------------------------

    def _requests(
        self, picks: list[tuple[int, int]], black: bool = False, examples=None, replace_bad: bool = True
    ) -> tuple[list, list]:
        """RolloutRequests whose images are ObjectRefs (one put per prompt) and MaskRequests for them.

        A prompt whose images cannot be used is counted in ``self.bad_prompts`` and, when
        ``replace_bad``, replaced by the sampler's next prompt (so the batch stays whole);
        otherwise it is left out.
        """

        examples = examples or self.train_set.examples
        rollout_reqs, mask_reqs = [], []
        picks = list(picks)
        fit = self.cfg.model.image_fit()
        while picks:
            index, epoch = picks.pop(0)
            ex: PromptExample = examples[index]
            try:
                images = prompt_images(ex, self.cfg.data.max_raw_pixels, fit)
                # Pre-masked images are fitted like the originals (the same size is required).
                masked = ex.images_masked
                if masked is not None and fit is not None:
                    masked = prompt_masked_images(ex, self.cfg.data.max_raw_pixels, fit)
            except BadPrompt as e:
                self.bad_prompts += 1
                logger.warning("skipping a prompt (%d so far): %s", self.bad_prompts, e)
                if self.bad_prompts > max(100, len(examples) // 10):
                    raise RuntimeError(f"{self.bad_prompts} prompts had unusable images; last: {e}") from None
                if replace_bad:
                    picks.extend(self.sampler.take(1))
                continue
            if black:
                images = [Image.new("RGB", im.size) for im in images]
            refs = [ray.put(im) for im in images]
            rollout_reqs.append(RolloutRequest.from_example(ex, images=refs, epoch=epoch))
            mask_reqs.append(
                MaskRequest(images=refs, run_seed=self.cfg.seed, row_id=ex.row_id, epoch=epoch, precomputed=masked)
            )
        return rollout_reqs, mask_reqs

    def _grade(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, int]:
        scores = self.services.reward.score(list(zip(batch.response_text, batch.answers)))
        overall = torch.tensor([s["overall"] for s in scores], dtype=torch.float32)
        accuracy = torch.tensor([s["accuracy"] for s in scores], dtype=torch.float32)
        return overall, accuracy, sum(1 for s in scores if s.get("error"))

    def _generate(self, step: int, timings: dict[str, float]) -> tuple[RolloutBatch, dict[str, float]]:
        """Steps 1-3: prompts, masks alongside generation, rewards, DAPO group filter (bounded tries)."""

        cfg, svc = self.cfg, self.services
        algo = cfg.algo
        spec = SamplingSpec.from_config(cfg.rollout, seed=cfg.seed * 1_000_003 + step * 7919)
        kept: list[RolloutBatch] = []
        stats = {"generated_groups": 0, "kept_groups": 0, "filled_groups": 0, "grading_errors": 0, "request_errors": 0}
        spares: list[RolloutBatch] = []  # every try's uninformative groups (the fill fallback's filler)
        for _ in range(algo.dynamic_sampling_max_tries if algo.dynamic_sampling else 1):
            need = cfg.rollout.batch_size - sum(len(b.groups()) for b in kept)
            if need <= 0:
                break
            draw = (algo.dynamic_sampling_gen_batch_size or cfg.rollout.batch_size) if algo.dynamic_sampling else need
            rollout_reqs, mask_reqs = self._requests(self.sampler.take(draw))
            t = time.perf_counter()
            masked_refs = svc.corruption.submit(mask_reqs) if svc.corruption is not None else None
            timings["timing/corruption_submit"] = timings.get("timing/corruption_submit", 0) + time.perf_counter() - t
            t = time.perf_counter()
            result = svc.rollout.generate(rollout_reqs, spec)
            timings["timing/gen"] = timings.get("timing/gen", 0) + time.perf_counter() - t
            stats["request_errors"] += len(result.errors)
            if result.batch is None:
                raise RuntimeError(
                    f"the rollout pool served none of {len(rollout_reqs)} prompts: {list(result.errors.values())[:3]}"
                )
            batch = result.batch
            if masked_refs is not None:
                batch.masked_image_refs = [masked_refs[g] for g in batch.group_ids.tolist()]
            t = time.perf_counter()
            batch.rewards, batch.accuracy, errors = self._grade(batch)
            timings["timing/reward"] = timings.get("timing/reward", 0) + time.perf_counter() - t
            stats["grading_errors"] += errors
            groups = batch.groups()
            stats["generated_groups"] += len(groups)
            if algo.dynamic_sampling:
                # DAPO: only groups whose accuracy varies carry a gradient.
                low, high = algo.dynamic_sampling_acc_low, algo.dynamic_sampling_acc_high
                mixed = [low < float(batch.accuracy[g].mean()) < high for g in groups]
                keep = [g for g, m in zip(groups, mixed) if m][:need]
                flat = [g for g, m in zip(groups, mixed) if not m]
                if flat and algo.dynamic_sampling_exhausted == "fill":
                    spares.append(batch.select(torch.cat(flat)).renumber_groups())
                if not keep:
                    continue
                batch = batch.select(torch.cat(keep))
            # Group ids restart at 0 in every try: make them unique before concatenating.
            kept.append(batch.renumber_groups(start=sum(len(b.groups()) for b in kept)))
        else:
            short = cfg.rollout.batch_size - sum(len(b.groups()) for b in kept)
            if algo.dynamic_sampling and short > 0:
                what = (
                    f"dynamic sampling kept {cfg.rollout.batch_size - short} of {cfg.rollout.batch_size} groups "
                    f"after algo.dynamic_sampling_max_tries={algo.dynamic_sampling_max_tries} tries: nearly every "
                    "group is all-correct or all-wrong"
                )
                spare_groups = sum(len(b.groups()) for b in spares)
                if algo.dynamic_sampling_exhausted == "error" or spare_groups < short:
                    raise RuntimeError(
                        f"{what}; lower rollout.batch_size, raise the tries, or set "
                        "algo.dynamic_sampling_exhausted=fill to train on what there is"
                    )
                # Uninformative groups have zero advantages: the step trains on the mixed groups, and
                # the KL terms alone act on the rest (what pulls a collapsed policy back).
                logger.warning(
                    "%s; filling %d groups with uninformative ones (algo.dynamic_sampling_exhausted=fill)", what, short
                )
                # The latest tries' groups first: they come from the policy closest to this step's.
                latest_first, offset = [], 0
                for b in reversed(spares):  # unique group ids before concatenating (each starts at 0)
                    latest_first.append(b.renumber_groups(start=offset))
                    offset += len(b.groups())
                pool = RolloutBatch.concat(latest_first)
                filler = pool.select(torch.cat(pool.groups()[:short]))
                kept.append(filler.renumber_groups(start=cfg.rollout.batch_size - short))
                stats["filled_groups"] = short
        batch = RolloutBatch.concat(kept) if len(kept) > 1 else kept[0]
        stats["kept_groups"] = len(batch.groups())
        # DAPO's cost: groups generated (and graded) per group trained on.
        stats["generated_per_kept"] = stats["generated_groups"] / max(stats["kept_groups"], 1)
        if stats["kept_groups"] != cfg.rollout.batch_size:
            raise RuntimeError(
                f"the rollout pool served {stats['kept_groups']} of {cfg.rollout.batch_size} prompts "
                f"({stats['request_errors']} request errors, e.g. {list(result.errors.values())[:3]}); "
                "the step needs whole batches (learner.mini_batch_size divides them)"
            )
        return batch, stats

    def step(self, step: int) -> dict[str, float]:
        cfg, svc = self.cfg, self.services
        timings: dict[str, float] = {}
        t_step = time.perf_counter()

        batch, stats = self._generate(step, timings)
        if batch.weight_versions != {self.version}:
            raise RuntimeError(
                f"rollouts carry weight versions {sorted(batch.weight_versions)}, "
                f"expected {self.version}: the rollout pool missed a weight sync"
            )

        # Step 4: masked (perception pool), reference and old log-probs in parallel.
        t = time.perf_counter()
        masked_refs = svc.perception.submit(batch, masked=True) if svc.perception is not None else None
        ref_refs = svc.reference.submit(batch) if svc.reference is not None else None
        # On-policy (one epoch, one mini-batch) the update's own forward gives the old log-probs
        # (ratio 1, same gradient, as verl does): the separate no-grad pass would be pure overhead.
        on_policy = cfg.learner.ppo_epochs == 1 and len(batch) == cfg.learner.mini_batch_size
        # Each phase's time is what the driver waits for it after the previous one (the pools
        # work concurrently: a pool's wait is the part of it left on the critical path).
        lap = t
        if not on_policy:
            batch.old_logp = svc.learner.compute_logprobs(batch)
            timings["timing/old_logp"], lap = time.perf_counter() - lap, time.perf_counter()
        if cfg.masked_pass.on_learner:
            batch.masked_logp = svc.learner.compute_logprobs(batch, masked=True)  # the official serial order
        if masked_refs is not None:
            batch.masked_logp, versions = svc.perception.collect(masked_refs)
            if versions != batch.weight_versions:
                raise RuntimeError(
                    f"masked_logp computed with weight versions {sorted(versions)} but the rollouts "
                    f"came from {sorted(batch.weight_versions)} (docs/design.md contract)"
                )
        if cfg.masked_pass.before_update:
            timings["timing/masked_logp"], lap = time.perf_counter() - lap, time.perf_counter()
        if ref_refs is not None:
            batch.ref_logp, _ = svc.reference.collect(ref_refs)
            timings["timing/ref_logp"], lap = time.perf_counter() - lap, time.perf_counter()
        timings["timing/logprobs"] = time.perf_counter() - t
        mask = batch.response_mask
        rollout_logp_diff = None
        if batch.old_logp is not None:
            rollout_logp_diff = float((batch.rollout_logp - batch.old_logp).abs()[mask].mean()) if mask.any() else 0.0

        # Step 5: advantages and all optimiser steps of this rollout batch.
        batch.advantages = group_advantages(batch.rewards, cfg.rollout.n, eps=cfg.algo.adv_eps)
        gamma, eta1, eta2 = perception_coefs(
            step - 1,
            cfg.trainer.total_steps,
            gamma=cfg.algo.gamma,
            eta1=cfg.algo.eta1,
            eta2=cfg.algo.eta2,
            schedule=cfg.algo.gamma_schedule,
            gamma_end=cfg.algo.gamma_end,
            anneal_ratio=cfg.algo.gamma_anneal_ratio,
        )
        t = time.perf_counter()
        learn = svc.learner.train_step(batch, gamma=gamma, eta1=eta1, eta2=eta2)
        timings["timing/update"] = time.perf_counter() - t

        # Step 6: weight sync; the receivers report the version they now hold.
        t = time.perf_counter()
        self.version += 1
        self._sync_weights()
        timings["timing/sync"] = time.perf_counter() - t
        timings["timing/step"] = time.perf_counter() - t_step

        metrics = {
            "train/reward": float(batch.rewards.mean()),
            "train/accuracy": float(batch.accuracy.mean()),
            "train/response_length": float(batch.response_lengths.float().mean()),
            "train/gamma": gamma,
            "train/weight_version": float(self.version),
            "train/epoch": float(self.sampler.epoch),
            "train/bad_prompts": float(self.bad_prompts),
            "perf/driver_rss_mb": _rss_mb(),
            **{f"train/{k}": float(v) for k, v in stats.items()},
            **{f"train/{k}": float(v) for k, v in learn.items()},
            **({} if rollout_logp_diff is None else {"train/rollout_logp_diff": rollout_logp_diff}),
            **timings,
        }
        return metrics

    # ---- evaluation --------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The eval/* metrics on the validation rows (trainer/evaluate/): greedy accuracy with the
        real, black and training-style masked images, their gaps, and avg@k / pass@k when
        ``trainer.eval_k > 0``, on the rollout pool and the reward server."""

        if self.val_set is None:
            return {}
        t = time.perf_counter()
        examples = self.val_set.examples[: self.cfg.data.val_size or len(self.val_set.examples)]
        result = evaluate_examples(
            examples,
            generate=self.services.rollout.generate,
            grade=self.services.reward.score,
            cfg=self.cfg,
            put=ray.put,
            name=self.cfg.data.val_split,
            source=str(self.val_set.source),
        )
        return {**result.metrics(), "timing/eval": time.perf_counter() - t}

    # ---- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        line = StepLine(cfg.trainer.total_steps, keys=("train/reward", "train/accuracy", "eval/accuracy"))
        metrics_path = self.run_dir / "metrics.jsonl"
        if self.start_step:
            # Rows logged after the checkpoint (a crash between saves) are about to be redone.
            rows = (
                [r for r in read_metrics(metrics_path) if r["step"] <= self.start_step] if metrics_path.exists() else []
            )
            tmp = metrics_path.with_name(metrics_path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, metrics_path)
            start = {
                k: v for k, v in (rows[0] if rows and rows[0]["step"] == 0 else {}).items() if k.startswith("eval/")
            }
        with MetricsWriter(self.run_dir, tensorboard=cfg.trainer.tensorboard, append=bool(self.start_step)) as writer:
            if not self.start_step:
                start = self.evaluate()
                writer.log(0, start)
                logger.info("step 0: %s", start)
            last_eval = start
            for step in range(self.start_step + 1, cfg.trainer.total_steps + 1):
                metrics = self.step(step)
                last = step == cfg.trainer.total_steps
                if cfg.trainer.eval_every and (step % cfg.trainer.eval_every == 0 or last):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                # The row goes out before the checkpoints: a stop during a save loses no logged step.
                writer.log(step, metrics)
                if step % cfg.trainer.log_every == 0 or last:
                    print(line(step, metrics), flush=True)
                accuracy = last_eval.get("eval/accuracy") if "eval/accuracy" in metrics else None
                if accuracy is not None and (self.best["accuracy"] is None or accuracy > self.best["accuracy"]):
                    self.best = {"step": step, "accuracy": accuracy, **last_eval}
                    self.services.learner.save_checkpoint(self.run_dir / "best", extra=self._trainer_state(step))
                if last or (cfg.trainer.save_every and step % cfg.trainer.save_every == 0):
                    self.save(step)
        if cfg.trainer.plot:
            plot_curves(
                metrics_path,
                self.run_dir / CURVES_FILE,
                keys=("train/reward", "eval/accuracy", "train/perception_kl", "train/entropy"),
            )
        summary = {
            "run_dir": str(self.run_dir),
            "wall_s": time.perf_counter() - t0,
            "startup_s": t0 - self._t_created,
            "startup": {k: round(v, 2) for k, v in self.startup.items()},
            "total_s": time.perf_counter() - self._t_created,
            "start": start,
            "end": last_eval,
            "best": self.best,
        }
        self._print_summary(summary, metrics_path)
        return summary

    def _print_summary(self, summary: dict[str, Any], metrics_path: Path) -> None:
        rows = read_metrics(metrics_path)
        kls = [r["train/perception_kl"] for r in rows if r.get("train/perception_kl") is not None]
        start, end, best = summary["start"], summary["end"], summary["best"]

        def acc(d: dict[str, Any], key: str = "eval/accuracy") -> str:
            v = d.get(key)
            return "n/a" if v is None else f"{v:.3f}"

        lines = [
            f"done in {summary['total_s']:.0f} s ({summary['startup_s']:.0f} s start-up, "
            f"{summary['wall_s']:.0f} s of steps and evals); run directory {self.run_dir}",
            f"  start-up             {startup_line(summary['startup'])}",
            f"  eval accuracy        {acc(start)} -> {acc(end)} (best {acc(best)} at step {best.get('step')}, "
            f"checkpoint {self.run_dir / 'best'})",
            f"  black-image accuracy {acc(start, 'eval/black_accuracy')} -> {acc(end, 'eval/black_accuracy')}",
        ]
        if "eval/masked_accuracy" in end:
            lines.append(
                f"  masked-image accuracy {acc(start, 'eval/masked_accuracy')} -> {acc(end, 'eval/masked_accuracy')}"
            )
        if kls:
            lines.append(f"  perception KL        {kls[0]:.4f} (first step) -> {kls[-1]:.4f} (last step)")
        print("\n".join(lines), flush=True)

    def close(self) -> None:

        try:
            self.services.shutdown()
            if self.started_ray:
                ray.shutdown()
        finally:
            self._lock.release()


def _rss_mb() -> float:
    """This (driver) process's resident memory: flat over a run unless something accumulates."""

    return psutil.Process().memory_info().rss / 2**20


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the same clean shutdown as Ctrl-C runs."""


_terminated = False  # set by the handler: Ray's ray.get re-raises interrupts as plain KeyboardInterrupt


def _on_sigterm(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True
    raise Terminated(f"signal {signum}")


def train(cfg: JobConfig, resume: str | os.PathLike | None = None) -> int:
    """``papo train``: build the services, run every step, shut everything down.

    Ctrl-C and SIGTERM stop the run between or inside steps (also during start-up); engines are
    stopped and the Ray cluster we started is shut down; checkpoints are atomic, so the last one
    stays intact. A reward server that stays unreachable ends the run with that error (exit 1):
    no step trains on missing rewards. Bad paths, impossible resumes and a run folder that another
    live run holds exit 2 before Ray starts.
    """

    global _terminated
    _terminated = False
    main = _main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None

    def install() -> None:
        if main:
            signal.signal(signal.SIGTERM, _on_sigterm)

    trainer = None
    try:
        install()
        try:
            trainer = Trainer(cfg, resume=resume, on_ray_init=install)
        except (
            FileNotFoundError,
            DataError,
            ResumeError,
            RunDirInUse,
            UnsupportedModel,
        ) as e:  # named: bad paths, a busy run folder
            print(f"papo train: {e}", file=sys.stderr, flush=True)
            return 2
        trainer.run()
        return 0
    except RewardServerError as e:
        print(
            f"papo train: stopped: the reward server failed: {e}. No step trained on missing rewards; "
            f"checkpoints so far are under {trainer.run_dir / 'checkpoints' if trainer else cfg.trainer.output_dir}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated) or _terminated
        print(
            f"papo train: {'SIGTERM' if term else 'interrupted'}: shutting down (checkpoints written so far are "
            "intact)",
            file=sys.stderr,
            flush=True,
        )
        return 143 if term else 130
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        try:
            if trainer is not None:
                trainer.close()
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()
