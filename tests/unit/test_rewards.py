"""Reward functions, the registry and the grading pool (no Ray, no HTTP).

The grading table checks ``accuracy`` and ``format`` of every case, including non-equivalent
near-misses that a lax grader would accept (1/2 vs 2, 0.5 vs 0.05, [1,2) vs [1,2], (2,1) vs
(1,2), B vs D).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import rewards
from rewards import registry
from rewards.extract import answer_letter, as_number, format_score, last_boxed, normalize_answer
from rewards.pool import GradingPool


def T(answer_text: str) -> str:
    """A well-formatted response: reasoning in think tags, then the answer text."""
    return f"<think>Let me work this out step by step.</think> So the final answer is {answer_text}."


# (reward_fn, response, ground_truth, accuracy, format)
CASES = [
    # --- math: fractions vs decimals
    ("math", T(r"\boxed{\frac{1}{2}}"), "0.5", 1, 1),
    ("math", T(r"\boxed{0.5}"), r"\frac{1}{2}", 1, 1),
    ("math", T(r"\boxed{\dfrac{3}{4}}"), "0.75", 1, 1),
    ("math", T(r"\boxed{0.50}"), "1/2", 1, 1),
    ("math", T(r"\boxed{2}"), "1/2", 0, 1),  # near-miss
    ("math", T(r"\boxed{1/2}"), "2", 0, 1),  # near-miss
    ("math", T(r"\boxed{0.05}"), "0.5", 0, 1),  # near-miss
    ("math", T(r"\boxed{\frac{1}{3}}"), "0.333", 0, 1),  # near-miss: beyond float rounding
    # --- math: LaTeX vs plain
    ("math", T(r"\boxed{\sqrt{2}/2}"), r"\frac{\sqrt{2}}{2}", 1, 1),
    ("math", T(r"\boxed{2\sqrt{3}}"), r"\sqrt{12}", 1, 1),
    ("math", T(r"\boxed{\frac{\sqrt{3}}{2}}"), r"\frac{\sqrt3}{2}", 1, 1),
    ("math", T(r"\boxed{\frac{\pi}{2}}"), r"\pi/2", 1, 1),
    ("math", T(r"\boxed{2^{10}}"), "1024", 1, 1),
    ("math", T(r"\boxed{2x+1}"), "1+2x", 1, 1),
    ("math", T(r"\boxed{x^2}"), "x^3", 0, 1),  # near-miss
    ("math", T(r"\boxed{3.14}"), r"\pi", 0, 1),  # near-miss
    ("math", T(r"\boxed{1{,}000}"), "1000", 1, 1),
    ("math", T(r"\boxed{10}"), "10.0", 1, 1),
    ("math", T(r"\boxed{10}"), "100", 0, 1),  # near-miss
    # --- math: percentages
    ("math", T(r"\boxed{50\%}"), "50", 1, 1),
    ("math", T(r"\boxed{25\%}"), "0.25", 1, 1),
    # --- math: negative numbers
    ("math", T(r"\boxed{-3}"), "-3", 1, 1),
    ("math", T(r"\boxed{3}"), "-3", 0, 1),  # near-miss
    ("math", T(r"\boxed{-2}"), "2", 0, 1),  # near-miss
    ("math", T(r"\boxed{-\frac{1}{2}}"), "-0.5", 1, 1),
    # --- math: intervals
    ("math", T(r"\boxed{[1,2)}"), "[1,2]", 0, 1),  # near-miss
    ("math", T(r"\boxed{[0, 1]}"), "[0,1)", 0, 1),  # near-miss
    ("math", T(r"\boxed{[1, 2]}"), "[1,2]", 1, 1),
    ("math", T(r"\boxed{(-\infty, 3)}"), r"(-\infty,3)", 1, 1),
    ("math", T(r"\boxed{(-\infty, 3]}"), r"(-\infty,3)", 0, 1),  # near-miss
    # --- math: sets and tuples
    ("math", T(r"\boxed{\{1,2\}}"), r"\{2,1\}", 1, 1),
    ("math", T(r"\boxed{\{1,2,3\}}"), r"\{1,2\}", 0, 1),  # near-miss
    ("math", T(r"\boxed{(2,1)}"), "(1,2)", 0, 1),  # near-miss: order matters in a tuple
    ("math", T(r"\boxed{(1,2)}"), "(1,2)", 1, 1),
    ("math", T(r"\boxed{(3, -1)}"), "(3,-1)", 1, 1),
    # --- math: units and \text{}
    ("math", T(r"\boxed{5\text{ cm}}"), "5", 1, 1),
    ("math", T(r"\boxed{12 \text{ meters}}"), "12", 1, 1),
    ("math", T(r"\boxed{\text{5 cm}}"), "5", 1, 1),
    ("math", T(r"\boxed{30^\circ}"), "30", 1, 1),
    ("math", T(r"\boxed{x = 5}"), "5", 1, 1),
    # --- math: word answers are words, not products of symbols
    ("math", T(r"\boxed{pot}"), "top", 0, 1),  # math-verify alone: p*o*t == t*o*p
    ("math", T(r"\boxed{Yes}"), "yes", 1, 1),
    # --- math: which box counts
    ("math", T(r"\boxed{\boxed{7}}"), "7", 1, 1),
    ("math", T(r"first \boxed{3}, corrected: \boxed{4}"), "4", 1, 1),
    ("math", T(r"first \boxed{3}, corrected: \boxed{4}"), "3", 0, 1),
    ("math", T(r"\boxed{4} and then a truncated \boxed{5"), "4", 1, 1),
    ("math", T(r"\boxed{}"), "4", 0, 1),
    ("math", "<think>easy</think> The answer is 4.", "4", 0, 0),  # no box: no accuracy
    ("math", T(r"\boxed{4}"), r"\boxed{4}", 1, 1),  # boxed ground truth
    # --- format
    ("math", r"<think>r</think>\boxed{1}", "1", 1, 1),
    ("math", "< think >r</ think >\n\\boxed{1}", "1", 1, 1),  # whitespace inside tags
    ("math", "  \n<think>\nr\n</think>\n\nThus \\boxed{1}.\n", "1", 1, 1),  # whitespace around
    ("math", r"<think></think>\boxed{1}", "1", 1, 1),  # empty reasoning is allowed
    ("math", r"\boxed{1}", "1", 1, 0),  # no think block
    ("math", r"<think>\boxed{1}</think> it is 1", "1", 1, 0),  # box only inside the reasoning
    ("math", r"<think>a</think><think>b</think>\boxed{1}", "1", 1, 0),  # two think blocks
    ("math", r"Sure! <think>a</think>\boxed{1}", "1", 1, 0),  # text before <think>
    ("math", r"<think>a \boxed{1}", "1", 1, 0),  # never closed
    ("math", r"</think>a<think>\boxed{1}", "1", 1, 0),  # closed before opened
    # --- choice
    ("choice", T(r"\boxed{B}"), "B", 1, 1),
    ("choice", T(r"\boxed{B}"), "D", 0, 1),  # near-miss
    ("choice", T(r"\boxed{b}"), "B", 1, 1),
    ("choice", T(r"\boxed{\text{(C)}}"), "C", 1, 1),
    ("choice", T(r"\boxed{B. 42}"), "B", 1, 1),
    ("choice", T(r"\boxed{B, D}"), "B", 0, 1),  # two options is not an answer
    ("choice", T(r"\boxed{Blue}"), "B", 0, 1),  # a word starting with B is not option B
    ("choice", T(r"\boxed{B}"), "(B)", 1, 1),
    ("choice", "<think>x</think>\n(B)", "B", 1, 0),
    ("choice", "<think>x</think>\nB.", "B", 1, 0),
    ("choice", "the answer is B", "B", 1, 0),
    ("choice", "The answer is (D).", "B", 0, 0),  # near-miss
    ("choice", "Answer: (C)", "C", 1, 0),
    ("choice", "<think>maybe the answer is A</think> the answer is B", "A", 0, 0),
    ("choice", "the answer is a circle", "A", 0, 0),
    # --- exact (the demo's synthetic task)
    ("exact", T(r"\boxed{red}"), "red", 1, 1),
    ("exact", T(r"\boxed{Red}"), "red", 1, 1),
    ("exact", T(r"\boxed{\text{left}}"), "left", 1, 1),
    ("exact", T(r"\boxed{ yes. }"), "yes", 1, 1),
    ("exact", T(r"\boxed{3}"), "3", 1, 1),
    ("exact", T(r"\boxed{3.0}"), "3", 1, 1),
    ("exact", T(r"\boxed{dark red}"), "dark red", 1, 1),
    ("exact", T(r"\boxed{reds}"), "red", 0, 1),  # near-miss
    ("exact", T(r"\boxed{right}"), "left", 0, 1),
    ("exact", T(r"\boxed{no}"), "yes", 0, 1),
    ("exact", T(r"\boxed{13}"), "3", 0, 1),  # near-miss
    ("exact", "<think>it is red</think> red", "red", 0, 0),  # graded from the box only
]


@pytest.mark.parametrize(
    "reward_fn,response,ground_truth,accuracy,fmt",
    CASES,
    ids=[f"{i:02d}-{c[0]}" for i, c in enumerate(CASES)],
)
def test_grading_cases(reward_fn: str, response: str, ground_truth: str, accuracy: int, fmt: int) -> None:
    got = rewards.score(reward_fn, response, ground_truth)
    assert set(got) == {"overall", "accuracy", "format"}
    assert (got["accuracy"], got["format"]) == (accuracy, fmt), (response, ground_truth, got)
    assert got["overall"] == pytest.approx(0.9 * accuracy + 0.1 * fmt)


def test_case_table_is_large_and_balanced() -> None:
    assert len(CASES) >= 60
    for fn in ("math", "choice", "exact"):
        accs = {c[3] for c in CASES if c[0] == fn}
        assert accs == {0, 1}, fn  # every function has correct and incorrect cases


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_format_weight_is_configurable(weight: float) -> None:
    # accuracy 1, format 0
    got = rewards.score("math", r"\boxed{4}", "4", format_weight=weight)
    assert got["overall"] == pytest.approx(1.0 - weight)
    got = rewards.score("exact", "<think>x</think> \\boxed{blue}", "red", format_weight=weight)
    assert got["overall"] == pytest.approx(weight)


def test_bad_format_weight_rejected() -> None:
    with pytest.raises(ValueError):
        rewards.score("math", r"\boxed{4}", "4", format_weight=1.5)


# ------------------------------------------------------------------------ extraction helpers


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"\boxed{42}", "42"),
        (r"a \boxed{1} b \boxed{\frac{1}{2}} c", r"\frac{1}{2}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # an escaped brace is not an opener
        (r"\boxed {  7 }", "7"),
        (r"\boxed{3} \boxed{4", "3"),  # an unclosed final box is skipped
        ("no box here", None),
        (r"\boxed{", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


def test_normalize_and_numbers() -> None:
    assert normalize_answer(r" $\text{Dark  Red}$. ") == "darkred"
    assert normalize_answer(r"\left(1,2\right)") == "(1,2)"
    assert as_number("1,000") == 1000.0
    assert as_number("1,2") is None  # a list, not a number with a thousands separator
    assert as_number("-0.5") == -0.5
    assert as_number("red") is None


def test_answer_letter_prefers_box_and_ignores_reasoning() -> None:
    assert answer_letter(r"<think>A or B? answer is A</think> answer is C \boxed{D}") == "D"
    assert answer_letter(r"<think>answer is A</think> so the answer is: B") == "B"
    assert answer_letter("I think so") is None


def test_format_score_tolerates_tag_spacing_only() -> None:
    assert format_score("<think >a</think > \\boxed{1}") == 1.0
    assert format_score("<thinking>a</thinking> \\boxed{1}") == 0.0


def test_pathological_regex_inputs_are_fast() -> None:
    # Long runs of spaces after "answer" or a letter must not make any regex backtrack.
    nasty = "answer" + " " * 50_000 + "x"
    start = time.perf_counter()
    rewards.score("choice", nasty, "A")
    rewards.score("choice", r"\boxed{B" + " " * 50_000 + "!}", "B")
    rewards.score("exact", "<think>" * 2000 + "\\boxed{" * 2000, "x")
    assert time.perf_counter() - start < 1.0


def test_numeric_fast_path_agrees_with_math_verify() -> None:
    """`math` decides plain numbers and integer fractions without sympy; it must decide them
    exactly as math-verify does (exact for integers/fractions, 6-place rounding with decimals)."""
    import random

    from rewards.extract import simple_number
    from rewards.functions import numbers_equal, sympy_equal

    rng = random.Random(1234)

    def form(num: int, den: int) -> str:
        k = rng.randint(0, 4)
        if k == 0:
            return rf"\frac{{{num}}}{{{den}}}"
        if k == 1:
            return rf"\dfrac{{{2 * num}}}{{{2 * den}}}"
        if k == 2:
            return f"{num}/{den}"
        if k == 3:
            return f"{round(num / den, rng.randint(0, 8))}"  # sometimes within rounding of the value
        return str(num // den) if num % den == 0 else f"{num / den:.{rng.randint(1, 7)}f}"

    pairs = [
        ("1.0000001", "1"),
        ("1.0000001", "1.0"),
        ("0.3333333", r"\frac{1}{3}"),
        ("1.5000001", "3/2"),
        ("-0.5", r"-\frac{1}{2}"),
        ("10", "10.0"),
        ("2.0", r"\frac{4}{2}"),
        ("2", "1/2"),
    ]
    for _ in range(150):
        a = (rng.randint(-30, 30), rng.randint(1, 8))
        b = a if rng.random() < 0.5 else (rng.randint(-30, 30), rng.randint(1, 8))
        pairs.append((form(*a), form(*b)))
    for answer, truth in pairs:
        x, y = simple_number(answer), simple_number(truth)
        assert x is not None and y is not None, (answer, truth)
        assert numbers_equal(x, y) == sympy_equal(answer, truth), (answer, truth)


# ------------------------------------------------------------------------ registry


def _write(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_unknown_name_raises_with_known_names() -> None:
    with pytest.raises(registry.UnknownRewardFunction) as err:
        rewards.score("nope", "x", "y")
    assert "math" in str(err.value) and "nope" in str(err.value)


def test_builtins_cannot_be_replaced() -> None:
    with pytest.raises(ValueError):
        registry.register("math", lambda r, g: 1.0)


def test_user_functions_float_and_dict(tmp_path) -> None:
    path = _write(
        tmp_path,
        "my_rewards.py",
        """
        def length_ok(response, ground_truth):
            return len(response) <= int(ground_truth)

        def full(response, ground_truth, format_weight=0.1):
            return {"overall": 0.25, "accuracy": 0.5}

        def bad(response, ground_truth):
            return float("nan")
        """,
    )
    assert registry.reward_name(f"{path}:length_ok") == "length_ok"
    assert registry.is_user_spec(f"{path}:length_ok") and not registry.is_user_spec("math")
    names = registry.register_user_functions({"short": f"{path}:length_ok", "full_u": f"{path}:full"}, f"{path}:bad")
    assert names == ["short", "full_u", "bad"]
    assert set(names) <= set(rewards.available())
    # A number is the accuracy; format comes from the response, overall combines them.
    assert rewards.score("short", "<think>a</think>\\boxed{1}", "100") == pytest.approx(
        {"overall": 1.0, "accuracy": 1.0, "format": 1.0}
    )
    assert rewards.score("short", "x" * 20, "10")["accuracy"] == 0.0
    # A dict is taken as given; a missing format is computed.
    assert rewards.score("full_u", "plain", "") == {"overall": 0.25, "accuracy": 0.5, "format": 0.0}
    with pytest.raises(ValueError):
        rewards.score("bad", "x", "y")  # no NaN rewards


def test_user_function_errors_are_loud(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        registry.load_user_function(str(tmp_path / "missing.py") + ":fn")
    path = _write(tmp_path, "empty_rewards.py", "x = 1\n")
    with pytest.raises(AttributeError):
        registry.load_user_function(f"{path}:fn")
    with pytest.raises(ValueError):
        registry.load_user_function("not-a-spec")


# ------------------------------------------------------------------------ grading pool

USER_FNS = """
import os, time

