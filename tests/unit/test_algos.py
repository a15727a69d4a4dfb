"""Tests of trainer/core/algos.py.

The reference below is written directly from the formulas (docs/algorithm.md and the docstrings of
trainer/core/algos.py) as per-token Python loops over 0-dim float64 tensors, with Python control flow
for the clips and clamps: deliberately unlike the vectorised implementation. Autograd through the
reference gives reference gradients.
"""

from __future__ import annotations

import dataclasses
import math
import statistics

import pytest
import torch

from trainer.core import algos
from trainer.core.algos import (
    LossSettings,
    aggregate,
    entropy_from_logits,
    group_advantages,
    kl_penalty,
    papo_loss,
    perception_coef,
    perception_coefs,
    perception_token_mask,
)

F64 = torch.float64

# --------------------------------------------------------------------------------------------
# Reference implementation (float64, per element)
# --------------------------------------------------------------------------------------------


def r_clamp(x, lo, hi):
    """Clamp of a 0-dim tensor: a clamped value is a constant (no gradient)."""
    if x < lo:
        return torch.tensor(lo, dtype=F64)
    if x > hi:
        return torch.tensor(hi, dtype=F64)
    return x


def r_kl(kind, lp, other):
    if kind in ("k1", "kl"):
        return lp - other
    if kind in ("k2", "mse"):
        return 0.5 * (lp - other) * (lp - other)
    if kind == "abs":
        return lp - other if lp >= other else other - lp
    assert kind in ("low_var_kl", "k3")
    x = r_clamp(other - lp, -20.0, 20.0)
    return r_clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)


def fl(x):
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def r_quantile(values, q):
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def r_papo(
    lp,
    old,
    adv,
    mask,
    *,
    masked=None,
    ref=None,
    gamma=0.0,
    beta=0.0,
    eta1=0.0,
    eta2=0.0,
    clip_low=0.2,
    clip_high=0.3,
    clip_dual=3.0,
    kl_kind="low_var_kl",
    avg="token",
    grad_accum=1,
    num_tokens=None,
    perception_kl_kind="low_var_kl",
    perception_top_p=None,
    perception_kl_clip=None,
    perception_kl_masked_grad=False,
):
    """Reference loss and metrics. Only real tokens (mask == 1) are ever read."""
    B, T = mask.shape
    rows = [[t for t in range(T) if mask[i, t]] for i in range(B)]
    n_tok = sum(len(r) for r in rows)

    def reduce(f, mode):
        if mode == "token":
            return (
                sum((f(i, t) for i in range(B) for t in rows[i]), torch.tensor(0.0, dtype=F64))
                / max(n_tok, 1)
                / grad_accum
            )
        if mode == "seq":
            per_seq = [
                sum((f(i, t) for t in rows[i]), torch.tensor(0.0, dtype=F64)) / max(len(rows[i]), 1) for i in range(B)
            ]
            return sum(per_seq, torch.tensor(0.0, dtype=F64)) / B / grad_accum
        assert mode == "token_global"
        return sum((f(i, t) for i in range(B) for t in rows[i]), torch.tensor(0.0, dtype=F64)) / num_tokens

    def tok_mode():
        return "token_global" if avg == "token_global" else "token"

    def a(i, t):
        return adv[i] if adv.dim() == 1 else adv[i, t]

    clipfrac = {"low": 0, "high": 0, "dual": 0}

    def pg(i, t):
        A = a(i, t).detach()
        r = torch.exp(r_clamp(lp[i, t] - old[i, t].detach(), -20.0, 20.0))
        rc = r_clamp(r, 1.0 - clip_low, 1.0 + clip_high)
        loss = max(-A * r, -A * rc)
        if A < 0:
            loss = min(loss, -A * clip_dual)
        return loss

    for i in range(B):
        for t in rows[i]:
            A = fl(a(i, t))
            r = math.exp(min(max(fl(lp[i, t] - old[i, t]), -20.0), 20.0))
            clipfrac["high"] += A > 0 and r > 1 + clip_high
            clipfrac["low"] += A < 0 and r < 1 - clip_low
            clipfrac["dual"] += A < 0 and r > clip_dual

    pg_loss = reduce(pg, avg)
    loss = pg_loss
    metrics = {
        "pg_loss": fl(pg_loss),
        "entropy": sum(-fl(lp[i, t]) for i in range(B) for t in rows[i]) / max(n_tok, 1),
        "ppo_kl": sum(fl(old[i, t] - lp[i, t]) for i in range(B) for t in rows[i]) / max(n_tok, 1),
        "response_tokens": fl(n_tok),
    }
    for k, v in clipfrac.items():
        metrics[f"pg_clipfrac_{k}"] = v / max(n_tok, 1)

    if ref is not None:

        def rk(i, t):
            return r_kl(kl_kind, lp[i, t], ref[i, t].detach())

        if beta:
            loss = loss + beta * reduce(rk, avg)
        metrics["ref_kl"] = sum(fl(rk(i, t)) for i in range(B) for t in rows[i]) / max(n_tok, 1)

    if masked is not None:

        def other(i, t):
            return masked[i, t] if perception_kl_masked_grad else masked[i, t].detach()

        def raw(i, t):
            return r_kl(perception_kl_kind, lp[i, t], other(i, t))

        kept = {(i, t): True for i in range(B) for t in rows[i]}
        if perception_top_p is not None:
            for i in range(B):
                if not rows[i]:
                    continue
                vals = [fl(raw(i, t)) for t in rows[i]]
                thr = r_quantile(vals, 1.0 - perception_top_p)
                for t, v in zip(rows[i], vals):
                    kept[(i, t)] = v >= thr

        def pk(i, t):
            v = raw(i, t) if kept[(i, t)] else torch.tensor(0.0, dtype=F64)
            if perception_kl_clip is not None:
                v = r_clamp(v, 0.0, perception_kl_clip)
            return v

        if gamma:
            loss = loss - gamma * reduce(pk, avg)
        if eta2:
            loss = loss + eta2 * reduce(lambda i, t: -masked[i, t], tok_mode())
        metrics["perception_kl"] = sum(fl(pk(i, t)) for i in range(B) for t in rows[i]) / max(n_tok, 1)
        metrics["perception_kl_raw"] = sum(fl(raw(i, t)) for i in range(B) for t in rows[i]) / max(n_tok, 1)
        metrics["masked_entropy"] = sum(-fl(masked[i, t]) for i in range(B) for t in rows[i]) / max(n_tok, 1)
        metrics["perception_mask_frac"] = sum(kept.values()) / max(n_tok, 1) if perception_top_p is not None else 1.0

    if eta1:
        loss = loss + eta1 * reduce(lambda i, t: -lp[i, t], tok_mode())
    metrics["loss"] = fl(loss)
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

