"""Text extraction shared by the reward functions: boxed answers, the PAPO format check, answer
normalisation and multiple-choice letters.

This module owns *what counts as the model's answer* in a response; `rewards.functions` owns how
an extracted answer is graded. Everything here is pure string work (no sympy), cheap and safe to
call on untrusted text: no regex here can backtrack catastrophically (patterns are anchored or
linear), and brace matching is a single linear scan.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = [
    "last_boxed",
    "format_score",
    "normalize_answer",
    "unwrap_text",
    "choice_letter",
    "answer_letter",
    "as_number",
    "simple_number",
]

_BOXED_RE = re.compile(r"\\boxed\s*\{")
# Qwen2.5-VL often emits whitespace inside tags ("< think >", "</ think>"); EasyR1 (the PAPO
# authors' base) strips it before matching, so we tolerate it the same way.
_THINK_OPEN_RE = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE_RE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)


def _brace_pairs(text: str) -> dict[int, int]:
    """Index of each ``{`` that is closed -> index of its ``}``, in one linear pass.

    Escaped braces (``\\{`` / ``\\}``, LaTeX set notation) are skipped. One pass for the whole
    text, not one scan per ``\\boxed{``: thousands of unclosed boxes must stay cheap.
    """
    pairs: dict[int, int] = {}
    stack: list[int] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2  # skip the escaped character, whatever it is
            continue
        if c == "{":
            stack.append(i)
        elif c == "}" and stack:
            pairs[stack.pop()] = i
        i += 1
    return pairs


def _boxed_spans(text: str) -> list[tuple[int, int, str]]:
    """All brace-matched ``\\boxed{...}`` occurrences as (start, end, content), in text order."""
    if "\\boxed" not in text:
        return []
    pairs = _brace_pairs(text)
    spans = []
    for m in _BOXED_RE.finditer(text):
        close = pairs.get(m.end() - 1)
        if close is not None:
            spans.append((m.start(), close + 1, text[m.end() : close]))
    return spans


def last_boxed(text: str) -> str | None:
    """Content of the last brace-matched ``\\boxed{...}`` in ``text`` (stripped), or None.

    "Last" is by opening position, so for ``\\boxed{\\boxed{3}}`` it is the inner ``3``. A final
    ``\\boxed{`` that is never closed (a truncated response) is skipped, and the last complete one
    before it is used: a truncated response is graded on what it did finish.
    """
    spans = _boxed_spans(text)
    if not spans:
        return None
    return spans[-1][2].strip()


def format_score(response: str) -> float:
    """PAPO's format reward: 1.0 for ``<think>...</think>`` followed by a ``\\boxed{...}``, else 0.0.

    Rules (EasyR1's ``<think>.*</think>.*\\boxed{.*}.*`` made precise):
    - the response starts (after whitespace) with one ``<think>`` tag and has one ``</think>``;
      whitespace inside and around the tags is tolerated;
    - no further think tags anywhere (a second or nested block is malformed);
    - a brace-matched ``\\boxed{}`` appears after ``</think>`` (a box inside the reasoning only
      does not count). The thinking may be empty, as in EasyR1.
    """
    opens = list(_THINK_OPEN_RE.finditer(response))
    closes = list(_THINK_CLOSE_RE.finditer(response))
    if len(opens) != 1 or len(closes) != 1:
        return 0.0
    if response[: opens[0].start()].strip():
        return 0.0
    if closes[0].start() < opens[0].end():
        return 0.0
    tail = response[closes[0].end() :]
    return 1.0 if _boxed_spans(tail) else 0.0


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~")
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")


def unwrap_text(text: str) -> str:
    """``text`` with ``\\text{...}``-like wrappers replaced by their content (nested ones too)."""
    s = text
    for _ in range(4):
        new = _TEXT_CMD_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    return s


def normalize_answer(text: str) -> str:
    """Canonical string form used for string comparison (the fallback of ``math``, and ``exact``).

    Removes LaTeX decoration that never changes a value: math delimiters, ``\\text{}``-like
    wrappers, spacing commands, ``\\left``/``\\right``, ``\\dfrac``/``\\tfrac`` variants, degree
    signs, surrounding quotes, a trailing full stop, all whitespace; lower-cases the rest.
    """
    s = text.strip()
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2]
    if s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    s = unwrap_text(s.replace("$", ""))
    s = _SPACING_RE.sub(" ", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    s = s.strip().rstrip(".").strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'`":
        s = s[1:-1]
    return "".join(s.split()).lower()


_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?")


def as_number(text: str) -> float | None:
    """The value of a plain decimal number (after `normalize_answer`), else None.

    Thousands separators written ``1,000`` or ``1{,}000`` are accepted only in groups of three,
    so ``1,2`` (a list) is not read as a number.
    """
    s = normalize_answer(text).replace("{,}", ",")
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", s):
        s = s.replace(",", "")
    if not _NUMBER_RE.fullmatch(s):
        return None
    try:
        return float(s)
    except ValueError:
        return None


# A single option letter, optionally in brackets, optionally followed by "." ":" ")" and text
# (for "B. 42" or "(B) the circle"): the letter must stand alone, so "Blue" is not option B.
_LETTER_RE = re.compile(r"^[\(\[\{]?\s*([A-Za-z])\s*[\)\]\}]?(?:[.:)\s].*)?$", re.DOTALL)
# Option letters are upper case here: "the answer is a circle" must not read as option A. The
# quantifiers are bounded so that long runs of spaces cannot make the regex backtrack for long.
_ANSWER_IS_RE = re.compile(
    r"(?i:answer)(?:\s{0,4}(?i:is))?[\s:]{0,8}(?:(?i:option)[\s:]{0,4})?[\(\[]?([A-Z])[\)\]]?(?![A-Za-z])"
)
_BARE_LETTER_RE = re.compile(r"^[\(\[]?\s*([A-Za-z])\s*[\)\]]?\s*\.?$")


def choice_letter(text: str) -> str | None:
    """The option letter of a short answer string (``B``, ``(B)``, ``B.``, ``\\text{B}``, ``B: 42``).

    Returns the upper-case letter, or None when the text is not a single-option answer.
    """
    s = unwrap_text(text.strip().replace("$", ""))
    m = _LETTER_RE.match(s.strip())
    return m.group(1).upper() if m else None


def answer_letter(response: str) -> str | None:
    """The option the response chose, or None.

    Order: the last ``\\boxed{}`` (when present it is the answer, even if not a letter); else the
    last "answer is B" / "Answer: (B)"; else the whole text after ``</think>`` if it is just a
    letter (``B``, ``(B)``, ``B.``).
    """
    boxed = last_boxed(response)
    if boxed is not None:
        return choice_letter(boxed)
    closes = list(_THINK_CLOSE_RE.finditer(response))
    tail = response[closes[-1].end() :] if closes else response
    found = list(_ANSWER_IS_RE.finditer(tail))
    if found:
        return found[-1].group(1).upper()
    # Only a bare "B" / "(B)." counts here, not a sentence that happens to start with "I" or "A".
    m = _BARE_LETTER_RE.match(tail.strip())
    return m.group(1).upper() if m else None


_DECIMAL_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")
_SLASH_RE = re.compile(r"([+-]?\d+)/(\d+)")


def simple_number(text: str) -> tuple[Fraction, bool] | None:
    """``(value, exact)`` of an integer, a decimal or an integer fraction (``\\frac{3}{4}``,
    ``\\dfrac{-1}{2}``, ``3/4``), else None. ``exact`` is False for decimals, which math-verify
    compares rounded (as floats) rather than exactly. Exponents and percentages are not simple.
    """
    s = normalize_answer(text)
    if len(s) > 64:
        return None
    if _DECIMAL_RE.fullmatch(s):
        return Fraction(s), "." not in s
    m = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if m is None:
        return None
    groups = m.groups()
    sign, num, den = ("", *groups) if len(groups) == 2 else groups
    if int(den) == 0:
        return None
    value = Fraction(int(num), int(den))
    return (-value if sign == "-" else value), True
