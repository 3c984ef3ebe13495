#!/usr/bin/env bash
# Rebuild the shipped demo models from their experiment configs, in order:
#
#   tokenizer: titok_demo_stage1 .. titok_demo_stage5   (conf/tokenizer/experiment/; each starts from the last)
#   generator: maskgit_demo                             (conf/generator/experiment/; on stage 5's tokens)
#
#   bash scripts/rebuild_demo_models.sh             # train all six into runs/ (about 3.5 hours on 2 CPU cores)
#   bash scripts/rebuild_demo_models.sh --install   # then ship them: tokenizer/assets, generator/assets
#
# Runs in the current directory (data/ and runs/ are made there; use the repository root). A run
# whose output file exists already is skipped, so an interrupted rebuild continues where it stopped
# (delete runs/tokenizer/titok_demo_stageN or runs/generator/maskgit_demo to redo one). What the
# shipped runs measured: docs/demo_models.md.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, however it is installed
STAGES=(1 2 3 4 5)

usage() {
    cat <<EOF
usage: bash scripts/rebuild_demo_models.sh [--install] [--dry-run] [-- OVERRIDE ...]

Trains the five stages of the demo tokenizer (experiment=titok_demo_stage1 .. titok_demo_stage5)
and the demo generator (experiment=maskgit_demo) one after the other, each from its config.

  --install   afterwards copy the results over the shipped files:
                runs/tokenizer/titok_demo_stage5/tokenizer.safetensors -> tokenizer/assets/titok_demo.safetensors
                runs/generator/maskgit_demo/generator.safetensors     -> generator/assets/maskgit_demo.safetensors
              (the generator's file then records its tokenizer as titok_demo, the shipped name)
  --dry-run   print the commands, run nothing
  -- ...      Hydra overrides added to every training command (e.g. -- trainer.accelerator=cpu)

Python: \$PYTHON, else $REPO/.venv/bin/python, else python3.
EOF
}

install=0
dry=0
extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --install) install=1 ;;
        --dry-run) dry=1 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "rebuild_demo_models.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

run() {
    echo "+ $*"
    if [[ $dry -eq 0 ]]; then "$@"; fi
}

# One training run, unless its output file is there already.
train() {
    local module="$1" name="$2" out="$3"
    if [[ -f "$out" ]]; then
        echo "# $name: $out exists, skipped (delete $(dirname "$out") to train it again)"
        return
    fi
    run "$PYTHON" -m "$module" "experiment=$name" ${extra[@]+"${extra[@]}"}
    if [[ $dry -eq 0 && ! -f "$out" ]]; then
        echo "rebuild_demo_models.sh: $name did not write $out" >&2
        exit 1
    fi
}

for n in "${STAGES[@]}"; do
    train tokenizer.train "titok_demo_stage$n" "runs/tokenizer/titok_demo_stage$n/tokenizer.safetensors"
done
TOKENIZER="runs/tokenizer/titok_demo_stage${STAGES[-1]}/tokenizer.safetensors"
GENERATOR="runs/generator/maskgit_demo/generator.safetensors"
train generator.train maskgit_demo "$GENERATOR"

if [[ $install -eq 0 ]]; then
    echo "# built $TOKENIZER and $GENERATOR (ship them with --install)"
    exit 0
fi

run cp "$TOKENIZER" "$REPO/tokenizer/assets/titok_demo.safetensors"
# The generator's file names the tokenizer it was trained on; once shipped, that tokenizer is titok_demo.
run "$PYTHON" - "$GENERATOR" "$REPO/generator/assets/maskgit_demo.safetensors" "$TOKENIZER" <<'EOF'
import sys

from titok_core.checkpoints import read_model_extra, read_model_file, save_model_file

src, dst, tokenizer = sys.argv[1:]
kind, config, state_dict = read_model_file(src)
extra = read_model_extra(src)
if extra["tokenizer"]["spec"] != tokenizer:
    sys.exit(f"{src} was trained on {extra['tokenizer']['spec']}, not on {tokenizer}: not shipped")
extra["tokenizer"] = {"spec": "titok_demo", "checkpoint": None}
save_model_file(dst, kind=kind, config=config, state_dict=state_dict, extra=extra)
print(f"{src} -> {dst} (tokenizer recorded as titok_demo)")
EOF
echo "# shipped: tokenizer/assets/titok_demo.safetensors, generator/assets/maskgit_demo.safetensors"
