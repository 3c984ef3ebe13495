#!/usr/bin/env bash
# Idempotent setup: a virtual environment in .venv with torch and this project (editable, with dev extras),
# and Debian's chromium for the page test when it is missing and we may install it (root with apt-get).
# TORCH_SPEC overrides the torch build, e.g. TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  # shellcheck disable=SC2086
  .venv/bin/pip install -q $TORCH_SPEC
fi
if ! .venv/bin/python -c "import tokenizer, generator, sampling, eval, pytest, xdist, lightning, hydra, torch_fidelity, gradio, playwright, sklearn" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  # tests/test_serve.py drives it through playwright (which never downloads a browser of its own here)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "setup.sh: could not install chromium with apt-get; the browser test will skip" >&2
  fi
fi
