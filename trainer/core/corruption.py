"""The pure image-corruption math of PAPO: the masked image that the perception term compares against.

This module owns
- the corruption functions (``patch_blackening`` and the other strategies) on PIL images and
  numpy arrays, with input validation;
- the strategy registry (``corruption.strategy`` picks one by name; adding one is one function);
- mask-seed derivation (``mask_seed``): one mask per prompt, shared by its n rollouts, derived
  from (run seed, dataset row id, epoch) so retries and resumed runs mask identically.

Semantics of ``patch_blackening`` follow the authors' code (PAPO, ``random_patch_blackening``):
a grid of ``patch_size`` cells laid over the raw image from the top-left corner, edge cells
partial, each cell blackened independently with probability ``prob`` (a cell is blackened when
its uniform draw is ``< prob``). Unlike the official code it is seeded and vectorised: the draws
are ``Generator.random((rows, cols))`` in row-major order, which is the same stream a per-cell
loop calling ``Generator.random()`` row by row would consume, so the two agree cell for cell.
PIL images are masked inside PIL (one paste through a 1-bit mask, no numpy round trip); arrays
by one byte-wise AND pass. Both paths give the same pixels (the property tests check it).
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover - typing only
    pass

ImageLike = Image.Image | np.ndarray


DEFAULT_STRATEGY = "patch_blackening"
DEFAULT_PATCH_SIZE = 14
DEFAULT_PROB = 0.6
# A guard against decompression bombs and runaway inputs, not a resize limit (that is
# ``model.max_pixels``): 8192 x 8192 is far beyond any VLM input and still only 200 MB as RGB.
DEFAULT_MAX_PIXELS = 8192 * 8192
# Noise cells: N(0.5, noise_std) in units of the full intensity range, clipped to it.
DEFAULT_NOISE_STD = 0.25

# PIL modes whose pixel value 0 is black in every band and that survive a numpy round trip with
# the same mode. Colour spaces where zero is not black (CMYK is white, YCbCr/LAB are green-ish)
# are rejected rather than silently mis-masked.
_PLAIN_MODES = frozenset({"1", "L", "I", "F", "I;16", "I;16B", "RGB"})
# Modes whose last band is alpha: masked cells become opaque black, not transparent, because a
# transparent cell would let the processor's background show through instead of black.
_ALPHA_MODES = frozenset({"LA", "RGBA"})
# Palette modes carry indices, not colours (index 0 is not black in general), so they are
# expanded to colours first; the result has the expanded mode.
_CONVERTED_MODES = {"P": "RGB", "PA": "RGBA"}
SUPPORTED_PIL_MODES = tuple(sorted(_PLAIN_MODES | _ALPHA_MODES | set(_CONVERTED_MODES)))

# numpy dtype kinds accepted for arrays: bool, unsigned, signed, float.
_ARRAY_KINDS = frozenset("buif")

# Separates mask seeds from any other stream the trainer derives from the same run seed
# (ASCII "MASK"), so masks are never correlated with, e.g., data shuffling.
_MASK_SEED_DOMAIN = 0x4D41534B


# --------------------------------------------------------------------------------------------
# Parameters and validation
# --------------------------------------------------------------------------------------------


def _check_patch_size(patch_size: Any) -> int:
    if isinstance(patch_size, bool) or not isinstance(patch_size, numbers.Integral):
        raise TypeError(f"patch_size must be an integer number of pixels, got {patch_size!r}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1 pixel, got {patch_size}")
    return int(patch_size)


def _check_prob(prob: Any) -> float:
    if isinstance(prob, bool) or not isinstance(prob, numbers.Real):
        raise TypeError(f"prob must be a number in [0, 1], got {prob!r}")
    value = float(prob)
    if not (0.0 <= value <= 1.0):  # also rejects NaN
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    return value


def _check_max_pixels(max_pixels: Any) -> int:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, numbers.Integral):
        raise TypeError(f"max_pixels must be an integer, got {max_pixels!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    return int(max_pixels)


def _check_noise_std(noise_std: Any) -> float:
    if isinstance(noise_std, bool) or not isinstance(noise_std, numbers.Real):
        raise TypeError(f"noise_std must be a number >= 0, got {noise_std!r}")
    value = float(noise_std)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    return value


def _check_seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer or None, got {seed!r}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


@dataclass(frozen=True)
class CorruptionParams:
    """Validated parameters shared by every strategy (the ``corruption.*`` config fields)."""

    patch_size: int = DEFAULT_PATCH_SIZE
    prob: float = DEFAULT_PROB
    max_pixels: int = DEFAULT_MAX_PIXELS
    noise_std: float = DEFAULT_NOISE_STD

    def __post_init__(self) -> None:
        # frozen dataclass: normalise through object.__setattr__ so numpy scalars become plain
        # Python values (they pickle smaller and compare predictably).
        object.__setattr__(self, "patch_size", _check_patch_size(self.patch_size))
        object.__setattr__(self, "prob", _check_prob(self.prob))
        object.__setattr__(self, "max_pixels", _check_max_pixels(self.max_pixels))
        object.__setattr__(self, "noise_std", _check_noise_std(self.noise_std))


# --------------------------------------------------------------------------------------------
# Image <-> array
# --------------------------------------------------------------------------------------------


@dataclass
class _Pixels:
    """An image as a C-contiguous (H, W, C) array plus what is needed to give it back."""

    array: np.ndarray  # (H, W, C), C-contiguous; may be read-only (never written in place)
    alpha: bool  # last channel is alpha (PIL LA/RGBA): masked cells get opaque alpha
    pil_mode: str | None  # output PIL mode, or None when the input was an array
    squeeze: bool  # input array was 2-D


def _check_size(height: int, width: int, max_pixels: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"zero-size image ({width}x{height} pixels) cannot be masked")
    if height * width > max_pixels:
        raise ValueError(
            f"image of {width}x{height} = {height * width} pixels is above the pixel limit max_pixels={max_pixels}"
        )


def _prepare_pil(image: Image.Image, max_pixels: int) -> Image.Image:
    """Check a PIL image's size and mode; expand palette modes. Never decodes a bomb."""
    width, height = image.size
    # Check before touching pixel data: converting would decode a lazily opened file.
    _check_size(height, width, max_pixels)
    mode = image.mode
    if mode in _CONVERTED_MODES:
        # A palette image with a transparency entry keeps it as alpha instead of silently
        # dropping it.
        target = _CONVERTED_MODES[mode]
        if target == "RGB" and "transparency" in image.info:
            target = "RGBA"
        return image.convert(target)
    if mode not in _PLAIN_MODES and mode not in _ALPHA_MODES:
        raise ValueError(
            f"unsupported PIL image mode {mode!r}: zero is not black in it or it does not "
            f"round-trip through numpy; supported modes are {', '.join(SUPPORTED_PIL_MODES)}"
            f" (convert first, e.g. image.convert('RGB'))"
        )
    return image


