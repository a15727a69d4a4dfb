"""trainer/core/data/: parquet + image files -> chat prompts; bad rows skipped and counted, not fatal."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from trainer.core import data
from trainer.core.data import PAPO_FORMAT_PROMPT, DataError, build_messages, load_image, load_split
from trainer.demo.assets import DemoAssets


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
        {"type": "text", "text": " with\n"},
        {"type": "image"},
        {"type": "text", "text": f" Which is redder? {PAPO_FORMAT_PROMPT}"},
    ]
    # An image-only question still gets the format prompt, after the image (EasyR1: after a space).
    assert image_only.messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": f" {PAPO_FORMAT_PROMPT}"}]

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
    rows = [
        {"id": "geo_7", "problem": "Q?", "answer": "a"},
        {"id": None, "problem": "Q?", "answer": "a"},
        {"id": "12", "problem": "Q?", "answer": "a"},
    ]
    _write(tmp_path / "train.parquet", rows)
    first = load_split(tmp_path, "train", image_key=None)
    again = load_split(tmp_path, "train", image_key=None)
    ids = [e.row_id for e in first.examples]
    assert ids == [e.row_id for e in again.examples]  # stable across loads (and processes: sha256)
    assert len(ids) == 2 and ids[1] == 12 and 0 <= ids[0] < 2**63
    assert first.skipped == {data.SKIP_BAD_ID: 1}


# ------------------------------------------------------------------------------------------------
# Issue 9: every supported layout, embedded bytes, pre-masked images, templates, prompt length.
# Images are solid colours, so a decoded image tells which file/bytes it came from.
# ------------------------------------------------------------------------------------------------

RED, GREEN, BLUE, GREY = (200, 30, 30), (30, 200, 30), (30, 30, 200), (90, 90, 90)


def _png_bytes(colour, size=(28, 28)) -> bytes:
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def _colours(images) -> list[tuple[int, int, int]]:
    return [im.getpixel((0, 0)) for im in images]


#: HF ``Image`` feature storage: a struct of (bytes, path), as datasets writes it to parquet/arrow.
IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
EMBEDDED_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("problem", pa.string()),
        ("answer", pa.string()),
        ("images", pa.list_(IMAGE_STRUCT)),
        ("images_masked", pa.list_(IMAGE_STRUCT)),
    ]
)


def _embedded_rows() -> list[dict]:
    """Rows with embedded image bytes: good ones (1 and 2 images, with pre-masked copies) and
    broken ones, one per failure mode; the comment says what must happen to each."""
    img = lambda c: {"bytes": _png_bytes(c), "path": None}  # noqa: E731
    return [
        # kept: one image, its masked copy
        {"id": 10, "problem": "<image>Colour?", "answer": "red", "images": [img(RED)], "images_masked": [img(GREY)]},
        # kept: two images in placeholder order, two masked copies in the same order
        {
            "id": 11,
            "problem": "Left <image> right <image> which is green?",
            "answer": "right",
            "images": [img(BLUE), img(GREEN)],
            "images_masked": [img(GREY), img((0, 0, 0))],
        },
        # undecodable bytes -> unreadable_image
        {
            "id": 12,
            "problem": "<image>Colour?",
            "answer": "x",
            "images": [{"bytes": b"not a png", "path": None}],
            "images_masked": [img(GREY)],
        },
        # one placeholder, two images -> placeholder_mismatch
        {
            "id": 13,
            "problem": "<image>Colour?",
            "answer": "x",
            "images": [img(RED), img(RED)],
            "images_masked": [img(GREY), img(GREY)],
        },
        # masked column has fewer images -> masked_image_mismatch
        {
            "id": 14,
            "problem": "<image><image>",
            "answer": "x",
            "images": [img(RED), img(RED)],
            "images_masked": [img(GREY)],
        },
        # undecodable masked bytes -> unreadable_image (a precomputed mask must decode too)
        {
            "id": 15,
            "problem": "<image>Colour?",
            "answer": "x",
            "images": [img(RED)],
            "images_masked": [{"bytes": b"\x89PNG broken", "path": None}],
        },
        # kept: bytes absent, path relative to the dataset file's folder (HF Image with a path)
        {
            "id": 16,
            "problem": "<image>Colour?",
            "answer": "blue",
            "images": [{"bytes": None, "path": "blue.png"}],
            "images_masked": [{"bytes": None, "path": "grey.png"}],
        },
        # path to a missing file -> missing_image_file
        {
            "id": 17,
            "problem": "<image>Colour?",
            "answer": "x",
            "images": [{"bytes": None, "path": "gone.png"}],
            "images_masked": [img(GREY)],
        },
        # neither bytes nor path -> bad_image_entry
        {
            "id": 18,
            "problem": "<image>Colour?",
            "answer": "x",
            "images": [{"bytes": None, "path": None}],
            "images_masked": [img(GREY)],
        },
    ]


def _check_embedded(split, caplog_text: str = "") -> None:
    by_id = {ex.row_id: ex for ex in split.examples}
    assert sorted(by_id) == [10, 11, 16]
    assert split.num_rows == 9 and split.skipped == {
        data.SKIP_UNREADABLE_IMAGE: 2,
        data.SKIP_PLACEHOLDER_MISMATCH: 1,
        data.SKIP_MASKED_MISMATCH: 1,
        data.SKIP_MISSING_IMAGE: 1,
        data.SKIP_BAD_IMAGE_ENTRY: 1,
    }
    assert split.skipped_row_ids[data.SKIP_UNREADABLE_IMAGE] == [12, 15]
    assert split.skipped_row_ids[data.SKIP_PLACEHOLDER_MISMATCH] == [13]
    # The kept rows carry exactly their own images, in placeholder order, and their own answers.
    assert [by_id[i].answer for i in (10, 11, 16)] == ["red", "right", "blue"]
    assert _colours(data.prompt_images(by_id[10], 10**6)) == [RED]
    assert _colours(data.prompt_images(by_id[11], 10**6)) == [BLUE, GREEN]
    assert _colours(data.prompt_images(by_id[16], 10**6)) == [BLUE]
    assert _colours(data.prompt_masked_images(by_id[11], 10**6)) == [GREY, (0, 0, 0)]
    assert _colours(data.prompt_masked_images(by_id[16], 10**6)) == [GREY]
    assert [item["type"] for item in by_id[11].messages[0]["content"]] == ["text", "image", "text", "image", "text"]
    assert isinstance(by_id[10].images[0], bytes) and isinstance(by_id[16].images[0], Path)


def test_parquet_with_embedded_bytes_and_masked_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _png(tmp_path / "blue.png", BLUE)
    _png(tmp_path / "grey.png", GREY)
    _write(tmp_path / "train.parquet", _embedded_rows(), schema=EMBEDDED_SCHEMA)
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        split = load_split(tmp_path, "train", masked_image_key="images_masked")
    _check_embedded(split)
    # The one warning names the first skipped row ids per reason.
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped 6 of 9" in warning and "unreadable_image=2 (row ids 12, 15)" in warning
    # Without masked_image_key the column is not read and examples carry no masked images.
    plain = load_split(tmp_path, "train")
    assert plain.examples[0].images_masked is None
    # A named masked column must exist.
    with pytest.raises(DataError, match="'masks'"):
        load_split(tmp_path, "train", masked_image_key="masks")


def test_saved_dataset_folder(tmp_path: Path) -> None:
    """``datasets.save_to_disk`` layout: Arrow stream files listed in state.json (written here
    byte-for-byte the way datasets does, since the package is optional), plus a DatasetDict."""
    import json

    def save(folder: Path, table: pa.Table, indices: list[int] | None = None) -> None:
        folder.mkdir(parents=True)
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        state = {
            "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
            "_fingerprint": "x",
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        if indices is not None:
            idx = pa.table({"indices": pa.array(indices, pa.uint64())})
            with pa.OSFile(str(folder / "indices-00000-of-00001.arrow"), "wb") as sink:
                with pa.ipc.new_stream(sink, idx.schema) as writer:
                    writer.write_table(idx)
            state["_indices_data_files"] = [{"filename": "indices-00000-of-00001.arrow"}]
        (folder / "state.json").write_text(json.dumps(state))
        (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))

    table = pa.Table.from_pylist(_embedded_rows(), schema=EMBEDDED_SCHEMA)
    single = tmp_path / "single"
    save(single, table)
    _png(single / "blue.png", BLUE)
    _png(single / "grey.png", GREY)
    _check_embedded(load_split(single, "train", masked_image_key="images_masked"))

    # A DatasetDict: one folder per split; the validation split was saved after a shuffle, so an
    # indices mapping reorders its rows (rows 1 and 0 of the table, in that order).
    root = tmp_path / "dict"
    save(root / "train", table)
    save(root / "validation", table, indices=[1, 0])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    val = load_split(root, "validation", masked_image_key="images_masked")
    assert [e.row_id for e in val.examples] == [11, 10] and val.num_rows == 2
    assert _colours(data.prompt_images(val.examples[0], 10**6)) == [BLUE, GREEN]
    with pytest.raises(FileNotFoundError, match="'test' not in the saved DatasetDict"):
        load_split(root, "test")


@pytest.mark.skipif(__import__("importlib").util.find_spec("datasets") is None, reason="datasets not installed")
def test_real_save_to_disk_folder(tmp_path: Path) -> None:
    import datasets

    feats = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "problem": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "images": datasets.Sequence(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "id": [1, 2],
            "problem": ["<image>Q?", "<image>Q?"],
            "answer": ["red", "blue"],
            "images": [[Image.new("RGB", (28, 28), RED)], [Image.new("RGB", (28, 28), BLUE)]],
        },
        features=feats,
    )
    ds.shuffle(seed=1).save_to_disk(str(tmp_path / "saved"))
    split = load_split(tmp_path / "saved", "train")
    got = {e.row_id: (e.answer, _colours(data.prompt_images(e, 10**6))) for e in split.examples}
    assert got == {1: ("red", [RED]), 2: ("blue", [BLUE])}


def test_jsonl_with_relative_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json

    for name, colour in (("a.png", RED), ("b.png", GREEN), ("c.png", BLUE)):
        _png(tmp_path / "data" / "img" / name, colour)
    lines = [
        {"id": "geo-1", "problem": "<image>Q1", "answer": "red", "images": ["img/a.png"]},
        {"id": "geo-2", "problem": "<image> and <image>", "answer": "green", "images": ["img/b.png", "img/c.png"]},
        {"id": "geo-3", "problem": "<image>Q3", "answer": "x", "images": ["img/missing.png"]},
        {"id": "geo-4", "problem": "<image><image>Q4", "answer": "x", "images": ["img/a.png"]},
        "{this line is not json",
        {"id": "geo-6", "problem": "<image>Q6", "answer": "blue", "images": "img/c.png"},  # a bare string
        {"id": "geo-7", "problem": "<image>Q7", "answer": "x", "images": [{"bytes": None, "path": "img/a.png"}, 3]},
    ]
    path = tmp_path / "data" / "train.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    for source in (path, tmp_path / "data"):  # the file itself, or the folder holding train.jsonl
        split = load_split(source, "train")
        kept = {e.answer: _colours(data.prompt_images(e, 10**6)) for e in split.examples}
        assert kept == {"red": [RED], "green": [GREEN, BLUE], "blue": [BLUE]}
        assert split.num_rows == 7 and split.skipped == {
            data.SKIP_MISSING_IMAGE: 1,
            data.SKIP_PLACEHOLDER_MISMATCH: 1,
            data.SKIP_BAD_JSON: 1,
            data.SKIP_BAD_IMAGE_ENTRY: 1,
        }
        assert split.skipped_row_ids[data.SKIP_BAD_JSON] == [4]  # its position in the file
        assert split.examples[0].row_id == data._row_id("geo-1")
        assert split.examples[0].image_paths == [(tmp_path / "data" / "img" / "a.png").resolve()]
    # image_root moves where relative paths resolve: nothing is found there, nothing is kept wrong.
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError, match="every row of split .train..*missing_image_file=4"):
        load_split(path, "train", image_root=tmp_path / "elsewhere")


def test_hub_id_goes_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id reaches ``datasets.load_dataset`` (never downloaded here: a fake module returns a
    local table the way ``Dataset.with_format('arrow')[:]`` does)."""
    import sys
    import types

    table = pa.Table.from_pylist(_embedded_rows()[:2], schema=EMBEDDED_SCHEMA)
    calls = []

    class FakeDataset:
        def with_format(self, kind):
            assert kind == "arrow"
            return self

        def __getitem__(self, key):
            assert key == slice(None)
            return table

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset()

    monkeypatch.chdir(tmp_path)  # the id must not exist as a local path
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    split = load_split("PAPOGalaxy/PAPO_ViRL39K_train", "train", masked_image_key="images_masked")
    assert calls == [("PAPOGalaxy/PAPO_ViRL39K_train", "train")]
    assert [e.answer for e in split.examples] == ["red", "right"] and split.source == "PAPOGalaxy/PAPO_ViRL39K_train"
    assert _colours(data.prompt_images(split.examples[1], 10**6)) == [BLUE, GREEN]
    load_split("hiyouga/geometry3k@test", "train")
    assert calls[-1] == ("hiyouga/geometry3k", "test")  # EasyR1's name@split

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the error says what to do
    with pytest.raises(DataError, match="needs the `datasets` package"):
        load_split("PAPOGalaxy/PAPO_ViRL39K_train", "train")


