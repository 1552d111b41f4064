#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: tiny random models for most tests, the embedded
# SmolLM2 model at short lengths for the end-to-end ones (downloaded and converted once into ~/.cache/attnkit).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
