"""Datasets for training and evaluation: reading prompts and formatting them as chat messages.

This module owns the dataset layout the trainer reads and the prompt formatting applied to it:

* the on-disk layout (the HF-datasets "parquet + image files" layout that ``trainer/demo.py``
  writes): one parquet file per split with a question column whose text holds one ``<image>``
  placeholder per image, a ground-truth answer column, and a column of image paths relative to
  the dataset folder;
* turning each row into a :class:`PromptExample`: chat messages whose image items sit where the
  placeholders were, absolute image paths, the answer, and a stable row id (the corruption
  service seeds each prompt's mask from it, so it must not depend on load order);
* appending the format prompt (PAPO's, by default) to the question;
* tolerating bad rows: a row with a missing or unreadable image, a placeholder/image count
  mismatch or an empty answer is skipped and counted by reason, never crashes a load.

Images are not decoded at load time (only their headers are read, to catch unreadable files);
:func:`load_image` decodes one when a rollout needs it.

First version: local parquet only. Real HF hub datasets and jsonl come with a later issue and
plug in at :func:`resolve_split_files` / :func:`load_split`.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict

logger = logging.getLogger(__name__)

#: The prompt PAPO appends to every question (PAPO.md, "prompt").
PAPO_FORMAT_PROMPT = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)

#: The placeholder marking where an image goes in the question text.
IMAGE_PLACEHOLDER = "<image>"

# Reasons a row can be skipped for; the keys of ``LoadedSplit.skipped``.
SKIP_MISSING_IMAGE = "missing_image_file"
SKIP_UNREADABLE_IMAGE = "unreadable_image"
SKIP_PLACEHOLDER_MISMATCH = "placeholder_mismatch"
SKIP_EMPTY_ANSWER = "empty_answer"
SKIP_BAD_PROBLEM = "bad_problem"
SKIP_BAD_IMAGE_ENTRY = "bad_image_entry"
SKIP_BAD_ID = "bad_id"
SKIP_REASONS = (
    SKIP_MISSING_IMAGE,
    SKIP_UNREADABLE_IMAGE,
    SKIP_PLACEHOLDER_MISMATCH,
    SKIP_EMPTY_ANSWER,
    SKIP_BAD_PROBLEM,
    SKIP_BAD_IMAGE_ENTRY,
    SKIP_BAD_ID,
)


class DataError(ValueError):
    """A dataset that cannot be read at all (as opposed to single bad rows, which are skipped)."""


class PromptExample(BaseModel):
    """One prompt, ready for a chat template and an image processor."""

    model_config = ConfigDict(frozen=True)

    row_id: int
    """Stable id of the dataset row: the ``id`` column (string ids hashed to a stable int), else
    the row's position in the split."""
    messages: list[dict[str, Any]]
    """``[{"role": "user", "content": [{"type": "image"}, ..., {"type": "text", "text": ...}]}]``,
    image items in placeholder order."""
    image_paths: list[Path]
    """Absolute paths, one per image item, in the same order."""
    answer: str
    """The bare ground truth (e.g. ``red``)."""


class LoadedSplit(BaseModel):
    """The examples of one split plus what was skipped on the way."""

    model_config = ConfigDict(frozen=True)

    source: Path
    """The parquet file the split was read from (the first one, when the split has shards)."""
    examples: list[PromptExample]
    num_rows: int
    """Rows read, kept and skipped."""
    skipped: dict[str, int]
    """Skipped rows by reason (see ``SKIP_REASONS``); empty when nothing was skipped."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.examples)


def load_image(path: str | Path) -> Image.Image:
    """Decode one image file as an RGB ``PIL.Image`` (fully loaded, file handle closed)."""
    with Image.open(path) as img:
        # convert() returns a new, loaded image even when the file already is RGB, so nothing
        # refers to the closed file afterwards.
        return img.convert("RGB")


class BadPrompt(ValueError):
    """A prompt whose images cannot be used (missing, unreadable, above data.max_raw_pixels)."""


def prompt_images(example: PromptExample, max_raw_pixels: int) -> list[Any]:
    """Decode a prompt's images, checking each header against ``max_raw_pixels`` before decoding."""
    images = []
    for path in example.image_paths:
        try:
            with Image.open(path) as im:
                w, h = im.size
            if w * h > max_raw_pixels:
                raise BadPrompt(f"row {example.row_id}: {path} has {w}x{h} pixels > data.max_raw_pixels={max_raw_pixels}")
            images.append(load_image(path))
        except (OSError, SyntaxError, Image.DecompressionBombError) as e:
            raise BadPrompt(f"row {example.row_id}: {path}: {e.__class__.__name__}: {e}") from None
    return images


