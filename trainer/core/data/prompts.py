"""Prompt formatting: a question with ``<image>`` placeholders -> chat messages, with PAPO's format
prompt appended or a Jinja template (EasyR1's ``format_prompt`` files; ``configs/templates``).

Two styles (``data.prompt_style``): ``easyr1`` builds the messages exactly as EasyR1, the authors'
base, does (the template file stripped, then rendered; or ``question + " " + format_prompt``; the
text split around the placeholders and every non-empty piece kept as it is); ``papo`` is papo's
earlier style (whitespace-only pieces dropped, leading whitespace after an image stripped, one
space before the format prompt), kept for runs that must reproduce it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import configs
from trainer.core.data.examples import DataError

#: The prompt PAPO appends to every question (docs/algorithm.md, "prompt").
PAPO_FORMAT_PROMPT = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)

#: The placeholder marking where an image goes in the question text.
IMAGE_PLACEHOLDER = "<image>"

#: ``data.prompt_style`` values: how the question, the format prompt and the images become messages.
PROMPT_STYLES = ("easyr1", "papo")

#: The suffix of prompt-template files; a bare name (``papo_math``) is looked up in ``configs/templates``.
TEMPLATE_SUFFIX = ".jinja"


def templates_dir() -> Path:
    """The shipped prompt templates (``configs/templates``)."""
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
def _compile_template(path: str, mtime_ns: int, strip: bool = False) -> Any:
    # Lazy: jinja2 is no declared dependency, and only templated prompts need it.
    from jinja2 import StrictUndefined, TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Sandboxed like HF chat templates: a template file from elsewhere cannot reach Python
    # internals. StrictUndefined turns a typo ({{ contnet }}) into an error, not empty text.
    env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)
    try:
        text = Path(path).read_text(encoding="utf-8")
        # EasyR1 compiles the file's text stripped (no trailing newline in the rendered prompt).
        return env.from_string(text.strip() if strip else text)
    except TemplateSyntaxError as e:
        raise DataError(f"prompt template {path}: line {e.lineno}: {e.message}") from None


def load_prompt_template(spec: str | Path, *, strip: bool = False) -> Any:
    """The compiled Jinja template named by ``spec`` (a shipped name or a file), of the file's text
    stripped when ``strip`` (EasyR1's way); validated by rendering a sample question, so a broken
    template fails before any data is read."""
    path = resolve_template_path(spec)
    template = _compile_template(str(path.resolve()), path.stat().st_mtime_ns, strip)
    try:
        template.render(content=f"{IMAGE_PLACEHOLDER}What is shown?")
    except Exception as e:  # jinja raises UndefinedError, TypeError... from user templates
        raise DataError(f"prompt template {path}: rendering failed: {e.__class__.__name__}: {e}") from None
    return template


class PromptFormatter:
    """Turns a question (text with ``<image>`` placeholders) into chat messages.

    With a ``template`` (a Jinja file rendered with ``content`` = the question, EasyR1's
    convention) the rendered text is the whole user turn; otherwise ``format_prompt`` (or
    nothing, when ``None``) is added to the question. ``style`` is one of :data:`PROMPT_STYLES`
    (module docstring).
    """

    def __init__(
        self,
        format_prompt: str | None = PAPO_FORMAT_PROMPT,
        template: str | Path | None = None,
        style: str = "easyr1",
    ):
        if style not in PROMPT_STYLES:
            raise ValueError(f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}; got {style!r}")
        self.format_prompt = format_prompt
        self.style = style
        self.template = load_prompt_template(template, strip=style == "easyr1") if template is not None else None

    def messages(self, problem: str, num_images: int) -> list[dict[str, Any]]:
        """Raises ``ValueError`` when the placeholder count differs from ``num_images``."""
        # Checked before rendering too, so a template that adds text cannot mask a bad row.
        if problem.count(IMAGE_PLACEHOLDER) != num_images:
            raise ValueError(
                f"{problem.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)"
            )
        if self.style == "papo":
            if self.template is None:
                return build_messages(problem, num_images, self.format_prompt)
            return build_messages(self.template.render(content=problem), num_images, None)
        if self.template is not None:
            text = self.template.render(content=problem)
        elif self.format_prompt:
            text = f"{problem} {self.format_prompt.strip()}"
        else:
            text = problem
        return easyr1_messages(text, num_images)


def easyr1_messages(text: str, num_images: int) -> list[dict[str, Any]]:
    """EasyR1's user turn: ``text`` split around ``<image>``, an image item between pieces and every
    non-empty piece kept verbatim (whitespace included).

    Raises ``ValueError`` when the placeholder count differs from ``num_images``.
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != num_images:
        raise ValueError(f"{len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def build_messages(problem: str, num_images: int, format_prompt: str | None) -> list[dict[str, Any]]:
    """Chat messages for a question whose text marks each image with ``<image>`` (the ``papo`` style).

    The text is split around the placeholders, so image items land where the dataset put them;
    empty text pieces are dropped. The format prompt goes after the question's last text,
    separated by one space.
    Raises ``ValueError`` when the placeholder count differs from ``num_images``.
    """
    (turn,) = easyr1_messages(problem, num_images)
    content = [c for c in turn["content"] if c["type"] == "image" or c["text"].strip()]
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
