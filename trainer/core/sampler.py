"""The prompt sampler: seeded epoch-wise shuffling that checkpoints as a few integers."""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)


class PromptSampler:
    """Seeded epoch-wise shuffling: the (epoch, position) pair fully determines the next prompts."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n == 0:
            raise ValueError("the training split has no usable rows")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "shuffle": int(self.shuffle), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where a saved sampler stopped (same dataset size and seed required)."""
        if (state["n"], state["seed"], bool(state["shuffle"])) != (self.n, self.seed, self.shuffle):
            raise ValueError(
                f"the checkpoint's sampler ran over {state['n']} rows with seed {state['seed']} "
                f"(shuffle={bool(state['shuffle'])}); this run has {self.n} rows, seed {self.seed} "
                f"(shuffle={self.shuffle}): resuming would not continue the same data order"
            )
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation(self.epoch)

    def take(self, k: int) -> list[tuple[int, int]]:
        """``k`` (index, epoch) pairs."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            out.append((int(self._order[self.pos]), self.epoch))
            self.pos += 1
        return out
