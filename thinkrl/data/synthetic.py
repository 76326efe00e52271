"""Key recall: the project's own task on which thinking demonstrably helps, generated offline.

A document reads ``key : c a ; 3 1 4 1 5 9 ; recall :`` and the true continuation is the key ``c a``.
With ``data.interpreter_window`` smaller than the noise, the interpreter (and the base) never see the key:
the null thought leaves them guessing (log num_symbols nats per key symbol), and only a reasoner that
copies the key into its thought lets them predict y. So reward can rise from 0 to about
``key_len * log(num_symbols)``, and a learner whose estimator is broken stays near 0.
"""

from __future__ import annotations

import numpy as np

from thinkrl.config import SyntheticTaskConfig
from thinkrl.models.synthetic_vocab import symbols


def synthetic_documents(cfg: SyntheticTaskConfig, n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (context, target) texts; the same seed gives the same documents."""
    keys, noise = symbols(cfg)
    rng = np.random.default_rng(seed)
    contexts, targets = [], []
    for _ in range(n):
        key = [keys[i] for i in rng.integers(0, len(keys), cfg.key_len)]
        filler = [noise[i] for i in rng.integers(0, len(noise), cfg.noise_len)]
        contexts.append(" ".join(["key", ":", *key, ";", *filler, ";", "recall", ":"]))
        targets.append(" ".join(key))
    return contexts, targets
