#!/usr/bin/env bash
# Create .venv with attnkit and everything it needs. CPU-only machines get the CPU build of torch
# (a plain `torch` requirement would pull a multi-GB CUDA build); set TORCH_SPEC to choose another.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".[all]"
