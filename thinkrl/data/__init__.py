"""The data: text, task and synthetic sources turned into positions (where a thought goes and what it predicts) and
batched into windows.

Imports ``prompts``, ``models``, ``config`` and ``errors``; never ``rollout`` or anything above it.
"""
