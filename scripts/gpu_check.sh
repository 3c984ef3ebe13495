#!/usr/bin/env bash
# The GPU check on your own CUDA machine (docs/gpu_check.md):
#
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check options, e.g. --only p6_gfid --p6-samples 20000]
#
# Runs `python -m titok_bench.gpu_check OUT_DIR` from the repository root (which needs
# `pip install -e . pytest` there first) with a budget of $GPU_CHECK_BUDGET_S seconds (default 480:
# at most about 8 minutes), and keeps OUT_DIR.tar beside OUT_DIR: every step's JSON, summary.json
# and gpu_check.log, rewritten after each step, so that a run cut short still leaves its finished
# steps in one file. $PYTHON picks the interpreter (default python3). The official side by side
# runs when the options name the official code and a script that times it (--official DIR
# --sbs-tool FILE; docs/gpu_check.md says what they are).
set -euo pipefail

OUT_DIR=${1:?usage: bash scripts/gpu_check.sh OUT_DIR [gpu_check options]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m titok_bench.gpu_check "$OUT_DIR" --budget-s "${GPU_CHECK_BUDGET_S:-480}" \
  --bundle "$OUT_DIR.tar" "$@"
