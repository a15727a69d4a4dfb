"""Properties of the image corruption functions (trainer/core/corruption.py), no Ray.

Property-based over random sizes, modes, dtypes, patch sizes, probabilities and seeds: only whole
grid cells change, changed cells are exactly black (opaque for alpha modes), everything else is
bit-identical, the masked fraction stays within a binomial (Hoeffding) bound of ``prob``, seeds
determine the mask, and type/shape/dtype/mode are preserved. Plus the other strategies, seed
derivation, the service class and bad inputs.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.corruption.service import CorruptionService
from trainer.core import corruption
from trainer.core.corruption import (
    STRATEGIES,
    CorruptionParams,
    corrupt,
    mask_seed,
    patch_blackening,
    register_strategy,
)

# deadline=None: timing varies on shared 2-core CI machines; the examples are small images.
PROPERTY = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PIL_MODES = ["1", "L", "I", "F", "I;16", "I;16B", "RGB", "LA", "RGBA"]
ARRAY_DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]


def random_pixels(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random pixel data with no black pixel, so a blackened cell is always distinguishable."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype=bool)  # bool has a single non-black value
    if dtype.kind == "f":
        return rng.uniform(0.01, 1.0, size=shape).astype(dtype)
    high = min(np.iinfo(dtype).max, 60000)
    return rng.integers(1, high, size=shape, endpoint=True).astype(dtype)


def make_pil(mode: str, height: int, width: int, rng: np.random.Generator) -> Image.Image:
    if mode == "1":
        array = random_pixels(rng, (height, width), np.bool_)
        # Mix in some False pixels: a cell with black pixels must still come back identical.
        array[rng.random((height, width)) < 0.3] = False
    elif mode in ("L", "I", "F", "I;16", "I;16B"):
        dtypes = {"L": np.uint8, "I": np.int32, "F": np.float32, "I;16": np.uint16, "I;16B": ">u2"}
        dtype = dtypes[mode]
        array = random_pixels(rng, (height, width), np.dtype(dtype))
    else:
        channels = {"RGB": 3, "LA": 2, "RGBA": 4}[mode]
        array = random_pixels(rng, (height, width, channels), np.uint8)
        if mode in ("LA", "RGBA"):
            # Alpha below 255 everywhere, so an opaque masked cell is visibly different.
            array[..., -1] = rng.integers(0, 254, size=(height, width), endpoint=True)
    image = Image.fromarray(array)
    assert image.mode == mode
    return image


@st.composite
def images(draw: st.DrawFn, max_side: int = 48) -> corruption.ImageLike:
    """A PIL image of a supported mode or an HxW / HxWxC array of a supported dtype."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        return make_pil(draw(st.sampled_from(PIL_MODES)), height, width, rng)
    dtype = draw(st.sampled_from(ARRAY_DTYPES))
    channels = draw(st.sampled_from([None, 1, 2, 3, 4]))
    shape = (height, width) if channels is None else (height, width, channels)
    array = random_pixels(rng, shape, dtype)
    if draw(st.booleans()) and dtype != np.bool_:
        array.flat[0] = 0  # some genuinely black pixels in the input
    if draw(st.booleans()):
        array = array[:, ::-1]  # a non-contiguous view must work too
    return array


def as_hwc(image: corruption.ImageLike) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def black_pixel(image: corruption.ImageLike) -> np.ndarray:
    """What a masked pixel must be: all zero, except alpha at max for PIL LA/RGBA."""
    array = as_hwc(image)
    fill = np.zeros(array.shape[2], dtype=array.dtype)
    if isinstance(image, Image.Image) and image.mode in ("LA", "RGBA"):
        fill[-1] = 255
    return fill