def resolve_split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The parquet file(s) holding ``split`` under ``data_dir``, or the file ``data_dir`` itself.

    Looks for ``{split}.parquet``, then HF-style shards ``{split}-*.parquet`` and
    ``data/{split}-*.parquet``, then ``{split}/*.parquet``. Raises ``FileNotFoundError`` naming
    every path tried.
    """
    root = Path(data_dir)
    if root.is_file():
        return [root]
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    candidates: list[tuple[str, list[Path]]] = [
        (str(root / f"{split}.parquet"), [root / f"{split}.parquet"]),
        (str(root / f"{split}-*.parquet"), sorted(root.glob(f"{split}-*.parquet"))),
        (str(root / "data" / f"{split}-*.parquet"), sorted((root / "data").glob(f"{split}-*.parquet"))),
        (str(root / split / "*.parquet"), sorted((root / split).glob("*.parquet"))),
    ]
    for _, files in candidates:
        found = [f for f in files if f.is_file()]
        if found:
            return found
    tried = ", ".join(pattern for pattern, _ in candidates)
    raise FileNotFoundError(f"no parquet file for split {split!r} in {root} (tried {tried})")


def build_messages(problem: str, num_images: int, format_prompt: str | None) -> list[dict[str, Any]]:
    """Chat messages for a question whose text marks each image with ``<image>``.

    The text is split around the placeholders, so image items land where the dataset put them;
    empty text pieces are dropped. The format prompt goes after the question's last text,
    separated by one space (as EasyR1/PAPO's ``{{ content | trim }} <format prompt>``).
    Raises ``ValueError`` when the placeholder count differs from ``num_images``.
    """
    pieces = problem.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != num_images:
        raise ValueError(
            f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)"
        )
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece})
    if format_prompt:
        if content and content[-1]["type"] == "text":
            last = content[-1]["text"].rstrip()
            content[-1] = {"type": "text", "text": f"{last} {format_prompt}"}
        else:
            content.append({"type": "text", "text": format_prompt})
    # Text directly after an image keeps no leading whitespace: the chat template already
    # closes the image with <|vision_end|>.
    for i, item in enumerate(content):
        if item["type"] == "text" and i > 0 and content[i - 1]["type"] == "image":
            content[i] = {"type": "text", "text": item["text"].lstrip()}
    return [{"role": "user", "content": content}]


def _row_id(value: Any) -> int | None:
    """The id column's value as an int: integers as they are, strings (many HF datasets use
    string ids) as a stable 63-bit hash, None for a null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    text = str(value)
    if text.lstrip("-").isdigit():
        return int(text)
    # Python's hash() is salted per process; the row id must be the same in every run.
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _image_entries(value: Any) -> list[str] | None:
    """The image column's value as a list of path strings, or None if it has another shape."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _check_image(path: Path, verify: bool) -> str | None:
    """None if the image looks usable, else the skip reason."""
    if not path.is_file():
        return SKIP_MISSING_IMAGE
    try:
        with Image.open(path) as img:
            if verify:
                img.load()  # full decode: catches truncated files, costs a decode per image
    except Exception:  # PIL raises several unrelated types for broken files
        return SKIP_UNREADABLE_IMAGE
    return None


def load_split(
    data_dir: str | Path,
    split: str = "train",
    *,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    image_key: str | None = "images",
    id_key: str = "id",
    format_prompt: str | None = PAPO_FORMAT_PROMPT,
    image_root: str | Path | None = None,
    verify_images: bool = False,
) -> LoadedSplit:
    """Read one split of a local parquet dataset into :class:`PromptExample` objects.

    ``data_dir`` is the dataset folder (or one parquet file); relative image paths resolve
    against ``image_root`` (default: ``data_dir``, or the parquet file's folder when a file is
    given). ``format_prompt`` is appended to each question; ``None`` leaves questions as they
    are. ``id_key`` names the row-id column; without that column a row's id is its position.
    ``image_key=None`` reads a text-only dataset (no image column needed).

    Only the header of each image is read, which catches missing and non-image files; pass
    ``verify_images=True`` to decode every image (catches truncated files, costs a decode each).

    Raises ``FileNotFoundError`` for a missing folder/split (naming the paths) and
    :class:`DataError` for a missing column (naming it and listing those present). Bad rows are
    skipped, counted by reason in ``LoadedSplit.skipped`` and summarised in one warning line.
    """
    files = resolve_split_files(data_dir, split)
    root = Path(image_root) if image_root is not None else (
        Path(data_dir) if Path(data_dir).is_dir() else Path(data_dir).parent
    )
    root = root.resolve()

    examples: list[PromptExample] = []
    skipped: Counter[str] = Counter()
    num_rows = 0
    for file in files:
        schema_names = pq.read_schema(file).names
        for key in (prompt_key, answer_key, image_key):
            if key is not None and key not in schema_names:
                raise DataError(
                    f"column {key!r} not found in {file}; columns present: {', '.join(schema_names)}"
                )
        has_ids = id_key in schema_names
        columns = list(dict.fromkeys(k for k in (prompt_key, answer_key, image_key, id_key if has_ids else None) if k))
        # Only the needed columns are read; pyarrow -> Python lists once per column is far
        # cheaper than per-row access.
        table = pq.read_table(file, columns=columns)
        data = {name: table.column(name).to_pylist() for name in columns}
        n = table.num_rows
        for i in range(n):
            row_id = _row_id(data[id_key][i]) if has_ids else num_rows + i
            if row_id is None:
                skipped[SKIP_BAD_ID] += 1
                continue
            reason = _row_problem(
                data[prompt_key][i],
                data[answer_key][i],
                data[image_key][i] if image_key is not None else None,
                root,
                format_prompt,
                verify_images,
            )
            if isinstance(reason, str):
                skipped[reason] += 1
                continue
            messages, paths, answer = reason
            examples.append(
                PromptExample(row_id=row_id, messages=messages, image_paths=paths, answer=answer)
            )
        num_rows += n

    if skipped:
        logger.warning(
            "skipped %d of %d rows of split %r in %s: %s",
            sum(skipped.values()),
            num_rows,
            split,
            files[0] if len(files) == 1 else f"{files[0].parent} ({len(files)} files)",
            ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())),
        )
    return LoadedSplit(source=files[0], examples=examples, num_rows=num_rows, skipped=dict(skipped))


def _row_problem(
    problem: Any,
    answer: Any,
    images: Any,
    root: Path,
    format_prompt: str | None,
    verify_images: bool,
) -> str | tuple[list[dict[str, Any]], list[Path], str]:
    """A skip reason, or the row's (messages, absolute image paths, answer)."""
    if answer is None or not str(answer).strip():
        return SKIP_EMPTY_ANSWER
    if not isinstance(problem, str) or not problem.strip():
        return SKIP_BAD_PROBLEM
    entries = _image_entries(images)
    if entries is None:
        return SKIP_BAD_IMAGE_ENTRY
    if problem.count(IMAGE_PLACEHOLDER) != len(entries):
        return SKIP_PLACEHOLDER_MISMATCH
    paths = [p if p.is_absolute() else root / p for p in map(Path, entries)]
    for path in paths:
        bad = _check_image(path, verify_images)
        if bad is not None:
            return bad
    # Placeholder count was checked above, so build_messages cannot raise here.
    return build_messages(problem, len(paths), format_prompt), paths, str(answer).strip()