LENGTHS = [9, 5, 0, 3, 7, 1]  # variable lengths, one empty response
T = 9


def make_batch(seed=0, lengths=LENGTHS, adv_2d=False, dtype=F64, garbage=None):
    """Random log-probs with right padding, some tokens pushed past every clamp and clip."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    lp = -3.0 * torch.rand(B, T, generator=g, dtype=F64) - 0.05
    old = lp + 0.35 * torch.randn(B, T, generator=g, dtype=F64)
    ref = lp + 0.5 * torch.randn(B, T, generator=g, dtype=F64)
    masked = lp + 1.2 * torch.randn(B, T, generator=g, dtype=F64)
    adv = torch.randn(B, T, generator=g, dtype=F64) if adv_2d else torch.randn(B, generator=g, dtype=F64)
    # Past the clamps: k3 > 10 both ways (x > 2.53, x clamped at -20), ratio clamped at e^20,
    # ratio past the dual clip with a negative advantage.
    masked[0, 0] = lp[0, 0] + 4.0
    masked[0, 1] = lp[0, 1] - 30.0
    old[1, 0] = lp[1, 0] - 25.0
    old[4, 2] = lp[4, 2] - 1.5
    if adv_2d:
        adv[4, 2] = -1.0
    else:
        adv[4] = -abs(adv[4]) - 0.1
    if garbage is not None:
        for x in (lp, old, ref, masked):
            x[~mask] = garbage
    cast = lambda x: x.to(dtype)  # noqa: E731
    return {
        "logp": cast(lp),
        "old_logp": cast(old),
        "ref_logp": cast(ref),
        "masked_logp": cast(masked),
        "advantages": cast(adv),
        "mask": mask,
    }


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def run_impl(batch, grad_masked=True, grad_accum=1, num_tokens=None, **kw):
    lp = leaf(batch["logp"])
    masked = leaf(batch["masked_logp"]) if grad_masked else batch["masked_logp"].clone()
    loss, metrics = papo_loss(
        lp,
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        masked_logp=masked,
        ref_logp=batch["ref_logp"],
        settings=LossSettings(**kw),
        grad_accum=grad_accum,
        num_tokens=num_tokens,
    )
    loss.backward()
    return loss, metrics, lp.grad, masked.grad


def run_ref(batch, **kw):
    lp = leaf(batch["logp"])
    masked = leaf(batch["masked_logp"])
    loss, metrics = r_papo(
        lp,
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        masked=masked,
        ref=batch["ref_logp"],
        **kw,
    )
    if loss.requires_grad:
        loss.backward()
    g_lp = lp.grad if lp.grad is not None else torch.zeros_like(lp)
    g_m = masked.grad if masked.grad is not None else torch.zeros_like(masked)
    return loss, metrics, g_lp, g_m


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", algos.KL_KINDS)
def test_kl_penalty_matches_reference(kind):
    g = torch.Generator().manual_seed(1)
    lp = -4.0 * torch.rand(50, generator=g, dtype=F64)
    other = lp + 2.0 * torch.randn(50, generator=g, dtype=F64)
    other[0], other[1], other[2] = lp[0] + 30.0, lp[1] - 30.0, lp[2]  # both clamps, and KL = 0
    out = kl_penalty(lp, other, kind)
    expected = torch.stack([r_kl(kind, lp[i], other[i]) for i in range(50)])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out[2] == 0


def test_kl_penalty_k3_clamps_and_gradient():
    lp = torch.tensor([-1e4, 0.0, -1.0, -1.0], dtype=torch.float32, requires_grad=True)
    other = torch.tensor([0.0, -1e4, -5.0, -1.2])
    kl = kl_penalty(lp, other, "k3")
    assert torch.isfinite(kl).all() and (kl <= 10).all() and (kl >= 0).all()
    # x = other - lp: 1e4 -> clamp 20 -> exp(20) - 21 clamps to 10; -1e4 -> -20 -> 19 -> 10;
    # x = -4 -> exp(-4) + 3 = 3.018 (no clamp); x = -0.2 -> small.
    assert kl[0] == 10 and kl[1] == 10
    kl.sum().backward()
    assert lp.grad[0] == 0 and lp.grad[1] == 0  # clamped tokens contribute no gradient
    assert lp.grad[2] != 0 and lp.grad[3] != 0
    # d k3 / d logp = 1 - exp(other - logp)
    assert lp.grad[2].item() == pytest.approx(1 - math.exp(-4.0), rel=1e-6)


def test_kl_penalty_unknown_kind_and_shape():
    with pytest.raises(ValueError, match="low_var_kl") as exc:
        kl_penalty(torch.zeros(3), torch.zeros(3), "k4")
    assert "'k4'" in str(exc.value)
    with pytest.raises(ValueError, match="other_logp"):
        kl_penalty(torch.zeros(3), torch.zeros(4))


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def test_group_advantages_matches_reference():
    g = torch.Generator().manual_seed(2)
    n, groups = 5, 7
    rewards = torch.rand(n * groups, generator=g, dtype=F64)
    rewards[10:15] = 0.3  # constant group
    rewards[20:25] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=F64)
    adv = group_advantages(rewards, n)
    vals = rewards.tolist()
    for gi in range(groups):
        grp = vals[gi * n : (gi + 1) * n]
        mean, std = statistics.fmean(grp), statistics.stdev(grp)  # unbiased
        for j, r in enumerate(grp):
            expected = 0.0 if std == 0 else (r - mean) / (std + 1e-6)
            assert adv[gi * n + j].item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_group_advantages_constant_groups_exactly_zero():
    # In float32 the mean of six 0.9 is 0.9 - 6e-8: (R - mean) / (0 + eps) would give 0.056.
    rewards = torch.tensor([0.9] * 6 + [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] + [0.3] * 6 + [0.0] * 6)
    adv = group_advantages(rewards, 6)
    assert adv.dtype == torch.float32
    assert torch.equal(adv[:6], torch.zeros(6))
    assert torch.equal(adv[12:], torch.zeros(12))
    assert (adv[6:12] != 0).all()


def test_group_advantages_int_rewards_and_eps():
    adv = group_advantages(torch.tensor([1, 0, 0, 0]), 4, eps=0.5)
    std = statistics.stdev([1, 0, 0, 0])
    assert adv.dtype == torch.float32
    assert adv[0].item() == pytest.approx(0.75 / (std + 0.5), rel=1e-6)


@pytest.mark.parametrize(
    "rewards, group_size, match",
    [
        (torch.zeros(7), 5, "multiple of group_size"),
        (torch.zeros(6), 1, "group_size"),
        (torch.zeros(6), 0, "group_size"),
        (torch.zeros(2, 3), 3, "1-D"),
        (torch.tensor([0.0, float("nan"), 1.0, 1.0]), 2, "NaN"),
    ],
)
def test_group_advantages_errors(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


# --------------------------------------------------------------------------------------------
# papo_loss against the reference
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "grpo_token": dict(beta=0.01),
    "papo_g": dict(beta=0.01, gamma=0.02),
    "papo_g_all_terms_k1_k2": dict(beta=0.3, gamma=0.5, eta1=0.05, eta2=0.07, kl_kind="k2", perception_kl_kind="k1"),
    "papo_d_seq": dict(gamma=0.01, eta1=0.03, eta2=0.03, clip_high=0.28, avg="seq"),
    "seq_accum": dict(beta=0.2, gamma=0.3, eta1=0.1, eta2=0.2, avg="seq", grad_accum=3),
    "token_accum": dict(beta=0.2, gamma=0.3, eta1=0.1, eta2=0.2, grad_accum=4),
    "token_global": dict(beta=0.2, gamma=0.3, eta1=0.1, eta2=0.2, avg="token_global", num_tokens=57, grad_accum=2),
    "abs_kinds": dict(beta=0.2, gamma=0.3, kl_kind="abs", perception_kl_kind="abs"),
    "top_p": dict(gamma=0.5, perception_top_p=0.2),
    "kl_clip": dict(gamma=0.5, perception_kl_clip=0.2),
    "top_p_and_clip_seq": dict(gamma=0.5, perception_top_p=0.4, perception_kl_clip=0.5, avg="seq"),
    "masked_grad": dict(gamma=0.5, eta2=0.1, perception_kl_masked_grad=True),
    "tight_clips": dict(clip_low=0.05, clip_high=0.05, clip_dual=1.2),
}


@pytest.mark.parametrize("adv_2d", [False, True], ids=["adv_seq", "adv_tok"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_papo_loss_matches_reference(name, adv_2d):
    kw = CONFIGS[name]
    batch = make_batch(seed=100 + list(CONFIGS).index(name), adv_2d=adv_2d)
    loss, metrics, g_lp, g_m = run_impl(batch, **kw)
    r_loss, r_metrics, r_g_lp, r_g_m = run_ref(batch, **kw)
    assert loss.item() == pytest.approx(r_loss.item(), rel=1e-10, abs=1e-13)
    torch.testing.assert_close(g_lp, r_g_lp, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(g_m if g_m is not None else torch.zeros_like(r_g_m), r_g_m, rtol=1e-9, atol=1e-13)
    assert set(metrics) == set(r_metrics)
    for key, value in r_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    # the options under test do act on this batch
    if "perception_top_p" in kw:
        assert metrics["perception_mask_frac"] < 1.0
    if "perception_kl_clip" in kw:
        assert metrics["perception_kl"] < metrics["perception_kl_raw"] * metrics["perception_mask_frac"]


def test_reference_batch_exercises_clips_and_clamps():
    """Guard for the test above: the random batch does hit every clip and clamp."""
    batch = make_batch(seed=3)
    _, m = r_papo(batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    assert m["pg_clipfrac_dual"] > 0 and m["pg_clipfrac_high"] + m["pg_clipfrac_low"] > 0
    k3 = kl_penalty(batch["logp"], batch["masked_logp"])
    assert (k3[batch["mask"]] == 10).sum() >= 2


def test_perception_term_is_maximised():
    """The perception KL is subtracted: raising gamma lowers the loss by gamma * avg(KL)."""
    batch = make_batch(seed=4)
    args = (batch["logp"], batch["old_logp"], batch["advantages"], batch["mask"])
    base, _ = papo_loss(*args, masked_logp=batch["masked_logp"])
    with_p, metrics = papo_loss(*args, masked_logp=batch["masked_logp"], gamma=0.5)
    assert metrics["perception_kl"] > 0
    assert (base - with_p).item() == pytest.approx(0.5 * metrics["perception_kl"], rel=1e-12)
    # and its gradient on logp pushes the log-prob away from masked_logp's: -gamma * d k3/d logp
    lp = torch.tensor([[-1.0]], dtype=F64, requires_grad=True)
    masked = torch.tensor([[-1.7]], dtype=F64)
    loss, _ = papo_loss(lp, lp.detach(), torch.zeros(1, dtype=F64), torch.ones(1, 1), masked_logp=masked, gamma=1.0)
    loss.backward()
    # loss = -k3 and d k3/d logp = 1 - exp(masked - logp) > 0 here: the gradient is negative, so
    # a descent step raises logp, away from masked_logp, and the KL grows.
    assert lp.grad.item() == pytest.approx(-(1 - math.exp(-0.7)), rel=1e-12)
    assert lp.grad.item() < 0


# --------------------------------------------------------------------------------------------
# Padding, detaching, gradients
# --------------------------------------------------------------------------------------------

ALL_TERMS = dict(beta=0.2, gamma=0.3, eta1=0.1, eta2=0.2, perception_top_p=0.3, perception_kl_clip=0.5)


@pytest.mark.parametrize("kind", ["low_var_kl", "k2"])  # k3's clamps stop nan gradients, k2 has none
@pytest.mark.parametrize("avg", algos.AVG_MODES)
@pytest.mark.parametrize("adv_2d", [False, True], ids=["adv_seq", "adv_tok"])
def test_padding_contributes_nothing(avg, adv_2d, kind):
    kw = dict(ALL_TERMS, avg=avg, num_tokens=40, kl_kind=kind, perception_kl_kind=kind)
    clean = make_batch(seed=5, adv_2d=adv_2d, garbage=0.0)
    loss0, metrics0, g0, gm0 = run_impl(clean, **kw)
    pad = ~clean["mask"]
    for garbage in (-1e4, 1e4, float("inf"), float("-inf"), float("nan")):
        wild = make_batch(seed=5, adv_2d=adv_2d, garbage=garbage)
        if adv_2d:
            wild["advantages"][pad] = garbage
        loss, metrics, g, gm = run_impl(wild, **kw)
        assert torch.equal(loss, loss0), garbage
        assert torch.equal(g, g0) and torch.equal(gm, gm0), garbage
        assert (g[pad] == 0).all() and (gm[pad] == 0).all()
        assert metrics == metrics0


@pytest.mark.parametrize("avg", algos.AVG_MODES)
def test_old_ref_advantages_get_no_gradient(avg):
    batch = make_batch(seed=6, adv_2d=True)
    old, ref, adv = leaf(batch["old_logp"]), leaf(batch["ref_logp"]), leaf(batch["advantages"])
    lp = leaf(batch["logp"])
    loss, _ = papo_loss(
        lp,
        old,
        adv,
        batch["mask"],
        masked_logp=batch["masked_logp"],
        ref_logp=ref,
        settings=LossSettings(avg=avg, **ALL_TERMS),
        num_tokens=30,
    )
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert lp.grad is not None and lp.grad.abs().sum() > 0


@pytest.mark.parametrize("avg", algos.AVG_MODES)
def test_masked_logp_gradient_only_from_eta2(avg):
    batch = make_batch(seed=7)
    mask = batch["mask"]
    n_tok, k = int(mask.sum()), 2
    base = dict(gamma=0.5, beta=0.1, eta1=0.1, avg=avg, grad_accum=k, num_tokens=50)
    # no eta2: the perception KL alone sends no gradient into masked_logp
    _, _, g_lp, g_m = run_impl(batch, **base)
    assert g_m is None and g_lp.abs().sum() > 0
    # eta2: gradient = eta2 * d tok(-masked)/d masked, exactly
    _, _, _, g_m = run_impl(batch, eta2=0.3, **base)
    denom = 50 if avg == "token_global" else n_tok * k
    expected = torch.where(mask, torch.full_like(g_m, -0.3 / denom), torch.zeros_like(g_m))
    torch.testing.assert_close(g_m, expected, rtol=1e-13, atol=0)
    # eta2 with a masked_logp that carries no grad (pool / learner placement): a constant term
    loss_const, _, g_lp_const, g_m_const = run_impl(batch, grad_masked=False, eta2=0.3, **base)
    loss_grad, _, g_lp_grad, _ = run_impl(batch, eta2=0.3, **base)
    assert g_m_const is None
    assert torch.equal(loss_const, loss_grad) and torch.equal(g_lp_const, g_lp_grad)


def test_masked_grad_option_sends_kl_gradient_to_masked_logp():
    batch = make_batch(seed=8)
    _, _, _, g_m = run_impl(batch, gamma=0.5, perception_kl_masked_grad=True)
    assert g_m is not None and g_m[batch["mask"]].abs().sum() > 0
    # maximising k3 = exp(x) - x - 1 with x = masked - logp: d(-gamma k3)/d masked = -gamma (exp(x) - 1) / n
    mask = batch["mask"]
    x = (batch["masked_logp"] - batch["logp"])[mask]
    expected = -0.5 * (x.exp() - 1) / int(mask.sum())
    expected[(x.exp() - x - 1) > 10] = 0  # clamped tokens
    torch.testing.assert_close(g_m[mask], expected, rtol=1e-12, atol=1e-15)


def test_gradcheck_away_from_kinks():
    g = torch.Generator().manual_seed(9)
    B, TT = 3, 4
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    lp = (-1.0 - torch.rand(B, TT, generator=g, dtype=F64)).requires_grad_(True)
    # log-ratios either well inside the clip range or well past it (flat region), never near a kink
    old = lp.detach() + torch.tensor([[0.05, -0.6, 0.08, 1.6], [-0.04, 0.6, 0.0, 0.0], [0.0] * 4], dtype=F64)
    adv = torch.tensor([0.7, -1.3, 0.4], dtype=F64)
    ref = lp.detach() + 0.3 * torch.randn(B, TT, generator=g, dtype=F64)
    masked = (lp.detach() + 0.8 * torch.randn(B, TT, generator=g, dtype=F64)).requires_grad_(True)

    def f(lp_, masked_, avg, masked_grad):
        return papo_loss(
            lp_,
            old,
            adv,
            mask,
            masked_logp=masked_,
            ref_logp=ref,
            settings=LossSettings(
                gamma=0.3, beta=0.2, eta1=0.1, eta2=0.2, avg=avg, perception_kl_masked_grad=masked_grad
            ),
            grad_accum=2,
            num_tokens=7,
        )[0]

    for avg in algos.AVG_MODES:
        # Default: the loss is a true function of logp (masked_logp a constant input) ...
        fixed_masked = masked.detach()
        assert torch.autograd.gradcheck(
            lambda x, avg=avg, m=fixed_masked: f(x, m, avg, False), (lp,), eps=1e-6, atol=1e-8
        )
        # ... and with the KL's masked-branch gradient on, of both (eta2 and the KL reach masked_logp).
        assert torch.autograd.gradcheck(lambda x, y, avg=avg: f(x, y, avg, True), (lp, masked), eps=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Averaging modes
# --------------------------------------------------------------------------------------------


def _two_sequences():
    """Lengths 1 and 3, ratio 1 (no clip), advantages +1 and -1: per-token pg loss = -A."""
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    lp = torch.full((2, 3), -0.5, dtype=F64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=F64)
    return lp, adv, mask


def test_token_vs_seq_known_difference():
    lp, adv, mask = _two_sequences()
    token, _ = papo_loss(lp, lp.detach(), adv, mask, settings=LossSettings(avg="token"))
    (g_token,) = torch.autograd.grad(token, lp)
    seq, _ = papo_loss(lp, lp.detach(), adv, mask, settings=LossSettings(avg="seq"))
    (g_seq,) = torch.autograd.grad(seq, lp)
    # token: -(1 * 1 + (-1) * 3) / 4 = 0.5; seq: -(1 / 1 + (-1) * 3 / 3) / 2 = 0
    assert token.item() == pytest.approx(0.5, abs=1e-15)
    assert seq.item() == pytest.approx(0.0, abs=1e-15)
    # d/dlogp of -A * r at r = 1: token -A / 4; seq -A / (2 * len)
    expected_token = torch.tensor([[-0.25, 0, 0], [0.25, 0.25, 0.25]], dtype=F64)
    expected_seq = torch.tensor([[-0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]], dtype=F64)
    torch.testing.assert_close(g_token, expected_token, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(g_seq, expected_seq, rtol=1e-14, atol=1e-15)


def test_seq_mode_counts_empty_sequence_in_mean():
    lp, adv, mask = _two_sequences()
    mask3 = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)])
    lp3 = torch.cat([lp.detach(), torch.full((1, 3), float("nan"), dtype=F64)]).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 5.0], dtype=F64)
    seq, _ = papo_loss(lp3, lp3.detach(), adv, mask3, settings=LossSettings(avg="seq"))
    assert seq.item() == pytest.approx(-2.0 / 3.0, abs=1e-15)  # (-1 - 1 + 0) / 3


@pytest.mark.parametrize("avg", ["token", "seq"])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_grad_accum_scales_by_exactly_one_over_k(avg, k):
    batch = make_batch(seed=10)
    loss1, m1, g1, gm1 = run_impl(batch, avg=avg, **ALL_TERMS)
    lossk, mk, gk, gmk = run_impl(batch, avg=avg, grad_accum=k, **ALL_TERMS)
    assert lossk.item() == pytest.approx(loss1.item() / k, rel=1e-14)
    torch.testing.assert_close(gk, g1 / k, rtol=1e-13, atol=0)
    torch.testing.assert_close(gmk, gm1 / k, rtol=1e-13, atol=0)
    assert mk["loss"] == pytest.approx(m1["loss"] / k, rel=1e-14)
    assert mk["entropy"] == m1["entropy"]  # statistics are not scaled


def test_token_global_is_sum_over_num_tokens():
    batch = make_batch(seed=11)
    mask = batch["mask"]
    kw = dict(beta=0.2, gamma=0.3, eta1=0.1, eta2=0.2)
    # Summing per-token contributions and dividing by num_tokens
    loss, _ = papo_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        mask,
        masked_logp=batch["masked_logp"],
        ref_logp=batch["ref_logp"],
        settings=LossSettings(avg="token_global", **kw),
        num_tokens=100,
    )
    pg, _ = algos.clipped_policy_loss(batch["logp"], batch["old_logp"], batch["advantages"])
    ref_kl = kl_penalty(batch["logp"], batch["ref_logp"])
    p_kl = kl_penalty(batch["logp"], batch["masked_logp"])
    total = pg + 0.2 * ref_kl - 0.3 * p_kl + 0.1 * -batch["logp"] + 0.2 * -batch["masked_logp"]
    assert loss.item() == pytest.approx(total[mask].sum().item() / 100, rel=1e-12)
    # grad_accum does not apply; a tensor num_tokens works the same
    loss_k, _ = papo_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        mask,
        masked_logp=batch["masked_logp"],
        ref_logp=batch["ref_logp"],
        settings=LossSettings(avg="token_global", **kw),
        num_tokens=torch.tensor(100),
        grad_accum=4,
    )
    assert torch.equal(loss, loss_k)
    # with num_tokens = this micro-batch's count it equals the token mode without accumulation
    loss_tok, _ = papo_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        mask,
        masked_logp=batch["masked_logp"],
        ref_logp=batch["ref_logp"],
        settings=LossSettings(avg="token", **kw),
    )
    loss_glob, _ = papo_loss(
        batch["logp"],
        batch["old_logp"],
        batch["advantages"],
        mask,
        masked_logp=batch["masked_logp"],
        ref_logp=batch["ref_logp"],
        settings=LossSettings(avg="token_global", **kw),
        num_tokens=int(mask.sum()),
    )
    assert loss_glob.item() == pytest.approx(loss_tok.item(), rel=1e-13)


def test_aggregate_modes_directly():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), float("inf")]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate(values, mask, "token").item() == pytest.approx(7 / 3)
    assert aggregate(values, mask, "token", grad_accum=7).item() == pytest.approx(1 / 3)
    assert aggregate(values, mask, "seq").item() == pytest.approx((1.5 + 4) / 2)
    assert aggregate(values, mask, "token_global", num_tokens=14).item() == pytest.approx(0.5)
    zero = torch.zeros(2, 3, dtype=torch.bool)
    for mode in algos.AVG_MODES:
        assert aggregate(values, zero, mode, num_tokens=0).item() == 0.0


# --------------------------------------------------------------------------------------------
# Numerical safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("avg", algos.AVG_MODES)
def test_extreme_logprobs_stay_finite(avg):
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    big = 1e4
    lp = torch.tensor([[-big, 0.0, -big, -1.0, -big], [0.0, -big, 0, 0, 0], [-big] * 5]).requires_grad_(True)
    old = torch.tensor([[0.0, -big, -big, -big, 0.0], [-big, 0.0, 0, 0, 0], [0.0] * 5])
    ref = torch.tensor([[0.0, -big, 0.0, -big, 0.0], [-big, 0.0, 0, 0, 0], [0.0] * 5])
    masked = torch.tensor([[0.0, -big, -big, 0.0, 0.0], [0.0, -big, 0, 0, 0], [0.0] * 5]).requires_grad_(True)
    for adv in (torch.tensor([1.0, -1.0, 2.0]), torch.tensor([-3.0, 3.0, 0.0])):
        for kind in ("low_var_kl", "k1", "k2", "abs"):
            lp.grad = masked.grad = None
            loss, metrics = papo_loss(
                lp,
                old,
                adv,
                mask,
                masked_logp=masked,
                ref_logp=ref,
                settings=LossSettings(avg=avg, kl_kind=kind, perception_kl_kind=kind, **ALL_TERMS),
                num_tokens=6,
            )
            loss.backward()
            assert torch.isfinite(loss), (kind, adv)
            assert torch.isfinite(lp.grad).all() and torch.isfinite(masked.grad).all(), (kind, adv)
            assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_all_padding_micro_batch():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    lp = torch.full((2, 4), float("nan")).requires_grad_(True)
    for avg in algos.AVG_MODES:
        lp.grad = None
        loss, metrics = papo_loss(
            lp,
            lp.detach(),
            torch.ones(2),
            mask,
            masked_logp=lp.detach(),
            ref_logp=lp.detach(),
            settings=LossSettings(avg=avg, **ALL_TERMS),
            num_tokens=0,
        )
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 4))
        assert metrics["response_tokens"] == 0 and all(math.isfinite(v) for v in metrics.values())


def test_half_precision_inputs_compute_in_float32():
    batch = make_batch(seed=12, dtype=torch.bfloat16)
    lp = leaf(batch["logp"])
    loss, metrics = papo_loss(
        lp,
        batch["old_logp"],
        batch["advantages"],
        batch["mask"],
        masked_logp=batch["masked_logp"],
        ref_logp=batch["ref_logp"],
        settings=LossSettings(**ALL_TERMS),
    )
    loss.backward()
    assert loss.dtype == torch.float32 and lp.grad.dtype == torch.bfloat16
    assert torch.isfinite(loss) and all(math.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# Handcrafted cases: clip fractions, top-p mask, KL clip
# --------------------------------------------------------------------------------------------


def test_clip_fractions_handcrafted():
    # (A, ratio) per token; clip_low 0.2, clip_high 0.3, clip_dual 3
    cases = [
        (1.0, 1.5),  # high: A > 0, r > 1.3            loss -1.3
        (1.0, 0.5),  # none: A > 0, lower clip loose   loss -0.5
        (-1.0, 0.5),  # low:  A < 0, r < 0.8            loss 0.8
        (-1.0, 1.5),  # none: A < 0, upper clip loose   loss 1.5
        (-1.0, 4.0),  # dual: A < 0, r > 3              loss 3
        (2.0, 1.0),  # none                            loss -2
        (0.0, 9.0),  # none: A = 0                     loss 0
    ]
    n = len(cases)
    adv = torch.tensor([[a for a, _ in cases] + [-1.0]], dtype=F64)
    old = torch.zeros(1, n + 1, dtype=F64)
    lp = torch.tensor([[math.log(r) for _, r in cases] + [math.log(50.0)]], dtype=F64)  # pad: r = 50, A < 0
    mask = torch.tensor([[1] * n + [0]], dtype=torch.bool)
    loss, metrics = papo_loss(lp, old, adv, mask)
    assert metrics["pg_clipfrac_high"] == pytest.approx(1 / n)
    assert metrics["pg_clipfrac_low"] == pytest.approx(1 / n)
    assert metrics["pg_clipfrac_dual"] == pytest.approx(1 / n)
    expected = (-1.3 - 0.5 + 0.8 + 1.5 + 3.0 - 2.0 + 0.0) / n
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # clipped tokens get no gradient, the others get -A * r / n
    lp = leaf(lp)
    papo_loss(lp, old, adv, mask)[0].backward()
    expected_grad = [0.0, -0.5 / n, 0.0, 1.5 / n, 0.0, -2.0 / n, 0.0, 0.0]
    torch.testing.assert_close(lp.grad[0], torch.tensor(expected_grad, dtype=F64), rtol=1e-12, atol=1e-15)


def _perception_case():
    # k1 perception KL = logp - masked = [0.1, 0.5, 0.2, 0.9, 0.3] on row 0, plus padding;
    # row 1 has one token; row 2 none.
    kl_row0 = [0.1, 0.5, 0.2, 0.9, 0.3]
    lp = torch.full((3, 6), -1.0, dtype=F64)
    masked = lp.clone()
    masked[0, :5] = lp[0, :5] - torch.tensor(kl_row0, dtype=F64)
    masked[0, 5] = lp[0, 5] - 100.0  # padding with a huge KL: must not move the threshold
    masked[1, 0] = lp[1, 0] - 0.05
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 0] = True
    return lp, masked, mask


def test_top_p_mask_handcrafted():
    lp, masked, mask = _perception_case()
    kl = kl_penalty(lp, masked, "k1")
    # top_p 0.4: q = 0.6, sorted [.1 .2 .3 .5 .9], pos 2.4 -> threshold .3 + .4 * .2 = .38
    keep = perception_token_mask(kl, mask, 0.4)
    assert keep[0].tolist() == [False, True, False, True, False, False]
    assert keep[1].tolist() == [True] + [False] * 5  # a single token is its own quantile
    assert not keep[2].any()
    # ties at the threshold are kept: top_p 0.5 -> q = 0.5, pos 2 -> threshold exactly 0.3
    keep = perception_token_mask(kl, mask, 0.5)
    assert keep[0].tolist() == [False, True, False, True, True, False]
    # top_p 1 (which algo.perception_top_p accepts) keeps every response token: the loss without a mask
    assert torch.equal(perception_token_mask(kl, mask, 1.0), mask.bool())
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"perception_top_p must be in \(0, 1\]"):
            perception_token_mask(kl, mask, bad)
    whole = [
        papo_loss(
            leaf(lp),
            lp,
            torch.ones(3, dtype=F64),
            mask,
            masked_logp=masked,
            settings=LossSettings(gamma=1.0, perception_kl_kind="k1", perception_top_p=top_p),
        )[0].item()
        for top_p in (1.0, None)
    ]
    assert whole[0] == pytest.approx(whole[1], rel=1e-15)

    # in the loss: dropped tokens count 0 but stay in the denominator (official semantics)
    lp_leaf = leaf(lp)
    loss, metrics = papo_loss(
        lp_leaf,
        lp,
        torch.zeros(3, dtype=F64),
        mask,
        masked_logp=masked,
        settings=LossSettings(gamma=1.0, perception_kl_kind="k1", perception_top_p=0.4),
    )
    assert loss.item() == pytest.approx(-(0.5 + 0.9 + 0.05) / 6, rel=1e-12)
    assert metrics["perception_mask_frac"] == pytest.approx(3 / 6)
    assert metrics["perception_kl"] == pytest.approx((0.5 + 0.9 + 0.05) / 6, rel=1e-12)
    assert metrics["perception_kl_raw"] == pytest.approx((1.9 + 0.1 + 0.05) / 6 + 0.0, rel=1e-12)
    loss.backward()
    expected = torch.zeros(3, 6, dtype=F64)
    expected[0, 1] = expected[0, 3] = expected[1, 0] = -1.0 / 6  # d(-k1)/dlogp = -1, / 6 tokens
    torch.testing.assert_close(lp_leaf.grad, expected, rtol=1e-12, atol=1e-15)


def test_kl_clip_handcrafted():
    lp = torch.full((1, 4), -1.0, dtype=F64)
    masked = lp - torch.tensor([[0.1, 0.5, -0.2, 0.0]], dtype=F64)  # k1: [0.1, 0.5, -0.2, 0]
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    lp_leaf = leaf(lp)
    loss, metrics = papo_loss(
        lp_leaf,
        lp,
        torch.zeros(1, dtype=F64),
        mask,
        masked_logp=masked,
        settings=LossSettings(gamma=2.0, perception_kl_kind="k1", perception_kl_clip=0.2),
    )
    # clamp to [0, 0.2]: [0.1, 0.2, 0.0]
    assert metrics["perception_kl"] == pytest.approx(0.3 / 3, rel=1e-12)
    assert metrics["perception_kl_raw"] == pytest.approx(0.4 / 3, rel=1e-12)
    assert loss.item() == pytest.approx(-2.0 * 0.3 / 3, rel=1e-12)
    loss.backward()
    # only the unclamped token gets gradient
    torch.testing.assert_close(lp_leaf.grad, torch.tensor([[-2.0 / 3, 0, 0, 0]], dtype=F64), rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Metrics and validation
# --------------------------------------------------------------------------------------------

BASE_KEYS = {
    "loss",
    "pg_loss",
    "entropy",
    "ppo_kl",
    "pg_clipfrac_low",
    "pg_clipfrac_high",
    "pg_clipfrac_dual",
    "response_tokens",
}
PERCEPTION_KEYS = {"perception_kl", "perception_kl_raw", "masked_entropy", "perception_mask_frac"}


def test_metrics_keys_follow_inputs():
    b = make_batch(seed=13)
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    _, m = papo_loss(*args)
    assert set(m) == BASE_KEYS and all(isinstance(v, float) for v in m.values())
    _, m = papo_loss(*args, ref_logp=b["ref_logp"])
    assert set(m) == BASE_KEYS | {"ref_kl"}
    _, m = papo_loss(*args, masked_logp=b["masked_logp"])  # diagnostic: measured, not in the loss
    assert set(m) == BASE_KEYS | PERCEPTION_KEYS
    assert m["perception_mask_frac"] == 1.0 and m["perception_kl"] > 0
    assert m["loss"] == m["pg_loss"]


def test_entropy_metrics_are_sampled_token_estimates():
    lp = torch.tensor([[-1.0, -2.0, -50.0]], dtype=F64)
    masked = torch.tensor([[-3.0, -5.0, -50.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0]])
    _, m = papo_loss(lp, lp, torch.zeros(1, dtype=F64), mask, masked_logp=masked)
    assert m["entropy"] == pytest.approx(1.5) and m["masked_entropy"] == pytest.approx(4.0)
    assert m["ppo_kl"] == 0.0 and m["response_tokens"] == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(avg="mean"), "avg"),
        (dict(avg="token_global"), "num_tokens"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(grad_accum=1.5), "grad_accum"),
        (dict(kl_kind="kl2"), "kl_kind"),
        (dict(perception_kl_kind="x"), "perception_kl_kind"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(clip_dual=1.0), "clip_dual"),
        (dict(beta=0.01, ref_logp=None), "ref_logp"),
        (dict(gamma=0.02, masked_logp=None), "masked_logp"),
        (dict(eta2=0.03, masked_logp=None), "masked_logp"),
        (dict(perception_top_p=0.0), "perception_top_p"),
        (dict(perception_kl_clip=0.0), "perception_kl_clip"),
        (dict(old_logp=torch.zeros(6, 8)), "old_logp"),
        (dict(mask=torch.ones(6, 8)), "mask"),
        (dict(masked_logp=torch.zeros(6, 8)), "masked_logp"),
        (dict(ref_logp=torch.zeros(6, 8)), "ref_logp"),
        (dict(advantages=torch.zeros(5)), "advantages"),
        (dict(logp=torch.zeros(6)), "logp"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, match):
    b = make_batch(seed=14)
    call = dict(
        logp=b["logp"],
        old_logp=b["old_logp"],
        advantages=b["advantages"],
        mask=b["mask"],
        masked_logp=b["masked_logp"],
        ref_logp=b["ref_logp"],
    )
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        papo_loss(**call)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(avg="mean"), "avg"),
        (dict(kl_kind="kl2"), "kl_kind"),
        (dict(perception_kl_kind="x"), "perception_kl_kind"),
        (dict(clip_low=1.0), "clip_low"),
        (dict(clip_high=-0.1), "clip_high"),
        (dict(clip_dual=1.0), "clip_dual"),
        (dict(perception_top_p=1.5), "perception_top_p"),
        (dict(perception_kl_clip=-1.0), "perception_kl_clip"),
    ],
)
def test_loss_settings_validate_once_naming_the_field(fields, match):
    """The keyword form of papo_loss and LossSettings share one validation: the same message."""
    with pytest.raises(ValueError, match=match) as direct:
        LossSettings(**fields)
    b = make_batch(seed=14)
    with pytest.raises(ValueError, match=match) as via_keywords:
        papo_loss(b["logp"], b["old_logp"], b["advantages"], b["mask"], **fields)
    assert str(direct.value) == str(via_keywords.value)
    # replace() builds a new object through the same check
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(LossSettings(), **fields)


def test_loss_settings_are_frozen_and_replace_makes_a_copy():
    s = LossSettings(gamma=0.02, beta=0.01)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gamma = 0.5
    t = dataclasses.replace(s, gamma=0.01, eta2=0.03)
    assert (s.gamma, s.eta2) == (0.02, 0.0) and (t.gamma, t.beta, t.eta2) == (0.01, 0.01, 0.03)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_keyword_form_equals_settings_form(name):
    """The contract's keyword form builds the same LossSettings the learner passes: identical results."""
    kw = dict(CONFIGS[name])
    placement = {k: kw.pop(k) for k in ("grad_accum", "num_tokens") if k in kw}
    batch = make_batch(seed=200 + list(CONFIGS).index(name))
    results = []
    for call in (dict(kw, **placement), dict(settings=LossSettings(**kw), **placement)):
        lp, masked = leaf(batch["logp"]), leaf(batch["masked_logp"])
        loss, metrics = papo_loss(
            lp,
            batch["old_logp"],
            batch["advantages"],
            batch["mask"],
            masked_logp=masked,
            ref_logp=batch["ref_logp"],
            **call,
        )
        loss.backward()
        results.append((loss, metrics, lp.grad, masked.grad))
    (l1, m1, g1, gm1), (l2, m2, g2, gm2) = results
    assert torch.equal(l1, l2) and m1 == m2 and torch.equal(g1, g2)
    assert (gm1 is None and gm2 is None) or torch.equal(gm1, gm2)


