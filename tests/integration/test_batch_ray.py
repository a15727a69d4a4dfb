"""RolloutBatch travels through the Ray object store intact, with its image ObjectRefs usable remotely."""

from __future__ import annotations

import numpy as np
import torch

from trainer.core.batch import RolloutBatch


def test_round_trip_through_object_store(ray_cluster):
    ray = ray_cluster
    images = [np.full((28, 28, 3), k, dtype=np.uint8) for k in (10, 20)]
    refs = [ray.put(img) for img in images]  # one put per prompt, shared by its rows
    batch = RolloutBatch.from_sequences(
        [[1, 2, 3], [1, 2, 3], [4, 5], [4, 5]],
        [[7, 8], [9], [7], [8, 8, 8]],
        [[-0.5, -1.0], [-2.0], [-0.1], [-0.2, -0.3, -0.4]],
        group_ids=[0, 0, 1, 1],
        row_ids=[41, 41, 42, 42],
        weight_version=[5, 5, 5, 5],
        image_refs=[[refs[0]], [refs[0]], [refs[1]], [refs[1]]],
        answers=["red", "red", "3", "3"],
        pad_token_id=0,
    )

    @ray.remote(num_cpus=0.1)
    def score(b: RolloutBatch) -> RolloutBatch:
        # A remote stage reads the images through the refs it was handed and fills a later field.
        pixel_means = [float(np.mean(ray.get(r[0], timeout=30))) for r in b.image_refs]
        b.rewards = torch.tensor(pixel_means) / 10.0
        b.old_logp = b.rollout_logp * b.response_mask
        return b

    batch_ref = ray.put(batch)
    out = ray.get(score.remote(batch_ref), timeout=60)
    for name in (
        "prompt_ids",
        "prompt_mask",
        "response_ids",
        "response_mask",
        "rollout_logp",
        "group_ids",
        "row_ids",
        "weight_version",
        "epochs",
    ):
        assert torch.equal(getattr(out, name), getattr(batch, name)), name
    assert out.answers == batch.answers
    assert out.rewards.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert torch.equal(out.old_logp, batch.rollout_logp)
    # The refs came back as refs to the same objects, not as copies of the pixels.
    assert out.image_refs[0][0] == refs[0] and out.image_refs[2][0] == refs[1]
    assert np.array_equal(ray.get(out.image_refs[3][0], timeout=30), images[1])
