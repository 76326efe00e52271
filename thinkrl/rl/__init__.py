"""The learning maths: teacher-forced scores of thoughts (per position and per window), rewards and advantages, the
loss, the EMA reference and the no-thought LM baseline step.

Imports ``rollout``, ``data``, ``prompts``, ``models`` and ``config``; never ``run`` or anything above it.
"""
