"""LogProbPool (perception and reference roles) against the learner's own no-grad log-probs.

The learner is a world-size-1 DeepSpeed rank in the test process; the pools are Ray actors that
resolve the batch's image ObjectRefs themselves. Temperature 0.7, so scaling is part of the parity.
"""

from __future__ import annotations

import pytest
import torch

from services.logprob.pool import LogProbPool
from services.logprob.scorer import LogProbWorker
from tests.helpers_model import MAX_PIXELS, MIN_PIXELS, algo_cfg, learner_cfg, make_batch, write_model
from trainer.core.modeling import load_processor
from trainer.learner.learner import Learner

TIMEOUT = 300.0
T = 0.7


@pytest.fixture(scope="module")
def setup(ray_cluster, tmp_path_factory):
    ray = ray_cluster
    path = write_model(tmp_path_factory.mktemp("logprob_pool") / "model")
    processor = load_processor(str(path), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    batch, images, masked = make_batch(processor, prompts=3, n=2)
    refs = {id(x): [ray.put(im) for im in x] for x in images}
    masked_refs = {id(x): [ray.put(im) for im in x] for x in masked}
    batch.image_refs = [refs[id(x)] for x in images]
    batch.masked_image_refs = [masked_refs[id(x)] for x in masked]
    learner = Learner(
        str(path),
        learner_cfg(zero_stage=0, mini_batch_size=6, micro_batch_size=3),
        algo_cfg(gamma=0.01),
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        temperature=T,
    )
    common = dict(
        num_cpus=0.25,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        temperature=T,
        micro_batch_size=4,
        get_timeout_s=TIMEOUT,
    )
    perception = LogProbPool(str(path), role="perception", num_workers=2, **common)
    reference = LogProbPool(str(path), role="reference", num_workers=1, **common)
    yield path, batch, images, masked, learner, perception, reference
    perception.shutdown()
    reference.shutdown()


def test_pools_match_the_learner_then_follow_a_weight_sync(setup):
    path, batch, images, masked, learner, perception, reference = setup
    old = learner.compute_logprobs(batch, images)
    old_masked = learner.compute_logprobs(batch, masked)
    assert perception.versions() == [0, 0]
    pool_masked = perception.compute_logprobs(batch, masked=True, expected_version=0)
    assert torch.allclose(pool_masked, old_masked, atol=1e-5)
    assert (old_masked - old).abs().max() > 1e-4  # the masked image really changes the scores
    ref0 = reference.compute_logprobs(batch)
    assert torch.allclose(ref0, old, atol=1e-5)

    b = batch.select(range(len(batch)))
    b.old_logp, b.masked_logp = old, old_masked
    for _ in range(2):
        learner.train_step(b, images)
    new_masked = learner.compute_logprobs(batch, masked)
    assert (new_masked - old_masked).abs().max() > 1e-3
    handle = learner.publish_weights(version=1)
    assert perception.receive_weights(handle) == [1, 1]
    pool_new = perception.compute_logprobs(batch, masked=True, expected_version=1)
    assert torch.allclose(pool_new, new_masked, atol=1e-5)
    with pytest.raises(RuntimeError, match="versions"):
        perception.compute_logprobs(batch, masked=True, expected_version=0)

    # The reference pool keeps the initial weights and refuses updates.
    with pytest.raises(RuntimeError, match="frozen"):
        reference.receive_weights(handle)
    assert torch.allclose(reference.compute_logprobs(batch), ref0, atol=0)


def test_worker_rejects_a_blob_that_does_not_match_its_digest(setup):
    path, batch, images, masked, learner, perception, reference = setup
    import dataclasses

    worker = LogProbWorker(str(path), role="perception", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, temperature=T)
    handle = learner.publish_weights(version=2)
    with pytest.raises(ValueError, match="digest"):
        worker.receive_weights(dataclasses.replace(handle, digest="0" * 64))
    assert worker.version == 0
    assert worker.receive_weights(handle) == 2
    assert torch.allclose(worker.compute_logprobs(batch, images), learner.compute_logprobs(batch, images), atol=1e-5)


def test_a_killed_perception_worker_is_restarted_and_scores_with_the_current_weights(setup):
    import ray

    path, batch, images, masked, learner, perception, reference = setup
    handle = learner.publish_weights(version=5)
    assert perception.receive_weights(handle) == [5, 5]
    want = learner.compute_logprobs(batch, masked)
    old_pids = list(perception.pids)
    ray.kill(perception.actors[1], no_restart=False)  # Ray restarts it with the folder's weights
    got = perception.compute_logprobs(batch, masked=True, expected_version=5)
    assert torch.allclose(got, want, atol=1e-5)
    assert perception.resubmissions >= 1 and perception.pids[1] != old_pids[1]
    assert perception.versions() == [5, 5]  # the restarted worker re-synced before it scored
