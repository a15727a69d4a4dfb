"""Rule-based rewards for papo: reward functions, their registry, robust grading and a client.

- `rewards.score(name, response, ground_truth)` grades one response in this process and returns
  ``{"overall", "accuracy", "format"}`` (the public API of the contract).
- `rewards.functions`: the built-ins ``math``, ``choice`` and ``exact``.
- `rewards.registry`: registered names and the operator's ``path/to/file.py:fn`` functions.
- `rewards.pool.GradingPool`: grading in worker processes with per-item timeouts (what the
  reward server uses; math-verify's own timeout does not work outside a main thread).
- `rewards.client.RewardClient`: HTTP client for the reward server, with retries.

Importing this package is cheap: math-verify/sympy load on the first ``math`` grade.
"""

from rewards.registry import (
    UnknownRewardFunction,
    available,
    register,
    register_user_function,
    reward_name,
    score,
)

__all__ = [
    "UnknownRewardFunction",
    "available",
    "register",
    "register_user_function",
    "reward_name",
    "score",
]