def test_contract_keywords_all_accepted():
    """The public keyword form (docs/design.md): every documented keyword, spelled out."""
    import trainer.algos

    b = make_batch(seed=15)
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    loss, metrics = trainer.algos.papo_loss(
        *args,
        masked_logp=b["masked_logp"],
        ref_logp=b["ref_logp"],
        gamma=0.02,
        beta=0.01,
        eta1=0.03,
        eta2=0.03,
        clip_low=0.2,
        clip_high=0.28,
        clip_dual=3.0,
        kl_kind="low_var_kl",
        avg="token_global",
        grad_accum=1,
        num_tokens=40,
    )
    settings = LossSettings(gamma=0.02, beta=0.01, eta1=0.03, eta2=0.03, clip_high=0.28, avg="token_global")
    same, same_metrics = papo_loss(
        *args, masked_logp=b["masked_logp"], ref_logp=b["ref_logp"], settings=settings, num_tokens=40
    )
    assert torch.equal(loss, same) and metrics == same_metrics
    # the defaults of the keyword form are LossSettings()'s
    assert torch.equal(papo_loss(*args)[0], papo_loss(*args, settings=LossSettings())[0])


def test_unknown_keywords_and_mixed_forms_are_type_errors():
    b = make_batch(seed=16)
    args = (b["logp"], b["old_logp"], b["advantages"], b["mask"])
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'gama', 'kl_typ'") as err:
        papo_loss(*args, masked_logp=b["masked_logp"], gama=0.02, kl_typ="k1")
    assert "perception_kl_masked_grad" in str(err.value)  # the message lists the known fields
    # settings= and keyword fields: ambiguous, refused (override with dataclasses.replace instead)
    with pytest.raises(TypeError, match=r"not both \(got settings and 'gamma'\)"):
        papo_loss(*args, masked_logp=b["masked_logp"], settings=LossSettings(gamma=0.01), gamma=0.02)
    # an unknown name is reported even next to settings=
    with pytest.raises(TypeError, match="'gama'"):
        papo_loss(*args, settings=LossSettings(), gama=0.02)
    with pytest.raises(TypeError, match="must be a LossSettings"):
        papo_loss(*args, settings={"gamma": 0.0})


