"""The built-in reward functions: ``math``, ``choice`` and ``exact``.

Each takes ``(response, ground_truth, format_weight=0.1)`` and returns
``{"overall", "accuracy", "format"}`` with ``overall = (1 - w) * accuracy + w * format``
(PAPO's 0.9 / 0.1 by default). ``accuracy`` grades the answer extracted by `rewards.extract`
(the last brace-matched ``\\boxed{}``); ``format`` is PAPO's ``<think>...</think>`` then
``\\boxed{}`` check, the same for every function.

No timeouts here, on purpose: math-verify's own timeout uses ``signal.alarm``, which raises in
any thread but a process's main thread, silently returns False (a reward of 0 nobody counts)
when it fires, and cannot interrupt a C-level big-integer power such as ``9^{9^{9}}`` at all.
Untrusted text is graded by `rewards.pool.GradingPool`, which runs these functions in worker
processes and kills a worker that exceeds the per-item timeout.
"""

from __future__ import annotations

import functools
import logging
import math as _math
import re
from fractions import Fraction
from typing import Any

from rewards.extract import (
    answer_letter,
    as_number,
    choice_letter,
    format_score,
    last_boxed,
    normalize_answer,
    simple_number,
    unwrap_text,
)

__all__ = ["combine", "math_reward", "choice_reward", "exact_reward", "math_equal", "sympy_equal", "numbers_equal"]

DEFAULT_FORMAT_WEIGHT = 0.1
_FLOAT_ROUNDING = 6  # math-verify's default float_rounding


def combine(accuracy: float, fmt: float, format_weight: float = DEFAULT_FORMAT_WEIGHT) -> dict[str, float]:
    """The score dict every reward function returns."""
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    return {
        "overall": (1.0 - format_weight) * float(accuracy) + format_weight * float(fmt),
        "accuracy": float(accuracy),
        "format": float(fmt),
    }


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


