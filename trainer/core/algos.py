"""The algorithm core of PAPO: pure tensor math, no Ray, no config, no I/O.

This module owns every formula of the objective and nothing else (the one bridge from the config
is :meth:`LossSettings.from_algo`, which reads an ``AlgoConfig``'s fields by name):

- KL estimators (``kl_penalty``: k1, k2, abs, k3 / low_var_kl),
- GRPO outcome advantages (``group_advantages``),
- the PPO clipped policy loss with clip-higher and dual clip (``clipped_policy_loss``),
- loss averaging over response tokens (``aggregate``: token / seq / token_global), and the
  per-row denominators that keep it independent of how rows are packed (``layout_denominators``),
- the perception-KL top-p token mask (``perception_token_mask``),
- the hyper-parameters of the objective, validated once (``LossSettings``),
- the full PAPO objective and its metrics (``papo_loss``),
- the perception coefficient schedule (``perception_coef``, ``perception_coefs``),
- exact entropy from logits, for logging (``entropy_from_logits``).

Shapes: per-token tensors are ``(batch, tokens)``; ``mask`` is the response-token mask (1 for
real response tokens, 0 for padding). The objective, per micro-batch, to minimise::

    L = L_pg + beta * avg(KL(logp, ref_logp)) - gamma * avg(KL(logp, masked_logp))
             + eta1 * tok(-logp) + eta2 * tok(-masked_logp)

Semantics follow the authors' code (MikeWangWZHL/PAPO: ``verl/trainer/core_algos.py`` and
``verl/workers/actor/dp_actor.py``, built on EasyR1); where it differs from the paper's figure
or leaves something open, we follow the code:

- k3 is ``exp(x) - x - 1`` with ``x = other - logp``, i.e. ``1/r + log r - 1`` for
  ``r = pi / pi_other`` (EasyR1 ``compute_kl``); the paper's figure writes ``r - log r - 1``.
- Top-p perception mask (``perception_top_p``, dp_actor ``use_kl_prcp_token_level_mask``): the
  threshold is each sequence's ``(1 - top_p)`` quantile (linear interpolation, response tokens
  only, ``torch.nanquantile``) of the per-token perception KL *before* clipping; tokens with
  ``KL >= threshold`` are kept. Dropped tokens contribute 0 but still count in the averaging
  denominator: the official code multiplies the KL by the token mask and then averages it with
  the response mask. docs/algorithm.md does not pin this down; we follow the code.
- Perception KL clip (``perception_kl_clip``, ``use_kl_prcp_clipping``): the per-token KL is
  clamped to ``[0, clip]`` after the top-p mask; tokens above the clip get no gradient.
- The perception term is subtracted (KL maximised). The official metric ``kl_prcp_loss`` is
  logged negated; we log ``perception_kl`` as the positive KL.
- Entropy terms use the token mean whatever the averaging mode (official: ``VF.masked_mean``).
- ``masked_logp`` inside the perception KL: the official default computes it under
  ``torch.no_grad`` (so the KL's gradient reaches only ``logp``, and eta2 has no gradient). With
  the official ``RECOMPUTE_AUG_LOG_PROBS=True`` switch the recomputed, grad-carrying log-probs go
  into ``compute_kl``, which does not detach, so the KL then also back-propagates through the
  masked branch (``compute_kl`` checked; the recompute branch itself as described by the README
  and third-party audits of ``dp_actor.py``). We detach ``masked_logp`` inside the KL by default, so that the
  ``learner_grad`` placement changes only the eta2 term and the KL gradient is the official
  default's; ``perception_kl_masked_grad=True`` gives the recompute behaviour.
- Schedule: the official ``AnnealingKLController`` gives, at the k-th training step (k = 0 for
  the first), ``start + (end - start) * min(k / anneal_steps, 1)`` with
  ``anneal_steps = max(1, int(total_steps * anneal_ratio))``, ``end`` defaulting to 0; both
  entropy coefficients are multiplied by ``gamma_k / gamma_start`` (``discount_ratio``).
- The official per-sample ``kl_prcp_weighting`` is all ones in its only implemented mode
  (``all``), so it is omitted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.core.config import AlgoConfig

__all__ = [
    "AVG_MODES",
    "KL_KINDS",
    "SCHEDULES",
    "LossSettings",
    "aggregate",
    "clipped_policy_loss",
    "entropy_from_logits",
    "group_advantages",
    "kl_penalty",
    "layout_denominators",
    "masked_mean",
    "papo_loss",
    "perception_coef",
    "perception_coefs",
    "perception_token_mask",
]

KL_KINDS: tuple[str, ...] = ("k1", "kl", "k2", "mse", "abs", "low_var_kl", "k3")
"""Accepted ``kind`` values of :func:`kl_penalty` (``kl``/``mse``/``k3`` are verl aliases)."""

AVG_MODES: tuple[str, ...] = ("token", "seq", "token_global")
"""Accepted ``avg`` values of :func:`aggregate` and :func:`papo_loss`."""

SCHEDULES: tuple[str, ...] = ("fixed", "linear")
"""Accepted ``schedule`` values of :func:`perception_coef`."""

# exp() of a log-ratio beyond these bounds overflows float32 or gives inf * 0 = nan gradients
# (pytorch/pytorch#10729); both verl and EasyR1 clamp here.
_LOG_RATIO_CLAMP = 20.0
# Caps one token's k3 (and zeroes its gradient past the cap) so outlier tokens cannot dominate.
_K3_CLAMP = 10.0


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Half-precision log-probs lose the small differences that ratios and KLs are made of.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_same_shape(name: str, x: Tensor, ref: Tensor) -> None:
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)} (the shape of logp)")


# --------------------------------------------------------------------------------------------
# KL estimators
# --------------------------------------------------------------------------------------------


def kl_penalty(logp: Tensor, other_logp: Tensor, kind: str = "low_var_kl") -> Tensor:
    """Per-token estimate of KL(pi || other) from tokens sampled by pi.

    With ``d = logp - other_logp``:

    - ``k1`` (alias ``kl``):   ``d``
    - ``k2`` (alias ``mse``):  ``0.5 * d^2``
    - ``abs``:                 ``|d|``
    - ``low_var_kl`` (alias ``k3``), Schulman's estimator with the verl/EasyR1 clamps:
      ``x = clamp(other_logp - logp, -20, 20)``; ``k3 = clamp(exp(x) - x - 1, -10, 10)``.
      Tokens whose k3 exceeds 10 contribute no gradient.

    Nothing is detached here: a gradient flows into whichever argument carries one
    (:func:`papo_loss` decides what is detached). Half-precision inputs are computed in float32.

    Raises:
        ValueError: unknown ``kind`` (the message lists :data:`KL_KINDS`) or shape mismatch.
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; allowed kinds: {', '.join(KL_KINDS)}")
    if logp.shape != other_logp.shape:
        raise ValueError(f"other_logp has shape {tuple(other_logp.shape)}, expected {tuple(logp.shape)}")
    dtype = _compute_dtype(logp)
    logp, other_logp = logp.to(dtype), other_logp.to(dtype)
    if kind in ("k1", "kl"):
        return logp - other_logp
    if kind in ("k2", "mse"):
        return 0.5 * (logp - other_logp).square()
    if kind == "abs":
        return (logp - other_logp).abs()
    x = (other_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return (x.exp() - x - 1.0).clamp(-_K3_CLAMP, _K3_CLAMP)


# --------------------------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantages, one value per response.

    Responses of group g are the contiguous rows ``[g * n, (g + 1) * n)``, ``n = group_size``::

        A_i = (R_i - mean_g(R)) / (std_g(R) + eps),   std unbiased (divides by n - 1)

    A group whose rewards are all equal gets exactly 0 (not round-off of a mean that is not
    exactly representable, divided by ``eps``). Integer or bool rewards are computed in float32.

    Raises:
        ValueError: ``rewards`` not 1-D, ``group_size < 2`` (the unbiased std is undefined),
            ``len(rewards)`` not a multiple of ``group_size``, or non-finite rewards.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D (one scalar per response), got shape {tuple(rewards.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2 (unbiased std needs two responses), got {group_size!r}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) is not a multiple of group_size ({group_size})")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.float32)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf")
    groups = rewards.reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, unbiased=True, keepdim=True)
    constant = groups.amax(dim=1, keepdim=True) == groups.amin(dim=1, keepdim=True)
    adv = torch.where(constant, torch.zeros_like(groups), (groups - mean) / (std + eps))
    return adv.reshape(-1)


