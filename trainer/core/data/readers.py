"""Reading one split of a dataset into :class:`PromptExample` objects (:func:`load_split`).

**Sources**: a parquet file, or a folder holding ``{split}.parquet`` / HF-style shards (the layout
``trainer/demo/`` writes); a jsonl file, or a folder holding ``{split}.jsonl``; a
``datasets.save_to_disk`` folder (a ``Dataset``, or a ``DatasetDict`` with one subfolder per split),
read straight from its Arrow files with pyarrow; a hub dataset id ``owner/name`` (optionally
``owner/name@split``), read through ``datasets.load_dataset``.

**Row layout** (PAPO/EasyR1; every column name configurable): ``problem`` (text with one
``<image>`` placeholder per image), ``answer``, ``images`` (file paths relative to the dataset's
folder, ``{bytes, path}`` dicts as HF ``Image`` features store them, or raw encoded bytes), optional
pre-masked images (one per image) and an optional ``id`` column (the stable row id the corruption
service seeds each prompt's mask from). Bad rows are skipped and counted by reason, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from trainer.core.data.examples import (
    SKIP_BAD_ID,
    SKIP_BAD_IMAGE_ENTRY,
    SKIP_BAD_JSON,
    SKIP_BAD_PROBLEM,
    SKIP_EMPTY_ANSWER,
    SKIP_EXAMPLES,
    SKIP_MASKED_MISMATCH,
    SKIP_PLACEHOLDER_MISMATCH,
    DataError,
    LoadedSplit,
    PromptExample,
    skip_summary,
)
from trainer.core.data.images import check_image, image_items
from trainer.core.data.prompts import IMAGE_PLACEHOLDER, PAPO_FORMAT_PROMPT, PromptFormatter

logger = logging.getLogger(__name__)

# owner/name or owner/name@split: what the hub accepts as a dataset id.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
# A missing "data/train.parquet" is a typo'd local path, not a hub id.
_FILE_SUFFIXES = (".parquet", ".jsonl", ".json", ".arrow", ".csv", ".yaml", ".yml")


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
    prompt_style: str = "easyr1",
    image_root: str | Path | None = None,
    verify_images: bool = False,
) -> LoadedSplit:
    """Read one split of a dataset (parquet, jsonl, ``save_to_disk`` folder or hub id; see the
    module docstring) into :class:`PromptExample` objects.

    Relative image paths resolve against ``image_root`` (default: the dataset folder, or the
    file's folder when a file is given; for a hub id, the current directory). ``format_prompt``
    is appended to each question (``None`` leaves questions as they are); ``prompt_template`` (a
    shipped template name such as ``papo_math`` or a ``.jinja`` file), when given, replaces it;
    ``prompt_style`` is how (``easyr1`` or ``papo``: trainer/core/data/prompts.py). ``id_key``
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
    formatter = PromptFormatter(None if prompt_template is not None else format_prompt, prompt_template, prompt_style)
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
            skip_summary(skipped, skipped_ids),
        )
    if num_rows and not examples:
        raise DataError(f"every row of split {split!r} in {origin} was skipped: {skip_summary(skipped, skipped_ids)}")
    return LoadedSplit(
        source=chunks[0].origin,
        examples=examples,
        num_rows=num_rows,
        skipped=dict(skipped),
        skipped_row_ids={k: list(v) for k, v in skipped_ids.items()},
    )


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
    items = image_items(images, root)
    if items is None:
        return SKIP_BAD_IMAGE_ENTRY
    if problem.count(IMAGE_PLACEHOLDER) != len(items):
        return SKIP_PLACEHOLDER_MISMATCH
    masked_items = None
    if has_masked:
        masked_items = image_items(masked, root)
        if masked_items is None:
            return SKIP_BAD_IMAGE_ENTRY
        if len(masked_items) != len(items):
            return SKIP_MASKED_MISMATCH
    sizes = []
    for item in (*items, *(masked_items or ())):
        size = check_image(item, verify_images)
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