def test_prompt_images_of_bytes(tmp_path: Path) -> None:
    good = data.PromptExample(row_id=3, messages=[], images=[_png_bytes(RED, (40, 30))], answer="a")
    assert [(im.size, im.mode) for im in data.prompt_images(good, 40 * 30)] == [((40, 30), "RGB")]
    with pytest.raises(data.BadPrompt, match=r"row 3: image 0 \(\d+ bytes stored in the dataset\) has 40x30 pixels"):
        data.prompt_images(good, 40 * 30 - 1)
    truncated = data.PromptExample(row_id=4, messages=[], images=[_png_bytes(RED, (64, 64))[:60]], answer="a")
    with pytest.raises(data.BadPrompt, match="row 4: image 0"):  # header fine, pixel data cut
        data.prompt_images(truncated, 10**6)
    garbage = data.PromptExample(row_id=5, messages=[], images=[b"junk"], answer="a")
    with pytest.raises(data.BadPrompt, match="row 5: .*UnidentifiedImageError"):
        data.prompt_images(garbage, 10**6)
    # Files-only helpers refuse embedded images instead of returning a wrong list.
    with pytest.raises(ValueError, match="use trainer.core.data.prompt_images"):
        _ = good.image_paths
    assert "bytes>" in repr(good) and "\\x89PNG" not in repr(good)
    assert data.prompt_masked_images(good, 10**6) is None