def classify_cells(original: corruption.ImageLike, masked: corruption.ImageLike, patch_size: int) -> np.ndarray:
    """Check the cell structure and return the (rows, cols) grid of blackened cells.

    Every cell must be either bit-identical to the original or entirely black; a cell that is
    both (an originally black cell) counts as not blackened.
    """
    before, after = as_hwc(original), as_hwc(masked)
    height, width, _ = before.shape
    fill = black_pixel(masked)
    rows, cols = math.ceil(height / patch_size), math.ceil(width / patch_size)
    blackened = np.zeros((rows, cols), dtype=bool)
    for r in range(rows):
        for c in range(cols):
            rows_slice = slice(r * patch_size, (r + 1) * patch_size)
            cell = (rows_slice, slice(c * patch_size, (c + 1) * patch_size))
            new = np.ascontiguousarray(after[cell])
            if new.tobytes() == np.ascontiguousarray(before[cell]).tobytes():
                continue  # unchanged, bit for bit (NaN-safe, -0.0-safe)
            is_black = np.broadcast_to(fill, new.shape)
            assert new.tobytes() == np.ascontiguousarray(is_black).tobytes(), (
                f"cell ({r}, {c}) changed but is not exactly black"
            )
            blackened[r, c] = True
    return blackened


def reference_loop(image: corruption.ImageLike, patch_size: int, prob: float, seed: int) -> np.ndarray:
    """The official per-cell loop, seeded with a Generator: one draw per cell, row-major."""
    rng = np.random.default_rng(seed)
    array = as_hwc(image).copy()
    fill = black_pixel(image)
    height, width, _ = array.shape
    for y in range(0, height, patch_size):
        for x in range(0, width, patch_size):
            if rng.random() < prob:
                array[y : y + patch_size, x : x + patch_size] = fill
    return array


# --------------------------------------------------------------------------------------------
# patch_blackening properties
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(
    image=images(),
    patch_size=st.integers(1, 20),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64),
)
def test_only_whole_cells_change_to_black_and_type_is_preserved(image, patch_size, prob, seed):
    before = np.array(as_hwc(image), copy=True)
    masked = patch_blackening(image, patch_size=patch_size, prob=prob, seed=seed)

    assert type(masked) is type(image)
    if isinstance(image, Image.Image):
        assert masked.mode == image.mode and masked.size == image.size
    else:
        assert masked.shape == image.shape and masked.dtype == image.dtype
    # The input is never modified.
    assert as_hwc(image).tobytes() == before.tobytes()
    classify_cells(image, masked, patch_size)
    # And exactly the cells the documented draw order selects (same as the official loop).
    assert as_hwc(masked).tobytes() == reference_loop(image, patch_size, prob, seed).tobytes()


@PROPERTY
@given(
    mode=st.sampled_from(["1", "L", "I", "F", "I;16", "I;16B", "RGB"]),
    height=st.integers(1, 48),
    width=st.integers(1, 48),
    patch_size=st.integers(1, 20),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64),
)
def test_pil_and_array_paths_agree(mode, height, width, patch_size, prob, seed):
    # PIL images are masked inside PIL, arrays with numpy: same seed, same pixels.
    image = make_pil(mode, height, width, np.random.default_rng(seed % 2**32))
    from_pil = patch_blackening(image, patch_size, prob, seed)
    from_array = patch_blackening(np.asarray(image), patch_size, prob, seed)
    assert np.asarray(from_pil).tobytes() == from_array.tobytes()


@PROPERTY
@given(
    rows=st.integers(20, 60),
    cols=st.integers(20, 60),
    patch_size=st.integers(1, 6),
    edge=st.data(),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64),
    mode=st.sampled_from(["L", "RGB", "RGBA", "array"]),
)
def test_masked_fraction_is_within_a_binomial_bound(rows, cols, patch_size, edge, prob, seed, mode):
    # Partial edge cells count as cells too: the last row/column is 1..patch_size pixels.
    height = (rows - 1) * patch_size + edge.draw(st.integers(1, patch_size))
    width = (cols - 1) * patch_size + edge.draw(st.integers(1, patch_size))
    rng = np.random.default_rng(seed % 2**32)
    if mode == "array":
        image = random_pixels(rng, (height, width, 3), np.float32)
    else:
        image = make_pil(mode, height, width, rng)
    blackened = classify_cells(image, patch_blackening(image, patch_size, prob, seed), patch_size)
    n = rows * cols
    # Hoeffding: P(|k/n - p| >= t) <= 2 exp(-2 n t^2) = 1e-6 per example, valid for every p
    # (no normal approximation), so the suite does not flake.
    t = math.sqrt(math.log(2 / 1e-6) / (2 * n))
    assert abs(blackened.mean() - prob) < t, (blackened.mean(), prob, n)


