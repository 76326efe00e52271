"""Coconut (continuous latent thoughts, Hao et al. 2024) as a baseline inside thinkrl.

    thinkrl coconut train --config configs/coconut/synthetic_cpu.yaml curriculum.mode=coconut  # cot|no_cot|pause
    thinkrl coconut eval  --config configs/coconut/synthetic_cpu.yaml eval.split=test

Modules: ``config`` (dataclasses), ``curriculum`` (pure stage schedule), ``data`` (readers, published text format,
stage examples, aligning collator), ``synthetic`` (the CPU task), ``models`` (tokenizer/model with the three
latent tokens), ``latent_forward`` (KV-cached multi-pass forward, batched greedy generation), ``evaluation``,
``trainer`` (accelerate loop, full-state checkpoints), ``cli``. Benchmark: ``scripts/bench_coconut.py``.
"""
