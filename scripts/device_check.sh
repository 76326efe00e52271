# GPU checks for a session lent a device machine (the `device` tool runs this in the repo root; results go to $OUT).
# Prepare once on the CPU machine (ignored folder .whl/, passed with carry: [".whl"]):
#   pip download omegaconf==2.4.0 --no-deps -d .whl          # the device has torch/transformers/accelerate, not omegaconf
#   mkdir -p .whl/smollm2-tok .whl/data && cp "$(python -c 'from thinkrl.models.smollm2 import smollm2_folder as f; print(f())')"/tokenizer* .whl/smollm2-tok/
#   cp -r ../shared/data/gsm8k .whl/data/                    # the device copy has no ../shared
# The SmolLM2 weights and vLLM's CUDA wheel are too big to travel: the memory benchmark uses a scratch model of
# SmolLM2-135M's shape (9 key/value heads instead of 3) with its tokenizer and GSM8K positions.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site || exit
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L; python3 -c "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)"
echo "=== gpu-marked tests (sharding, trainer bf16, scorer, coconut, parallel passes, flex attention)"
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs -m gpu tests/distributed/test_sharding.py tests/test_gpu.py tests/rl/test_parallel_passes.py tests/models/test_flex_passes.py 2>&1 | tee $OUT/pytest_gpu.log | tail -15
echo "=== bench_memory cuda, SmolLM2-135M shape (scratch weights, SmolLM2 tokenizer, GSM8K positions)"
timeout 130 python3 scripts/bench_memory.py --device cuda --json $OUT/memory.json model.default.path=scratch model.tokenizer=.whl/smollm2-tok model.default.scratch.hidden_size=576 model.default.scratch.num_layers=30 model.default.scratch.num_heads=9 model.default.scratch.intermediate_size=1536 data.data_dir=.whl/data 2>&1 | tee $OUT/memory.log | tail -14
echo "=== every-token step on cuda: the hand merge against flex_attention (rollout.attention_kernel), isolated step"
for kernel in merge flex; do
    timeout 120 python3 scripts/bench_every_token.py --device cuda --sizes large --windows 256,1024 --thought-lens 6 \
        --max-per-position-s 0 --no-trainer --attention-kernel $kernel --json $OUT/every_token_$kernel.json 2>&1 | tail -5
done
echo done