@PROPERTY
@given(
    image=images(),
    patch_size=st.integers(1, 20),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64),
)
def test_same_seed_same_output(image, patch_size, prob, seed):
    first = patch_blackening(image, patch_size, prob, seed)
    second = patch_blackening(image, patch_size, prob, seed)
    assert as_hwc(first).tobytes() == as_hwc(second).tobytes()


@PROPERTY
@given(
    size=st.integers(10, 40),
    patch_size=st.integers(1, 4),
    prob=st.floats(0.2, 0.8),
    seeds=st.lists(st.integers(0, 2**64), min_size=2, max_size=2, unique=True),
)
def test_different_seeds_give_different_masks(size, patch_size, prob, seeds):
    # >= 9 cells per side: P(two independent masks agree) <= 0.68 ** 81 ~ 3e-14.
    assume(math.ceil(size / patch_size) >= 9)
    image = random_pixels(np.random.default_rng(0), (size, size, 3), np.uint8)
    first, second = (patch_blackening(image, patch_size, prob, s) for s in seeds)
    assert not np.array_equal(first, second)


def test_unseeded_calls_draw_fresh_masks():
    image = random_pixels(np.random.default_rng(0), (140, 140), np.uint8)
    first, second = patch_blackening(image, seed=None), patch_blackening(image, seed=None)
    assert not np.array_equal(first, second)


def test_prob_extremes_and_defaults():
    image = random_pixels(np.random.default_rng(1), (30, 31, 3), np.uint8)
    assert np.array_equal(patch_blackening(image, prob=0.0, seed=1), image)
    assert not patch_blackening(image, prob=1.0, seed=1).any()
    # Defaults are the paper's: 14 px cells, p = 0.6.
    assert np.array_equal(patch_blackening(image, seed=5), reference_loop(image, 14, 0.6, 5))


def test_rgba_cells_become_opaque_black():
    rng = np.random.default_rng(2)
    image = make_pil("RGBA", 28, 28, rng)
    masked = np.asarray(patch_blackening(image, patch_size=14, prob=1.0, seed=0))
    assert (masked[..., :3] == 0).all() and (masked[..., 3] == 255).all()


def test_float_nan_and_negative_zero_survive_bit_for_bit_outside_masked_cells():
    image = np.full((28, 28), np.nan, dtype=np.float64)
    image[0, 0] = -0.0
    masked = patch_blackening(image, patch_size=14, prob=0.5, seed=11)
    blackened = classify_cells(image, masked, 14)
    # This seed masks some but not all of the 4 cells; classify_cells compared the bits.
    assert 0 < blackened.sum() < 4


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_images_are_converted_first(transparency):
    rgb = make_pil("RGB", 30, 40, np.random.default_rng(3))
    palette = rgb.quantize(16)
    if transparency:
        palette.info["transparency"] = 0
    masked = patch_blackening(palette, patch_size=7, prob=0.5, seed=9)
    expected_mode = "RGBA" if transparency else "RGB"
    assert masked.mode == expected_mode
    expected = patch_blackening(palette.convert(expected_mode), patch_size=7, prob=0.5, seed=9)
    assert np.array_equal(np.asarray(masked), np.asarray(expected))


def test_pa_image_is_converted_to_rgba():
    pa = make_pil("RGB", 20, 20, np.random.default_rng(4)).quantize(8).convert("PA")
    masked = patch_blackening(pa, patch_size=5, prob=1.0, seed=0)
    assert masked.mode == "RGBA" and (np.asarray(masked)[..., 3] == 255).all()