def flaky(response, ground_truth):
    if response == "CRASH":
        os._exit(3)
    if response == "RAISE":
        return 1 / 0
    if response == "SLEEP":
        time.sleep(60)
    return float(response == ground_truth)
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    path = _write(tmp_path_factory.mktemp("pool"), "pool_rewards.py", USER_FNS)
    p = GradingPool(workers=2, timeout_s=1.0, user_functions={"flaky": f"{path}:flaky"})
    yield p
    p.close()


def test_pool_grades_in_order(pool: GradingPool) -> None:
    items = [(T(rf"\boxed{{{i}}}"), str(i if i % 3 else i + 1)) for i in range(30)]
    got = pool.grade("math", items)
    assert [r["accuracy"] for r in got] == [0.0 if i % 3 == 0 else 1.0 for i in range(30)]
    assert all(r["error"] is None and r["format"] == 1.0 for r in got)


def test_pool_isolates_failures(pool: GradingPool) -> None:
    before = pool.stats()
    items = [(str(i), str(i)) for i in range(12)]
    items[2] = ("CRASH", "x")
    items[5] = ("RAISE", "x")
    items[8] = ("SLEEP", "x")
    start = time.monotonic()
    got = pool.grade("flaky", items)
    assert time.monotonic() - start < 1.0 + 2.0
    errors = {i: r["error"] for i, r in enumerate(got) if r["error"]}
    assert errors == {2: "worker_crashed", 5: "ZeroDivisionError", 8: "timeout"}
    assert all(got[i]["overall"] == 0.0 for i in errors)
    assert all(got[i]["accuracy"] == 1.0 for i in range(12) if i not in errors)
    after = pool.stats()
    assert after["worker_crashes"] == before["worker_crashes"] + 1
    assert after["worker_restarts"] >= before["worker_restarts"] + 2  # crash + timeout kill
    assert after["errors"]["timeout"] == before["errors"].get("timeout", 0) + 1
    # The replacements work.
    assert [r["accuracy"] for r in pool.grade("flaky", [("a", "a"), ("b", "c")])] == [1.0, 0.0]
    deadline = time.monotonic() + 10
    while pool.stats()["workers_alive"] != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.stats()["workers_alive"] == 2


