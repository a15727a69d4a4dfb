"""The demo's supervised warm start (trainer/demo/warmstart.py): it learns the task from the image,
stays inside the asset cache's contract (recipe keys the cache, only the weights change) and
is reproducible.

The learning test trains the real tiny model on a real sft split of the demo's task (colour, chance
1/6) with a looser band than the demo's, so it stops within about 40 steps; the accuracy it reports
is re-measured from the saved folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from trainer.demo import assets as demo
from trainer.demo import warmstart
from trainer.demo.assets import DemoAssets, WarmStart, build_demo_assets, recipe
from trainer.demo.dataset import COLORS, DEFAULT_TEMPLATES, DEMO_TEMPLATES, DatasetSizes
from trainer.demo.warmstart import EVAL_SPLIT, SFTWarmStart, _by_key, _greedy_correct, _prepare

#: Tiny train/validation (not used here) and the demo's sft split of 4096 rows (with 1024 the
#: tiny model memorises images and plateaus near 0.3, measured on colour + count).
SIZES = DatasetSizes(train=16, validation=16, sft=4096, sft_eval=128, sft_easy=1280)
#: The warm-started assets are the demo's task: colour questions only. (Colour + count, the
#: library's default mixture, needs 420 supervised steps to reach 0.37 with recipe 2's palette.)
TEMPLATES = DEMO_TEMPLATES
CHANCE = 1 / 6
#: The demo's curriculum (20 steps on larger shapes first) with a looser band: 0.33 is about 5
#: binomial standard deviations above chance on 128 rows, and every colour's right answer must have
#: a mean probability of 0.2 or more (about 1/6 at best for a model that ignores the image).
TEST_WARM = SFTWarmStart(target_band=(0.33, 1.0), min_coverage=0.2, easy_steps=20, max_steps=260, eval_every=2)
#: A few steps on a few rows: for the contract tests, which need weights to move, not learning.
QUICK = SFTWarmStart(batch_size=8, eval_size=8, max_steps=2, eval_every=2, max_new_tokens=8)
SMALL = DatasetSizes(train=16, validation=8, sft=24, sft_eval=8, sft_easy=8)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def warmed(tmp_path_factory: pytest.TempPathFactory) -> tuple[DemoAssets, DemoAssets]:
    """(the same assets built without and with the test warm start)."""
    root = tmp_path_factory.mktemp("warm")
    plain = build_demo_assets(root / "plain", seed=0, sizes=SIZES, templates=TEMPLATES)
    warm = build_demo_assets(root / "warm", seed=0, sizes=SIZES, templates=TEMPLATES, warm_start=TEST_WARM)
    return plain, warm


def test_warm_start_learns_from_the_image(warmed: tuple[DemoAssets, DemoAssets]) -> None:
    _, warm = warmed
    info = json.loads((warm.root / demo.MANIFEST).read_text())["warm_start_info"]
    assert info["in_band"] and info["covered"] and info["steps"] < TEST_WARM.max_steps, info  # stopped early
    assert info["heldout_rows"] == TEST_WARM.eval_size and info["train_rows"] == SIZES.sft
    assert info["easy_rows"] == SIZES.sft_easy and info["steps"] > TEST_WARM.easy_steps
    # Every colour's correct response is sampled with real probability: what RL needs.
    assert set(info["p_answer_by_answer"]) == set(COLORS) and min(info["p_answer_by_answer"].values()) >= 0.2
    assert info["heldout_accuracy"] >= CHANCE + 0.08, info
    # Fully black images: the answer must come from the image, so this stays near chance.
    assert info["black_accuracy"] <= CHANCE + 0.08, info
    assert info["heldout_accuracy"] - info["black_accuracy"] >= 0.06, info
    # Colour is the template the tiny model picks up first; without the image it is a guess.
    by_t, black_by_t = info["heldout_accuracy_by_template"], info["black_accuracy_by_template"]
    assert by_t["color"] - black_by_t["color"] >= 0.1 and black_by_t["color"] <= 1 / 6 + 0.1, info

    # Re-measure from the saved folder through the generic HF classes: the reported accuracy is
    # the saved model's, not that of some in-memory state.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(warm.model_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(warm.model_dir)
    held_out = _prepare(processor, warm.data_dir, EVAL_SPLIT)[: TEST_WARM.eval_size]
    correct = _greedy_correct(model, processor, held_out, black=False, max_new_tokens=16)
    assert sum(correct) / len(correct) == pytest.approx(info["heldout_accuracy"], abs=1e-3)
    assert _by_key([e.answer for e in held_out], correct) == info["recall_by_answer"]


def test_only_the_weights_change_and_the_recipe_keys_the_cache(warmed: tuple[DemoAssets, DemoAssets]) -> None:
    plain, warm = warmed
    before, after = _digests(plain.model_dir), _digests(warm.model_dir)
    assert before.keys() == after.keys()
    assert [name for name in before if before[name] != after[name]] == ["model.safetensors"]
    assert warm.recipe_hash != plain.recipe_hash
    assert warm.recipe["warm_start"] == TEST_WARM.recipe
    # Same recipe: cached, nothing retrained.
    again = build_demo_assets(
        warm.root, seed=0, sizes=SIZES, templates=TEMPLATES, warm_start=dataclasses.replace(TEST_WARM)
    )
    assert not again.built and again.recipe_hash == warm.recipe_hash


def test_recipe_string_changes_the_cache_key() -> None:
    def key(ws: SFTWarmStart | None) -> str:
        return recipe(
            seed=0,
            min_pixels=3136,
            max_pixels=12544,
            sizes=SIZES,
            templates=DEFAULT_TEMPLATES,
            image_size=56,
            warm_start=ws,
        )[1]

    base = SFTWarmStart()
    assert isinstance(base, WarmStart)
    assert key(base) == key(SFTWarmStart())  # stable across instances (and processes: no id/hash())
    others = [
        None,
        SFTWarmStart(lr=1e-3),
        SFTWarmStart(max_steps=100),
        SFTWarmStart(target_band=(0.4, 0.6)),
        SFTWarmStart(eval_size=64),
        SFTWarmStart(max_pixels=56 * 56 * 4 + 28 * 28),
        SFTWarmStart(min_coverage=0.3),
        SFTWarmStart(num_threads=1),
    ]
    assert len({key(base), *map(key, others)}) == len(others) + 1


def test_the_palette_keys_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def key() -> str:
        return recipe(
            seed=0,
            min_pixels=3136,
            max_pixels=12544,
            sizes=SIZES,
            templates=DEFAULT_TEMPLATES,
            image_size=56,
            warm_start=None,
        )[1]

    before = key()
    monkeypatch.setitem(demo.COLORS, "red", (200, 35, 35))
    assert key() != before


def test_same_seed_same_weights_other_seed_differs(tmp_path: Path) -> None:
    plain = build_demo_assets(tmp_path / "plain", sizes=SMALL)
    weights = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        shutil.copytree(plain.root, tmp_path / name)
        facts = QUICK(tmp_path / name / "model", tmp_path / name / "data", seed=seed)
        assert facts["steps"] == 2 and facts["heldout_rows"] == 8 and facts["train_rows"] == SMALL.sft
        assert len(facts["weights_sha256"]) == 64
        weights[name] = (tmp_path / name / "model" / "model.safetensors").read_bytes()
    assert weights["a"] == weights["b"] != weights["c"]
    assert weights["a"] != (plain.model_dir / "model.safetensors").read_bytes()


def test_too_small_sft_split_is_skipped_and_recorded(tmp_path: Path) -> None:
    plain = build_demo_assets(tmp_path / "plain", sizes=SMALL)
    shutil.copytree(plain.root, tmp_path / "x")
    facts = SFTWarmStart()(tmp_path / "x" / "model", tmp_path / "x" / "data", seed=0)  # 24 rows < batch 64
    assert "skipped" in facts and "sft has 24 rows" in facts["skipped"] and "sft_eval 8" in facts["skipped"]
    assert _digests(tmp_path / "x" / "model") == _digests(plain.model_dir)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_band": (0.6, 0.4)},
        {"target_band": (-0.1, 0.5)},
        {"batch_size": 0},
        {"lr": 0.0},
        {"min_coverage": 1.5},
        {"num_threads": 0},
        {"easy_steps": 600},
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SFTWarmStart(**kwargs)


def _script(monkeypatch: pytest.MonkeyPatch, accuracies: list[float], coverages: list[float]) -> list[str]:
    """Scripted checks for the stopping rule: the i-th greedy pass answers ``accuracies[i]`` of the
    rows right, the i-th probability pass gives every row ``coverages[i]``. Returns a call log."""
    calls: list[str] = []
    acc, cov = iter(accuracies), iter(coverages)

    def greedy(model, processor, examples, **kw):  # noqa: ANN001, ANN003, ANN202 (a test double)
        calls.append("black" if kw["black"] else "greedy")
        k = round(next(acc) * len(examples))
        return [1.0] * k + [0.0] * (len(examples) - k)

    def prob(model, image_processor, examples, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append("prob")
        return [next(cov)] * len(examples)

    monkeypatch.setattr(warmstart, "_greedy_correct", greedy)
    monkeypatch.setattr(warmstart, "_answer_prob", prob)
    return calls


def _copies(tmp_path: Path, *names: str) -> None:
    plain = build_demo_assets(tmp_path / "plain", sizes=SMALL)
    for name in names:
        shutil.copytree(plain.root, tmp_path / name)


def test_overshooting_the_band_keeps_the_closer_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between two checks accuracy can jump over the band: 0.25 -> 0.875 around a 0.35-0.55 band
    keeps the earlier weights (0.10 below beats 0.325 above)."""
    _copies(tmp_path, "ref", "x")
    QUICK(tmp_path / "ref" / "model", tmp_path / "ref" / "data", seed=0)  # the weights after 2 steps

    # Checks at steps 2 and 4 (then the black-image pass): accuracies 2/8, 7/8, 1/8.
    _script(monkeypatch, [0.25, 0.875, 0.125], [0.5, 0.5])
    ws = dataclasses.replace(QUICK, max_steps=10, target_band=(0.35, 0.55))
    facts = ws(tmp_path / "x" / "model", tmp_path / "x" / "data", seed=0)
    assert (facts["steps"], facts["steps_trained"]) == (2, 4)
    assert [(c["step"], c["accuracy"]) for c in facts["checks"]] == [(2, 0.25), (4, 0.875)]
    assert not facts["in_band"] and facts["heldout_accuracy"] == 0.25 and facts["black_accuracy"] == 0.125
    ref = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()
    assert (tmp_path / "x" / "model" / "model.safetensors").read_bytes() == ref