#: The authors' examples/format_prompt/math_perception.jinja, byte for byte.
AUTHORS_MATH_PERCEPTION = (
    "{{ content | trim }}\n\nYou first think through the reasoning process as an internal monologue, "
    "enclosed within <think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.\n"
)


def test_the_shipped_papo_math_template_is_the_authors_file_byte_for_byte(demo_assets: DemoAssets) -> None:
    from trainer.core.data import resolve_template_path

    assert resolve_template_path("papo_math").read_bytes() == AUTHORS_MATH_PERCEPTION.encode()
    (ex, *_) = load_split(demo_assets.data_dir, "validation", prompt_template="papo_math").examples
    *_, last = ex.messages[0]["content"]
    question, instruction = last["text"].split("\n\n")
    assert instruction == PAPO_FORMAT_PROMPT and question == question.strip() and question
    # papo's earlier prompt (one space, papo style) stays available: the format_prompt path's messages.
    legacy = load_split(demo_assets.data_dir, "validation", prompt_style="papo")
    spaced = load_split(demo_assets.data_dir, "validation", prompt_template="papo_math_space", prompt_style="papo")
    assert [e.messages for e in spaced.examples] == [e.messages for e in legacy.examples]
    assert spaced.examples[0].messages[0]["content"][-1]["text"].endswith(f"? {PAPO_FORMAT_PROMPT}") or (
        spaced.examples[0].messages[0]["content"][-1]["text"].endswith(f" {PAPO_FORMAT_PROMPT}")
    )


