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


def _length_order(prompt_lens: Sequence[int], response_lens: Sequence[int], rows: Sequence[int]) -> list[int]:
    """``rows`` longest response first, then longest prompt (then batch order): the order in which
    neighbours pad each other least where it matters most, the response positions."""
    return sorted(rows, key=lambda i: (-response_lens[i], -prompt_lens[i], i))


def token_budget_plan(
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    max_tokens: int,
    *,
    max_rows: int | None = None,
    field: str = "max_tokens_per_micro_batch",
) -> Plan:
    """Rows grouped by length into micro-batches of at most ``max_tokens`` padded tokens.

    Rows are put in length order (longest response first, then longest prompt) and cut into
    consecutive runs, each within the budget (and within ``max_rows`` rows, if given). Of all such
    cuts the plan takes the fewest micro-batches (each pass has a fixed cost: under ZeRO-3 it
    gathers every parameter) and, among those, the fewest padded tokens: an exact dynamic program
    over the cut points, O(rows x rows per micro-batch). Within each micro-batch rows keep their
    batch order.

    Raises:
        ValueError: ``max_tokens < 1``, or a row whose own length exceeds the budget (naming
            ``field``, the row and its length).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{field} must be an int >= 1, got {max_tokens!r}")
    if len(prompt_lens) != len(response_lens):
        raise ValueError(f"{len(prompt_lens)} prompt lengths for {len(response_lens)} responses")
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        if p + r > max_tokens:
            raise ValueError(
                f"{field}={max_tokens} is smaller than row {i}'s length {p + r} "
                f"(prompt {p} + response {r} tokens); raise it to at least {p + r}"
            )
    order = _length_order(prompt_lens, response_lens, range(len(prompt_lens)))
    n = len(order)
    # best[j]: (micro-batches, padded tokens) of the best cut of order[:j]; cut[j]: where its last run starts.
    best: list[tuple[int, int]] = [(0, 0)] + [(n + 1, 0)] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        max_p = max_r = 0
        for i in range(j - 1, -1, -1):  # the last run is order[i:j]; it only grows as i falls
            max_p, max_r = max(max_p, prompt_lens[order[i]]), max(max_r, response_lens[order[i]])
            size = (j - i) * (max_p + max_r)
            if size > max_tokens or (max_rows is not None and j - i > max_rows):
                break
            cand = (best[i][0] + 1, best[i][1] + size)
            if cand < best[j]:
                best[j], cut[j] = cand, i
    plan: Plan = []
    j = n
    while j > 0:
        plan.append(sorted(order[cut[j] : j]))
        j = cut[j]
    return plan[::-1]


def split_to_count(plan: Plan, count: int, prompt_lens: Sequence[int], response_lens: Sequence[int]) -> Plan:
    """``plan`` refined to exactly ``count`` micro-batches, each split where it saves the most padding.

    Used to keep data-parallel ranks in lock-step: every rank runs the largest count any rank
    needs, and a rank with fewer spends its extra passes on padding. Each step cuts one
    micro-batch in two, in length order, at the point (of all micro-batches) that removes the most
    padded tokens (on a tie, the most even cut). Splitting a micro-batch never raises its padded
    size, so budgets still hold.

    Raises:
        ValueError: ``count`` below the plan's length or above its number of rows.
    """
    rows = sum(len(m) for m in plan)
    if count < len(plan) or count > rows:
        raise ValueError(f"cannot refine {len(plan)} micro-batches of {rows} rows into {count}")
    out = [_length_order(prompt_lens, response_lens, m) for m in plan]

    def size(m: Sequence[int]) -> int:
        return padded_tokens(prompt_lens, response_lens, m)

    while len(out) < count:
        # The most padding removed; on a tie (rows of one length) the most even halves.
        _, k, at = max(
            ((size(m) - size(m[:c]) - size(m[c:]), -max(size(m[:c]), size(m[c:]))), k, c)
            for k, m in enumerate(out)
            for c in range(1, len(m))
        )
        big = out.pop(k)
        out[k:k] = [big[:at], big[at:]]
    return [sorted(m) for m in out]


def response_padding(response_lens: Sequence[int], plan: Plan) -> tuple[int, int]:
    """(response slots processed, real response tokens) of ``plan``: rows x longest response, summed."""
    slots = sum(len(m) * max((response_lens[i] for i in m), default=0) for m in plan)
    return slots, sum(response_lens[i] for m in plan for i in m)