@functools.lru_cache(maxsize=1)
def _math_verify() -> Any:
    """Import math-verify lazily (sympy costs ~0.3 s) and once."""
    import math_verify

    for name in ("math_verify.grader", "math_verify.parser"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    return math_verify


def _parse(mv: Any, text: str) -> list:
    config = [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]
    return mv.parse(f"${text}$", extraction_config=config, parsing_timeout=None)


@functools.lru_cache(maxsize=4096)
def _parse_gold(text: str) -> list:
    # Ground truths repeat n times per prompt (one per rollout): parse each once per process.
    return _parse(_math_verify(), text)


# An answer that is only letters ("red", "yes", "left") is a word, not a product of symbols:
# math-verify would read "red" as E*d*r and call it equal to "der".
_WORD_RE = re.compile(r"[A-Za-z]{2,}(?:\s+[A-Za-z]+)*")


def math_equal(answer: str, ground_truth: str) -> bool:
    """Whether ``answer`` is mathematically equivalent to ``ground_truth``.

    In order: equal after `normalize_answer` (covers what math-verify cannot parse) -> equal;
    word answers ("red", "yes") are equal only as strings; two plain numbers or integer
    fractions are compared directly, as math-verify would; everything else goes to math-verify
    (fractions vs decimals, LaTeX vs plain, percentages, intervals, sets, tuples, units in
    ``\\text{}``).
    """
    if not answer.strip() or not ground_truth.strip():
        return False
    norm_answer, norm_truth = normalize_answer(answer), normalize_answer(ground_truth)
    if norm_answer == norm_truth:
        # Equal strings are equal answers, and the string fallback below would say so anyway:
        # skipping sympy here changes no grade and makes the common exact-match case ~100x cheaper.
        return True
    if _WORD_RE.fullmatch(norm_truth) or _WORD_RE.fullmatch(norm_answer):
        return False
    x, y = simple_number(answer), simple_number(ground_truth)
    if x is not None and y is not None:
        # Plain numbers and integer fractions, the most common answers: decide as math-verify
        # would (exact unless a decimal is involved, then rounded to 6 places) without paying
        # ~3 ms for two LaTeX parses. tests/unit/test_rewards.py checks the two agree.
        return numbers_equal(x, y)
    return sympy_equal(answer, ground_truth)


def numbers_equal(x: tuple[Fraction, bool], y: tuple[Fraction, bool]) -> bool:
    """Equality of two `rewards.extract.simple_number` values, decided as math-verify 0.9 (with
    sympy 1.14) decides them: exactly when both are exact or one is an integer (so 1.0000001 is
    not 1), and rounded to 6 decimals otherwise (so 0.3333333 is 1/3, and 1.0000001 is 1.0)."""
    (a, a_exact), (b, b_exact) = x, y
    a_int = a_exact and a.denominator == 1
    b_int = b_exact and b.denominator == 1
    if (a_exact and b_exact) or a_int or b_int:
        return a == b
    return round(a, _FLOAT_ROUNDING) == round(b, _FLOAT_ROUNDING)


def sympy_equal(answer: str, ground_truth: str) -> bool:
    """math-verify's verdict alone (parse both, compare with sympy)."""
    mv = _math_verify()
    gold = _parse_gold(ground_truth)
    if not gold:
        return False
    candidates = [answer]
    unwrapped = unwrap_text(answer)
    if unwrapped != answer:
        candidates.append(unwrapped)  # math-verify reads \text{5 cm} as text, not as 5
    for candidate in candidates:
        pred = _parse(mv, candidate)
        if pred and mv.verify(gold, pred, timeout_seconds=None):
            return True
    return False


def _truth_answer(ground_truth: str) -> str:
    """Ground truths are sometimes stored boxed (``\\boxed{3}``); grade against the content."""
    boxed = last_boxed(ground_truth)
    return boxed if boxed is not None else ground_truth.strip()


def math_reward(response: str, ground_truth: str, format_weight: float = DEFAULT_FORMAT_WEIGHT) -> dict[str, float]:
    """Math answers: the last ``\\boxed{}`` of the response against the ground truth (`math_equal`).

    A response without a complete ``\\boxed{}`` has accuracy 0, as in PAPO/EasyR1. Sets follow
    math-verify: a set ground truth ``\\{1,2\\}`` also accepts ``(1,2)`` written in parentheses,
    while two tuples or intervals must match in order and brackets.
    """
    answer = last_boxed(response)
    correct = answer is not None and math_equal(answer, _truth_answer(ground_truth))
    return combine(1.0 if correct else 0.0, format_score(response), format_weight)


def choice_reward(response: str, ground_truth: str, format_weight: float = DEFAULT_FORMAT_WEIGHT) -> dict[str, float]:
    """Multiple choice: the option letter the response chose against the ground-truth letter.

    The response's letter comes from `rewards.extract.answer_letter` (``\\boxed{B}``, "the answer
    is (B)", a bare ``B.``); the ground truth may be ``B``, ``(B)``, ``B.`` or ``\\boxed{B}``.
    A ground truth that is not a letter raises ValueError (a data error, not a wrong answer).
    """
    truth = choice_letter(_truth_answer(ground_truth))
    if truth is None:
        raise ValueError(f"choice ground truth is not an option letter: {ground_truth[:40]!r}")
    chosen = answer_letter(response)
    return combine(1.0 if chosen == truth else 0.0, format_score(response), format_weight)


def exact_reward(response: str, ground_truth: str, format_weight: float = DEFAULT_FORMAT_WEIGHT) -> dict[str, float]:
    """Normalised exact match of the last ``\\boxed{}`` (the demo's synthetic task: ``red``, ``3``,
    ``left``, ``yes``).

    Case, whitespace, ``\\text{}`` and a trailing full stop are ignored; two plain numbers are
    equal when their values are (``3`` and ``3.0``). No boxed answer: accuracy 0.
    """
    answer = last_boxed(response)
    correct = False
    if answer is not None:
        truth = _truth_answer(ground_truth)
        a, t = normalize_answer(answer), normalize_answer(truth)
        correct = bool(a) and a == t
        if not correct and a and t:
            x, y = as_number(answer), as_number(truth)
            correct = x is not None and y is not None and _math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return combine(1.0 if correct else 0.0, format_score(response), format_weight)


def describe() -> dict[str, str]:
    """One-line descriptions of the built-ins, for ``GET /v1/reward-functions``."""
    return {
        "math": "last \\boxed{} vs ground truth with math-verify, normalised-string fallback",
        "choice": "multiple-choice option letter (\\boxed{B}, (B), B., 'the answer is B')",
        "exact": "normalised exact match of the last \\boxed{} (case, spaces, \\text{} ignored)",
    }
