"""The models: the role models built from config (reasoner, interpreter, base, mixing and true-token heads), the
parallel every-token attention and passes, shared-prefix forwards, chunked log-probs and the SmolLM2 package.

Imports ``config`` and ``errors`` only.
"""