def test_lazily_opened_file_image_is_masked():
    buffer = io.BytesIO()
    make_pil("RGB", 33, 21, np.random.default_rng(5)).save(buffer, format="PNG")
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    masked = patch_blackening(opened, prob=0.5, seed=2)
    assert masked.mode == "RGB" and masked.size == (21, 33)
    classify_cells(opened, masked, 14)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        ("photo.png", TypeError, "expected a PIL image or a numpy array"),
        ([[1, 2], [3, 4]], TypeError, "got list"),
        (None, TypeError, "got NoneType"),
        (np.zeros(5, np.uint8), ValueError, "HxW or HxWxC"),
        (np.zeros((2, 2, 2, 2), np.uint8), ValueError, "HxW or HxWxC"),
        (np.zeros((4, 4), dtype=object), TypeError, "dtype"),
        (np.zeros((4, 4), dtype=np.complex64), TypeError, "dtype"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "zero-size"),
        (np.zeros((5, 0), np.uint8), ValueError, "zero-size"),
        (np.zeros((5, 5, 0), np.uint8), ValueError, "zero-size"),
        (Image.new("RGB", (0, 5)), ValueError, "zero-size"),
        (Image.new("CMYK", (4, 4)), ValueError, "unsupported PIL image mode 'CMYK'"),
        (Image.new("YCbCr", (4, 4)), ValueError, "unsupported PIL image mode 'YCbCr'"),
        (Image.new("RGBX", (4, 4)), ValueError, "unsupported PIL image mode 'RGBX'"),
    ],
)
def test_bad_images_are_named(image, error, message):
    with pytest.raises(error, match=message):
        patch_blackening(image, seed=0)


def test_pixel_limit():
    image = np.ones((30, 40, 3), np.uint8)
    assert patch_blackening(image, seed=0, max_pixels=1200).shape == image.shape
    with pytest.raises(ValueError, match="pixel limit max_pixels=1199"):
        patch_blackening(image, seed=0, max_pixels=1199)
    with pytest.raises(ValueError, match="pixel limit"):
        patch_blackening(Image.new("L", (40, 30)), seed=0, max_pixels=1000)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"patch_size": 0}, ValueError, "patch_size must be >= 1"),
        ({"patch_size": -3}, ValueError, "patch_size must be >= 1"),
        ({"patch_size": 1.5}, TypeError, "patch_size must be an integer"),
        ({"patch_size": True}, TypeError, "patch_size must be an integer"),
        ({"prob": -0.01}, ValueError, r"prob must be in \[0, 1\]"),
        ({"prob": 1.01}, ValueError, r"prob must be in \[0, 1\]"),
        ({"prob": float("nan")}, ValueError, r"prob must be in \[0, 1\]"),
        ({"prob": "0.5"}, TypeError, "prob must be a number"),
        ({"seed": -1}, ValueError, "seed must be a non-negative integer"),
        ({"seed": 1.0}, TypeError, "seed must be a non-negative integer"),
        ({"max_pixels": 0}, ValueError, "max_pixels must be >= 1"),
    ],
)
def test_bad_parameters_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        patch_blackening(np.ones((4, 4), np.uint8), **kwargs)


def test_numpy_scalar_parameters_are_accepted():
    image = np.ones((10, 10), np.uint8)
    out = patch_blackening(image, patch_size=np.int64(3), prob=np.float32(1.0), seed=np.uint64(3))
    assert not out.any()


# --------------------------------------------------------------------------------------------
# Other strategies
# --------------------------------------------------------------------------------------------


@PROPERTY
@given(image=images(max_side=24), patch_size=st.integers(1, 10))
def test_full_blackens_everything(image, patch_size):
    masked = corrupt(image, "full", seed=None, params=CorruptionParams(patch_size=patch_size))
    assert type(masked) is type(image)
    expected = np.broadcast_to(black_pixel(image), as_hwc(image).shape)
    assert as_hwc(masked).tobytes() == np.ascontiguousarray(expected).tobytes()


