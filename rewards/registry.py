"""The reward-function registry: names -> functions, and the operator's user functions.

Owns which names exist (``math``, ``choice``, ``exact`` plus what the operator registers) and the
normalisation of whatever a function returns into ``{"overall", "accuracy", "format"}``.
User functions are named in the *operator's* configuration as ``path/to/file.py:fn`` and loaded
here; HTTP requests only pick a registered name (`get` raises `UnknownRewardFunction` for any
other), so no request can make the server load code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from rewards import functions as _builtin
from rewards.extract import format_score

__all__ = [
    "RewardFn",
    "UnknownRewardFunction",
    "register",
    "register_user_function",
    "register_user_functions",
    "load_user_function",
    "reward_name",
    "is_user_spec",
    "available",
    "describe",
    "get",
    "score",
]

RewardFn = Callable[..., Any]


class UnknownRewardFunction(KeyError):
    """A name that is not registered (HTTP 404 on the server)."""

    def __init__(self, name: str, known: list[str]):
        super().__init__(name)
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return f"unknown reward function {self.name!r}; registered: {', '.join(self.known)}"


_LOCK = threading.Lock()
_REGISTRY: dict[str, RewardFn] = {
    "math": _builtin.math_reward,
    "choice": _builtin.choice_reward,
    "exact": _builtin.exact_reward,
}
_DESCRIPTIONS: dict[str, str] = dict(_builtin.describe())
_BUILTINS = frozenset(_REGISTRY)


def register(name: str, fn: RewardFn, *, description: str = "", overwrite: bool = False) -> None:
    """Register ``fn(response, ground_truth[, format_weight]) -> float | dict`` under ``name``.

    Built-in names cannot be replaced; another existing name only with ``overwrite=True`` (or
    when it is the very same function, so registering twice is harmless).
    """
    if not name or not isinstance(name, str):
        raise ValueError("reward function name must be a non-empty string")
    if not callable(fn):
        raise TypeError(f"reward function {name!r} is not callable")
    with _LOCK:
        if name in _BUILTINS and _REGISTRY[name] is not fn:
            raise ValueError(f"{name!r} is a built-in reward function and cannot be replaced")
        if name in _REGISTRY and _REGISTRY[name] is not fn and not overwrite:
            raise ValueError(f"reward function {name!r} is already registered")
        _REGISTRY[name] = fn
        _DESCRIPTIONS[name] = description or (inspect.getdoc(fn) or "").split("\n")[0]


def is_user_spec(fn: str) -> bool:
    """Whether ``fn`` names a user function file (``path/to/file.py:fn``) rather than a name."""
    path, sep, attr = fn.rpartition(":")
    return bool(sep and path.endswith(".py") and attr.isidentifier())


def reward_name(fn: str) -> str:
    """The registered name a configured ``reward.fn`` is requested by.

    ``"math"`` -> ``"math"``; ``"path/to/file.py:my_fn"`` -> ``"my_fn"``.
    """
    return fn.rpartition(":")[2] if is_user_spec(fn) else fn


def load_user_function(spec: str) -> RewardFn:
    """Import ``fn`` from ``path/to/file.py:fn`` (path relative to the working directory or absolute)."""
    if not is_user_spec(spec):
        raise ValueError(f"user reward function must look like 'path/to/file.py:fn', got {spec!r}")
    path, _, attr = spec.rpartition(":")
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"user reward function file not found: {path}")
    # A unique module name per file, so two files both called reward.py do not collide.
    mod_name = "papo_user_reward_" + hashlib.sha1(path.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise AttributeError(f"{path} has no callable {attr!r}")
    return fn


def register_user_function(spec: str, name: str | None = None) -> str:
    """Load ``path/to/file.py:fn`` and register it (under ``name`` or the function's name).

    Returns the registered name. Registering the same spec again replaces the earlier load.
    """
    fn = load_user_function(spec)
    reg_name = name or reward_name(spec)
    register(reg_name, fn, description=f"user function {spec}", overwrite=True)
    return reg_name


def register_user_functions(user_functions: Mapping[str, str] | None = None, fn: str | None = None) -> list[str]:
    """Register the operator's functions: ``user_functions`` (name -> spec) and ``fn`` when it is
    a spec rather than a name. Returns the names registered. Used by every process that grades
    (server, grading workers), so they agree on the registry.
    """
    names = []
    for name, spec in (user_functions or {}).items():
        names.append(register_user_function(spec, name))
    if fn is not None and is_user_spec(fn):
        names.append(register_user_function(fn))
    return names


def _sorted_names() -> list[str]:
    return sorted(_REGISTRY, key=lambda n: (n not in _BUILTINS, n))


def available() -> list[str]:
    """Registered names, built-ins first."""
    with _LOCK:
        return _sorted_names()


def describe() -> dict[str, str]:
    """Name -> one-line description."""
    with _LOCK:
        return {n: _DESCRIPTIONS.get(n, "") for n in _sorted_names()}


def get(name: str) -> RewardFn:
    """The function registered as ``name``; `UnknownRewardFunction` otherwise."""
    with _LOCK:
        fn = _REGISTRY.get(name)
    if fn is None:
        raise UnknownRewardFunction(name, available())
    return fn


def _accepts_format_weight(fn: RewardFn) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "format_weight" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise TypeError(f"reward function returned a non-numeric {what}: {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"reward function returned a non-finite {what}: {out}")
    return out


def normalize_result(raw: Any, response: str, format_weight: float) -> dict[str, float]:
    """Turn what a (user) function returned into ``{"overall", "accuracy", "format"}``.

    - a number or bool is the accuracy; format is PAPO's format score of the response, and
      overall is combined with ``format_weight`` like the built-ins;
    - a dict must hold ``overall``; a missing ``accuracy`` defaults to ``overall`` and a missing
      ``format`` to the format score. Non-finite values raise ValueError (no NaN rewards).
    """
    if isinstance(raw, Mapping):
        if "overall" not in raw:
            raise ValueError("reward function returned a dict without 'overall'")
        overall = _finite(raw["overall"], "overall")
        accuracy = _finite(raw.get("accuracy", overall), "accuracy")
        fmt = _finite(raw["format"], "format") if "format" in raw else format_score(response)
        return {"overall": overall, "accuracy": accuracy, "format": fmt}
    accuracy = _finite(raw, "score")
    return _builtin.combine(accuracy, format_score(response), format_weight)


def score(
    name: str, response: str, ground_truth: str, *, format_weight: float = _builtin.DEFAULT_FORMAT_WEIGHT
) -> dict[str, float]:
    """Grade one response in this process: ``{"overall", "accuracy", "format"}``.

    No timeout: for untrusted model output use `rewards.pool.GradingPool` (or the reward server),
    which bounds each item's time in a worker process.
    """
    fn = get(name)
    if name in _BUILTINS or _accepts_format_weight(fn):
        raw = fn(response, ground_truth, format_weight=format_weight)
    else:
        raw = fn(response, ground_truth)
    return normalize_result(raw, response, format_weight)