def _to_pixels(image: Any, max_pixels: int) -> _Pixels:
    if isinstance(image, Image.Image):
        image = _prepare_pil(image, max_pixels)
        mode = image.mode
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[:, :, None]
        return _Pixels(np.ascontiguousarray(array), mode in _ALPHA_MODES, mode, False)

    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3):
            raise ValueError(f"image array must be HxW or HxWxC, got an array of shape {image.shape}")
        if image.dtype.kind not in _ARRAY_KINDS:
            raise TypeError(f"image array dtype must be bool, integer or float, got {image.dtype}")
        height, width = image.shape[:2]
        _check_size(height, width, max_pixels)
        if image.ndim == 3 and image.shape[2] == 0:
            raise ValueError(f"zero-size image: array of shape {image.shape} has no channels")
        squeeze = image.ndim == 2
        array = image[:, :, None] if squeeze else image
        # A view for contiguous inputs; a copy only for strided ones (e.g. a flipped view).
        return _Pixels(np.ascontiguousarray(array), False, None, squeeze)

    raise TypeError(f"expected a PIL image or a numpy array (HxW or HxWxC), got {type(image).__name__}")


def _from_pixels(out: np.ndarray, pixels: _Pixels) -> ImageLike:
    if pixels.pil_mode is None:
        return out[:, :, 0] if pixels.squeeze else out
    if out.shape[2] == 1:
        out = out[:, :, 0]
    image = Image.fromarray(out)
    # Every supported mode maps back to itself through numpy; guard it so a Pillow change
    # cannot silently alter the mode the caller gets.
    if image.mode != pixels.pil_mode:
        raise RuntimeError(f"internal error: PIL mode {pixels.pil_mode!r} came back as {image.mode!r}")
    return image


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def grid_shape(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """Rows and columns of the cell grid; edge cells are partial, so round up."""
    return -(-height // patch_size), -(-width // patch_size)


def draw_cells(rng: np.random.Generator, height: int, width: int, patch_size: int, prob: float) -> np.ndarray:
    """Boolean (rows, cols) grid, True where the cell is corrupted.

    One uniform draw per cell in row-major order, cell corrupted when ``draw < prob`` (the
    official comparison): ``prob=1`` corrupts every cell, ``prob=0`` none.
    """
    rows, cols = grid_shape(height, width, patch_size)
    return rng.random((rows, cols)) < prob


def _cell_extents(cells: int, length: int, patch_size: int) -> np.ndarray:
    """Pixels covered by each cell along one axis: patch_size, the last one partial."""
    extents = np.full(cells, patch_size)
    extents[-1] = length - (cells - 1) * patch_size
    return extents


def cells_to_pixels(cells: np.ndarray, height: int, width: int, patch_size: int) -> np.ndarray:
    """Expand a (rows, cols) cell grid to a C-contiguous (H, W) pixel mask.

    Repeating by per-cell extents yields the partial edge cells directly; cropping a full-cell
    expansion instead leaves a strided view whose conversion to PIL (``tobytes``) measured
    ~15x slower than the expansion itself at 1024x1024.
    """
    rows, cols = cells.shape
    expanded = np.repeat(cells, _cell_extents(rows, height, patch_size), axis=0)
    return np.repeat(expanded, _cell_extents(cols, width, patch_size), axis=1)


# The fill colour ``Image.paste`` uses for a masked cell, per PIL mode masked in PIL. The
# 16-bit modes are absent on purpose: Pillow 13's paste through a "1" mask writes only the low
# byte of I;16/I;16B pixels (found by the property tests), so those take the numpy path.
_PIL_BLACK: dict[str, Any] = {
    "1": 0,
    "L": 0,
    "I": 0,
    "F": 0.0,
    "RGB": (0, 0, 0),
    "LA": (0, 255),
    "RGBA": (0, 0, 0, 255),
}


def _blacken_pil(image: Image.Image, cells: np.ndarray, patch_size: int) -> Image.Image:
    """PIL inputs stay in PIL: copy, then paste black through a 1-bit mask of the cells.

    This skips the PIL -> numpy -> PIL round trip entirely (for RGB that round trip repacks
    every pixel between PIL's 4-byte and numpy's 3-byte layout twice) and is several times
    faster than it. A mode "1" mask matters: ``paste`` through an "L" mask blends every pixel,
    through a "1" mask it copies, about 8x faster. ``image`` has been through ``_prepare_pil``.
    """
    out = image.copy()
    if cells.any():
        height, width = image.height, image.width
        mask = Image.fromarray(cells_to_pixels(cells, height, width, patch_size))  # bool -> "1"
        out.paste(_PIL_BLACK[image.mode], mask=mask)
    return out


def _mask_cells(image: ImageLike, params: CorruptionParams, choose: Callable[[int, int], np.ndarray]) -> ImageLike:
    """Blacken the cells ``choose(height, width)`` selects, by the path that suits the type."""
    if isinstance(image, Image.Image):
        image = _prepare_pil(image, params.max_pixels)
        if image.mode in _PIL_BLACK:
            return _blacken_pil(image, choose(image.height, image.width), params.patch_size)
    pixels = _to_pixels(image, params.max_pixels)
    height, width, _ = pixels.array.shape
    out = _from_pixels(_blacken(pixels, choose(height, width), params.patch_size), pixels)
    if isinstance(out, Image.Image):  # keep metadata as the PIL path (Image.copy) does
        out.info = dict(image.info)
    return out


def _blacken(pixels: _Pixels, cells: np.ndarray, patch_size: int) -> np.ndarray:
    """Return a new array: ``pixels.array`` with the True cells all zero.

    The path for numpy inputs and the 16-bit PIL modes; alpha modes never get here (they are
    masked in PIL, where the fill colour carries the opaque alpha).

    Works on raw bytes so one code path serves every dtype: black is the all-zero bit pattern
    for bool, integers and IEEE floats alike. A cell covers ``patch_size * bytes_per_pixel``
    contiguous bytes of a row, so a (rows, row_bytes) keep-pattern of 0x00/0xFF broadcast over
    the ``patch_size`` pixel rows of each cell row zeroes whole cells in a single ``&`` pass;
    the output is written once and the input read once, which is what keeps this within a
    small factor of a plain copy.
    """
    if pixels.alpha:  # an invariant of _mask_cells, checked because zeros would be transparent
        raise RuntimeError("internal error: alpha images must be masked through PIL")
    src = pixels.array
    height, width, _ = src.shape
    src_bytes = src.reshape(height, -1).view(np.uint8)  # (H, W * bytes_per_pixel)
    row_bytes = src_bytes.shape[1]
    bytes_per_pixel = row_bytes // width

    keep_cells = np.where(cells, np.uint8(0), np.uint8(0xFF))  # (rows, cols)
    keep = np.repeat(keep_cells, patch_size * bytes_per_pixel, axis=1)[:, :row_bytes]

    out = np.empty_like(src)
    out_bytes = out.reshape(height, -1).view(np.uint8)
    full_rows = height // patch_size  # cell rows that are patch_size pixels tall
    split = full_rows * patch_size
    if full_rows:
        shape = (full_rows, patch_size, row_bytes)
        dst = out_bytes[:split].reshape(shape)
        np.bitwise_and(src_bytes[:split].reshape(shape), keep[:full_rows, None, :], out=dst)
    if split < height:  # the partial bottom cell row
        np.bitwise_and(src_bytes[split:], keep[full_rows], out=out_bytes[split:])
    return out


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


def patch_blackening(
    image: ImageLike,
    patch_size: int = DEFAULT_PATCH_SIZE,
    prob: float = DEFAULT_PROB,
    seed: int | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ImageLike:
    """Blacken random grid cells of an image: PAPO's default masking.

    A grid of ``patch_size`` x ``patch_size`` cells is laid over the raw image from the top-left
    corner (cells on the right and bottom edges are partial); each cell is set to black
    independently with probability ``prob``. ``seed`` (a non-negative int) makes the mask
    reproducible; ``None`` draws fresh entropy, like the official unseeded code.

    Accepts a PIL image or an HxW / HxWxC numpy array (bool, integer or float) and returns the
    same type, shape, dtype and mode; the input is never modified. PIL modes: 1, L, I, I;16,
    I;16B, F, RGB as is; LA and RGBA become *opaque* black in masked cells (alpha at its
    maximum); P is converted to RGB first (RGBA when it has a transparency entry) and PA to
    RGBA, so those come back in the converted mode. Other modes (CMYK, YCbCr, LAB, HSV, ...)
    raise ``ValueError``. Arrays carry no mode, so every channel of a masked cell is zero,
    including a fourth channel. A PIL image's ``info`` metadata is kept.

    Raises ``TypeError`` for non-images and ``ValueError`` for zero-size images, images above
    ``max_pixels``, ``patch_size < 1`` and ``prob`` outside [0, 1].
    """
    params = CorruptionParams(patch_size=patch_size, prob=prob, max_pixels=max_pixels)
    return _patch_blackening(image, _check_seed(seed), params, None)


def mask_seed(run_seed: int, row_id: int, epoch: int, image_index: int = 0) -> int:
    """The seed of one image's mask, derived through ``numpy.random.SeedSequence``.

    Depends only on (run seed, dataset row id, epoch, index of the image within the prompt):
    the n rollouts of a prompt, DAPO retries of it and a resumed run all get the same mask,
    while another row, epoch or run seed gets an independent one, and the images of a
    multi-image prompt get distinct ones. Returns a 128-bit int for ``patch_blackening(seed=)``.
    """
    key = {"run_seed": run_seed, "row_id": row_id, "epoch": epoch, "image_index": image_index}
    for name, value in key.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"mask_seed: {name} must be a non-negative integer, got {value!r}")
    sequence = np.random.SeedSequence(
        entropy=int(run_seed),
        spawn_key=(_MASK_SEED_DOMAIN, int(row_id), int(epoch), int(image_index)),
    )
    high, low = (int(word) for word in sequence.generate_state(2, dtype=np.uint64))
    return (high << 64) | low


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

# A strategy maps (image, seed, params, precomputed value or None) to the corrupted image.
Strategy = Callable[[ImageLike, int | None, CorruptionParams, Any], ImageLike]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    """Decorator adding a strategy to the registry under ``name`` (``corruption.strategy``)."""

    def decorate(fn: Strategy) -> Strategy:
        if name in STRATEGIES:
            raise ValueError(f"corruption strategy {name!r} is already registered")
        STRATEGIES[name] = fn
        return fn

    return decorate


def get_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown corruption strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None


def corrupt(
    image: ImageLike,
    strategy: str = DEFAULT_STRATEGY,
    *,
    seed: int | None = None,
    params: CorruptionParams | None = None,
    precomputed: Any = None,
) -> ImageLike:
    """Apply the named strategy to one image (what the service does per image)."""
    fn = get_strategy(strategy)
    return fn(image, _check_seed(seed), params or CorruptionParams(), precomputed)


@register_strategy("patch_blackening")
def _patch_blackening(image: ImageLike, seed: int | None, params: CorruptionParams, precomputed: Any) -> ImageLike:
    def choose(height: int, width: int) -> np.ndarray:
        return draw_cells(np.random.default_rng(seed), height, width, params.patch_size, params.prob)

    return _mask_cells(image, params, choose)


@register_strategy("full")
def _full(image: ImageLike, seed: int | None, params: CorruptionParams, precomputed: Any) -> ImageLike:
    """The whole image black (the paper's masking-ratio 1.0 ablation); ignores the seed."""

    def choose(height: int, width: int) -> np.ndarray:
        return np.ones(grid_shape(height, width, params.patch_size), dtype=bool)

    return _mask_cells(image, params, choose)


@register_strategy("noise")
def _noise(image: ImageLike, seed: int | None, params: CorruptionParams, precomputed: Any) -> ImageLike:
    """Cells chosen exactly as ``patch_blackening`` with the same seed, filled with noise.

    Each colour channel of a chosen pixel is drawn i.i.d. from N(0.5, noise_std) in units of
    the full intensity range ([0, max] for uint8/uint16, [0, 1] for float and bool), clipped
    to that range; alpha becomes opaque. The noise replaces the cell (it is not added to it),
    so a chosen cell carries no information about the original. Other dtypes (int32 "I"
    images, signed ints) have no natural range and raise ``ValueError``.
    """
    pixels = _to_pixels(image, params.max_pixels)
    src = pixels.array
    dtype = src.dtype
    if not (dtype.kind in "bf" or dtype in (np.dtype(np.uint8), np.dtype(np.uint16))):
        raise ValueError(f"noise strategy supports bool, uint8, uint16 and float images, got dtype {dtype}")
    height, width, channels = src.shape
    rng = np.random.default_rng(seed)
    cells = draw_cells(rng, height, width, params.patch_size, params.prob)
    chosen = cells_to_pixels(cells, height, width, params.patch_size)
    colour = channels - 1 if pixels.alpha else channels
    draws = rng.normal(0.5, params.noise_std, size=(int(chosen.sum()), colour))
    values = np.clip(draws, 0.0, 1.0)
    if dtype.kind == "u":
        values = np.rint(values * np.iinfo(dtype).max)
    elif dtype.kind == "b":
        values = values >= 0.5
    out = src.copy()
    out[chosen, :colour] = values.astype(dtype)
    if pixels.alpha:
        out[chosen, colour:] = np.iinfo(dtype).max
    return _from_pixels(out, pixels)


def _load_precomputed(value: Any, max_pixels: int) -> ImageLike:
    """Decode an ``images_masked`` value: image, array, encoded bytes, path or {bytes, path}."""
    if isinstance(value, (Image.Image, np.ndarray)):
        return value
    if isinstance(value, dict):
        data = value.get("bytes")
        source: Any = data if data is not None else value.get("path")
        if source is None:
            raise ValueError("precomputed image dict has neither 'bytes' nor 'path'")
        return _load_precomputed(source, max_pixels)
    if isinstance(value, (bytes, bytearray, memoryview)):
        stream: Any = io.BytesIO(bytes(value))
    elif isinstance(value, (str, os.PathLike)):
        if not Path(value).is_file():
            raise ValueError(f"precomputed image file not found: {os.fspath(value)!r}")
        stream = value
    else:
        raise TypeError(
            "precomputed masked image must be a PIL image, numpy array, encoded bytes, a path "
            f"or a {{'bytes', 'path'}} dict, got {type(value).__name__}"
        )
    try:
        image = Image.open(stream)
    except Image.UnidentifiedImageError as error:
        raise ValueError(f"precomputed masked image could not be decoded: {error}") from None
    with image:
        # The header gives the size without decoding: refuse bombs before load().
        _check_size(image.height, image.width, max_pixels)
        # A plain in-memory Image (not a PngImageFile holding a file handle) travels back.
        return image.copy()


@register_strategy("precomputed")
def _precomputed(image: ImageLike, seed: int | None, params: CorruptionParams, precomputed: Any) -> ImageLike:
    """Pass through the row's pre-masked image (dataset column ``images_masked``).

    The masked image must have the original's size (the image-token count depends on it). It is
    returned as the original's type: a PIL image converted to the original's (output) mode, or
    an array that must already match the original's shape and dtype.
    """
    if precomputed is None:
        raise ValueError(
            "strategy 'precomputed' needs the row's pre-masked image (column images_masked), but none was given"
        )
    if isinstance(image, Image.Image):
        original = _prepare_pil(image, params.max_pixels)  # validates; P -> RGB(A) as usual
        height, width, mode = original.height, original.width, original.mode
    else:
        height, width = _to_pixels(image, params.max_pixels).array.shape[:2]
        mode = None
    masked = _load_precomputed(precomputed, params.max_pixels)
    if isinstance(masked, Image.Image):
        _check_size(masked.height, masked.width, params.max_pixels)
        size = (masked.height, masked.width)
    else:
        size = _to_pixels(masked, params.max_pixels).array.shape[:2]
    if size != (height, width):
        raise ValueError(
            f"precomputed masked image is {size[1]}x{size[0]} but the original is "
            f"{width}x{height}; they must be the same size"
        )
    if mode is not None:  # the original is a PIL image: return one in its (output) mode
        if isinstance(masked, np.ndarray):
            masked = Image.fromarray(masked)
        return masked if masked.mode == mode else masked.convert(mode)
    # The original is an array: the masked one must match it exactly.
    array = np.asarray(masked)
    if array.shape != image.shape or array.dtype != image.dtype:
        raise ValueError(
            f"precomputed masked array has shape {array.shape} and dtype {array.dtype}, "
            f"the original has {image.shape} and {image.dtype}"
        )
    return array
