#!/usr/bin/env bash
# Build the separate venv and export the official Quiet-STaR model files, for scripts/bench_quiet_star_official.py.
#
#   bash scripts/quiet_star_official_venv.sh GIT_DIR [VENV_DIR] [EXPORT_DIR]
#
# GIT_DIR     a git directory of the official Quiet-STaR repository (ezelikman/quiet-star on GitHub; a bare clone
#             or the git dir of a mirror: the files are read with `git show HEAD:<path>`, no work tree is needed)
# VENV_DIR    default /work/qs_venv      (outside this repository: it never touches the project's .venv)
# EXPORT_DIR  default /work/qs_official  (their files go, unmodified, to EXPORT_DIR/quiet_star_model/)
#
# The venv gets torch 2.13.0 (CPU), transformers 4.37.2 (the version their code was written against) and the
# modules their modeling_mistral.py imports at top level (pandas, seaborn, matplotlib, wandb, termcolor, tqdm,
# reportlab). Packages are installed by name with pip only, from whatever index pip is configured to use.
set -euo pipefail

GIT_DIR=${1:?usage: $0 GIT_DIR [VENV_DIR] [EXPORT_DIR]}
VENV_DIR=${2:-/work/qs_venv}
EXPORT_DIR=${3:-/work/qs_official}
PY=${PYTHON:-python3}

OUT="$EXPORT_DIR/quiet_star_model"
mkdir -p "$OUT"
for f in modeling_mistral.py configuration_mistral.py; do
    git --git-dir="$GIT_DIR" show "HEAD:$f" > "$OUT/$f"
done
git --git-dir="$GIT_DIR" rev-parse HEAD > "$OUT/COMMIT"
echo "exported $(cat "$OUT/COMMIT") -> $OUT"

if [ ! -x "$VENV_DIR/bin/python" ]; then
    "$PY" -m venv "$VENV_DIR"
fi
"$VENV_DIR/bin/pip" install -q torch==2.13.0
"$VENV_DIR/bin/pip" install -q transformers==4.37.2 pandas seaborn matplotlib wandb termcolor tqdm reportlab
"$VENV_DIR/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
