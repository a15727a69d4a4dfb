"""The gloo weight broadcast end to end: learner rank 0 (a Ray actor) to a two-worker perception pool,
driven by the driver's own sync (group formation, concurrent receives, a restarted worker catching up
by the object store, the group re-formed around the new process). nccl runs the same code on GPUs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from services.logprob.pool import LogProbPool
from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, algo_cfg, learner_cfg, model_and_ray_batch
from trainer.core.config import resolve_config
from trainer.learner.group import LearnerGroup

TIMEOUT = 300.0


@pytest.mark.slow
def test_driver_sync_broadcasts_over_gloo_and_survives_a_restarted_receiver(ray_cluster, tmp_path):
    from trainer.driver import Trainer

    ray = ray_cluster
    path, batch = model_and_ray_batch(ray, tmp_path / "model")
    learner = LearnerGroup(
        str(path),
        learner_cfg(zero_stage=0, mini_batch_size=4, micro_batch_size=2, weight_transport="gloo"),
        algo_cfg(gamma=0.0),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        get_timeout_s=TIMEOUT,
    )
    perception = LogProbPool(
        str(path),
        role="perception",
        num_workers=2,
        num_cpus=0.25,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        get_timeout_s=TIMEOUT,
    )
    try:
        trainer = Trainer.__new__(Trainer)  # the driver's sync only: its config, services and version
        trainer.cfg = resolve_config(overrides=["learner.weight_transport=gloo"])
        trainer.services = SimpleNamespace(learner=learner, rollout=None, perception=perception)
        trainer._weight_group = None

        def train_and_sync(version: int) -> torch.Tensor:
            b = batch.select(range(len(batch)))
            b.old_logp = learner.compute_logprobs(b)
            learner.train_step(b)
            trainer.version = version
            trainer._sync_weights()
            return learner.compute_logprobs(batch, masked=True)

        want = train_and_sync(1)
        first_group = trainer._weight_group
        assert first_group is not None and perception.versions() == [1, 1]
        assert torch.allclose(perception.compute_logprobs(batch, masked=True, expected_version=1), want, atol=1e-5)

        # A receiver restarts after the broadcast: it cannot receive one alone, so the pool fetches
        # the same version by the object store (once) and the chunk is resubmitted.
        fallbacks = []
        publish = learner.publish_weights
        perception.fallback_publish = lambda v: fallbacks.append(v) or publish(v, transport="object_store")
        old_pid = perception.current_pids()[1]
        ray.kill(perception.actors[1], no_restart=False)
        got = perception.compute_logprobs(batch, masked=True, expected_version=1)
        assert torch.allclose(got, want, atol=1e-5)
        assert fallbacks == [1] and perception.current_pids()[1] != old_pid

        # The next sync re-forms the group around the new process, and everyone gets version 2.
        want = train_and_sync(2)
        assert trainer._weight_group not in (None, first_group)
        assert perception.versions() == [2, 2]
        assert torch.allclose(perception.compute_logprobs(batch, masked=True, expected_version=2), want, atol=1e-5)
    finally:
        perception.shutdown()
        learner.shutdown()
