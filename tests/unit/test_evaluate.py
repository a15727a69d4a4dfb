"""trainer/evaluate/ without an engine: the evaluator's arithmetic on a constructed case, the
masked condition's images against the corruption service, avg@k / pass@k over k samples, the
report's keys and table, and `papo eval`'s checks that run before any engine starts.

The generate function is a test double standing in for the rollout engine: it "sees" an image
when the image's top-left pixel is not black, and answers by rules the test sets per row.
The grading is the real ``exact`` reward function.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import rewards
from services.corruption.service import CorruptionService
from services.rollout.types import RolloutResult, SamplingSpec
from trainer.cli import main as cli_main
from trainer.core.batch import RolloutBatch
from trainer.core.config import named_config, resolve_config
from trainer.core.data import PromptExample
from trainer.evaluate import (
    EvalError,
    EvalReport,
    EvalSettings,
    Evaluator,
    check_checkpoint,
    evaluate_examples,
    find_run_config,
    write_report,
)

COLOUR = (200, 40, 40)


class FakeEngine:
    """(requests, spec) -> RolloutResult. Greedy: correct iff it sees the image and the row is not
    in ``wrong``. Sampled (n > 1): sample j is correct iff j < hits[row]. ``unserved`` rows get an
    engine error. Records every call's requests, spec and images."""

    def __init__(self, wrong=(), unserved=(), hits=None, unwrap=lambda x: x):
        self.wrong, self.unserved, self.hits = set(wrong), set(unserved), dict(hits or {})
        self.unwrap = unwrap
        self.calls: list[tuple[list, SamplingSpec, list[list[Image.Image]]]] = []

    def __call__(self, requests, spec):
        images = [[self.unwrap(x) for x in r.images] for r in requests]
        self.calls.append((list(requests), spec, images))
        rows, errors = [], {}
        for i, (req, imgs) in enumerate(zip(requests, images)):
            if req.row_id in self.unserved:
                errors[i] = "prompt_too_long: the fake engine refuses this row"
                continue
            sees = bool(np.asarray(imgs[0])[0, 0].any())
            for j in range(spec.n):
                ok = (sees and req.row_id not in self.wrong) if spec.n == 1 else j < self.hits.get(req.row_id, 0)
                rows.append((i, req, f"<think>look</think> \\boxed{{{req.answer if ok else 'nope'}}}"))
        if not rows:
            return RolloutResult(None, errors, 0, len(requests))
        batch = RolloutBatch.from_sequences(
            [[1, 2]] * len(rows),
            [[3]] * len(rows),
            [[0.0]] * len(rows),
            group_ids=[i for i, _, _ in rows],
            row_ids=[r.row_id for _, r, _ in rows],
            weight_version=0,
            image_refs=[[] for _ in rows],
            answers=[r.answer for _, r, _ in rows],
            response_text=[t for _, _, t in rows],
        )
        return RolloutResult(batch, errors, 0, len(requests))


def grade(items):
    return [rewards.score("exact", r, a) for r, a in items]


def make_examples(folder: Path, row_ids, missing=(), size=28) -> list[PromptExample]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for row in row_ids:
        path = folder / f"img{row}.png"
        if row not in missing:
            # A little texture so masks are visible in every cell.
            arr = np.full((size, size, 3), COLOUR, dtype=np.uint8)
            arr[::3, ::3] = (10, 200, 90)
            Image.fromarray(arr).save(path)
        out.append(
            PromptExample(
                row_id=row,
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}],
                    }
                ],
                image_paths=[path],
                answer=f"ans{row}",
            )
        )
    return out


def settings(**kw) -> EvalSettings:
    base = dict(k=4, seed=3, max_tokens=8, patch_size=14, prob=0.0)
    base.update(kw)
    return EvalSettings(**base)


# Rows 10-12 right, 13 wrong, 14 unserved by the engine, 15 has no image file.
ROWS = [10, 11, 12, 13, 14, 15]
HITS = {10: 4, 11: 2, 12: 0, 13: 1, 14: 4}


