"""Make PyPI's CUDA-linked torchvision import beside a CPU-only torch.

PyPI's torchvision wheels are linked against CUDA torch. Next to torch's ``+cpu`` build
their C++ extension does not load, so the ``torchvision::nms``/``qnms`` operators are never
defined, and ``torchvision/_meta_registrations.py`` dies at import registering fake kernels
for them (``RuntimeError: operator torchvision::nms does not exist``). Every other meta
registration in that file is already guarded by ``torchvision.extension._has_ops()``; this
script applies the same guard to the two unguarded ones. The pure-Python transforms that
transformers' and vLLM's Qwen2-VL image processing use are unaffected.

Idempotent; refuses to touch a torchvision whose file does not look as expected, and
verifies the result by importing ``torchvision.transforms.v2`` in a fresh interpreter.
Usage: ``python scripts/patch_torchvision.py`` with the target environment's python.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

OPS = ("nms", "qnms")


def _original(op: str) -> str:
    return f'@torch.library.register_fake("torchvision::{op}")\n'


def _guarded(op: str) -> str:
    return (
        f'@(torch.library.register_fake("torchvision::{op}") '
        "if torchvision.extension._has_ops() else (lambda fn: fn))  # papo: CPU-torch guard\n"
    )


def patch(path: Path) -> bool:
    """Guard the two registrations in ``path``; return True if the file changed."""
    text = path.read_text()
    changed = False
    for op in OPS:
        if _guarded(op) in text:
            continue
        if text.count(_original(op)) != 1:
            raise SystemExit(
                f"{path}: expected one unguarded registration of torchvision::{op}; "
                "this torchvision version is not the one the pins expect"
            )
        text = text.replace(_original(op), _guarded(op))
        changed = True
    if changed:
        path.write_text(text)
    return changed


def main() -> None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise SystemExit("torchvision is not installed in this environment")
    target = Path(spec.origin).parent / "_meta_registrations.py"
    changed = patch(target)
    check = subprocess.run(
        [sys.executable, "-c", "import torchvision.transforms.v2, torchvision; print(torchvision.__version__)"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(f"torchvision still fails to import after patching {target}:\n{check.stderr[-2000:]}")
    print(f"torchvision {check.stdout.strip()}: {'patched' if changed else 'already patched'} ({target})")


if __name__ == "__main__":
    main()
