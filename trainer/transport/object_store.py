"""The object-store transport: weights as one safetensors blob in Ray's object store, and
images fetched from it by reference.

A handle of transport ``object_store`` holds an ObjectRef of the blob and its sha256; receivers
fetch, verify and copy. It works across machines at the cost of a host round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainer.core.weights import WeightsHandle


def fetch_blob(handle: WeightsHandle, timeout_s: float | None = None) -> bytes:
    """The serialised weights of an ``object_store`` handle.

    ``handle.ref`` is an ObjectRef when the publisher runs under Ray (the product path) and the
    blob itself when it does not (a plain-process learner); both are accepted.
    """
    if handle.transport != "object_store":
        raise NotImplementedError(f"transport {handle.transport!r} has no blob (only object_store handles do)")
    ref = handle.ref
    if ref is None:
        raise ValueError(f"object_store handle of version {handle.version} has no ref")
    if isinstance(ref, (bytes, bytearray, memoryview)):
        return bytes(ref)
    import ray

    return ray.get(ref, timeout=timeout_s)


def resolve_image_refs(refs_per_row: Sequence[Sequence[Any]], timeout_s: float) -> list[list[Any]]:
    """Per-row image lists from per-row ObjectRefs, fetched once; equal rows share one list object.

    Entries that are not ObjectRefs (already PIL images) pass through unchanged.
    """
    import ray

    unique = {}
    for row in refs_per_row:
        for r in row:
            if isinstance(r, ray.ObjectRef):
                unique.setdefault(r, None)
    keys = list(unique)
    if keys:
        for k, v in zip(keys, ray.get(keys, timeout=timeout_s)):
            unique[k] = v
    shared: dict[tuple, list[Any]] = {}
    out = []
    for row in refs_per_row:
        key = tuple(r if isinstance(r, ray.ObjectRef) else id(r) for r in row)
        if key not in shared:
            shared[key] = [unique[r] if isinstance(r, ray.ObjectRef) else r for r in row]
        out.append(shared[key])
    return out