def test_an_answer_short_of_coverage_keeps_it_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Accuracy inside the band does not stop the warm start while some answer's correct response
    is rarely sampled; the greedy pass is skipped until coverage holds, then the band decides."""
    _copies(tmp_path, "x")
    calls = _script(monkeypatch, [0.5, 0.5, 0.0], [0.1, 0.2, 0.4, 0.4])
    ws = dataclasses.replace(QUICK, max_steps=20, target_band=(0.35, 0.55), min_coverage=0.3)
    facts = ws(tmp_path / "x" / "model", tmp_path / "x" / "data", seed=0)
    assert [(c["step"], c["accuracy"], c["coverage"]) for c in facts["checks"]] == [
        (2, None, 0.1),
        (4, None, 0.2),
        (6, 0.5, 0.4),
    ]
    assert calls == ["prob", "prob", "prob", "greedy", "black"]
    assert facts["steps"] == 6 and facts["covered"] and facts["in_band"] and facts["coverage"] == 0.4


def test_max_steps_without_coverage_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never covered: it stops at max_steps, measures the last check fully and says so."""
    _copies(tmp_path, "x")
    _script(monkeypatch, [0.5, 0.0], [0.1, 0.1])
    ws = dataclasses.replace(QUICK, max_steps=4, min_coverage=0.3)
    facts = ws(tmp_path / "x" / "model", tmp_path / "x" / "data", seed=0)
    assert facts["steps"] == 4 and not facts["covered"] and facts["heldout_accuracy"] == 0.5