# --------------------------------------------------------------------------------------------
# Averaging
# --------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(values * mask) / max(sum(mask), 1)``: the mean over response tokens, 0 when none.

    Padding is selected away with ``torch.where``, so non-finite values there are harmless.
    """
    m = mask.to(torch.bool)
    total = torch.where(m, values, torch.zeros_like(values)).sum()
    return total / m.sum().clamp(min=1).to(values.dtype)


def aggregate(
    values: Tensor,
    mask: Tensor,
    avg: str = "token",
    *,
    grad_accum: int = 1,
    num_tokens: int | float | Tensor | None = None,
) -> Tensor:
    """Reduce per-token values ``v`` (batch, tokens) to the scalar that enters the loss.

    With ``m`` the response mask, ``B`` the micro-batch size and ``k = grad_accum``:

    - ``token``:        ``sum_{i,t} m v / max(sum_{i,t} m, 1) / k``   (official default)
    - ``seq``:          ``(1/B) sum_i [sum_t m v / max(sum_t m, 1)] / k``; a sequence without
      response tokens contributes 0 and still counts in ``B`` (EasyR1's ``average_loss``)
    - ``token_global``: ``sum_{i,t} m v / num_tokens``, where ``num_tokens`` is the response-token
      count of the whole mini-batch across data-parallel ranks (DAPO's definition); no division
      by ``k``. Summed over every micro-batch of every rank this is the mini-batch's token mean.
      If the data-parallel gradient reduction *averages* over ranks (DDP, DeepSpeed), the caller
      multiplies the loss by the world size (verl does) to undo that average.

    With DeepSpeed, whose ``backward`` already divides by its accumulation steps, pass
    ``grad_accum=1`` for ``token``/``seq``: scale once, not twice.

    Raises:
        ValueError: unknown ``avg``, ``grad_accum < 1``, or ``num_tokens`` missing/negative
            for ``token_global``.
    """
    if avg not in AVG_MODES:
        raise ValueError(f"unknown avg {avg!r}; allowed: {', '.join(AVG_MODES)}")
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    m = mask.to(torch.bool)
    masked = torch.where(m, values, torch.zeros_like(values))
    if avg == "token":
        return masked.sum() / m.sum().clamp(min=1).to(values.dtype) / grad_accum
    if avg == "seq":
        per_seq = masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1).to(values.dtype)
        return per_seq.sum() / max(per_seq.numel(), 1) / grad_accum
    if num_tokens is None:
        raise ValueError("num_tokens is required for avg='token_global' (response tokens of the whole mini-batch)")
    if isinstance(num_tokens, Tensor):
        denom = num_tokens.to(device=values.device, dtype=values.dtype).clamp(min=1)
    else:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
        denom = max(float(num_tokens), 1.0)
    return masked.sum() / denom


def layout_denominators(
    response_lengths: Tensor,
    layout: Sequence[Sequence[int]],
    avg: str = "token",
    *,
    num_tokens: int | float | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row denominators ``(d_avg, d_tok)`` of a mini-batch's loss under the micro-batch ``layout``.

    ``layout`` is the fixed micro-batch layout that defines the objective (consecutive chunks of
    ``micro_batch_size`` rows: k micro-batches, micro-batch j with B_j rows and T_j response
    tokens; row i in micro-batch j(i) with T_i tokens). Then, for every row::

        token:         d_avg_i = k * T_j(i)             d_tok_i = k * T_j(i)
        seq:           d_avg_i = k * B_j(i) * T_i        d_tok_i = k * T_j(i)
        token_global:  d_avg_i = num_tokens             d_tok_i = num_tokens

    (each count at least 1) and ``sum_i sum_t m v / d_i`` over the mini-batch's rows equals the sum
    over its micro-batches of :func:`aggregate` with ``grad_accum = k`` (``tok``: the token mean).
    Summed over any regrouping of the rows it is the same number, which is what lets the learner
    pack rows by length (token-budget micro-batches) without changing the loss or its gradient.

    Returns two float64 tensors of shape (rows,).
    """
    if avg not in AVG_MODES:
        raise ValueError(f"unknown avg {avg!r}; allowed: {', '.join(AVG_MODES)}")
    lengths = response_lengths.detach().to(torch.float64).cpu()
    rows = sorted(i for micro in layout for i in micro)
    if rows != list(range(len(lengths))):
        raise ValueError(f"the layout must hold each of the {len(lengths)} rows exactly once")
    if avg == "token_global":
        if num_tokens is None:
            raise ValueError("num_tokens is required for avg='token_global' (response tokens of the whole mini-batch)")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens!r}")
        d = torch.full_like(lengths, max(float(num_tokens), 1.0))
        return d, d.clone()
    k = len(layout)
    d_tok = torch.empty_like(lengths)
    d_avg = torch.empty_like(lengths)
    for micro in layout:
        idx = torch.as_tensor(list(micro), dtype=torch.long)
        d_tok[idx] = k * lengths[idx].sum().clamp(min=1)
        d_avg[idx] = d_tok[idx] if avg == "token" else k * len(micro) * lengths[idx].clamp(min=1)
    return d_avg, d_tok


def _row_weighted_sum(values: Tensor, mask: Tensor, denominators: Tensor) -> Tensor:
    """``sum_i (sum_t m v)_i / d_i``: the loss of rows whose denominators come from their layout."""
    m = mask.to(torch.bool)
    per_row = torch.where(m, values, torch.zeros_like(values)).sum(dim=-1)
    return (per_row / denominators.to(device=values.device, dtype=values.dtype)).sum()


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_dual: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token PPO clipped policy loss with clip-higher and dual clip (verl semantics).

    ``advantages`` is (batch,) broadcast over tokens, or (batch, tokens)::

        r  = exp(clamp(logp - old_logp, -20, 20))
        l1 = -A * r
        l2 = -A * clamp(r, 1 - clip_low, 1 + clip_high)
        l3 = -A * clip_dual
        l  = max(l1, l2)               if A >= 0
             min(max(l1, l2), l3)      if A < 0      (dual clip bounds the loss of A < 0 tokens)

    Returns the per-token loss (unmasked, unreduced) and boolean per-token indicators of which
    clip binds (the token then has no gradient from this term):

    - ``high``: ``A > 0 and r > 1 + clip_high``
    - ``low``:  ``A < 0 and r < 1 - clip_low``
    - ``dual``: ``A < 0 and r > clip_dual``

    ``high | low`` is verl's ``pg_clipfrac`` event (EasyR1 calls it ``pg_clipfrac_higher``);
    ``dual`` is verl's/EasyR1's ``pg_clipfrac_lower``. Nothing is detached here.
    """
    if advantages.dim() == logp.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -advantages * clip_dual)
    negative = advantages < 0
    loss = torch.where(negative, loss_dual, loss_ppo)
    with torch.no_grad():
        positive = advantages > 0
        clips = {
            "high": positive & (ratio > 1.0 + clip_high),
            "low": negative & (ratio < 1.0 - clip_low),
            "dual": negative & (ratio > clip_dual),
        }
    return loss, clips


# --------------------------------------------------------------------------------------------
# Perception term helpers
# --------------------------------------------------------------------------------------------


def perception_token_mask(kl: Tensor, mask: Tensor, top_p: float) -> Tensor:
    """Top-p token mask of the perception KL (official ``use_kl_prcp_token_level_mask``).

    For each sequence, ``threshold = quantile_{1 - top_p}(kl over its response tokens)`` with
    linear interpolation (``torch.nanquantile``); keep response tokens with ``kl >= threshold``.
    About a ``top_p`` fraction of each sequence's tokens is kept (ties at the threshold are all
    kept; ``top_p = 1`` keeps every token); a sequence without response tokens keeps none. No
    gradient flows through the mask.

    Raises:
        ValueError: ``top_p`` not in (0, 1] (the range ``algo.perception_top_p`` accepts).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"perception_top_p must be in (0, 1], got {top_p!r}")
    m = mask.to(torch.bool)
    vals = kl.detach().to(_compute_dtype(kl))
    vals = torch.where(m, vals, torch.full_like(vals, float("nan")))
    threshold = torch.nanquantile(vals, 1.0 - top_p, dim=-1, keepdim=True)
    # NaN (padding, or an all-padding row's threshold) compares False: those tokens are dropped.
    return (vals >= threshold) & m


