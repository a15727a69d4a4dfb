"""Micro-batch plans and the layout denominators that make token budgets loss-neutral.

The loss identity is checked in float64 against the fixed layout (papo_loss with grad_accum /
num_tokens per micro-batch), for every averaging mode, on one rank and on two simulated
data-parallel ranks (the gradient reduction averages over ranks, as DeepSpeed's does).
"""

from __future__ import annotations

import random

import pytest
import torch

from trainer.core.algos import LossSettings, layout_denominators, papo_loss
from trainer.core.microbatch import (
    fixed_plan,
    padded_tokens,
    response_padding,
    split_to_count,
    token_budget_plan,
)

F64 = torch.float64


def _lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = random.Random(seed)
    return [rng.randint(20, 60) for _ in range(n)], [max(1, int(rng.paretovariate(1.2) * 8)) % 300 for _ in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_token_budget_plan_holds_every_row_once_within_the_budget(seed):
    prompt, response = _lengths(37, seed)
    budget = 3 * max(p + r for p, r in zip(prompt, response))
    plan = token_budget_plan(prompt, response, budget)
    assert sorted(i for m in plan for i in m) == list(range(37))
    assert all(m == sorted(m) for m in plan)
    assert all(padded_tokens(prompt, response, m) <= budget for m in plan)
    # Grouping by length pads less than the same number of rows in batch order.
    grouped, _ = response_padding(response, plan)
    in_order, real = response_padding(response, fixed_plan(37, -(-37 // len(plan))))
    assert grouped <= in_order and real == sum(response)


def test_token_budget_respects_a_row_cap_and_refuses_a_row_over_the_budget():
    plan = token_budget_plan([10] * 9, [5] * 9, 1000, max_rows=4)
    assert [len(m) for m in plan] == [4, 4, 1]
    with pytest.raises(ValueError, match=r"learner.max_tokens_per_micro_batch=30 is smaller than row 2's length 41"):
        token_budget_plan([10, 10, 40], [5, 5, 1], 30, field="learner.max_tokens_per_micro_batch")
    with pytest.raises(ValueError, match="logprob.max_tokens_per_micro_batch must be an int >= 1, got 0"):
        token_budget_plan([1], [1], 0, field="logprob.max_tokens_per_micro_batch")


def _partitions(items: list[int]):
    """Every set partition of ``items`` (Bell(n) of them)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1 :]]


@pytest.mark.parametrize("seed", range(12))
def test_token_budget_plan_is_the_fewest_micro_batches_then_the_least_padding(seed):
    """Against every way to group 7 rows (one prompt length, so the optimum is a cut in length order)."""
    rng = random.Random(seed)
    response = [rng.choice([1, 3, 8, 20, 50, 120]) + rng.randint(0, 5) for _ in range(7)]
    prompt = [30] * 7
    budget = rng.randint(1, 4) * max(response) + 30 * rng.randint(1, 4) + 30
    feasible = (
        (len(part), sum(padded_tokens(prompt, response, m) for m in part))
        for part in _partitions(list(range(7)))
        if all(padded_tokens(prompt, response, m) <= budget for m in part)
    )
    plan = token_budget_plan(prompt, response, budget)
    assert (len(plan), sum(padded_tokens(prompt, response, m) for m in plan)) == min(feasible)


def test_split_to_count_keeps_rows_and_budget_and_spends_extra_passes_on_padding():
    prompt, response = _lengths(20, 7)
    plan = token_budget_plan(prompt, response, 4 * max(p + r for p, r in zip(prompt, response)))
    finer = split_to_count(plan, len(plan) + 3, prompt, response)
    assert len(finer) == len(plan) + 3
    assert sorted(i for m in finer for i in m) == list(range(20))
    assert all(m == sorted(m) for m in finer)
    assert max(padded_tokens(prompt, response, m) for m in finer) <= max(
        padded_tokens(prompt, response, m) for m in plan
    )
    assert sum(padded_tokens(prompt, response, m) for m in finer) < sum(
        padded_tokens(prompt, response, m) for m in plan
    )
    # A long and a short row together: the extra pass separates them.
    assert split_to_count([[0, 1, 2]], 2, [10, 10, 10], [100, 5, 100]) == [[0, 2], [1]]
    with pytest.raises(ValueError, match="cannot refine"):
        split_to_count(plan, 21, prompt, response)


# ---- the loss identity ---------------------------------------------------------------------------


def _rank_data(rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = 11
    lengths = torch.randint(0, width + 1, (rows,), generator=g)
    lengths[0] = width
    mask = torch.arange(width)[None, :] < lengths[:, None]
    feats = torch.randn(rows, width, 6, generator=g, dtype=F64)
    ids = torch.randint(0, 9, (rows, width), generator=g)
    return dict(
        mask=mask,
        feats=feats,
        ids=ids,
        old=torch.randn(rows, width, generator=g, dtype=F64) * 0.1 - 2.0,
        masked=torch.randn(rows, width, generator=g, dtype=F64) * 0.1 - 2.2,
        ref=torch.randn(rows, width, generator=g, dtype=F64) * 0.1 - 2.1,
        adv=torch.randn(rows, generator=g, dtype=F64),
    )


def _logp(weight, d, rows):
    logits = d["feats"][rows] @ weight  # (rows, width, vocab)
    return torch.log_softmax(logits, -1).gather(-1, d["ids"][rows].unsqueeze(-1)).squeeze(-1)


def _micro_loss(weight, d, rows, settings, **kw):
    loss, _ = papo_loss(
        _logp(weight, d, rows),
        d["old"][rows],
        d["adv"][rows],
        d["mask"][rows],
        masked_logp=d["masked"][rows],
        ref_logp=d["ref"][rows],
        settings=settings,
        **kw,
    )
    return loss


def _rank_grads(weight, ranks, settings, micro, plans=None):
    """Per-rank gradient of one mini-batch: fixed micro-batches (grad_accum / num_tokens) or the
    given plans with layout denominators; the reduction then averages over ranks."""
    num_tokens = sum(int(d["mask"].sum()) for d in ranks)
    grads = []
    for r, d in enumerate(ranks):
        rows = d["mask"].shape[0]
        layout = fixed_plan(rows, micro)
        w = weight.detach().clone().requires_grad_(True)
        if plans is None:
            total = sum(
                _micro_loss(
                    w,
                    d,
                    m,
                    settings,
                    grad_accum=1 if settings.avg == "token_global" else len(layout),
                    num_tokens=num_tokens,
                )
                for m in layout
            )
        else:
            lengths = d["mask"].sum(1)
            d_avg, d_tok = layout_denominators(lengths, layout, settings.avg, num_tokens=num_tokens)
            total = sum(_micro_loss(w, d, m, settings, row_denominators=(d_avg[m], d_tok[m])) for m in plans[r])
        if settings.avg == "token_global":
            total = total * len(ranks)  # undo the rank average
        total.backward()
        grads.append((float(total.detach()), w.grad))
    loss = sum(x for x, _ in grads) / len(ranks)
    return loss, sum(g for _, g in grads) / len(ranks)


@pytest.mark.parametrize("avg", ["token", "seq", "token_global"])
@pytest.mark.parametrize("world", [1, 2])
def test_regrouped_rows_give_the_fixed_layouts_loss_and_gradient_in_float64(avg, world):
    settings = LossSettings(gamma=0.03, beta=0.02, eta1=0.01, eta2=0.02, avg=avg)
    weight = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=F64)
    ranks = [_rank_data(12, seed=10 + r) for r in range(world)]
    fixed_loss, fixed_grad = _rank_grads(weight, ranks, settings, micro=3)
    # Any regrouping: different counts per rank, different sizes, rows out of order.
    plans = [[[0, 5, 11], [1], [2, 3, 4, 6, 7], [8, 9, 10]], [[11, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]][:world]
    loss, grad = _rank_grads(weight, ranks, settings, micro=3, plans=plans)
    assert loss == pytest.approx(fixed_loss, abs=1e-12)
    assert torch.allclose(grad, fixed_grad, atol=1e-12, rtol=1e-9)
    # The identity is not vacuous: a different layout size changes token/seq averaging.
    if avg != "token_global":
        other_loss, _ = _rank_grads(weight, ranks, settings, micro=4)
        assert abs(other_loss - fixed_loss) > 1e-6


def test_layout_denominators_validate_the_layout():
    with pytest.raises(ValueError, match="exactly once"):
        layout_denominators(torch.tensor([1, 2, 3]), [[0, 1]], "token")
    with pytest.raises(ValueError, match="num_tokens is required"):
        layout_denominators(torch.tensor([1, 2]), [[0, 1]], "token_global")
    with pytest.raises(ValueError, match="unknown avg"):
        layout_denominators(torch.tensor([1, 2]), [[0, 1]], "tokens")
    d = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="replace grad_accum and num_tokens"):
        papo_loss(
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.zeros(2),
            torch.ones(2, 3, dtype=torch.bool),
            grad_accum=2,
            row_denominators=(d, d),
            gamma=0.0,
            beta=0.0,
        )