@pytest.mark.parametrize(
    "problem,easyr1,papo",
    [
        # Whitespace after an image and between images is text EasyR1 keeps.
        (
            "<image>\nWhat is shown?",
            [{"type": "image"}, {"type": "text", "text": "\nWhat is shown? FMT"}],
            [{"type": "image"}, {"type": "text", "text": "What is shown? FMT"}],
        ),
        (
            "Compare <image> \n <image>  which is larger?  ",
            [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "text", "text": " \n "},
                {"type": "image"},
                {"type": "text", "text": "  which is larger?   FMT"},
            ],
            [
                {"type": "text", "text": "Compare "},
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "which is larger? FMT"},
            ],
        ),
        # An image last: EasyR1 appends the format prompt to the text, after the placeholder.
        (
            "How many? <image>",
            [{"type": "text", "text": "How many? "}, {"type": "image"}, {"type": "text", "text": " FMT"}],
            [{"type": "text", "text": "How many? "}, {"type": "image"}, {"type": "text", "text": "FMT"}],
        ),
    ],
)
def test_prompt_styles_build_easyr1s_messages_or_papos_earlier_ones(problem, easyr1, papo) -> None:
    from trainer.core.data import PromptFormatter

    n = problem.count("<image>")
    assert PromptFormatter(" FMT\n", style="easyr1").messages(problem, n) == [{"role": "user", "content": easyr1}]
    assert PromptFormatter("FMT", style="papo").messages(problem, n) == [{"role": "user", "content": papo}]
    with pytest.raises(ValueError, match="data.prompt_style must be one of easyr1, papo"):
        PromptFormatter(style="verl")


