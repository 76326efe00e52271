"""The key-recall task's vocabulary and its word-level tokenizer, built in memory.

It lives with the models because ``roles.build_tokenizer`` needs it; ``data.synthetic`` writes its documents from
the same symbols, so the two cannot disagree.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from thinkrl.config import SyntheticTaskConfig
from thinkrl.errors import ConfigError

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
MARKERS = ["key", ":", ";", "recall"]


def symbols(cfg: SyntheticTaskConfig) -> tuple[list[str], list[str]]:
    """The key symbols (a-z) and noise symbols (0-9) the task draws from."""
    if cfg.num_symbols > 26 or cfg.noise_symbols > 10:
        raise ConfigError("data.synthetic allows at most 26 key symbols (a-z) and 10 noise symbols (0-9)")
    return list(string.ascii_lowercase[: cfg.num_symbols]), list(string.digits[: cfg.noise_symbols])


def synthetic_tokenizer(cfg: SyntheticTaskConfig) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words: one token per symbol, built in memory."""
    keys, noise = symbols(cfg)
    vocab = {w: i for i, w in enumerate(SPECIALS + MARKERS + keys + noise)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
