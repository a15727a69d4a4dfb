"""Driver pieces that need no cluster: the prompt sampler and the image checks before a rollout."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from trainer.data import BadPrompt, PromptExample, prompt_images
from trainer.driver import PromptSampler


def example(tmp_path, name: str, size=(56, 56)) -> PromptExample:
    path = tmp_path / name
    if size is not None:
        Image.fromarray(np.zeros((size[1], size[0], 3), dtype=np.uint8)).save(path)
    return PromptExample(row_id=7, messages=[], image_paths=[path], answer="red")


def test_prompt_images_checks_headers_before_decoding(tmp_path):
    assert prompt_images(example(tmp_path, "ok.png"), max_raw_pixels=56 * 56)[0].size == (56, 56)
    with pytest.raises(BadPrompt, match=r"row 7: .*big.png has 100x60 pixels > data.max_raw_pixels=5000"):
        prompt_images(example(tmp_path, "big.png", size=(100, 60)), max_raw_pixels=5000)
    with pytest.raises(BadPrompt, match="row 7: .*missing.png: FileNotFoundError"):
        prompt_images(example(tmp_path, "missing.png", size=None), max_raw_pixels=5000)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(BadPrompt, match="row 7: .*junk.png: UnidentifiedImageError"):
        prompt_images(PromptExample(row_id=7, messages=[], image_paths=[tmp_path / "junk.png"], answer="x"), 5000)


def test_sampler_is_a_seeded_permutation_per_epoch():
    a, b = PromptSampler(5, seed=3), PromptSampler(5, seed=3)
    first = a.take(7)
    assert first == b.take(7)
    assert sorted(i for i, e in first[:5]) == list(range(5)) and {e for _, e in first[:5]} == {0}
    assert [e for _, e in first[5:]] == [1, 1]
    assert [i for i, _ in PromptSampler(4, seed=0, shuffle=False).take(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="no usable rows"):
        PromptSampler(0, seed=0)