def test_custom_and_broken_templates(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _write(
        tmp_path / "train.parquet",
        [{"id": 1, "problem": "  Look: <image> what?  ", "answer": "a", "images": ["a.png"]}],
    )
    tpl = tmp_path / "mine.jinja"
    tpl.write_text("Question: {{ content | trim }}\nAnswer briefly.\n")
    (ex,) = load_split(tmp_path, "train", prompt_template=tpl).examples
    assert ex.messages[0]["content"] == [  # EasyR1: the file stripped, the text kept as rendered
        {"type": "text", "text": "Question: Look: "},
        {"type": "image"},
        {"type": "text", "text": " what?\nAnswer briefly."},
    ]
    (ex,) = load_split(tmp_path, "train", prompt_template=tpl, prompt_style="papo").examples
    assert ex.messages[0]["content"] == [
        {"type": "text", "text": "Question: Look: "},
        {"type": "image"},
        {"type": "text", "text": "what?\nAnswer briefly."},
    ]
    (tmp_path / "typo.jinja").write_text("{{ contnet }}")
    with pytest.raises(DataError, match="UndefinedError"):
        load_split(tmp_path, "train", prompt_template=tmp_path / "typo.jinja")
    (tmp_path / "syntax.jinja").write_text("{% if %}")
    with pytest.raises(DataError, match="syntax.jinja: line 1"):
        load_split(tmp_path, "train", prompt_template=tmp_path / "syntax.jinja")
    with pytest.raises(DataError, match="not a shipped template.*papo_math"):
        load_split(tmp_path, "train", prompt_template="no_such_template")
    # A template that adds a placeholder would misplace images: every row is skipped, loudly.
    (tmp_path / "extra.jinja").write_text("<image>{{ content }}")
    with pytest.raises(DataError, match="placeholder_mismatch=1"):
        load_split(tmp_path, "train", prompt_template=tmp_path / "extra.jinja")


@pytest.fixture(scope="module")
def tiny_processor(demo_assets: DemoAssets):
    from trainer.core.modeling import load_processor

    return load_processor(str(demo_assets.model_dir), min_pixels=56 * 56, max_pixels=112 * 112)


def test_prompt_lengths_match_the_processor(tmp_path: Path, tiny_processor) -> None:
    """Token counts computed from image headers equal what the processor really produces,
    including an image the pixel limit scales down and one the floor scales up."""
    _png(tmp_path / "small.png", size=(30, 20))  # below min_pixels: scaled up
    _png(tmp_path / "mid.png", size=(84, 56))
    _png(tmp_path / "big.png", size=(400, 300))  # above max_pixels: scaled down
    rows = [
        {"id": 0, "problem": "<image>What colour is it?", "answer": "a", "images": ["small.png"]},
        {"id": 1, "problem": "Compare <image> and <image>.", "answer": "a", "images": ["mid.png", "big.png"]},
        {"id": 2, "problem": "No image, just text " * 5, "answer": "a", "images": []},
    ]
    _write(tmp_path / "train.parquet", rows)
    split = load_split(tmp_path, "train")
    computed = data.prompt_lengths(split.examples, tiny_processor, min_pixels=56 * 56, max_pixels=112 * 112)
    actual = []
    for ex in split.examples:
        text = tiny_processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        images = data.prompt_images(ex, 10**7) or None
        actual.append(len(tiny_processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]))
    assert computed == actual and len(set(actual)) == 3


