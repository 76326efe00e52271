"""The run loop: ``Trainer`` (rollout → score → update → sync → log/eval/save), the LM warm-up, compute accounting,
the run folder's recipe, checkpoints and resume, the files a run writes, and held-out evaluation during training.

Imports ``rl`` and everything below it; never ``cli``, ``eval``, ``coconut`` or ``study``.
"""
