"""A prompt's images: the item kinds a dataset may hold (file path, encoded bytes, HF ``Image`` dict),
header checks at load time and decoding (:func:`prompt_images`) when a rollout needs the pixels.

With ``model.image_resize=easyr1`` a decoded image is first scaled by area into the job's
``[min_pixels, max_pixels]`` as EasyR1 (the authors' base) does (:func:`easyr1_fit`); the processor
then rounds it with its own limits (trainer.core.modeling.processor_pixels).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from trainer.core.data.examples import SKIP_MISSING_IMAGE, SKIP_UNREADABLE_IMAGE, ImageItem, PromptExample

#: ``(min_pixels, max_pixels)`` to fit decoded images into (EasyR1's resize), or None to keep them.
Fit = tuple[int, int] | None


def easyr1_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The (width, height) EasyR1's ``process_image`` gives a ``width x height`` image: above
    ``max_pixels`` (then below ``min_pixels``) scaled by ``sqrt(limit / area)``, each side truncated
    to an int (at least 1)."""
    for limit, outside in ((max_pixels, width * height > max_pixels), (min_pixels, width * height < min_pixels)):
        if outside:
            factor = math.sqrt(limit / (width * height))
            width, height = max(1, int(width * factor)), max(1, int(height * factor))
    return width, height


def easyr1_fit(image: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """``image`` resized to :func:`easyr1_size` (PIL's default filter, as EasyR1), or itself when it fits."""
    size = easyr1_size(image.width, image.height, min_pixels, max_pixels)
    return image if size == image.size else image.resize(size)


def load_image(path: str | Path) -> Image.Image:
    """Decode one image file as an RGB ``PIL.Image`` (fully loaded, file handle closed)."""
    with Image.open(path) as img:
        # convert() returns a new, loaded image even when the file already is RGB, so nothing
        # refers to the closed file afterwards.
        return img.convert("RGB")


def open_image(item: ImageItem) -> Image.Image:
    """Open (header only) an image file or encoded bytes."""
    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def _describe(item: ImageItem, index: int) -> str:
    return str(item) if isinstance(item, Path) else f"image {index} ({len(item)} bytes stored in the dataset)"


class BadPrompt(ValueError):
    """A prompt whose images cannot be used (missing, unreadable, above data.max_raw_pixels)."""


def decode_images(items: Sequence[ImageItem], row_id: int, max_raw_pixels: int, fit: Fit = None) -> list[Image.Image]:
    """Decode images (paths or encoded bytes) as RGB, checking each header against
    ``max_raw_pixels`` before decoding, and resized by :func:`easyr1_fit` when ``fit`` is given
    (before the RGB conversion, in EasyR1's order); raises :class:`BadPrompt` naming the row and image."""
    images = []
    for index, item in enumerate(items):
        what = _describe(item, index)
        try:
            with open_image(item) as im:
                w, h = im.size
                if w * h > max_raw_pixels:
                    raise BadPrompt(f"row {row_id}: {what} has {w}x{h} pixels > data.max_raw_pixels={max_raw_pixels}")
                images.append((im if fit is None else easyr1_fit(im, *fit)).convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, BadPrompt):
                raise
            raise BadPrompt(f"row {row_id}: {what}: {e.__class__.__name__}: {e}") from None
    return images


def prompt_images(example: PromptExample, max_raw_pixels: int, fit: Fit = None) -> list[Image.Image]:
    """Decode a prompt's images (files or bytes), checking each header against ``max_raw_pixels``
    before decoding, fitted as ``fit`` says. Raises :class:`BadPrompt` for a missing file or
    undecodable data."""
    return decode_images(example.images, example.row_id, max_raw_pixels, fit)


def prompt_masked_images(example: PromptExample, max_raw_pixels: int, fit: Fit = None) -> list[Image.Image] | None:
    """The decoded pre-masked images of a prompt (fitted like the originals), or ``None`` when the
    dataset has none."""
    if example.images_masked is None:
        return None
    return decode_images(example.images_masked, example.row_id, max_raw_pixels, fit)


def check_image(item: ImageItem, verify: bool) -> str | tuple[int, int]:
    """The image's (width, height) from its header if it looks usable, else the skip reason."""
    try:
        if isinstance(item, Path) and not item.is_file():
            return SKIP_MISSING_IMAGE
    except OSError:  # e.g. a name too long to be a path (base64 text in a path column)
        return SKIP_MISSING_IMAGE
    try:
        with open_image(item) as img:
            if verify:
                img.load()  # full decode: catches truncated files, costs a decode per image
            return img.size
    except Exception:  # PIL raises several unrelated types for broken files
        return SKIP_UNREADABLE_IMAGE


def image_items(value: Any, root: Path | None) -> list[ImageItem] | None:
    """An image column's value as image items, or None if it has a shape we cannot read.

    Accepted per image: a path string (relative to ``root``), encoded bytes, or an HF ``Image``
    ``{bytes, path}`` dict (bytes win when both are set, as in ``datasets``). A single image may
    stand without a list.
    """
    if value is None:
        return []
    if isinstance(value, (str, bytes, bytearray, Mapping)):
        value = [value]
    if not isinstance(value, Sequence):
        return None
    out: list[ImageItem] = []
    for entry in value:
        if isinstance(entry, Mapping):
            data, path = entry.get("bytes"), entry.get("path")
            if data is not None and not isinstance(data, (bytes, bytearray)):
                return None  # e.g. base64 text from a JSON export: not a path, not bytes
            entry = data if data is not None else path
        if isinstance(entry, (bytes, bytearray)):
            out.append(bytes(entry))
        elif isinstance(entry, str) and entry:
            p = Path(entry).expanduser()
            if not p.is_absolute():
                p = (root / p) if root is not None else p.absolute()
            out.append(p)
        else:
            return None
    return out
