#!/usr/bin/env bash
# The GPU check on a machine with a CUDA GPU: `python -m titok_bench.gpu_check` (docs/gpu_check.md).
#
#   bash scripts/gpu_check.sh OUT_DIR [gpu_check options, e.g. --only p6_gfid,sbs_official]
#
# Through the device tool (one call; OUT_DIR is the tool's $OUT, which brings back at most 8 files):
#   run(command="bash scripts/gpu_check.sh $OUT", carry=[".whl", ".gpu_carry"], timeout_s=560)
# OUT_DIR receives gpu_check.tar (every step's JSON, summary.json and the log; rewritten after each
# step, so a run cut short still leaves its finished steps), and at the end summary.json and
# gpu_check.log beside it. The steps write into $GPU_CHECK_RESULTS (default a new /tmp/gpu_check.*).
# The budget, $GPU_CHECK_BUDGET_S (default 420 s), leaves time in a 15-minute lease for the
# machine's start and a rerun of what was skipped (--only ...).
#
# Before the call, here, in the repo root (the GPU image lacks four packages; .whl/ is in .gitignore):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl "hydra-core==1.3.*" "omegaconf==2.3.*" "torch-fidelity==0.4.*"
#   python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # PyPI has only its sdist
# Optional, for the official side by side (../shared does not travel; the gpu tests' fixtures are in
# tests/fixtures). The tracked files are about 54 MB of the 64 MiB that travel: keep .gpu_carry small.
#   mkdir -p .git/info && echo /.gpu_carry/ >> .git/info/exclude     # never committed
#   mkdir -p .gpu_carry/1d-tokenizer && cp ../shared/tools/official_side_by_side.py .gpu_carry/
#   git -C /path/to/1d-tokenizer archive 942a96fb modeling configs utils | tar x -C .gpu_carry/1d-tokenizer
# On the device the official code is copied outside the tree (/tmp/official) before it is used.
set -uo pipefail

OUT_DIR=${1:?usage: scripts/gpu_check.sh OUT_DIR [gpu_check options]}
shift
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-420}
RESULTS=${GPU_CHECK_RESULTS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}  # fresh: a rerun on a warm machine mixes nothing in
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}

# The travelling wheels: only these four families, so that a stray torch wheel cannot shadow the image's.
wheels=()
for pattern in hydra_core omegaconf antlr4_python3_runtime torch_fidelity; do
  for w in .whl/"$pattern"-*.whl; do
    [ -f "$w" ] && wheels+=("$w")
  done
done
if [ ${#wheels[@]} -gt 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || echo "gpu_check.sh: installing the wheels failed; the env step lists what is missing" >&2
fi
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

# The official side by side, where carried: the tool, and the official code outside the tree.
official=()
if [ -f .gpu_carry/official_side_by_side.py ]; then
  official+=(--sbs-tool "$REPO/.gpu_carry/official_side_by_side.py")
fi
if [ -d .gpu_carry/1d-tokenizer ]; then
  rm -rf /tmp/official && cp -r .gpu_carry/1d-tokenizer /tmp/official && official+=(--official /tmp/official)
fi

"$PY" -m titok_bench.gpu_check "$RESULTS" --budget-s "$BUDGET" --bundle "$OUT_DIR/gpu_check.tar" \
  ${official[@]+"${official[@]}"} "$@"
rc=$?
for f in summary.json gpu_check.log; do
  [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT_DIR/"
done
exit $rc