def test_exact_numbers_on_a_constructed_case(tmp_path):
    examples = make_examples(tmp_path, ROWS, missing={15})
    engine = FakeEngine(wrong={13}, unserved={14}, hits=HITS)
    result = Evaluator(engine, grade, settings(prob=0.0)).evaluate(examples, name="toy")
    assert result.num_prompts == 6 and result.bad_prompts == 1 and result.unserved_prompts == 1
    # Unserved and unusable prompts stay in the denominator: they count as wrong.
    assert result.accuracy == pytest.approx(3 / 6)
    assert result.black_accuracy == 0.0 and result.vision_gap == pytest.approx(0.5)
    assert result.masked_accuracy == pytest.approx(3 / 6) and result.masked_gap == pytest.approx(0.0)  # p = 0
    assert result.avg_at_k == pytest.approx((4 + 2 + 0 + 1) / (4 * 6))
    assert result.pass_at_k == pytest.approx(3 / 6)
    assert result.grading_errors == 0
    greedy = result.conditions["greedy"]
    assert (greedy.requests, greedy.served) == (5, 4) and "prompt_too_long" in greedy.errors[0]
    m = result.metrics()
    assert m["eval/accuracy"] == pytest.approx(0.5) and m["eval/avg@4"] == pytest.approx(7 / 24)
    assert m["eval/pass@4"] == pytest.approx(0.5) and m["eval/unserved_prompts"] == 1.0
    assert m["eval/bad_prompts"] == 1.0 and m["eval/num_prompts"] == 6.0
    assert set(m) >= {"eval/black_accuracy", "eval/masked_accuracy", "eval/vision_gap", "eval/masked_gap"}
    # The k samples came at the rollout temperature / top-p, the greedy ones at temperature 0.
    specs = [spec for _, spec, _ in engine.calls]
    assert [s.n for s in specs] == [1, 1, 1, 4]
    assert specs[0].temperature == 0.0 and specs[3].temperature == 1.0


def test_fully_masked_images_give_the_black_accuracy(tmp_path):
    examples = make_examples(tmp_path, ROWS, missing={15})
    result = Evaluator(FakeEngine(wrong={13}, unserved={14}, hits=HITS), grade, settings(prob=1.0, k=0)).evaluate(
        examples
    )
    assert result.masked_accuracy == 0.0 and result.masked_gap == pytest.approx(0.5)
    assert result.avg_at_k is None and result.pass_at_k is None
    assert not any(k.startswith(("eval/avg@", "eval/pass@")) for k in result.metrics())


def test_masked_images_are_the_training_masks(tmp_path):
    examples = make_examples(tmp_path, [5, 6, 7], size=56)
    engine = FakeEngine()
    s = settings(prob=0.6, k=0, seed=11)
    Evaluator(engine, grade, s).evaluate(examples)
    (_, _, originals), (_, _, black), (_, _, masked) = engine.calls
    service = CorruptionService(strategy="patch_blackening", patch_size=14, prob=0.6, max_pixels=s.max_raw_pixels)
    for ex, orig, blk, got in zip(examples, originals, black, masked):
        expected = service.mask_prompt(orig, run_seed=11, row_id=ex.row_id, epoch=0)
        assert np.array_equal(np.asarray(got[0]), np.asarray(expected[0]))
        assert not np.array_equal(np.asarray(got[0]), np.asarray(orig[0]))  # really masked...
        assert np.asarray(got[0]).any()  # ...not all black
        assert not np.asarray(blk[0]).any() and blk[0].size == orig[0].size


def test_chunking_changes_nothing_and_images_are_put_once_per_condition(tmp_path):
    examples = make_examples(tmp_path, ROWS, missing={15})
    puts = []

    def put(image):
        puts.append(image)
        return ("ref", image)

    whole = Evaluator(FakeEngine(wrong={13}, unserved={14}, hits=HITS), grade, settings()).evaluate(examples)
    engine = FakeEngine(wrong={13}, unserved={14}, hits=HITS, unwrap=lambda ref: ref[1])
    chunked = Evaluator(engine, grade, settings(chunk_size=2), put=put).evaluate(examples)
    strip = {"seconds", "conditions"}
    assert chunked.model_dump(exclude=strip) == whole.model_dump(exclude=strip)
    # Original images once (shared by greedy and sampled), black once, masked once; 5 usable prompts.
    assert len(puts) == 3 * 5
    # Sampling seeds follow the prompt's position, whatever the chunking: seed + index * k.
    assert [spec.seed for _, spec, _ in engine.calls if spec.n > 1] == [3 + 0 * 4, 3 + 2 * 4, 3 + 4 * 4]


def test_an_engine_that_serves_nothing_is_an_error(tmp_path):
    examples = make_examples(tmp_path, [1, 2])
    with pytest.raises(RuntimeError, match="served none of 2 prompts in the greedy condition"):
        Evaluator(FakeEngine(unserved={1, 2}), grade, settings()).evaluate(examples)


def test_evaluate_examples_reads_the_config(tmp_path):
    cfg = resolve_config([named_config("demo")], ["corruption.prob=1.0", "rollout.temperature=0.7"], warn=False)
    assert cfg.trainer.eval_k == 0  # in-training eval stays cheap by default
    examples = make_examples(tmp_path, [1, 2, 3])
    engine = FakeEngine(hits={1: 8, 2: 8, 3: 8})
    result = evaluate_examples(examples, generate=engine, grade=grade, cfg=cfg)
    assert result.accuracy == 1.0 and result.masked_accuracy == 0.0 and result.avg_at_k is None
    engine = FakeEngine(hits={1: 8, 2: 4, 3: 0})
    result = evaluate_examples(examples, generate=engine, grade=grade, cfg=cfg, k=8)
    assert result.metrics()["eval/avg@8"] == pytest.approx(12 / 24)
    assert engine.calls[-1][1].temperature == 0.7 and engine.calls[-1][1].max_tokens == cfg.rollout.max_tokens