@PROPERTY
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    patch_size=st.integers(1, 12),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**64),
    kind=st.sampled_from(["RGB", "RGBA", "L", "uint16", "float32", "bool"]),
)
def test_noise_replaces_the_same_cells_as_blackening(height, width, patch_size, prob, seed, kind):
    rng = np.random.default_rng(seed % 2**32)
    if kind in ("RGB", "RGBA", "L"):
        image = make_pil(kind, height, width, rng)
    else:
        image = random_pixels(rng, (height, width, 3), np.dtype(kind))
    params = CorruptionParams(patch_size=patch_size, prob=prob, noise_std=0.3)
    noisy = as_hwc(corrupt(image, "noise", seed=seed, params=params))
    chosen = classify_cells(image, patch_blackening(image, patch_size, prob, seed), patch_size)
    pixels = corruption.cells_to_pixels(chosen, height, width, patch_size)
    original = as_hwc(image)
    # Outside the chosen cells nothing changes; inside, the values are in range.
    assert noisy[~pixels].tobytes() == original[~pixels].tobytes()
    if np.asarray(image).dtype.kind == "f":
        assert ((noisy[pixels] >= 0) & (noisy[pixels] <= 1)).all()
    if kind == "RGBA":
        assert (noisy[pixels][:, 3] == 255).all()
    # Deterministic in the seed.
    again = as_hwc(corrupt(image, "noise", seed=seed, params=params))
    assert again.tobytes() == noisy.tobytes()


def test_noise_statistics_and_zero_std():
    image = random_pixels(np.random.default_rng(0), (200, 200, 3), np.uint8)
    params = CorruptionParams(patch_size=10, prob=1.0, noise_std=0.2)
    noisy = corrupt(image, "noise", seed=1, params=params).astype(np.float64) / 255
    # 120k draws: the mean's standard error is ~6e-4, the std's ~4e-4.
    assert abs(noisy.mean() - 0.5) < 0.005 and abs(noisy.std() - 0.2) < 0.005
    flat = corrupt(image, "noise", seed=1, params=CorruptionParams(prob=1.0, noise_std=0.0))
    assert (flat == 128).all()  # round(0.5 * 255)


def test_noise_rejects_dtypes_without_a_range():
    with pytest.raises(ValueError, match="noise strategy supports .* got dtype int32"):
        corrupt(np.ones((4, 4), np.int32), "noise", seed=0)


def test_precomputed_passes_images_through(tmp_path):
    rng = np.random.default_rng(6)
    original = make_pil("RGB", 20, 30, rng)
    masked = make_pil("RGB", 20, 30, rng)
    path = tmp_path / "masked.png"
    masked.save(path)
    encoded = path.read_bytes()
    values = (
        masked,
        str(path),
        path,
        encoded,
        {"bytes": encoded, "path": None},
        {"bytes": None, "path": str(path)},
    )
    for value in values:
        out = corrupt(original, "precomputed", precomputed=value)
        assert isinstance(out, Image.Image) and out.mode == "RGB"
        assert np.array_equal(np.asarray(out), np.asarray(masked))
    # A grey semantic mask for an RGB original comes back in the original's mode.
    grey = corrupt(original, "precomputed", precomputed=masked.convert("L"))
    assert grey.mode == "RGB"
    # Arrays: the masked array must match the original's shape and dtype.
    array = np.asarray(original)
    from_array = corrupt(array, "precomputed", precomputed=np.asarray(masked))
    assert np.array_equal(from_array, np.asarray(masked))
    assert np.array_equal(corrupt(array, "precomputed", precomputed=str(path)), np.asarray(masked))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (None, ValueError, "needs the row's pre-masked image"),
        (Image.new("RGB", (31, 20)), ValueError, "is 31x20 but the original is 30x20"),
        ("/nonexistent/masked.png", ValueError, "file not found"),
        ({"path": None}, ValueError, "neither 'bytes' nor 'path'"),
        (3.5, TypeError, "got float"),
        (b"not an image", ValueError, "could not be decoded"),
    ],
)
def test_precomputed_bad_values(value, error, message):
    original = Image.new("RGB", (30, 20), (10, 20, 30))
    with pytest.raises(error, match=message):
        corrupt(original, "precomputed", precomputed=value)