def test_pool_deadline(pool: GradingPool) -> None:
    got = pool.grade("flaky", [("SLEEP", "x"), ("SLEEP", "x"), ("SLEEP", "x"), ("a", "a")], deadline_s=0.3)
    assert [r["error"] for r in got] == ["deadline"] * 4
    time.sleep(1.2)  # let the item timeouts free the workers for the next test


def test_pool_rejects_unknown_function(pool: GradingPool) -> None:
    with pytest.raises(registry.UnknownRewardFunction):
        pool.submit("nope", [("a", "b")])
    assert pool.grade("math", []) == []


def test_workers_die_with_their_owner(tmp_path) -> None:
    """SIGKILL the process that owns a pool while a worker is stuck in a computation: the zygote
    and every worker must go too (no orphan burning a core)."""
    script = _write(
        tmp_path,
        "owner.py",
        """
        import sys, time
        from rewards.pool import GradingPool

        if __name__ == "__main__":
            pool = GradingPool(workers=1, timeout_s=600)
            print(" ".join(map(str, pool.worker_pids() + [pool._zygote.proc.pid])), flush=True)
            pool.submit("math", [(r"\\boxed{9^{9^{9^{9^{9}}}}}", "1")])
            time.sleep(600)
        """,
    )
    owner = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.5)  # the worker is now inside the huge power
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 10
        alive = pids
        while alive and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            time.sleep(0.1)
        assert not alive, f"processes outlived their owner: {alive}"
    finally:
        if owner.poll() is None:
            owner.kill()
        for pid in pids if "pids" in locals() else []:
            if _alive(pid):  # only when the test failed: do not leave a core-burning orphan
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