# --------------------------------------------------------------------------------------------
# The PAPO objective
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSettings:
    """The hyper-parameters of :func:`papo_loss`, validated once when built.

    - ``gamma``, ``beta``, ``eta1``, ``eta2``: the coefficients of the perception KL, the
      reference KL and the two entropy terms (see :func:`papo_loss`);
    - ``clip_low``, ``clip_high``, ``clip_dual``: the clips of :func:`clipped_policy_loss`,
      ``0 <= clip_low < 1``, ``clip_high >= 0``, ``clip_dual > 1``;
    - ``kl_kind``, ``perception_kl_kind``: the :func:`kl_penalty` estimators of the reference and
      the perception KL (one of :data:`KL_KINDS`);
    - ``avg``: the :func:`aggregate` mode (one of :data:`AVG_MODES`);
    - ``perception_top_p`` (in (0, 1]) and ``perception_kl_clip`` (> 0): the top-p token mask and
      the clamp of the perception KL, off when None;
    - ``perception_kl_masked_grad``: let the perception KL back-propagate into ``masked_logp``.

    Built once per learner from the config (:meth:`from_algo`); a step's scheduled coefficients
    are ``dataclasses.replace(settings, gamma=..., eta1=..., eta2=...)`` (validated again).

    Raises:
        ValueError: an unknown ``avg``/``kl_kind``/``perception_kl_kind`` or an out-of-range clip,
            ``perception_top_p`` or ``perception_kl_clip`` (the message names the field).
    """

    gamma: float = 0.0
    beta: float = 0.0
    eta1: float = 0.0
    eta2: float = 0.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_dual: float = 3.0
    kl_kind: str = "low_var_kl"
    avg: str = "token"
    perception_kl_kind: str = "low_var_kl"
    perception_top_p: float | None = None
    perception_kl_clip: float | None = None
    perception_kl_masked_grad: bool = False

    def __post_init__(self) -> None:
        if self.avg not in AVG_MODES:
            raise ValueError(f"unknown avg {self.avg!r}; allowed: {', '.join(AVG_MODES)}")
        for name, kind in (("kl_kind", self.kl_kind), ("perception_kl_kind", self.perception_kl_kind)):
            if kind not in KL_KINDS:
                raise ValueError(f"unknown {name} {kind!r}; allowed kinds: {', '.join(KL_KINDS)}")
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low!r}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high!r}")
        if self.clip_dual <= 1.0:
            raise ValueError(f"clip_dual must be > 1, got {self.clip_dual!r}")
        if self.perception_top_p is not None and not 0.0 < self.perception_top_p <= 1.0:
            raise ValueError(f"perception_top_p must be in (0, 1], got {self.perception_top_p!r}")
        if self.perception_kl_clip is not None and self.perception_kl_clip <= 0.0:
            raise ValueError(f"perception_kl_clip must be > 0, got {self.perception_kl_clip!r}")

    @classmethod
    def from_algo(cls, algo: AlgoConfig) -> LossSettings:
        """The settings of an ``algo`` config section (``algo.loss_avg`` is ``avg``; the gamma
        schedule is the caller's, see :func:`perception_coefs`)."""
        return cls(
            gamma=algo.gamma,
            beta=algo.beta,
            eta1=algo.eta1,
            eta2=algo.eta2,
            clip_low=algo.clip_low,
            clip_high=algo.clip_high,
            clip_dual=algo.clip_dual,
            kl_kind=algo.kl_kind,
            avg=algo.loss_avg,
            perception_kl_kind=algo.perception_kl_kind,
            perception_top_p=algo.perception_top_p,
            perception_kl_clip=algo.perception_kl_clip,
            perception_kl_masked_grad=algo.perception_kl_masked_grad,
        )