def test_precomputed_array_mismatch_and_pixel_limit():
    original = np.ones((20, 30, 3), np.uint8)
    with pytest.raises(ValueError, match="dtype float32"):
        corrupt(original, "precomputed", precomputed=np.ones((20, 30, 3), np.float32))
    with pytest.raises(ValueError, match=r"shape \(20, 30\)"):
        corrupt(original, "precomputed", precomputed=np.ones((20, 30), np.uint8))
    buffer = io.BytesIO()
    Image.new("L", (100, 100)).save(buffer, format="PNG")
    small = CorruptionParams(max_pixels=20 * 30)
    with pytest.raises(ValueError, match="pixel limit"):
        corrupt(original, "precomputed", params=small, precomputed=buffer.getvalue())


def test_registry():
    with pytest.raises(ValueError, match="unknown corruption strategy 'blur'.*patch_blackening"):
        CorruptionService(strategy="blur")
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("patch_blackening")(lambda *args: None)
    assert {"patch_blackening", "full", "noise", "precomputed"} <= set(STRATEGIES)

    # Adding a strategy is one function.
    @register_strategy("invert_test")
    def invert(image, seed, params, precomputed):
        return 255 - image

    try:
        service = CorruptionService(strategy="invert_test")
        out = service.mask_prompt([np.full((2, 2), 5, np.uint8)], run_seed=0, row_id=0, epoch=0)
        assert (out[0] == 250).all()
    finally:
        STRATEGIES.pop("invert_test")


# --------------------------------------------------------------------------------------------
# Seeds and the service class
# --------------------------------------------------------------------------------------------


def test_mask_seed_is_pinned():
    # SeedSequence's derivation is stable across numpy versions; this pins our use of it, so a
    # change that would make resumed runs mask differently fails here.
    assert mask_seed(0, 0, 0) == 333974662799729596295134569622770873320
    assert mask_seed(0, 0, 0, 1) == 50064327465568700713553565748505827476


@settings(max_examples=200, deadline=None)
@given(
    first=st.tuples(*[st.integers(0, 2**40)] * 4),
    second=st.tuples(*[st.integers(0, 2**40)] * 4),
)
def test_mask_seed_is_a_function_of_its_key(first, second):
    assert mask_seed(*first) == mask_seed(*first)
    # 128-bit seeds: a collision between distinct keys would be a derivation bug.
    assert (mask_seed(*first) == mask_seed(*second)) == (first == second)


@pytest.mark.parametrize("bad", [(-1, 0, 0), (0, -1, 0), (0, 0, 1.5), (0, 0, 0, -2), (True, 0, 0)])
def test_mask_seed_rejects_bad_keys(bad):
    with pytest.raises(ValueError, match="must be a non-negative integer"):
        mask_seed(*bad)


def test_service_masks_one_prompt_reproducibly():
    rng = np.random.default_rng(7)
    image = make_pil("RGB", 84, 84, rng)
    service = CorruptionService(patch_size=14, prob=0.5)
    first = service.mask_prompt([image, image], run_seed=3, row_id=10, epoch=1)
    again = service.mask_prompt([image, image], run_seed=3, row_id=10, epoch=1)
    assert [np.asarray(x).tobytes() for x in first] == [np.asarray(x).tobytes() for x in again]
    # Each image of a prompt uses its own derived seed: the two identical images differ.
    assert not np.array_equal(np.asarray(first[0]), np.asarray(first[1]))
    for index, out in enumerate(first):
        expected = patch_blackening(image, 14, 0.5, seed=mask_seed(3, 10, 1, index))
        assert np.array_equal(np.asarray(out), np.asarray(expected))
    # Another row, epoch or run seed gives another mask.
    for key in ((4, 10, 1), (3, 11, 1), (3, 10, 2)):
        other = service.mask_prompt([image], *key)
        assert not np.array_equal(np.asarray(other[0]), np.asarray(first[0]))


def test_service_validates_its_config_and_precomputed_count():
    with pytest.raises(ValueError, match=r"prob must be in \[0, 1\]"):
        CorruptionService(prob=1.5)
    with pytest.raises(ValueError, match="noise_std must be a finite number"):
        CorruptionService(strategy="noise", noise_std=-1.0)
    service = CorruptionService(strategy="precomputed")
    with pytest.raises(ValueError, match="1 precomputed masked images for 2 images"):
        service.mask_prompt([np.ones((2, 2))] * 2, 0, 0, 0, precomputed=[np.ones((2, 2))])
