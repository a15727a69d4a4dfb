"""``RolloutBatch``: the one batch type that the rollout pool, the services, the learner and the
driver exchange through the Ray object store (docs/design.md, "The batch").

One row per sampled response. The rollout pool fills the generation fields; later stages fill
``rewards``/``accuracy`` (reward server), ``masked_image_refs`` (corruption service),
``masked_logp`` (perception pool), ``ref_logp`` (reference pool), ``old_logp`` (learner) and
``advantages`` (driver). Images never travel as pixels: a row holds ``ObjectRef``s of its prompt's
images, put into the object store once per prompt and shared by the prompt's n responses.

Token layout, per row: ``prompt_ids`` is left-padded to the batch's longest prompt and holds the
prompt exactly as the engine saw it (image pads expanded); ``response_ids`` is right-padded. The
model input is ``cat(prompt_ids, response_ids)`` with ``cat(prompt_mask, response_mask)`` as
attention mask, so every response token sits at the same column in every row and per-token
tensors (log-probs, masks) are ``(rows, response_len)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# Per-row tensor fields: name -> (trailing shape kind, dtype). "R" = response tokens, "P" = prompt tokens.
_ROW = "row"
_TENSOR_FIELDS: dict[str, tuple[str, torch.dtype]] = {
    "prompt_ids": ("P", torch.long),
    "prompt_mask": ("P", torch.bool),
    "response_ids": ("R", torch.long),
    "response_mask": ("R", torch.bool),
    "rollout_logp": ("R", torch.float32),
    "group_ids": (_ROW, torch.long),
    "row_ids": (_ROW, torch.long),
    "epochs": (_ROW, torch.long),
    "weight_version": (_ROW, torch.long),
    "rewards": (_ROW, torch.float32),
    "accuracy": (_ROW, torch.float32),
    "advantages": (_ROW, torch.float32),
    "old_logp": ("R", torch.float32),
    "ref_logp": ("R", torch.float32),
    "masked_logp": ("R", torch.float32),
}
_LIST_FIELDS = ("image_refs", "masked_image_refs", "answers", "response_text", "finish_reasons")


@dataclass
class RolloutBatch:
    """Sampled responses with everything a PAPO step computes about them (one row per response)."""

    prompt_ids: torch.Tensor  # (N, P) long, left-padded with pad_token_id
    prompt_mask: torch.Tensor  # (N, P) bool, True on real prompt tokens
    response_ids: torch.Tensor  # (N, R) long, right-padded with pad_token_id
    response_mask: torch.Tensor  # (N, R) bool, True on real response tokens
    rollout_logp: torch.Tensor  # (N, R) float32, the engine's log-probs of the sampled tokens (0 at padding)
    group_ids: torch.Tensor  # (N,) long, prompt index within the step; a group's rows are contiguous
    row_ids: torch.Tensor  # (N,) long, dataset row id of the prompt
    epochs: torch.Tensor  # (N,) long, data epoch the prompt was drawn in (with row_ids: the mask seed)
    weight_version: torch.Tensor  # (N,) long, policy version that generated the row
    image_refs: list[list[Any]]  # per row: ObjectRefs of the prompt's images, in placeholder order
    answers: list[str]  # per row: the prompt's ground truth
    response_text: list[str] = field(default_factory=list)  # per row: decoded response
    finish_reasons: list[str] = field(default_factory=list)  # per row: "stop" / "length" / ...
    pad_token_id: int = 0
    # Filled by later stages of the step.
    masked_image_refs: list[list[Any]] | None = None
    rewards: torch.Tensor | None = None  # (N,) overall reward
    accuracy: torch.Tensor | None = None  # (N,) accuracy part of the reward
    old_logp: torch.Tensor | None = None  # (N, R) learner, pre-update weights, original image
    ref_logp: torch.Tensor | None = None  # (N, R) reference model, original image
    masked_logp: torch.Tensor | None = None  # (N, R) rollout weights, masked image
    advantages: torch.Tensor | None = None  # (N,) one value per response

    def __post_init__(self) -> None:
        self.validate()

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_sequences(
        cls,
        prompt_ids: Sequence[Sequence[int]],
        response_ids: Sequence[Sequence[int]],
        rollout_logp: Sequence[Sequence[float]],
        *,
        group_ids: Sequence[int],
        row_ids: Sequence[int],
        weight_version: Sequence[int] | int,
        image_refs: Sequence[Sequence[Any]],
        answers: Sequence[str],
        epochs: Sequence[int] | int = 0,
        response_text: Sequence[str] = (),
        finish_reasons: Sequence[str] = (),
        pad_token_id: int = 0,
    ) -> RolloutBatch:
        """Pad ragged per-response token lists (as an engine returns them) into a batch."""
        n = len(prompt_ids)
        if not (len(response_ids) == len(rollout_logp) == n):
            raise ValueError(
                f"prompt_ids, response_ids and rollout_logp must have one entry per response; got "
                f"{n}, {len(response_ids)}, {len(rollout_logp)}"
            )
        for i, (r, lp) in enumerate(zip(response_ids, rollout_logp)):
            if len(r) != len(lp):
                raise ValueError(f"row {i}: {len(r)} response tokens but {len(lp)} rollout log-probs")
        p_ids, p_mask = _pad([list(p) for p in prompt_ids], pad_token_id, left=True)
        r_ids, r_mask = _pad([list(r) for r in response_ids], pad_token_id, left=False)
        r_logp, _ = _pad([list(x) for x in rollout_logp], 0.0, left=False, dtype=torch.float32)

        def per_row(v: Sequence[int] | int) -> torch.Tensor:
            return (
                torch.full((n,), v, dtype=torch.long)
                if isinstance(v, int)
                else torch.as_tensor(list(v), dtype=torch.long)
            )

        return cls(
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            response_ids=r_ids,
            response_mask=r_mask,
            rollout_logp=r_logp,
            group_ids=per_row(group_ids),
            row_ids=per_row(row_ids),
            epochs=per_row(epochs),
            weight_version=per_row(weight_version),
            image_refs=[list(x) for x in image_refs],
            answers=list(answers),
            response_text=list(response_text),
            finish_reasons=list(finish_reasons),
            pad_token_id=pad_token_id,
        )

    # ---- invariants --------------------------------------------------------------------------

    def validate(self) -> None:
        """Check shapes, dtypes and per-row list lengths; raise ValueError naming the field."""
        n = self.prompt_ids.shape[0]
        dims = {"P": self.prompt_ids.shape[-1], "R": self.response_ids.shape[-1]}
        for name, (kind, dtype) in _TENSOR_FIELDS.items():
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"RolloutBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            want = (n,) if kind == _ROW else (n, dims[kind])
            if tuple(t.shape) != want:
                raise ValueError(f"RolloutBatch.{name} has shape {tuple(t.shape)}, expected {want}")
            if t.dtype != dtype and not (dtype.is_floating_point and t.dtype.is_floating_point):
                raise ValueError(f"RolloutBatch.{name} has dtype {t.dtype}, expected {dtype}")
        for name in _LIST_FIELDS:
            v = getattr(self, name)
            if v is None or (name in ("response_text", "finish_reasons") and len(v) == 0):
                continue
            if len(v) != n:
                raise ValueError(f"RolloutBatch.{name} has {len(v)} entries for {n} rows")

    def require(self, *names: str) -> None:
        """Fail loudly when a stage runs before the stage that fills its inputs."""
        missing = [f for f in names if getattr(self, f) is None]
        if missing:
            raise ValueError(f"RolloutBatch is missing {', '.join(missing)} (filled by an earlier stage of the step)")

    # ---- views -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def input_ids(self) -> torch.Tensor:
        """(N, P + R) model input: left-padded prompt then right-padded response."""
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(N, P + R) long attention mask matching :attr:`input_ids`."""
        return torch.cat([self.prompt_mask, self.response_mask], dim=1).long()

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(dim=1)

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    @property
    def weight_versions(self) -> set[int]:
        return set(self.weight_version.tolist())

    def _runs(self) -> list[list[int]]:
        """Row indices of each run of equal consecutive group ids."""
        ids = self.group_ids.tolist()
        out: list[list[int]] = []
        for i, g in enumerate(ids):
            if not out or ids[out[-1][0]] != g:
                out.append([])
            out[-1].append(i)
        return out

    def groups(self) -> list[torch.Tensor]:
        """Row indices of each group, in order of appearance (a group's rows must be contiguous)."""
        runs = self._runs()
        ids = self.group_ids.tolist()
        if len({ids[r[0]] for r in runs}) != len(runs):
            raise ValueError(
                "RolloutBatch rows of one group must be contiguous and group ids unique "
                "(renumber_groups() after concatenating batches)"
            )
        return [torch.tensor(r, dtype=torch.long) for r in runs]

    # ---- reshaping ---------------------------------------------------------------------------

    def select(self, index: torch.Tensor | Sequence[int]) -> RolloutBatch:
        """Rows ``index`` (in that order), e.g. the groups DAPO's dynamic sampling keeps.

        Padding columns that no selected row uses are trimmed.
        """
        idx = torch.as_tensor(index)
        if idx.dtype == torch.bool:
            raise ValueError("select() takes row indices, not a boolean mask (use mask.nonzero().flatten())")
        idx = idx.long()
        li = idx.tolist()
        kw: dict[str, Any] = {}
        for name in _TENSOR_FIELDS:
            t = getattr(self, name)
            kw[name] = None if t is None else t[idx]
        for name in _LIST_FIELDS:
            v = getattr(self, name)
            kw[name] = None if v is None else ([v[i] for i in li] if len(v) else [])
        out = dataclasses.replace(self, **kw)
        return out._trimmed()

    def split(self, size: int) -> list[RolloutBatch]:
        """Consecutive chunks of ``size`` rows (mini-/micro-batches); the last may be smaller."""
        if size < 1:
            raise ValueError(f"split size must be >= 1, got {size}")
        return [self.select(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def shard(self, rank: int, world_size: int) -> RolloutBatch:
        """The ``rank``-th of ``world_size`` equal contiguous shards (data parallelism)."""
        if len(self) % world_size:
            raise ValueError(f"{len(self)} rows do not split evenly over {world_size} ranks")
        per = len(self) // world_size
        return self.select(range(rank * per, (rank + 1) * per))

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Stack batches row-wise, re-padding prompts (left) and responses (right) to the longest.

        Group ids are kept as given: callers concatenating batches from different steps or
        chunks must renumber groups so they stay unique (:meth:`renumber_groups`).
        """
        if not batches:
            raise ValueError("concat of no batches")
        pad = {b.pad_token_id for b in batches}
        if len(pad) != 1:
            raise ValueError(f"cannot concat batches with different pad_token_id {sorted(pad)}")
        P = max(b.prompt_ids.shape[1] for b in batches)
        R = max(b.response_ids.shape[1] for b in batches)
        kw: dict[str, Any] = {}
        for name, (kind, _) in _TENSOR_FIELDS.items():
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                kw[name] = None
                continue
            if any(v is None for v in vals):
                raise ValueError(f"cannot concat: {name} is set in some batches but not in others")
            if kind == _ROW:
                kw[name] = torch.cat(vals)
            else:
                width, left = (P, True) if kind == "P" else (R, False)
                fill = batches[0].pad_token_id if name.endswith("_ids") else 0
                kw[name] = torch.cat([_pad_to(v, width, fill, left) for v in vals])
        for name in _LIST_FIELDS:
            vals = [getattr(b, name) for b in batches]
            if all(v is None for v in vals):
                kw[name] = None
            elif any(v is None for v in vals):
                raise ValueError(f"cannot concat: {name} is set in some batches but not in others")
            else:
                kw[name] = [x for v in vals for x in v] if all(len(v) == len(b) for v, b in zip(vals, batches)) else []
        return cls(pad_token_id=batches[0].pad_token_id, **kw)

    def renumber_groups(self, start: int = 0) -> RolloutBatch:
        """Group ids start, start+1, ... for each run of consecutive equal ids, in order."""
        ids = torch.empty_like(self.group_ids)
        for g, rows in enumerate(self._runs()):
            ids[torch.tensor(rows)] = start + g
        return dataclasses.replace(self, group_ids=ids)

    def _trimmed(self) -> RolloutBatch:
        if len(self) == 0:
            return self
        p_keep = self.prompt_mask.any(dim=0)
        r_keep = self.response_mask.any(dim=0)
        p_first = int(p_keep.nonzero()[0]) if p_keep.any() else self.prompt_ids.shape[1]
        r_last = int(r_keep.nonzero()[-1]) + 1 if r_keep.any() else 0
        if p_first == 0 and r_last == self.response_ids.shape[1]:
            return self
        kw = {}
        for name, (kind, _) in _TENSOR_FIELDS.items():
            t = getattr(self, name)
            if t is not None and kind == "P":
                kw[name] = t[:, p_first:]
            elif t is not None and kind == "R":
                kw[name] = t[:, :r_last]
        return dataclasses.replace(self, **kw)


def _pad(
    rows: list[list], fill: float | int, *, left: bool, dtype: torch.dtype = torch.long
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), fill, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        if not r:
            continue
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, sl] = torch.as_tensor(r, dtype=dtype)
        mask[i, sl] = True
    return out, mask


def _pad_to(t: torch.Tensor, width: int, fill: float | int, left: bool) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra), fill, dtype=t.dtype)
    if t.dtype == torch.bool:
        pad = torch.zeros((t.shape[0], extra), dtype=torch.bool)
    return torch.cat([pad, t] if left else [t, pad], dim=1)