# --------------------------------------------------------------------------------------------
# Schedule and entropy helper
# --------------------------------------------------------------------------------------------


def test_perception_coef_schedules():
    assert perception_coef(0, 100, start=0.02) == 0.02
    assert perception_coef(99, 100, start=0.02, end=0.0, schedule="fixed") == 0.02
    # linear over int(100 * 0.5) = 50 steps, then constant
    lin = dict(start=0.02, end=0.0, schedule="linear", anneal_ratio=0.5)
    assert perception_coef(0, 100, **lin) == 0.02
    assert perception_coef(25, 100, **lin) == pytest.approx(0.01)
    assert perception_coef(50, 100, **lin) == pytest.approx(0.0)
    assert perception_coef(80, 100, **lin) == pytest.approx(0.0)
    # end defaults to 0, ratio to 1; annealing upward works too
    assert perception_coef(30, 40, start=0.04, schedule="linear") == pytest.approx(0.01)
    assert perception_coef(5, 10, start=0.01, end=0.03, schedule="linear") == pytest.approx(0.02)
    assert perception_coef(3, 2, start=0.01, end=0.03, schedule="linear", anneal_ratio=0.1) == pytest.approx(0.03)


def test_perception_coefs_scale_entropy_with_gamma():
    g, e1, e2 = perception_coefs(25, 100, gamma=0.02, eta1=0.03, eta2=0.05, schedule="linear", anneal_ratio=0.5)
    assert (g, e1, e2) == pytest.approx((0.01, 0.015, 0.025))
    assert perception_coefs(7, 100, gamma=0.02, eta1=0.03, eta2=0.05) == pytest.approx((0.02, 0.03, 0.05))
    assert perception_coefs(50, 100, gamma=0.0, eta1=0.03, eta2=0.05, schedule="linear") == (0.0, 0.03, 0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(step=0, total_steps=10, start=0.1, schedule="cosine"), "schedule"),
        (dict(step=-1, total_steps=10, start=0.1), "step"),
        (dict(step=0, total_steps=0, start=0.1, schedule="linear"), "total_steps"),
        (dict(step=0, total_steps=10, start=0.1, schedule="linear", anneal_ratio=0.0), "anneal_ratio"),
    ],
)
def test_perception_coef_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        perception_coef(**kwargs)


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(2, 3, 11, generator=g, dtype=F64)
    logits[0, 0, 4] = float("-inf")  # a banned token
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3)
    for i in range(2):
        for t in range(3):
            z = [v for v in logits[i, t].tolist() if v != float("-inf")]
            zmax = max(z)
            s = sum(math.exp(v - zmax) for v in z)
            p = [math.exp(v - zmax) / s for v in z]
            assert h[i, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)
    assert entropy_from_logits(torch.zeros(7)).item() == pytest.approx(math.log(7))
    assert entropy_from_logits(torch.tensor([0.0, -1e9, -1e9])).item() == pytest.approx(0.0, abs=1e-12)
    assert entropy_from_logits(torch.zeros(2, 5, dtype=torch.bfloat16)).dtype == torch.float32