def test_report_table_json_and_mean(tmp_path):
    a = Evaluator(FakeEngine(wrong={13}, unserved={14}, hits=HITS), grade, settings()).evaluate(
        make_examples(tmp_path / "a", ROWS, missing={15}), name="bench-a"
    )
    b = Evaluator(FakeEngine(hits={1: 4, 2: 4}), grade, settings()).evaluate(
        make_examples(tmp_path / "b", [1, 2]), name="bench-b"
    )
    report = EvalReport(checkpoint=str(tmp_path), settings=settings(), datasets=[a, b], reward_fn="exact")
    md = report.to_markdown()
    header = md.splitlines()[0]
    for col in ("accuracy", "black", "masked", "vision gap", "masked gap", "avg@4", "pass@4", "unserved", "bad"):
        assert col in header
    assert "| bench-a | 6 | 0.500 |" in md and "| bench-b | 2 | 1.000 |" in md and "| **mean** | 8 | 0.750 |" in md
    data = json.loads(report.to_json())
    assert data["mean"]["eval/accuracy"] == pytest.approx(0.75)
    assert data["datasets"][0]["vision_gap"] == pytest.approx(0.5)
    assert data["datasets"][0]["metrics"]["eval/avg@4"] == pytest.approx(7 / 24)
    assert data["metrics"]["eval/bench-b/accuracy"] == 1.0
    assert EvalReport.model_validate_json(report.to_json()).datasets[1].accuracy == 1.0
    metrics = report.metrics()
    assert metrics["eval/accuracy"] == pytest.approx(0.75) and metrics["eval/bench-a/accuracy"] == 0.5
    single = EvalReport(checkpoint=str(tmp_path), settings=settings(), datasets=[a])
    assert single.mean is None and "**mean**" not in single.to_markdown() and single.metrics() == a.metrics()
    json_path, md_path = write_report(single)
    assert (json_path, md_path) == (tmp_path / "eval.json", tmp_path / "eval.md")
    assert write_report(single, tmp_path / "out" / "r.json") == (tmp_path / "out" / "r.json", tmp_path / "out" / "r.md")
    assert write_report(single, tmp_path / "dir")[0] == tmp_path / "dir" / "eval.json"


# ---- papo eval: everything that must fail before an engine starts ---------------------------


def fake_model_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_checkpoint_checks_name_the_path(tmp_path):
    with pytest.raises(EvalError, match=f"{tmp_path / 'nope'} does not exist"):
        check_checkpoint(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EvalError, match="is not a folder"):
        check_checkpoint(tmp_path / "file")
    run = tmp_path / "runs" / "demo"
    ckpt = fake_model_folder(run / "checkpoints" / "step_000002")
    with pytest.raises(EvalError, match=r"no config.json; this looks like a run directory.*step_000002"):
        check_checkpoint(run)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(EvalError, match="no weights"):
        check_checkpoint(tmp_path / "empty")
    assert check_checkpoint(ckpt) == ckpt.resolve()
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text('{"model_type": "llava"}')
    (tmp_path / "llava" / "model.safetensors").write_bytes(b"")
    with pytest.raises(EvalError, match="model_type 'llava' is not a supported model family"):
        check_checkpoint(tmp_path / "llava")
    assert find_run_config(ckpt) is None
    (run / "config.yaml").write_text("seed: 1\n")
    assert find_run_config(ckpt) == run / "config.yaml"


def test_cli_exits_2_before_any_engine(tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    assert cli_main(["eval", "--checkpoint", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    ckpt = fake_model_folder(tmp_path / "ckpt")
    data = tmp_path / "missing.parquet"
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--k", "2"]) == 2
    assert f"data file {data} does not exist" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "rollout.n=1"]) == 2
    assert "rollout.n" in capsys.readouterr().err  # config errors name the field
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--k", "-1"]) == 2
    assert "--k must be >= 0" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli_main(["eval", "--checkpoint", str(ckpt), "--out", str(blocker / "sub")]) == 2
    assert f"cannot create the output folder {blocker / 'sub'}" in capsys.readouterr().err


def test_precomputed_strategy_uses_the_rows_masked_images(tmp_path):
    examples = make_examples(tmp_path, [1, 2])
    s = settings(corruption_strategy="precomputed", k=0)
    # Without pre-masked images the masked condition is skipped, not failed.
    plain = Evaluator(FakeEngine(), grade, s).evaluate(examples)
    assert plain.masked_accuracy is None and "masked" not in plain.conditions
    black = tmp_path / "black.png"
    Image.new("RGB", (28, 28)).save(black)
    premasked = [ex.model_copy(update={"images_masked": [black]}) for ex in examples]
    engine = FakeEngine()
    result = Evaluator(engine, grade, s).evaluate(premasked)
    assert result.accuracy == 1.0 and result.masked_accuracy == 0.0
    assert not np.asarray(engine.calls[2][2][0][0]).any()  # the masked pass got the row's own image
