"""Micro-batch plans: which rows of a (mini-)batch run together in one forward pass (no Ray).

A plan is a list of row-index lists. Two kinds:

- fixed: consecutive chunks of ``max_rows`` rows (the ``micro_batch_size`` layout);
- token budget: rows grouped by length so that each micro-batch's *padded* size,
  ``rows x (longest prompt + longest response)``, stays within ``max_tokens``. Rows of similar
  length share a micro-batch, so little of what is processed is padding, and short responses
  pack many to a pass.

A forward pass is a collective under ZeRO-3 (and a backward under ZeRO 1-3), so data-parallel
ranks must run the same number of micro-batches: :func:`split_to_count` refines a plan to the
largest count any rank needs (splitting only ever lowers a micro-batch's padded size).

Which rows share a micro-batch never changes the loss: the learner weights every row as in the
fixed layout (:func:`trainer.core.algos.layout_denominators`).
"""

from __future__ import annotations

from collections.abc import Sequence

Plan = list[list[int]]


def fixed_plan(num_rows: int, max_rows: int) -> Plan:
    """Consecutive chunks of ``max_rows`` rows; the last may be smaller."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return [list(range(s, min(s + max_rows, num_rows))) for s in range(0, num_rows, max_rows)]


def padded_tokens(prompt_lens: Sequence[int], response_lens: Sequence[int], rows: Sequence[int]) -> int:
    """Tokens one micro-batch of ``rows`` processes: rows x (longest prompt + longest response)."""
    if not rows:
        return 0
    return len(rows) * (max(prompt_lens[i] for i in rows) + max(response_lens[i] for i in rows))


def token_budget_plan(
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    max_tokens: int,
    *,
    max_rows: int | None = None,
    field: str = "max_tokens_per_micro_batch",
) -> Plan:
    """Rows grouped by length into micro-batches of at most ``max_tokens`` padded tokens.

    Rows are taken longest response first (then longest prompt) and appended to the current micro-batch
    while its padded size stays within the budget (and its row count within ``max_rows``, if
    given); then a new one starts. Within each micro-batch rows keep their batch order.

    Raises:
        ValueError: ``max_tokens < 1``, or a row whose own length exceeds the budget (naming
            ``field``, the row and its length).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{field} must be an int >= 1, got {max_tokens!r}")
    if len(prompt_lens) != len(response_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(response_lens)} responses")
    total = [p + r for p, r in zip(prompt_lens, response_lens)]
    for i, t in enumerate(total):
        if t > max_tokens:
            raise ValueError(
                f"{field}={max_tokens} is smaller than row {i}'s length {t} "
                f"(prompt {prompt_lens[i]} + response {response_lens[i]} tokens); raise it to at least {t}"
            )
    # Longest responses first (then longest prompts): neighbours in this order pad each other least
    # where it matters most, the response positions every vocabulary-sized pass is over.
    order = sorted(range(len(total)), key=lambda i: (-response_lens[i], -prompt_lens[i], i))
    plan: Plan = []
    current: list[int] = []
    max_p = max_r = 0
    for i in order:
        p, r = max(max_p, prompt_lens[i]), max(max_r, response_lens[i])
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * (p + r) > max_tokens):
            plan.append(sorted(current))
            current, p, r = [], prompt_lens[i], response_lens[i]
        current.append(i)
        max_p, max_r = p, r
    if current:
        plan.append(sorted(current))
    return plan


def split_to_count(plan: Plan, count: int) -> Plan:
    """``plan`` refined to exactly ``count`` micro-batches by halving the largest ones.

    Used to keep data-parallel ranks in lock-step: every rank runs the largest count any rank
    needs. Splitting a micro-batch never raises its padded size, so budgets still hold.

    Raises:
        ValueError: ``count`` below the plan's length or above its number of rows.
    """
    rows = sum(len(m) for m in plan)
    if count < len(plan) or count > rows:
        raise ValueError(f"cannot refine {len(plan)} micro-batches of {rows} rows into {count}")
    out = [list(m) for m in plan]
    while len(out) < count:
        k = max(range(len(out)), key=lambda j: len(out[j]))
        big = out.pop(k)
        half = len(big) // 2
        out[k:k] = [big[:half], big[half:]]
    return out


def response_padding(response_lens: Sequence[int], plan: Plan) -> tuple[int, int]:
    """(response slots processed, real response tokens) of ``plan``: rows x longest response, summed."""
    slots = sum(len(m) * max((response_lens[i] for i in m), default=0) for m in plan)
    return slots, sum(response_lens[i] for m in plan for i in m)
