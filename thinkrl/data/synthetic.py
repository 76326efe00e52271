"""Key recall: the project's own task on which thinking demonstrably helps, generated offline.

A document reads ``key : c a ; 3 1 4 1 5 9 ; recall :`` and the true continuation is the key ``c a``.
With ``data.interpreter_window`` smaller than the noise, the interpreter (and the base) never see the key:
the null thought leaves them guessing (log num_symbols nats per key symbol), and only a reasoner that
copies the key into its thought lets them predict y. So reward can rise from 0 to about
``key_len * log(num_symbols)``, and a learner whose estimator is broken stays near 0.
"""

from __future__ import annotations

import string

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from thinkrl.config import SyntheticTaskConfig
from thinkrl.errors import ConfigError

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MARKERS = ["key", ":", ";", "recall"]


def _symbols(cfg: SyntheticTaskConfig) -> tuple[list[str], list[str]]:
    if cfg.num_symbols > 26 or cfg.noise_symbols > 10:
        raise ConfigError("data.synthetic allows at most 26 key symbols (a-z) and 10 noise symbols (0-9)")
    return list(string.ascii_lowercase[: cfg.num_symbols]), list(string.digits[: cfg.noise_symbols])


def synthetic_tokenizer(cfg: SyntheticTaskConfig) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words: one token per symbol, built in memory."""
    keys, noise = _symbols(cfg)
    vocab = {w: i for i, w in enumerate(SPECIALS + MARKERS + keys + noise)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def synthetic_documents(cfg: SyntheticTaskConfig, n: int, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (context, target) texts; the same seed gives the same documents."""
    keys, noise = _symbols(cfg)
    rng = np.random.default_rng(seed)
    contexts, targets = [], []
    for _ in range(n):
        key = [keys[i] for i in rng.integers(0, len(keys), cfg.key_len)]
        filler = [noise[i] for i in rng.integers(0, len(noise), cfg.noise_len)]
        contexts.append(" ".join(["key", ":", *key, ";", *filler, ";", "recall", ":"]))
        targets.append(" ".join(key))
    return contexts, targets
