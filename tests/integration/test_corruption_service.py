"""CorruptionPool end to end on the session's local Ray cluster, images as ObjectRefs.

Checks that the actors mask exactly as the plain ``CorruptionService`` does, that masks depend
on (run seed, row id, epoch) and nothing else (not on which actor ran them), that results come
back as ObjectRefs the driver can pass on, and that failures surface as errors, never hangs.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from services.corruption.pool import CorruptionPool
from services.corruption.service import CorruptionService, MaskRequest

pytestmark = pytest.mark.ray

TIMEOUT_S = 60.0


def rgb(seed: int, height: int = 56, width: int = 70) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, (height, width, 3), dtype=np.uint8))


def same(first, second) -> bool:
    if type(first) is not type(second):
        return False
    if isinstance(first, Image.Image) and first.mode != second.mode:
        return False
    return np.asarray(first).tobytes() == np.asarray(second).tobytes()


@pytest.fixture(scope="module")
def pool(ray_cluster):
    # One call per prompt so that a handful of prompts exercises both actors.
    with CorruptionPool(num_workers=2, num_cpus=0.25, prob=0.5, prompts_per_call=1) as created:
        yield created


def test_pool_masks_object_refs_like_the_plain_service(ray_cluster, pool):
    ray = ray_cluster
    rgba = Image.fromarray(np.random.default_rng(1).integers(1, 255, (30, 30, 4), dtype=np.uint8))
    array16 = np.random.default_rng(2).integers(1, 60000, (40, 33), dtype=np.uint16)
    prompts = [[rgb(0)], [rgba, rgb(3)], [array16], [rgb(4, 224, 224)]]
    requests = [
        MaskRequest(images=[ray.put(image) for image in images], run_seed=7, row_id=row, epoch=0)
        for row, images in enumerate(prompts)
    ]
    refs = pool.submit(requests)
    assert [len(prompt) for prompt in refs] == [1, 2, 1, 1]
    assert all(isinstance(ref, ray.ObjectRef) for prompt in refs for ref in prompt)
    masked = pool.get(refs, timeout_s=TIMEOUT_S)

    local = CorruptionService(prob=0.5)
    for row, (images, outputs) in enumerate(zip(prompts, masked)):
        expected = local.mask_prompt(images, run_seed=7, row_id=row, epoch=0)
        assert all(same(out, exp) for out, exp in zip(outputs, expected)), f"row {row}"
        assert all(not same(out, image) for out, image in zip(outputs, images)), "nothing masked"
    assert masked[1][0].mode == "RGBA" and masked[2][0].dtype == np.uint16
    # Work went to both actors (least-loaded with round-robin ties).
    assert all(calls > 0 for calls in pool.calls_per_worker)


def test_masks_depend_on_seed_row_and_epoch_only(ray_cluster, pool):
    ray = ray_cluster
    image_ref = ray.put(rgb(5, 112, 112))
    keys = [(1, 10, 0), (1, 10, 0), (1, 10, 0), (2, 10, 0), (1, 11, 0), (1, 10, 1)]
    requests = [MaskRequest([image_ref], *key) for key in keys]
    masked = [prompt[0] for prompt in pool.get(pool.submit(requests), timeout_s=TIMEOUT_S)]
    # The same key gives the same mask whichever actor computed it (retries, resumed runs).
    assert same(masked[0], masked[1]) and same(masked[0], masked[2])
    # Another run seed, row or epoch gives another mask.
    for other in masked[3:]:
        assert not same(masked[0], other)


def test_images_of_one_prompt_get_distinct_masks(ray_cluster, pool):
    ray = ray_cluster
    image_ref = ray.put(rgb(6, 112, 112))
    (outputs,) = pool.get(pool.submit([MaskRequest([image_ref] * 3, 0, 0, 0)]), timeout_s=TIMEOUT_S)
    assert len(outputs) == 3
    assert not same(outputs[0], outputs[1]) and not same(outputs[1], outputs[2])


def test_batched_calls_and_text_only_prompts(ray_cluster):
    ray = ray_cluster
    images = [rgb(seed) for seed in range(5)]
    requests = [MaskRequest([ray.put(image)], 3, row, 2) for row, image in enumerate(images)]
    requests.insert(2, MaskRequest([], 3, 99, 2))  # a text-only prompt needs no call
    with CorruptionPool(num_workers=1, num_cpus=0.25, prompts_per_call=4) as batched:
        refs = batched.submit(requests)
        assert batched.calls_per_worker == [2]  # 5 prompts with images, 4 per call
        masked = batched.get(refs, timeout_s=TIMEOUT_S)
    assert masked[2] == []
    local = CorruptionService()
    kept = [request for request in requests if request.images]
    outputs = [prompt for prompt in masked if prompt]
    for request, image, (out,) in zip(kept, images, outputs):
        (expected,) = local.mask_prompt([image], request.run_seed, request.row_id, request.epoch)
        assert same(out, expected)


def test_precomputed_strategy_through_the_pool(ray_cluster, tmp_path):
    ray = ray_cluster
    original = rgb(8, 28, 28)
    semantic = rgb(9, 28, 28)
    path = tmp_path / "masked.png"
    semantic.save(path)
    requests = [
        MaskRequest([ray.put(original)], 0, 0, 0, precomputed=[ray.put(semantic)]),
        MaskRequest([ray.put(original)], 0, 1, 0, precomputed=[str(path)]),
        MaskRequest([ray.put(original)], 0, 2, 0, precomputed=[semantic]),
    ]
    with CorruptionPool(strategy="precomputed", num_workers=1, num_cpus=0.25) as passthrough:
        masked = passthrough.mask(requests, timeout_s=TIMEOUT_S)
        for (out,) in masked:
            assert same(out, semantic)
        # A missing images_masked value is an error naming the column.
        missing = passthrough.submit([MaskRequest([ray.put(original)], 0, 0, 0)])
        with pytest.raises(ValueError, match="images_masked"):
            passthrough.get(missing, timeout_s=TIMEOUT_S)


def test_bad_image_fails_with_a_named_error(ray_cluster, pool):
    ray = ray_cluster
    refs = pool.submit([MaskRequest([ray.put("not an image")], 0, 0, 0)])
    # Ray re-raises the actor's TypeError (as a RayTaskError that is also a TypeError).
    with pytest.raises(TypeError, match="expected a PIL image or a numpy array"):
        pool.get(refs, timeout_s=TIMEOUT_S)
    zero = pool.submit([MaskRequest([ray.put(np.zeros((0, 4, 3), np.uint8))], 0, 0, 0)])
    with pytest.raises(ValueError, match="zero-size image"):
        pool.get(zero, timeout_s=TIMEOUT_S)
    # The actor survives a bad input and keeps serving.
    good = pool.get(pool.submit([MaskRequest([ray.put(rgb(1))], 0, 0, 0)]), timeout_s=TIMEOUT_S)
    assert good[0][0].size == (70, 56)


def test_bad_config_fails_in_the_driver(ray_cluster):
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]"):
        CorruptionPool(prob=1.2)
    with pytest.raises(ValueError, match="unknown corruption strategy"):
        CorruptionPool(strategy="blur")
    with pytest.raises(ValueError, match="num_workers"):
        CorruptionPool(num_workers=0)


def test_pool_that_cannot_be_scheduled_times_out_instead_of_hanging(ray_cluster):
    # The session cluster has 4 logical CPUs: a whole-number request of 64 never schedules.
    with pytest.raises(RuntimeError, match="did not start within 2 s"):
        CorruptionPool(num_workers=1, num_cpus=64, start_timeout_s=2.0)