_SETTINGS_FIELDS = tuple(f.name for f in dataclasses.fields(LossSettings))


def _loss_settings(settings: LossSettings | None, fields: dict[str, Any]) -> LossSettings:
    """``settings``, or a :class:`LossSettings` built from ``papo_loss``'s keyword fields."""
    unknown = sorted(set(fields) - set(_SETTINGS_FIELDS))
    if unknown:
        raise TypeError(
            f"papo_loss() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"the loss settings are: {', '.join(_SETTINGS_FIELDS)}"
        )
    if settings is None:
        return LossSettings(**fields)
    if fields:
        raise TypeError(
            f"papo_loss() takes settings= or the loss-settings keywords, not both (got settings and "
            f"{', '.join(map(repr, sorted(fields)))}); pass dataclasses.replace(settings, ...) instead"
        )
    if not isinstance(settings, LossSettings):
        raise TypeError(f"papo_loss(settings=...) must be a LossSettings, got {type(settings).__name__}")
    return settings


def papo_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    masked_logp: Tensor | None = None,
    ref_logp: Tensor | None = None,
    settings: LossSettings | None = None,
    grad_accum: int = 1,
    num_tokens: int | float | Tensor | None = None,
    row_denominators: tuple[Tensor, Tensor] | None = None,
    **fields: Any,
) -> tuple[Tensor, dict[str, float]]:
    """The PAPO objective for one micro-batch, to minimise, and its metrics.

    ::

        L = avg(l_pg)                                  (clipped_policy_loss)
          + beta  * avg(KL_kl_kind(logp, ref_logp))    reference KL
          - gamma * avg(P)                             Implicit Perception Loss: KL maximised
          + eta1  * tok(-logp)                         Double Entropy Loss, original image
          + eta2  * tok(-masked_logp)                  Double Entropy Loss, masked image

    ``P = clamp(topp(KL_perception_kl_kind(logp, masked_logp)), 0, perception_kl_clip)``, where
    ``topp`` zeroes tokens outside :func:`perception_token_mask` and each of the two steps applies
    only when its option is set. ``avg`` is :func:`aggregate` with this call's ``avg``,
    ``grad_accum`` and ``num_tokens``; ``tok`` is the token mean (``token_global``: the global
    token mean ``sum / num_tokens``; otherwise the micro-batch token mean ``/ grad_accum``).
    GRPO = PAPO with gamma = eta1 = eta2 = 0; DAPO additionally has beta = 0 and no ``ref_logp``.

    The hyper-parameters are one :class:`LossSettings`: ``settings=LossSettings(...)`` (what the
    learner passes), or its fields as keywords (``gamma=0.02, beta=0.01, avg="seq", ...``, each
    defaulting as in :class:`LossSettings`), which build one; not both. ``grad_accum`` and
    ``num_tokens`` describe the micro-batch's place in its mini-batch, not the loss; so does
    ``row_denominators`` ``(d_avg, d_tok)``, each (batch,), from :func:`layout_denominators`,
    which replaces both: then ``avg(v) = sum_i (sum_t m v)_i / d_avg_i`` and ``tok`` likewise
    with ``d_tok`` (the rows may come from several micro-batches of the layout that defines the
    loss, which is how token-budget micro-batches keep the fixed layout's objective).

    Gradients (everything else is detached):

    - ``logp``: through the policy term, the reference KL, the perception KL and eta1.
    - ``masked_logp``: only through eta2, and only if it requires grad (the ``learner_grad``
      placement); it is detached inside the perception KL unless
      ``perception_kl_masked_grad=True`` (the official recompute path, see the module notes).
    - ``old_logp``, ``ref_logp``, ``advantages``: never.
    - padding positions (``mask == 0``) of every input: never, and their values (even nan/inf)
      never reach the loss, which is built from ``torch.where``-selected inputs.

    A term with a zero coefficient is left out of the graph. ``advantages`` is (batch,) or
    (batch, tokens). Half-precision inputs are computed in float32.

    Returns:
        ``(loss, metrics)``; ``loss`` is a 0-dim tensor. ``metrics`` holds python floats:

        - ``loss``, ``pg_loss``: this call's ``loss`` and policy term exactly as they enter the
          backward pass (so scaled by ``1/grad_accum`` or ``1/num_tokens``: summing them over
          the micro-batches of a mini-batch gives the mini-batch objective).
        - statistics over this micro-batch's response tokens (token means, unscaled):
          ``entropy`` (``mean(-logp)``, the sampled-token entropy estimate), ``ppo_kl``
          (``mean(old_logp - logp)``), ``pg_clipfrac_high`` / ``pg_clipfrac_low`` /
          ``pg_clipfrac_dual`` (fraction of response tokens where that clip binds, see
          :func:`clipped_policy_loss`), ``response_tokens`` (their count, for weighting).
        - only when ``ref_logp`` is given: ``ref_kl`` (mean reference KL, kind ``kl_kind``).
        - only when ``masked_logp`` is given: ``perception_kl`` (mean of ``P``, positive, the
          KL that enters the loss), ``perception_kl_raw`` (mean before the top-p mask and clip),
          ``masked_entropy`` (``mean(-masked_logp)``) and ``perception_mask_frac`` (fraction of
          response tokens kept by the top-p mask; 1.0 when it is off).

    Raises:
        ValueError: shape mismatches, invalid settings (see :class:`LossSettings`),
            ``grad_accum < 1``, ``num_tokens`` missing for ``token_global``, or a non-zero
            coefficient whose input is missing (beta without ``ref_logp``, gamma or eta2 without
            ``masked_logp``).
        TypeError: a keyword that is not a :class:`LossSettings` field, or ``settings`` together
            with keyword fields.
    """
    s = _loss_settings(settings, fields)
    # ---- validation (cheap: shapes and python scalars only, no device sync) ----
    if logp.dim() != 2:
        raise ValueError(f"logp must be (batch, tokens), got shape {tuple(logp.shape)}")
    _check_same_shape("old_logp", old_logp, logp)
    _check_same_shape("mask", mask, logp)
    if advantages.shape not in (logp.shape, logp.shape[:1]):
        raise ValueError(
            f"advantages has shape {tuple(advantages.shape)}, expected {tuple(logp.shape[:1])} or {tuple(logp.shape)}"
        )
    if masked_logp is not None:
        _check_same_shape("masked_logp", masked_logp, logp)
    if ref_logp is not None:
        _check_same_shape("ref_logp", ref_logp, logp)
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    if row_denominators is not None:
        if grad_accum != 1 or num_tokens is not None:
            raise ValueError("row_denominators replace grad_accum and num_tokens: pass grad_accum=1 and no num_tokens")
        for name, d in zip(("d_avg", "d_tok"), row_denominators):
            if d.shape != logp.shape[:1]:
                raise ValueError(
                    f"row_denominators {name} has shape {tuple(d.shape)}, expected {tuple(logp.shape[:1])}"
                )
    elif s.avg == "token_global" and num_tokens is None:
        raise ValueError("num_tokens is required for avg='token_global' (response tokens of the whole mini-batch)")
    if s.beta != 0.0 and ref_logp is None:
        raise ValueError("beta != 0 needs ref_logp (reference-model log-probs)")
    if s.gamma != 0.0 and masked_logp is None:
        raise ValueError("gamma != 0 needs masked_logp (log-probs under the masked image)")
    if s.eta2 != 0.0 and masked_logp is None:
        raise ValueError("eta2 != 0 needs masked_logp (log-probs under the masked image)")

    dtype = _compute_dtype(logp)
    m = mask.to(torch.bool)

    def clean(x: Tensor, detach: bool) -> Tensor:
        # Select padding away before any arithmetic: a where() whose other branch already holds
        # inf/nan would still send 0 * inf = nan into the backward pass.
        x = x.detach() if detach else x
        x = x.to(dtype)
        return torch.where(m, x, torch.zeros_like(x))

    def avg_(values: Tensor) -> Tensor:
        if row_denominators is not None:
            return _row_weighted_sum(values, m, row_denominators[0])
        return aggregate(values, m, s.avg, grad_accum=grad_accum, num_tokens=num_tokens)

    def tok_(values: Tensor) -> Tensor:
        if row_denominators is not None:
            return _row_weighted_sum(values, m, row_denominators[1])
        mode = "token_global" if s.avg == "token_global" else "token"
        return aggregate(values, m, mode, grad_accum=grad_accum, num_tokens=num_tokens)

    lp = clean(logp, detach=False)
    old = clean(old_logp, detach=True)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(lp)
    adv = torch.where(m, adv, torch.zeros_like(adv))

    pg_tokens, clips = clipped_policy_loss(
        lp, old, adv, clip_low=s.clip_low, clip_high=s.clip_high, clip_dual=s.clip_dual
    )
    pg_loss = avg_(pg_tokens)
    loss = pg_loss

    stats: dict[str, Tensor] = {}
    with torch.no_grad():
        stats["entropy"] = masked_mean(-lp, m)
        stats["ppo_kl"] = masked_mean(old - lp, m)
        for side in ("low", "high", "dual"):
            stats[f"pg_clipfrac_{side}"] = masked_mean(clips[side].to(dtype), m)
        stats["response_tokens"] = m.sum().to(dtype)

    if ref_logp is not None:
        ref_kl = kl_penalty(lp, clean(ref_logp, detach=True), s.kl_kind)
        if s.beta != 0.0:
            loss = loss + s.beta * avg_(ref_kl)
        with torch.no_grad():
            stats["ref_kl"] = masked_mean(ref_kl, m)

    if masked_logp is not None:
        mlp = clean(masked_logp, detach=False)
        kl_raw = kl_penalty(lp, mlp if s.perception_kl_masked_grad else mlp.detach(), s.perception_kl_kind)
        kl = kl_raw
        if s.perception_top_p is not None:
            keep = perception_token_mask(kl_raw, m, s.perception_top_p)
            kl = torch.where(keep, kl, torch.zeros_like(kl))
        if s.perception_kl_clip is not None:
            kl = kl.clamp(0.0, s.perception_kl_clip)
        if s.gamma != 0.0:
            loss = loss - s.gamma * avg_(kl)
        if s.eta2 != 0.0:
            loss = loss + s.eta2 * tok_(-mlp)
        with torch.no_grad():
            stats["perception_kl"] = masked_mean(kl, m)
            stats["perception_kl_raw"] = masked_mean(kl_raw, m)
            stats["masked_entropy"] = masked_mean(-mlp, m)
            if s.perception_top_p is not None:
                stats["perception_mask_frac"] = masked_mean(keep.to(dtype), m)
            else:
                stats["perception_mask_frac"] = torch.ones((), dtype=dtype, device=lp.device)

    if s.eta1 != 0.0:
        loss = loss + s.eta1 * tok_(-lp)

    with torch.no_grad():
        stats["loss"] = loss.detach()
        stats["pg_loss"] = pg_loss.detach()
        # One host sync for all metrics instead of one .item() per metric.
        values = torch.stack([v.to(dtype) for v in stats.values()]).tolist()
    metrics = dict(zip(stats.keys(), (float(v) for v in values)))
    return loss, metrics


