"""What a loaded dataset is made of: :class:`PromptExample`, :class:`LoadedSplit`, :class:`DataError`
and the reasons a row can be skipped for (the keys of ``LoadedSplit.skipped``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

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


def skip_summary(skipped: Mapping[str, int], ids: Mapping[str, Sequence[int]]) -> str:
    """``reason=count (row ids 1, 2, ...)`` per reason, for the one warning a load logs."""
    parts = []
    for reason, count in sorted(skipped.items()):
        shown = list(ids.get(reason, []))
        more = ", ..." if count > len(shown) else ""
        parts.append(f"{reason}={count} (row ids {', '.join(map(str, shown))}{more})")
    return ", ".join(parts)
