"""The demo's synthetic, vision-dependent VQA set: images of coloured shapes on a grey noisy
background and questions whose answers need the image (colour, shape, count, position, size
comparison, same colour), written in the parquet + image-files layout ``trainer.core.data`` reads,
with disjoint ``train``, ``validation``, ``sft``, ``sft_eval`` and ``sft_easy`` splits and answers
balanced per question text.
Owns the palette, the question templates, scene rendering and :func:`write_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from trainer.core.data import IMAGE_PLACEHOLDER

#: Bump whenever the output of a given set of arguments changes (model, tokenizer, data): the
#: cache key (``trainer.demo.assets.recipe``) includes it, so stale asset folders are rebuilt
#: instead of silently reused; the dataset card names it.
RECIPE_VERSION = 3

#: Base colours: saturated, far from grey and from each other even after +-25 jitter per channel
#: (every pair at least 110 apart in RGB; tests/unit/test_demo.py checks the margin). Recipe 1 had
#: orange (240, 140, 25) instead of cyan: 77 from yellow, and jittered orange and yellow came within
#: 14 of each other. Its RL runs learnt blue, green and purple and stalled on red/orange/yellow
#: (confusion matrices in docs/demo.md: orange and yellow were never both learnt), and no demo recipe
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
#: questions only. Measured (docs/demo.md): RL from a warm start on colour + count
#: stayed flat within the demo's budget; on colour only the best checkpoint gains 0.35-0.39 over
#: the start (recipe 2, 3 seeds).
DEMO_TEMPLATES: tuple[str, ...] = ("color",)
#: Single-token words of the answer vocabulary (the tokenizer is trained to keep them whole).
ANSWER_VOCAB = tuple(dict.fromkeys(a for answers in TEMPLATE_ANSWERS.values() for a in answers))

#: ``train`` and ``validation`` are the RL task; the warm start trains on ``sft_easy`` (the colour
#: question on larger shapes, :data:`EASY_COLOR_RADIUS`) and then on ``sft``, and decides when to
#: stop on ``sft_eval``; those three are drawn like ``train`` except ``sft_easy``. New splits go at
#: the end: a split's rows come from its position's random stream.
SPLITS = ("train", "validation", "sft", "sft_eval", "sft_easy")
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
    sft_eval: int = 256
    sft_easy: int = 2048

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


#: Half-side of the colour question's shape as a fraction of the image side: the task's ...
COLOR_RADIUS = (0.14, 0.28)
#: ... and ``sft_easy``'s: the same question on shapes about twice as large. On the task's shapes
#: the supervised warm start sits at chance, or answers the colours in two groups, for 230 to more
#: than 400 steps depending on the seed (docs/demo.md); on large shapes every colour forms at once,
#: after 35-60 steps on every seed measured, and carries over to the task's shapes.
EASY_COLOR_RADIUS = (0.30, 0.42)


def _template_color(
    rng: np.random.Generator, labels: _BalancedLabels, size: int, radius: tuple[float, float] = COLOR_RADIUS
) -> tuple[str, str, list[Shape]]:
    kind = _random_kind(rng)
    question = "What color is the shape?" if rng.integers(2) else f"What color is the {kind}?"
    answer = labels.draw("color", question, TEMPLATE_ANSWERS["color"])
    r = _radius(rng, size, *radius)
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
#: The ``sft_easy`` split's templates: the task's, with the colour question on larger shapes.
_EASY_TEMPLATE_FNS = {**_TEMPLATE_FNS, "color": functools.partial(_template_color, radius=EASY_COLOR_RADIUS)}


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
        fns = _EASY_TEMPLATE_FNS if split == "sft_easy" else _TEMPLATE_FNS
        question, answer, shapes = fns[template](rng, labels, image_size)
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
    # The YAML header lets `datasets.load_dataset(data_dir)` find every split (it would not guess
    # "sft", "sft_eval" or "sft_easy" from file names alone).
    configs = "\n".join(f"  - split: {s}\n    path: {s}.parquet" for s in SPLITS)
    return (
        f"---\nconfigs:\n- config_name: default\n  data_files:\n{configs}\n---\n"
        "# papo demo: synthetic vision-dependent VQA\n\n"
        f"Generated by `trainer/demo/` (recipe {RECIPE_VERSION}, seed {seed}): {image_size}x{image_size} "
        "images of coloured shapes on a grey noisy background.\n"
        f"Templates: {', '.join(templates)}. Rows: "
        + ", ".join(f"{k} {v}" for k, v in sizes.as_dict().items())
        + f". The `sft_easy` split (the warm start's first steps) draws the colour question's shape with "
        f"half-sides {EASY_COLOR_RADIUS[0]}-{EASY_COLOR_RADIUS[1]} of the image side, the others "
        f"{COLOR_RADIUS[0]}-{COLOR_RADIUS[1]}"
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
    """Write every split's parquet file (:data:`SPLITS`), their PNGs and a dataset card."""
    check_templates(templates)
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


def check_templates(templates: Sequence[str]) -> None:
    """Raises ``ValueError`` for an empty or unknown template list."""
    unknown = [t for t in templates if t not in TEMPLATE_ANSWERS]
    if unknown or not templates:
        raise ValueError(f"unknown or no templates {unknown or list(templates)}; choose from {list(TEMPLATES)}")