# --------------------------------------------------------------------------------------------
# Perception coefficient schedule
# --------------------------------------------------------------------------------------------


def perception_coef(
    step: int,
    total_steps: int,
    *,
    start: float,
    end: float | None = None,
    schedule: str = "fixed",
    anneal_ratio: float = 1.0,
) -> float:
    """The perception coefficient gamma for training step ``step`` (0 for the first step).

    - ``fixed``:  ``gamma = start``
    - ``linear``: ``gamma = start + (end - start) * min(step / S, 1)`` with
      ``S = max(1, int(total_steps * anneal_ratio))``; constant ``end`` after ``S`` steps.
      ``end`` defaults to 0.0 (official default). The official ``annealing_ratio`` default is
      0.5; ours is 1.0 (anneal over the whole run) and the config sets it explicitly.

    The entropy coefficients scale with gamma: see :func:`perception_coefs`.

    Raises:
        ValueError: unknown ``schedule``, ``step < 0``, ``total_steps < 1`` or
            ``anneal_ratio <= 0`` (the last two for ``linear``).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if schedule == "fixed":
        return float(start)
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    if not anneal_ratio > 0.0:
        raise ValueError(f"anneal_ratio must be > 0, got {anneal_ratio!r}")
    end = 0.0 if end is None else float(end)
    anneal_steps = max(1, int(total_steps * anneal_ratio))
    progress = min(step / anneal_steps, 1.0)
    return float(start) + (end - float(start)) * progress


def perception_coefs(
    step: int,
    total_steps: int,
    *,
    gamma: float,
    eta1: float = 0.0,
    eta2: float = 0.0,
    schedule: str = "fixed",
    gamma_end: float | None = None,
    anneal_ratio: float = 1.0,
) -> tuple[float, float, float]:
    """``(gamma_t, eta1_t, eta2_t)`` for step ``step``: the entropy coefficients follow gamma.

    ``gamma_t = perception_coef(step, total_steps, start=gamma, end=gamma_end, ...)`` and
    ``eta_t = eta * gamma_t / gamma`` (the official ``discount_ratio``, applied to both entropy
    terms); with ``gamma == 0`` the etas are returned unchanged.
    """
    g = perception_coef(step, total_steps, start=gamma, end=gamma_end, schedule=schedule, anneal_ratio=anneal_ratio)
    scale = g / gamma if gamma != 0.0 else 1.0
    return g, eta1 * scale, eta2 * scale


# --------------------------------------------------------------------------------------------
# Logging helpers
# --------------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Exact entropy ``H = -sum_v p_v log p_v`` of ``softmax(logits)`` over the last dim.

    For logging (divide the logits by the sampling temperature first). Computed in float32 (or
    float64); ``-inf`` logits (banned tokens) contribute 0. Returns ``logits.shape[:-1]``.
    Memory is a few times that of ``logits``: chunk long sequences at the call site.
    """
    logits = logits.to(_compute_dtype(logits))
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(dim=-1)
