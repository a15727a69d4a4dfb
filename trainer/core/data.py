"""Datasets for training and evaluation: reading prompts and formatting them as chat messages.

This module owns the dataset layouts the trainer reads and the prompt formatting applied to them.

**Sources** (``data.train_path`` / ``data.val_path``, see :func:`load_split`):

* a parquet file, or a folder holding ``{split}.parquet`` / HF-style shards (the layout
  ``trainer/demo/`` writes);
* a jsonl file (one JSON object per line), or a folder holding ``{split}.jsonl``;
* a ``datasets.save_to_disk`` folder (one ``Dataset``, or a ``DatasetDict`` with one subfolder
  per split), read straight from its Arrow files with pyarrow, so the ``datasets`` package is
  not needed for it;
* a hub dataset id ``owner/name`` (optionally ``owner/name@split``), read through
  ``datasets.load_dataset`` (needs the ``datasets`` package; a clear error says so otherwise).

**Row layout** (PAPO/EasyR1; every column name configurable): ``problem`` (text with one
``<image>`` placeholder per image), ``answer``, ``images`` (a list whose items are file paths
relative to the dataset file's folder / the dataset folder, ``{bytes, path}`` dicts as HF
``Image`` features store them, or raw encoded bytes), optional pre-masked images (same shapes, one
per image; the ``precomputed`` corruption strategy uses them) and an optional ``id`` column.

Each kept row becomes a :class:`PromptExample`: chat messages whose image items sit where the
placeholders were, the images as absolute ``Path`` objects or their encoded bytes (never decoded
at load time: :func:`prompt_images` decodes them when a rollout needs them), the answer and a
stable row id (the corruption service seeds each prompt's mask from it, so it must not depend on
load order).

**Prompt formatting**: either the historical ``format_prompt`` text appended to the question, or
a Jinja template rendered with ``content`` = the question (EasyR1's ``format_prompt`` files;
``configs/templates/papo_math.jinja`` is PAPO's math-perception prompt).

**Bad rows** (missing/unreadable image, placeholder/image count mismatch, empty answer, prompt
longer than ``data.max_prompt_length`` tokens after image expansion, ...) are skipped and
counted by reason, with the first few row ids logged; they never crash a load and never yield a
sample with the wrong images.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)

#: The prompt PAPO appends to every question (docs/algorithm.md, "prompt").
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
SKIP_MASKED_MISMATCH = "masked_image_mismatch"
SKIP_BAD_JSON = "bad_json_line"
SKIP_OVERLONG = "overlong_prompt"
SKIP_REASONS = (
    SKIP_MISSING_IMAGE,
    SKIP_UNREADABLE_IMAGE,
    SKIP_PLACEHOLDER_MISMATCH,
    SKIP_EMPTY_ANSWER,
    SKIP_BAD_PROBLEM,
    SKIP_BAD_IMAGE_ENTRY,
    SKIP_BAD_ID,
    SKIP_MASKED_MISMATCH,
    SKIP_BAD_JSON,
    SKIP_OVERLONG,
)

#: How many skipped row ids per reason are kept (``LoadedSplit.skipped_row_ids``) and logged.
SKIP_EXAMPLES = 5

#: The suffix of prompt-template files; a bare name (``papo_math``) is looked up in ``configs/templates``.
TEMPLATE_SUFFIX = ".jinja"

# owner/name or owner/name@split: what the hub accepts as a dataset id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
# A missing "data/train.parquet" is a typo'd local path, not a hub id.
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".yaml", ".yml")

#: One image of a prompt: an absolute file path, or the encoded bytes stored in the dataset.
#: Both are what ``services.corruption``'s ``precomputed`` strategy and :func:`prompt_images`
#: accept, and neither is decoded until a rollout needs it.
ImageItem = Path | bytes


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
    images: list[ImageItem] = []
    """One per image item, in the same order: an absolute ``Path`` or the encoded image bytes
    (PNG/JPEG... as stored in the dataset; decoded by :func:`prompt_images`)."""
    answer: str
    """The bare ground truth (e.g. ``red``)."""
    images_masked: list[ImageItem] | None = None
    """Pre-masked images (the ``data.masked_image_key`` column), one per image, same kinds as
    ``images``; ``None`` when the dataset has none. The ``precomputed`` corruption strategy
    takes them as they are (paths and bytes are both accepted there)."""

    @model_validator(mode="before")
    @classmethod
    def _accept_image_paths(cls, values: Any) -> Any:
        # ``image_paths=`` was the field name while only image files were supported; callers
        # that build examples from files keep working.
        if isinstance(values, dict) and "image_paths" in values:
            values = dict(values)
            paths = values.pop("image_paths")
            if "images" in values:
                raise ValueError("give images or image_paths, not both")
            values["images"] = [Path(p) for p in paths]
        return values

    @property
    def image_paths(self) -> list[Path]:
        """The image files, for datasets whose images all are files (the demo's layout).

        Raises ``ValueError`` when an image is stored as bytes in the dataset: use
        :func:`prompt_images`, which handles both kinds.
        """
        if not all(isinstance(im, Path) for im in self.images):
            raise ValueError(
                f"row {self.row_id} has images stored in the dataset, not files; "
                "use trainer.core.data.prompt_images(example, max_raw_pixels)"
            )
        return list(self.images)  # type: ignore[arg-type]

    def __repr_args__(self) -> Any:
        # Encoded images would flood logs and tracebacks: show their sizes instead.
        for name, value in super().__repr_args__():
            if name in ("images", "images_masked") and value is not None:
                value = [im if isinstance(im, Path) else f"<{len(im)} bytes>" for im in value]
            yield name, value


class LoadedSplit(BaseModel):
    """The examples of one split plus what was skipped on the way."""

    model_config = ConfigDict(frozen=True)

    source: Path | str
    """The file or folder the split was read from (the first file when the split has shards),
    or the hub id."""
    examples: list[PromptExample]
    num_rows: int
    """Rows read, kept and skipped."""
    skipped: dict[str, int]
    """Skipped rows by reason (see ``SKIP_REASONS``); empty when nothing was skipped."""
    skipped_row_ids: dict[str, list[int]] = {}
    """The first ``SKIP_EXAMPLES`` row ids skipped for each reason (positions when a row has no
    usable id)."""

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def __len__(self) -> int:
        return len(self.examples)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """Decode one image file as an RGB ``PIL.Image`` (fully loaded, file handle closed)."""
    with Image.open(path) as img:
        # convert() returns a new, loaded image even when the file already is RGB, so nothing
        # refers to the closed file afterwards.
        return img.convert("RGB")


def _open(item: ImageItem) -> Image.Image:
    """Open (header only) an image file or encoded bytes."""
    return Image.open(io.BytesIO(item) if isinstance(item, bytes) else item)


def _describe(item: ImageItem, index: int) -> str:
    return str(item) if isinstance(item, Path) else f"image {index} ({len(item)} bytes stored in the dataset)"


class BadPrompt(ValueError):
    """A prompt whose images cannot be used (missing, unreadable, above data.max_raw_pixels)."""


def decode_images(items: Sequence[ImageItem], row_id: int, max_raw_pixels: int) -> list[Image.Image]:
    """Decode images (paths or encoded bytes) as RGB, checking each header against
    ``max_raw_pixels`` before decoding; raises :class:`BadPrompt` naming the row and image."""
    images = []
    for index, item in enumerate(items):
        what = _describe(item, index)
        try:
            with _open(item) as im:
                w, h = im.size
                if w * h > max_raw_pixels:
                    raise BadPrompt(f"row {row_id}: {what} has {w}x{h} pixels > data.max_raw_pixels={max_raw_pixels}")
                images.append(im.convert("RGB"))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            if isinstance(e, BadPrompt):
                raise
            raise BadPrompt(f"row {row_id}: {what}: {e.__class__.__name__}: {e}") from None
    return images


def prompt_images(example: PromptExample, max_raw_pixels: int) -> list[Image.Image]:
    """Decode a prompt's images (files or bytes), checking each header against ``max_raw_pixels``
    before decoding. Raises :class:`BadPrompt` for a missing file or undecodable data."""
    return decode_images(example.images, example.row_id, max_raw_pixels)


def prompt_masked_images(example: PromptExample, max_raw_pixels: int) -> list[Image.Image] | None:
    """The decoded pre-masked images of a prompt, or ``None`` when the dataset has none."""
    if example.images_masked is None:
        return None
    return decode_images(example.images_masked, example.row_id, max_raw_pixels)


def _check_image(item: ImageItem, verify: bool) -> str | tuple[int, int]:
    """The image's (width, height) from its header if it looks usable, else the skip reason."""
    try:
        if isinstance(item, Path) and not item.is_file():
            return SKIP_MISSING_IMAGE
    except OSError:  # e.g. a name too long to be a path (base64 text in a path column)
        return SKIP_MISSING_IMAGE
    try:
        with _open(item) as img:
            if verify:
                img.load()  # full decode: catches truncated files, costs a decode per image
            return img.size
    except Exception:  # PIL raises several unrelated types for broken files
        return SKIP_UNREADABLE_IMAGE


def _image_items(value: Any, root: Path | None) -> list[ImageItem] | None:
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


# --------------------------------------------------------------------------------------------
# Prompt formatting
# --------------------------------------------------------------------------------------------


def templates_dir() -> Path:
    """The shipped prompt templates (``configs/templates``)."""
    import configs  # the shipped-configs package; imported lazily like trainer.core.config does

    return Path(configs.__file__).parent / "templates"


def resolve_template_path(spec: str | Path) -> Path:
    """``papo_math`` -> the shipped ``configs/templates/papo_math.jinja``; a path is returned as it
    is. Raises :class:`DataError` naming the shipped templates when neither exists."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = templates_dir() / (p.name if p.suffix == TEMPLATE_SUFFIX else f"{p.name}{TEMPLATE_SUFFIX}")
    if len(p.parts) == 1 and shipped.is_file():
        return shipped
    names = ", ".join(sorted(q.stem for q in templates_dir().glob(f"*{TEMPLATE_SUFFIX}")))
    raise DataError(f"prompt template {str(spec)!r}: no such file, and not a shipped template ({names})")


@functools.lru_cache(maxsize=16)
def _compile_template(path: str, mtime_ns: int) -> Any:
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed like HF chat templates: a template file from elsewhere cannot reach Python
    # internals. StrictUndefined turns a typo ({{ contnet }}) into an error, not empty text.
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
    try:
        return env.from_string(Path(path).read_text())
    except TemplateSyntaxError as e:
        raise DataError(f"prompt template {path}: line {e.lineno}: {e.message}") from None


def load_prompt_template(spec: str | Path) -> Any:
    """The compiled Jinja template named by ``spec`` (a shipped name or a file); validated by
    rendering a sample question, so a broken template fails before any data is read."""
    path = resolve_template_path(spec)
    template = _compile_template(str(path.resolve()), path.stat().st_mtime_ns)
    try:
        template.render(content=f"{IMAGE_PLACEHOLDER}What is shown?")
    except Exception as e:  # jinja raises UndefinedError, TypeError... from user templates
        raise DataError(f"prompt template {path}: rendering failed: {e.__class__.__name__}: {e}") from None
    return template


class PromptFormatter:
    """Turns a question (text with ``<image>`` placeholders) into chat messages.

    With a ``template`` (a Jinja file rendered with ``content`` = the question, EasyR1's
    convention) the rendered text is the whole user turn; otherwise ``format_prompt`` (or
    nothing, when ``None``) is appended to the question by :func:`build_messages`.
    """

    def __init__(self, format_prompt: str | None = PAPO_FORMAT_PROMPT, template: str | Path | None = None):
        self.format_prompt = format_prompt
        self.template = load_prompt_template(template) if template is not None else None

    def messages(self, problem: str, num_images: int) -> list[dict[str, Any]]:
        """Raises ``ValueError`` when the placeholder count differs from ``num_images``."""
        if self.template is None:
            return build_messages(problem, num_images, self.format_prompt)
        # Checked before rendering too, so a template that adds text cannot mask a bad row.
        if problem.count(IMAGE_PLACEHOLDER) != num_images:
            raise ValueError(
                f"{problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)"
            )
        return build_messages(self.template.render(content=problem), num_images, None)


def build_messages(problem: str, num_images: int, format_prompt: str | None) -> list[dict[str, Any]]:
    """Chat messages for a question whose text marks each image with ``<image>``.

    The text is split around the placeholders, so image items land where the dataset put them;
    empty text pieces are dropped. The format prompt goes after the question's last text,
    separated by one space (as EasyR1/PAPO's ``{{ content | trim }} <format prompt>``).
    Raises ``ValueError`` when the placeholder count differs from ``num_images``.
    """
    pieces = problem.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != num_images:
        raise ValueError(f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
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


# --------------------------------------------------------------------------------------------
# Sources: every layout is read into columns (name -> list of Python values)
# --------------------------------------------------------------------------------------------


class _Chunk:
    """Rows of one file (or one hub split) as columns, plus where relative image paths resolve."""

    def __init__(
        self,
        origin: Path | str,
        columns: dict[str, list[Any]],
        names: list[str],
        num_rows: int,
        bad_rows: list[int] | None = None,
    ):
        self.origin = origin
        self.columns = columns
        self.names = names  # every column the source has, for error messages
        self.num_rows = num_rows
        self.bad_rows = set(bad_rows or ())  # positions that could not be parsed (jsonl)


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` or ``owner/name@split`` that is not a local path."""
    return (
        bool(_HUB_ID.match(text))
        and not Path(text).exists()
        and Path(text.partition("@")[0]).suffix.lower() not in _FILE_SUFFIXES
    )


def _jsonl_files(root: Path, split: str) -> list[tuple[str, list[Path]]]:
    return [
        (str(root / f"{split}.jsonl"), [root / f"{split}.jsonl"]),
        (str(root / f"{split}.json"), [root / f"{split}.json"]),
        (str(root / f"{split}-*.jsonl"), sorted(root.glob(f"{split}-*.jsonl"))),
        (str(root / "data" / f"{split}-*.jsonl"), sorted((root / "data").glob(f"{split}-*.jsonl"))),
    ]


def resolve_split_files(data_dir: str | Path, split: str) -> list[Path]:
    """The file(s) holding ``split`` under ``data_dir``, or the file ``data_dir`` itself.

    Looks for ``{split}.parquet``, HF-style shards ``{split}-*.parquet`` and
    ``data/{split}-*.parquet``, ``{split}/*.parquet``, then the same for jsonl. Raises
    ``FileNotFoundError`` naming every path tried.
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
        *_jsonl_files(root, split),
    ]
    for _, files in candidates:
        found = [f for f in files if f.is_file()]
        if found:
            return found
    tried = ", ".join(pattern for pattern, _ in candidates)
    raise FileNotFoundError(f"no parquet or jsonl file for split {split!r} in {root} (tried {tried})")


def _table_columns(table: pa.Table, wanted: Sequence[str]) -> dict[str, list[Any]]:
    # pyarrow -> Python lists once per column is far cheaper than per-row access.
    return {name: table.column(name).to_pylist() for name in wanted if name in table.column_names}


def _read_parquet(file: Path, wanted: Sequence[str]) -> _Chunk:
    names = pq.read_schema(file).names
    # Only the needed columns are read: the others may hold large unused data.
    table = pq.read_table(file, columns=[c for c in wanted if c in names])
    return _Chunk(file, _table_columns(table, wanted), names, table.num_rows)


def _read_jsonl(file: Path, wanted: Sequence[str]) -> _Chunk:
    columns: dict[str, list[Any]] = {name: [] for name in wanted}
    names: dict[str, None] = {}
    bad: list[int] = []
    n = 0
    with open(file, encoding="utf-8") as fh:
        text = fh.read()
    if file.suffix == ".json" and text.lstrip().startswith("["):
        # A JSON array of records (what some exporters write for .json).
        try:
            records: list[Any] = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{file} is not valid JSON: {e}") from None
        lines: list[Any] = records
    else:
        lines = [line for line in text.splitlines() if line.strip()]
    for line in lines:
        if isinstance(line, str):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
        else:
            record = line
        if not isinstance(record, dict):
            bad.append(n)
            record = {}
        names.update(dict.fromkeys(record))
        for name in wanted:
            columns[name].append(record.get(name))
        n += 1
    present = {name: col for name, col in columns.items() if name in names}
    return _Chunk(file, present, list(names), n, bad)


def _read_ipc_files(folder: Path, entries: Sequence[Mapping[str, str]]) -> pa.Table:
    tables = []
    for entry in entries:
        with pa.memory_map(str(folder / entry["filename"]), "rb") as src:
            tables.append(pa.ipc.open_stream(src).read_all())
    if not tables:
        raise DataError(f"{folder}/state.json lists no data files")
    return pa.concat_tables(tables)


def is_saved_dataset(folder: Path) -> bool:
    """A ``datasets.save_to_disk`` folder (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _read_saved_dataset(folder: Path, split: str, wanted: Sequence[str]) -> _Chunk:
    """A ``save_to_disk`` folder read with pyarrow: ``state.json`` lists the Arrow stream files
    (and an optional indices mapping left by select/shuffle); a DatasetDict has one such folder
    per split, listed in ``dataset_dict.json``."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if split not in splits:
            raise FileNotFoundError(
                f"split {split!r} not in the saved DatasetDict {folder} (splits: {', '.join(splits)})"
            )
        folder = folder / split
    state = json.loads((folder / "state.json").read_text())
    saved_split = state.get("_split")
    if saved_split and saved_split != split and not (folder.parent / "dataset_dict.json").is_file():
        # A single saved Dataset holds one split whatever name is asked for: say so, since
        # train and validation would then be the same rows.
        logger.warning("%s holds the saved split %r; using it for split %r", folder, saved_split, split)
    table = _read_ipc_files(folder, state.get("_data_files") or [])
    if state.get("_indices_data_files"):
        indices = _read_ipc_files(folder, state["_indices_data_files"]).column(0)
        table = table.take(indices)
    return _Chunk(folder, _table_columns(table, wanted), table.column_names, table.num_rows)


def _read_hub(dataset_id: str, split: str, wanted: Sequence[str]) -> _Chunk:
    """A hub dataset through ``datasets.load_dataset`` (downloads once into the HF cache)."""
    name, _, at_split = dataset_id.partition("@")
    split = at_split or split
    try:
        import datasets  # optional: only hub ids need it
    except ImportError:
        raise DataError(
            f"{dataset_id!r} is no local file or folder and looks like a hub dataset id; loading hub datasets "
            "needs the `datasets` package (pip install datasets), or download its parquet files and point the "
            "path at them"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown split...: say which dataset and split
        raise DataError(f"hub dataset {name!r} split {split!r}: {e.__class__.__name__}: {e}") from None
    # The arrow format returns the stored columns without decoding: Image features stay
    # {bytes, path} structs, decoded later by prompt_images like any other bytes.
    table = ds.with_format("arrow")[:]
    return _Chunk(dataset_id, _table_columns(table, wanted), table.column_names, table.num_rows)


def _read_chunks(data_path: str | Path, split: str, wanted: Sequence[str]) -> tuple[list[_Chunk], Path | None]:
    """Every chunk of the split, and the folder relative image paths resolve against."""
    text = str(data_path)
    path = Path(data_path).expanduser()
    if not path.exists() and looks_like_hub_id(text):
        return [_read_hub(text, split, wanted)], None
    if path.is_dir() and is_saved_dataset(path):
        return [_read_saved_dataset(path, split, wanted)], path.resolve()
    files = resolve_split_files(path, split)
    root = (path if path.is_dir() else path.parent).resolve()
    chunks = []
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".parquet":
            chunks.append(_read_parquet(file, wanted))
        elif suffix in (".jsonl", ".json"):
            chunks.append(_read_jsonl(file, wanted))
        else:
            raise DataError(f"{file}: unsupported dataset file type {suffix!r} (parquet, jsonl or json)")
    return chunks, root


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _row_id(value: Any) -> int | None:
    """The id column's value as an int: integers as they are, strings (many HF datasets use
    string ids) as a stable 63-bit hash, None for a null."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        text = str(value)
    else:
        text = str(value)
        if text.isdigit():
            return int(text)
    if isinstance(value, int) and value >= 0:
        return value
    # Negative ids and strings: a stable 63-bit hash (mask seeds need non-negative ids; Python's
    # hash() is salted per process, and the row id must be the same in every run).
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def load_split(
    data_dir: str | Path,
    split: str = "train",
    *,
    prompt_key: str = "problem",
    answer_key: str = "answer",
    image_key: str | None = "images",
    masked_image_key: str | None = None,
    id_key: str = "id",
    format_prompt: str | None = PAPO_FORMAT_PROMPT,
    prompt_template: str | Path | None = None,
    image_root: str | Path | None = None,
    verify_images: bool = False,
) -> LoadedSplit:
    """Read one split of a dataset (parquet, jsonl, ``save_to_disk`` folder or hub id; see the
    module docstring) into :class:`PromptExample` objects.

    Relative image paths resolve against ``image_root`` (default: the dataset folder, or the
    file's folder when a file is given; for a hub id, the current directory). ``format_prompt``
    is appended to each question (``None`` leaves questions as they are); ``prompt_template`` (a
    shipped template name such as ``papo_math`` or a ``.jinja`` file), when given, replaces it. ``id_key``
    names the row-id column; without that column a row's id is its position. ``image_key=None``
    reads a text-only dataset. ``masked_image_key`` names a column of pre-masked images, which
    must then exist (one per image; ``PromptExample.images_masked``).

    Only the header of each image is read, which catches missing and non-image files and
    undecodable bytes; pass ``verify_images=True`` to decode every image (catches truncated
    data, costs a decode each).

    Raises ``FileNotFoundError`` for a missing folder/split (naming the paths) and
    :class:`DataError` for a missing column (naming it and listing those present), an unreadable
    source, or a split whose every row was skipped. Bad rows are skipped, counted by reason in
    ``LoadedSplit.skipped`` (first row ids in ``skipped_row_ids``) and summarised in one warning.
    """
    # The template holds the whole user turn, so it replaces the appended format prompt (the
    # job config refuses both set explicitly; see DataConfig).
    formatter = PromptFormatter(None if prompt_template is not None else format_prompt, prompt_template)
    wanted = list(dict.fromkeys(k for k in (prompt_key, answer_key, image_key, masked_image_key, id_key) if k))
    chunks, default_root = _read_chunks(data_dir, split, wanted)
    root = Path(image_root).expanduser().resolve() if image_root is not None else default_root

    examples: list[PromptExample] = []
    skipped: Counter[str] = Counter()
    skipped_ids: dict[str, list[int]] = defaultdict(list)
    num_rows = 0
    for chunk in chunks:
        for key in (prompt_key, answer_key, image_key, masked_image_key):
            if key is not None and key not in chunk.columns:
                raise DataError(
                    f"column {key!r} not found in {chunk.origin}; columns present: {', '.join(chunk.names)}"
                )
        cols = chunk.columns
        has_ids = id_key in cols
        for i in range(chunk.num_rows):
            position = num_rows + i
            reason: Any
            if i in chunk.bad_rows:
                row_id, reason = position, SKIP_BAD_JSON
            else:
                row_id = _row_id(cols[id_key][i]) if has_ids else position
                if row_id is None:
                    row_id, reason = position, SKIP_BAD_ID
                else:
                    reason = _make_example(
                        row_id,
                        cols[prompt_key][i],
                        cols[answer_key][i],
                        cols[image_key][i] if image_key is not None else None,
                        cols[masked_image_key][i] if masked_image_key is not None else None,
                        root=root,
                        formatter=formatter,
                        verify_images=verify_images,
                        has_masked=masked_image_key is not None,
                    )
            if isinstance(reason, str):
                skipped[reason] += 1
                if len(skipped_ids[reason]) < SKIP_EXAMPLES:
                    skipped_ids[reason].append(row_id)
                continue
            examples.append(reason)
        num_rows += chunk.num_rows

    origin = chunks[0].origin if len(chunks) == 1 else f"{Path(chunks[0].origin).parent} ({len(chunks)} files)"
    if skipped:
        logger.warning(
            "skipped %d of %d rows of split %r in %s: %s",
            sum(skipped.values()),
            num_rows,
            split,
            origin,
            _skip_summary(skipped, skipped_ids),
        )
    if num_rows and not examples:
        raise DataError(f"every row of split {split!r} in {origin} was skipped: {_skip_summary(skipped, skipped_ids)}")
    return LoadedSplit(
        source=chunks[0].origin,
        examples=examples,
        num_rows=num_rows,
        skipped=dict(skipped),
        skipped_row_ids={k: list(v) for k, v in skipped_ids.items()},
    )


def _skip_summary(skipped: Mapping[str, int], ids: Mapping[str, Sequence[int]]) -> str:
    parts = []
    for reason, count in sorted(skipped.items()):
        shown = list(ids.get(reason, []))
        more = ", ..." if count > len(shown) else ""
        parts.append(f"{reason}={count} (row ids {', '.join(map(str, shown))}{more})")
    return ", ".join(parts)


def _make_example(
    row_id: int,
    problem: Any,
    answer: Any,
    images: Any,
    masked: Any,
    *,
    root: Path | None,
    formatter: PromptFormatter,
    verify_images: bool,
    has_masked: bool,
) -> str | PromptExample:
    """A skip reason, or the row's example."""
    if answer is None or not str(answer).strip():
        return SKIP_EMPTY_ANSWER
    if not isinstance(problem, str) or not problem.strip():
        return SKIP_BAD_PROBLEM
    items = _image_items(images, root)
    if items is None:
        return SKIP_BAD_IMAGE_ENTRY
    if problem.count(IMAGE_PLACEHOLDER) != len(items):
        return SKIP_PLACEHOLDER_MISMATCH
    masked_items = None
    if has_masked:
        masked_items = _image_items(masked, root)
        if masked_items is None:
            return SKIP_BAD_IMAGE_ENTRY
        if len(masked_items) != len(items):
            return SKIP_MASKED_MISMATCH
    sizes = []
    for item in (*items, *(masked_items or ())):
        size = _check_image(item, verify_images)
        if isinstance(size, str):
            return size
        sizes.append(size)
    if masked_items is not None and sizes[: len(items)] != sizes[len(items) :]:
        # A pre-masked image of another size would change the image-token count of the masked
        # pass (and the corruption service refuses it): not a usable pair.
        return SKIP_MASKED_MISMATCH
    try:
        messages = formatter.messages(problem, len(items))
    except ValueError:  # a template that adds or removes placeholders
        return SKIP_PLACEHOLDER_MISMATCH
    return PromptExample(
        row_id=row_id, messages=messages, images=items, answer=str(answer).strip(), images_masked=masked_items
    )


# --------------------------------------------------------------------------------------------
# Prompt length (needs the model's processor; optional step)
# --------------------------------------------------------------------------------------------


def image_token_count(image_processor: Any, height: int, width: int, *, min_pixels: int, max_pixels: int) -> int:
    """Tokens one image of ``height`` x ``width`` raw pixels becomes in a Qwen2-VL-family prompt.

    The processor resizes the image to a multiple of patch_size * merge_size within
    [min_pixels, max_pixels] (``smart_resize``), cuts it into patch_size patches and merges
    merge_size^2 of them per token. Computed from the size alone, exactly as vLLM does
    (``get_number_of_image_patches``), without running the processor on pixels.
    """
    merge = int(getattr(image_processor, "merge_size", 2))
    kwargs = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    if hasattr(image_processor, "get_number_of_image_patches"):
        patches = image_processor.get_number_of_image_patches(height, width, kwargs)
    else:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        patch = int(image_processor.patch_size)
        h, w = smart_resize(height, width, patch * merge, min_pixels=min_pixels, max_pixels=max_pixels)
        patches = (h // patch) * (w // patch)
    return int(patches) // (merge * merge)


def prompt_lengths(
    examples: Sequence[PromptExample], processor: Any, *, min_pixels: int, max_pixels: int, batch_size: int = 256
) -> list[int | None]:
    """Prompt tokens of each example after image expansion, as the engine will see them
    (chat template with the generation prompt); ``None`` when an image header cannot be read."""
    tokenizer = getattr(processor, "tokenizer", processor)
    image_processor = getattr(processor, "image_processor", None)
    pad_token = getattr(processor, "image_token", None)
    pad_id = tokenizer.convert_tokens_to_ids(pad_token) if pad_token is not None else None
    out: list[int | None] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts = [processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False) for ex in batch]
        ids = tokenizer(texts)["input_ids"]
        for ex, row_ids in zip(batch, ids):
            extra = 0
            try:
                for item in ex.images:
                    with _open(item) as im:
                        w, h = im.size
                    extra += image_token_count(image_processor, h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            except (OSError, SyntaxError, ValueError):
                out.append(None)
                continue
            # The template writes one pad token per image; the processor repeats it per image token.
            pads = row_ids.count(pad_id) if pad_id is not None else len(ex.images)
            out.append(len(row_ids) - pads + extra)
    return out


def filter_overlong(
    split: LoadedSplit, processor: Any, max_prompt_length: int, *, min_pixels: int, max_pixels: int
) -> LoadedSplit:
    """``split`` without the prompts longer than ``max_prompt_length`` tokens after image
    expansion (EasyR1's ``filter_overlong_prompts``), counted as ``overlong_prompt``; a prompt
    whose image header became unreadable since loading is counted as ``unreadable_image``."""
    lengths = prompt_lengths(split.examples, processor, min_pixels=min_pixels, max_pixels=max_pixels)
    kept: list[PromptExample] = []
    skipped = Counter(split.skipped)
    ids = {k: list(v) for k, v in split.skipped_row_ids.items()}
    for ex, n in zip(split.examples, lengths):
        if n is not None and n <= max_prompt_length:
            kept.append(ex)
            continue
        reason = SKIP_UNREADABLE_IMAGE if n is None else SKIP_OVERLONG
        skipped[reason] += 1
        if len(ids.setdefault(reason, [])) < SKIP_EXAMPLES:
            ids[reason].append(ex.row_id)
    dropped = len(split.examples) - len(kept)
    if dropped:
        logger.warning(
            "dropped %d of %d prompts of %s longer than data.max_prompt_length=%d tokens: %s",
            dropped,
            len(split.examples),
            split.source,
            max_prompt_length,
            _skip_summary(
                {k: skipped[k] - split.skipped.get(k, 0) for k in skipped if skipped[k] != split.skipped.get(k, 0)}, ids
            ),
        )
    if split.examples and not kept:
        raise DataError(
            f"every prompt of {split.source} is longer than data.max_prompt_length={max_prompt_length} "
            f"tokens (shortest: {min((n for n in lengths if n is not None), default='n/a')})"
        )
    return split.model_copy(update={"examples": kept, "skipped": dict(skipped), "skipped_row_ids": ids})


@functools.lru_cache(maxsize=2)
def _cached_processor(path: str, min_pixels: int, max_pixels: int, trust_remote_code: bool) -> Any:
    from trainer.core.modeling import load_processor  # torch/transformers: only when filtering

    return load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels, trust_remote_code=trust_remote_code)


def load_split_from_config(
    data: Any, path: str | Path, split: str, *, model: Any = None, processor: Any = None
) -> LoadedSplit:
    """:func:`load_split` with a job's ``data`` section (``trainer.core.config.DataConfig``), then the
    ``data.max_prompt_length`` filter when it is set. That filter needs the model's processor:
    ``processor`` if given, else loaded (once per process) from ``model.path`` with the job's
    pixel limits (``model`` is the job's ``ModelConfig``)."""
    loaded = load_split(
        path,
        split,
        prompt_key=data.prompt_key,
        answer_key=data.answer_key,
        image_key=data.image_key,
        masked_image_key=data.masked_image_key,
        id_key=data.id_key,
        format_prompt=data.format_prompt,
        prompt_template=data.prompt_template,
        image_root=data.image_root,
        verify_images=data.verify_images,
    )
    if data.max_prompt_length is None:
        return loaded
    if model is None:
        raise ValueError("data.max_prompt_length needs the model's processor: pass model= (the job's model section)")
    if processor is None:
        processor = _cached_processor(
            str(model.path), model.min_pixels, model.max_pixels, bool(getattr(model, "trust_remote_code", False))
        )
    return filter_overlong(
        loaded, processor, data.max_prompt_length, min_pixels=model.min_pixels, max_pixels=model.max_pixels
    )


__all__ = [
    "BadPrompt",
    "DataError",
    "ImageItem",
    "LoadedSplit",
    "PAPO_FORMAT_PROMPT",
    "PromptExample",
    "PromptFormatter",
    "build_messages",
    "decode_images",
    "filter_overlong",
    "image_token_count",
    "load_image",
    "load_prompt_template",
    "load_split",
    "load_split_from_config",
    "looks_like_hub_id",
    "prompt_images",
    "prompt_lengths",
    "prompt_masked_images",
    "resolve_split_files",
    "resolve_template_path",
]