def test_easyr1_resize_gives_the_authors_image_token_counts(tmp_path: Path, demo_assets: DemoAssets) -> None:
    """A 1000 x 1000 image at the paper's limits (256-1280 x 28 x 28 pixels) under Qwen2.5-VL's own
    processor limits (3136-12845056): EasyR1 keeps it (it fits), the processor rounds it to
    1008 x 1008 = 1296 tokens; limits handed to the processor instead give 1225 (980 x 980)."""
    import shutil

    from trainer.core.config import ModelConfig
    from trainer.core.modeling import load_processor, processor_pixels

    model = tmp_path / "model"
    shutil.copytree(demo_assets.model_dir, model)
    proc = json.loads((model / "processor_config.json").read_text())
    proc["image_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}  # Qwen2.5-VL's own
    (model / "processor_config.json").write_text(json.dumps(proc))
    _png(tmp_path / "big.png", size=(1000, 1000))
    _write(tmp_path / "train.parquet", [{"id": 0, "problem": "<image>How many?", "answer": "3", "images": ["big.png"]}])
    (ex,) = load_split(tmp_path, "train").examples
    paper = dict(path=str(model), min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    counts = {}
    for mode in ("easyr1", "processor"):
        cfg = ModelConfig(**paper, image_resize=mode)
        lo, hi = processor_pixels(cfg)
        processor = load_processor(str(model), min_pixels=lo, max_pixels=hi)
        (image,) = data.prompt_images(ex, 10**8, cfg.image_fit())
        text = processor.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()
        counts[mode] = ids.count(5)  # <|image_pad|>
        # The length filter's count from the header alone agrees with the processor.
        (n,) = data.prompt_lengths([ex], processor, min_pixels=lo, max_pixels=hi, fit=cfg.image_fit())
        assert n == len(ids), mode
    assert counts == {"easyr1": 1296, "processor": 1225}
    assert processor_pixels(ModelConfig(**paper, image_resize="easyr1")) == (3136, 12845056)
    assert processor_pixels(ModelConfig(**paper, image_resize="processor")) == (200704, 1003520)


@pytest.mark.parametrize(
    "size,expected",
    [
        ((1000, 1000), (1000, 1000)),  # inside the limits: unchanged
        ((2000, 1000), (1416, 708)),  # above max_pixels: sqrt(1003520 / 2e6) = 0.70835..., truncated
        ((300, 200), (548, 365)),  # below min_pixels: sqrt(200704 / 60000) = 1.82896..., truncated
    ],
)
def test_easyr1_size_is_easyr1s_area_resize(size, expected) -> None:
    assert data.easyr1_size(*size, 256 * 28 * 28, 1280 * 28 * 28) == expected
    from PIL import Image

    assert data.easyr1_fit(Image.new("RGB", size), 256 * 28 * 28, 1280 * 28 * 28).size == expected


def test_overlong_prompts_are_filtered_and_counted(
    tmp_path: Path, tiny_processor, caplog: pytest.LogCaptureFixture
) -> None:
    _png(tmp_path / "big.png", size=(112, 112))  # 16 image tokens at these limits
    rows = [
        {"id": i, "problem": "<image>" + "Why? " * words, "answer": str(i), "images": ["big.png"]}
        for i, words in enumerate((1, 200, 2, 300))
    ]
    _write(tmp_path / "train.parquet", rows)
    split = load_split(tmp_path, "train")
    lengths = data.prompt_lengths(split.examples, tiny_processor, min_pixels=56 * 56, max_pixels=112 * 112)
    limit = max(lengths[0], lengths[2])
    assert lengths[1] > limit and lengths[3] > limit
    with caplog.at_level(logging.WARNING, logger=data.__name__):
        kept = data.filter_overlong(split, tiny_processor, limit, min_pixels=56 * 56, max_pixels=112 * 112)
    assert [e.answer for e in kept.examples] == ["0", "2"]
    assert kept.skipped == {data.SKIP_OVERLONG: 2} and kept.skipped_row_ids[data.SKIP_OVERLONG] == [1, 3]
    assert kept.num_rows == 4 and split.skipped == {}  # the input split is left as it was
    assert any("data.max_prompt_length" in r.getMessage() for r in caplog.records)
    with pytest.raises(DataError, match="every prompt"):
        data.filter_overlong(split, tiny_processor, 5, min_pixels=56 * 56, max_pixels=112 * 112)


def test_load_split_from_config(tmp_path: Path, demo_assets: DemoAssets, tiny_processor) -> None:
    """The driver's entry point: every DataConfig field reaches the loader; max_prompt_length
    filters with the model's processor (loaded from model.path when not given)."""
    from trainer.core.config import resolve_config

    _png(tmp_path / "img.png", RED, size=(112, 112))
    rows = [
        {"uid": 5, "question": "<image>Short?", "solution": "red", "pics": ["img.png"], "masked": ["img.png"]},
        {
            "uid": 6,
            "question": "<image>" + "Long? " * 300,
            "solution": "red",
            "pics": ["img.png"],
            "masked": ["img.png"],
        },
    ]
    _write(tmp_path / "d" / "train.jsonl.parquet", rows)  # any parquet file name works when given directly
    cfg = resolve_config(
        overrides=[
            f"data.train_path={tmp_path / 'd' / 'train.jsonl.parquet'}",
            "data.prompt_key=question",
            "data.answer_key=solution",
            "data.image_key=pics",
            "data.masked_image_key=masked",
            "data.id_key=uid",
            "data.prompt_template=papo_math",
            "data.max_prompt_length=200",
            f"data.image_root={tmp_path}",
            f"model.path={demo_assets.model_dir}",
            "model.min_pixels=3136",
            "model.max_pixels=12544",
        ]
    )
    assert cfg.data.format_prompt is None  # cleared by the template
    split = data.load_split_from_config(cfg.data, cfg.data.train_path, "train", model=cfg.model)
    (ex,) = split.examples
    assert (ex.row_id, ex.answer, split.skipped) == (5, "red", {data.SKIP_OVERLONG: 1})
    assert ex.images_masked == ex.images and ex.messages[0]["content"][-1]["text"].endswith(PAPO_FORMAT_PROMPT)
    with pytest.raises(ValueError, match="needs the model's processor"):
        data.load_split_from_config(cfg.data, cfg.data.train_path, "train")


def test_data_config_errors_name_the_field(tmp_path: Path) -> None:
    from trainer.core.config import ConfigError, resolve_config

    with pytest.raises(ConfigError, match=r"data\.prompt_template: .*not a shipped template"):
        resolve_config(overrides=["data.prompt_template=nope"])
    with pytest.raises(ConfigError, match=r"data\.prompt_template='papo_math' and data\.format_prompt are both set"):
        resolve_config(overrides=["data.prompt_template=papo_math", "data.format_prompt=Answer."])
    with pytest.raises(ConfigError, match=r"data\.max_prompt_length: .*allowed: 1 <= x"):
        resolve_config(overrides=["data.max_prompt_length=0"])
    # A dumped config (format_prompt written out as null) resolves again unchanged.
    from trainer.core.config import dump_config

    cfg = resolve_config(overrides=["data.prompt_template=papo_math"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert resolve_config([tmp_path / "c.yaml"]).data == cfg.data


def test_readme_example_writes_a_dataset_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """README "Bring your own data": its two Python blocks run as written, and
    the dataset they write loads with the documented images and answers."""
    import re

    doc = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = doc.split("## Bring your own data", 1)[1].split("\n## ", 1)[0]
    write, check = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:2]
    assert len(write.strip().splitlines()) <= 12  # "a ten-line example"
    monkeypatch.chdir(tmp_path)
    exec(compile(write, "docs-example-write", "exec"), {})
    exec(compile(check, "docs-example-check", "exec"), {})
    assert "{}" in capsys.readouterr().out  # nothing skipped
    split = load_split(tmp_path / "my_data", "train")
    assert [(e.row_id, e.answer) for e in split.examples] == [(0, "red"), (1, "yes")]
    assert _colours(data.prompt_images(split.examples[1], 10**6)) == [(255, 255, 255), (0, 0, 0)]
    assert [i["type"] for i in split.examples[1].messages[0]["content"]] == ["text", "image", "text", "image", "text"]


def test_odd_image_entries_and_path_typos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    _png(tmp_path / "ok.png", RED)
    rows = [
        {"id": 1, "problem": "<image>Q", "answer": "red", "images": ["ok.png"]},
        {"id": 2, "problem": "<image>Q", "answer": "x", "images": [{"bytes": "iVBORw0KGgo=", "path": None}]},  # base64
        {"id": 3, "problem": "<image>Q", "answer": "x", "images": ["A" * 5000]},  # too long to be a file name
        {"id": 4, "problem": "<image>Q", "answer": "x", "images": [None]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    split = load_split(tmp_path / "train.jsonl", "train")
    assert [e.answer for e in split.examples] == ["red"]
    assert split.skipped == {data.SKIP_BAD_IMAGE_ENTRY: 2, data.SKIP_MISSING_IMAGE: 1}
    # A missing local file is reported as such, not sent to the hub.
    monkeypatch.chdir(tmp_path)
    assert not data.looks_like_hub_id("data/train.parquet") and data.looks_like_hub_id("owner/name@test")
    with pytest.raises(FileNotFoundError, match="data/train.parquet"):
        load_split("data/train.parquet", "train")


def test_masked_images_feed_the_precomputed_strategy(tmp_path: Path) -> None:
    """``images_masked`` goes to the corruption service as it is (paths and bytes both), and a
    pre-masked image of another size than its original is skipped at load, not at train time."""
    from services.corruption.service import CorruptionService

    _png(tmp_path / "orig.png", RED, size=(40, 30))
    _png(tmp_path / "masked.png", GREY, size=(40, 30))
    _png(tmp_path / "small_mask.png", GREY, size=(20, 15))
    # Plain path strings for the originals; HF Image structs (a path, then bytes) for the masks.
    rows = [
        {
            "id": 1,
            "problem": "<image><image>Q",
            "answer": "a",
            "images": ["orig.png", "orig.png"],
            "images_masked": [
                {"bytes": None, "path": "masked.png"},
                {"bytes": _png_bytes((0, 0, 0), (40, 30)), "path": None},
            ],
        },
        {
            "id": 2,
            "problem": "<image>Q",
            "answer": "b",
            "images": ["orig.png"],
            "images_masked": [{"bytes": None, "path": "small_mask.png"}],
        },
    ]
    schema = pa.schema(
        [
            ("id", pa.int64()),
            ("problem", pa.string()),
            ("answer", pa.string()),
            ("images", pa.list_(pa.string())),
            ("images_masked", pa.list_(IMAGE_STRUCT)),
        ]
    )
    _write(tmp_path / "train.parquet", rows, schema=schema)
    split = load_split(tmp_path, "train", masked_image_key="images_masked")
    assert [e.row_id for e in split.examples] == [1] and split.skipped == {data.SKIP_MASKED_MISMATCH: 1}
    (ex,) = split.examples
    service = CorruptionService(strategy="precomputed")
    masked = service.mask_prompt(
        data.prompt_images(ex, 10**6), run_seed=0, row_id=ex.row_id, epoch=0, precomputed=ex.images_masked
    )
    assert _colours(masked) == [GREY, (0, 0, 0)]