def test_easy_steps_train_on_the_easy_split_first_and_are_not_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copies(tmp_path, "x")
    prepared: dict[str, list] = {}
    real_prepare, real_batch = warmstart._prepare, warmstart._batch

    def prepare(processor, data_dir, split_name="sft"):  # noqa: ANN001, ANN202 (a recording wrapper)
        prepared[split_name] = real_prepare(processor, data_dir, split_name)
        return prepared[split_name]

    drawn: list[str] = []
    ws = dataclasses.replace(QUICK, batch_size=4, easy_steps=3, max_steps=7, eval_every=2)

    def batch(examples, responses, pad_id):  # noqa: ANN001, ANN202
        if len(examples) == ws.batch_size:  # a training batch (checks score eval_size rows)
            easy = {id(e) for e in prepared["sft_easy"]}
            drawn.append("easy" if all(id(e) in easy for e in examples) else "sft")
        return real_batch(examples, responses, pad_id)

    monkeypatch.setattr(warmstart, "_prepare", prepare)
    monkeypatch.setattr(warmstart, "_batch", batch)
    facts = ws(tmp_path / "x" / "model", tmp_path / "x" / "data", seed=0)
    assert drawn == ["easy"] * 3 + ["sft"] * 4
    assert [c["step"] for c in facts["checks"]] == [5, 7]  # every 2 steps after the easy ones, and the last
    assert facts["easy_steps"] == 3 and facts["easy_rows"] == SMALL.sft_easy
