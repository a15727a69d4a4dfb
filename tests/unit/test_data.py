"""trainer/data.py: parquet + image files -> chat prompts; bad rows skipped and counted, not fatal."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from trainer import data
from trainer.data import (
    PAPO_FORMAT_PROMPT,
    DataError,
    build_messages,
    load_image,
    load_split,
)
from trainer.demo import DemoAssets


def _png(path: Path, colour=(200, 30, 30), size=(56, 56), mode="RGB") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else 128).save(path)
    return path.name


def _write(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def test_demo_layout_parses(demo_assets: DemoAssets) -> None:
    split = load_split(demo_assets.data_dir, "validation")
    rows = pq.read_table(demo_assets.data_dir / "validation.parquet").to_pylist()
    assert len(split) == split.num_rows == len(rows) and split.skipped == {}
    for ex, row in zip(split.examples, rows):
        assert ex.row_id == row["id"] and ex.answer == row["answer"]
        assert ex.image_paths == [(demo_assets.data_dir / row["images"][0]).resolve()]
        assert all(p.is_absolute() and p.is_file() for p in ex.image_paths)
        (msg,) = ex.messages
        assert msg["role"] == "user"
        image_item, text_item = msg["content"]
        assert image_item == {"type": "image"}
        question = row["problem"].replace("<image>", "")
        assert text_item == {"type": "text", "text": f"{question} {PAPO_FORMAT_PROMPT}"}


def test_format_prompt_is_a_parameter(demo_assets: DemoAssets) -> None:
    raw = load_split(demo_assets.data_dir, "validation", format_prompt=None)
    custom = load_split(demo_assets.data_dir, "validation", format_prompt="Answer in \\boxed{}.")
    row = pq.read_table(demo_assets.data_dir / "validation.parquet").to_pylist()[0]
    question = row["problem"].replace("<image>", "")
    assert raw.examples[0].messages[0]["content"][-1]["text"] == question
    assert custom.examples[0].messages[0]["content"][-1]["text"] == question + " Answer in \\boxed{}."


def test_two_images_follow_placeholder_order(tmp_path: Path, demo_assets: DemoAssets) -> None:
    from transformers import AutoProcessor

    _png(tmp_path / "img" / "first.png", (200, 30, 30))
    _png(tmp_path / "img" / "second.png", (30, 30, 200), size=(112, 112))
    _write(
        tmp_path / "train.parquet",
        [
            {
                "id": 41,
                "problem": "Compare <image> with\n<image> Which is redder?",
                "answer": "first",
                "images": ["img/first.png", "img/second.png"],
            },
            {"id": 42, "problem": "<image>", "answer": "x", "images": ["img/second.png"]},
        ],
    )
    split = load_split(tmp_path, "train")
    ex, image_only = split.examples
    assert ex.row_id == 41
    assert ex.image_paths == [tmp_path.resolve() / "img" / "first.png", tmp_path.resolve() / "img" / "second.png"]
    assert ex.messages[0]["content"] == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": "with\n"},
        {"type": "image"},
        {"type": "text", "text": f"Which is redder? {PAPO_FORMAT_PROMPT}"},
    ]
    # An image-only question still gets the format prompt, after the image.
    assert image_only.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": PAPO_FORMAT_PROMPT}]

    # End to end through the tiny processor: the first vision block holds the first image's tokens.
    processor = AutoProcessor.from_pretrained(demo_assets.model_dir)
    text = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
    assert text.index("Compare ") < text.index("<|vision_start|>") < text.index("with\n")
    batch = processor(text=[text], images=[load_image(p) for p in ex.image_paths], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 8, 8]]
    ids = batch["input_ids"][0].tolist()
    starts = [i for i, t in enumerate(ids) if t == 3]
    assert [ids[s + 1 : s + 1 + n].count(5) for s, n in zip(starts, (4, 16))] == [4, 16]


def test_bad_rows_are_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _png(tmp_path / "ok.png")
    (tmp_path / "not_an_image.png").write_text("this is text")
    full = tmp_path / "truncated.png"
    _png(full, size=(64, 64))
    full.write_bytes(full.read_bytes()[:60])  # header intact, pixel data cut
    rows = [
        {"id": 0, "problem": "<image>Q?", "answer": "a", "images": ["ok.png"]},
        {"id": 1, "problem": "<image>Q?", "answer": "a", "images": ["missing.png"]},
        {"id": 2, "problem": "<image><image>Q?", "answer": "a", "images": ["ok.png"]},
        {"id": 3, "problem": "Q?", "answer": "a", "images": ["ok.png"]},
        {"id": 4, "problem": "<image>Q?", "answer": "  ", "images": ["ok.png"]},
        {"id": 5, "problem": "<image>Q?", "answer": None, "images": ["ok.png"]},
        {"id": 6, "problem": "<image>Q?", "answer": "a", "images": ["not_an_image.png"]},
        {"id": 7, "problem": "<image>Q?", "answer": "a", "images": ["truncated.png"]},
        {"id": 8, "problem": "<image>Q?", "answer": "b", "images": [str((tmp_path / "ok.png").resolve())]},
    ]
    _write(tmp_path / "train.parquet", rows)

    with caplog.at_level(logging.WARNING, logger=data.__name__):
        split = load_split(tmp_path, "train")
    assert [e.row_id for e in split.examples] == [0, 7, 8]  # header-only check lets the truncated file pass
    assert split.skipped == {
        data.SKIP_MISSING_IMAGE: 1,
        data.SKIP_PLACEHOLDER_MISMATCH: 2,
        data.SKIP_EMPTY_ANSWER: 2,
        data.SKIP_UNREADABLE_IMAGE: 1,
    }
    assert split.num_rows == 9 and split.num_skipped == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "skipped 6 of 9" in warnings[0].getMessage() and "missing_image_file=1" in warnings[0].getMessage()

    verified = load_split(tmp_path, "train", verify_images=True)
    assert [e.row_id for e in verified.examples] == [0, 8]
    assert verified.skipped[data.SKIP_UNREADABLE_IMAGE] == 2


def test_missing_column_is_named(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _write(tmp_path / "train.parquet", [{"id": 0, "question": "<image>Q?", "solution": "a", "images": ["a.png"]}])
    with pytest.raises(DataError) as err:
        load_split(tmp_path, "train")
    assert "'problem'" in str(err.value) and "question, solution" in str(err.value)
    with pytest.raises(DataError, match="'answer'"):
        load_split(tmp_path, "train", prompt_key="question")
    split = load_split(tmp_path, "train", prompt_key="question", answer_key="solution")
    assert split.examples[0].answer == "a"
    with pytest.raises(DataError, match="'pics'"):
        load_split(tmp_path, "train", prompt_key="question", answer_key="solution", image_key="pics")


def test_missing_split_or_folder_names_the_path(tmp_path: Path) -> None:
    _write(tmp_path / "train.parquet", [{"problem": "Q?", "answer": "a"}])
    with pytest.raises(FileNotFoundError) as err:
        load_split(tmp_path, "test")
    assert str(tmp_path / "test.parquet") in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_split(tmp_path / "nowhere", "train")


def test_text_only_rows_and_positional_ids(tmp_path: Path) -> None:
    # No image column (image_key=None) and no id column: a text-only dataset, ids are positions.
    _write(tmp_path / "data" / "train-00000-of-00001.parquet", [{"problem": "2+2?", "answer": 4}] * 3)
    with pytest.raises(DataError, match="'images'"):
        load_split(tmp_path, "train")
    split = load_split(tmp_path, "train", image_key=None)
    assert [e.row_id for e in split.examples] == [0, 1, 2]
    assert split.examples[0].answer == "4" and split.examples[0].image_paths == []
    assert split.examples[0].messages[0]["content"] == [{"type": "text", "text": f"2+2? {PAPO_FORMAT_PROMPT}"}]


def test_load_does_not_decode_images(demo_assets: DemoAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decode(self, *args, **kwargs):
        raise AssertionError("load_split decoded an image")

    monkeypatch.setattr(Image.Image, "load", no_decode)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert len(load_split(demo_assets.data_dir, "validation")) > 0


def test_load_image_returns_rgb(tmp_path: Path) -> None:
    grey = tmp_path / "grey.png"
    _png(grey, mode="L", size=(30, 20))
    img = load_image(grey)
    assert img.mode == "RGB" and img.size == (30, 20) and img.getpixel((0, 0)) == (128, 128, 128)


def test_build_messages_rejects_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        build_messages("<image><image>", 1, None)


def test_string_and_null_ids(tmp_path: Path) -> None:
    rows = [{"id": "geo_7", "problem": "Q?", "answer": "a"}, {"id": None, "problem": "Q?", "answer": "a"},
            {"id": "12", "problem": "Q?", "answer": "a"}]
    _write(tmp_path / "train.parquet", rows)
    first = load_split(tmp_path, "train", image_key=None)
    again = load_split(tmp_path, "train", image_key=None)
    ids = [e.row_id for e in first.examples]
    assert ids == [e.row_id for e in again.examples]  # stable across loads (and processes: sha256)
    assert len(ids) == 2 and ids[1] == 12 and 0 <= ids[0] < 2**63
    assert first.skipped == {data.SKIP_BAD_ID: 1}
