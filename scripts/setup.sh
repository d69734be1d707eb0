#!/usr/bin/env bash
# One-time set-up, safe to repeat: the sandbox tool, a virtualenv with the project, and the corpus cache.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v bwrap >/dev/null 2>&1; then
  echo "setup: installing bubblewrap (the training sandbox)"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq bubblewrap >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq && sudo apt-get install -y -qq bubblewrap >/dev/null
  else
    echo "setup: bubblewrap is missing; install it with: apt-get install bubblewrap" >&2
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first and pinned: an open range would pull a multi-GB CUDA build on CPU-only machines.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q --disable-pip-version-check "torch==${TORCH_VERSION:-2.13.0}"
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev,plot]'
.venv/bin/pgolf-agent data >/dev/null
echo "setup: done (.venv/bin/pgolf-agent)"
