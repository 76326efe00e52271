"""The scratch model Coconut trains reads a continuous thought in the space its output layer decodes from."""

import torch

from thinkrl.coconut.config import load_coconut_config
from thinkrl.coconut.models import build_model, build_tokenizer

SMALL = ["model.scratch.hidden_size=32", "model.scratch.num_heads=2", "model.scratch.intermediate_size=64"]


def test_scratch_output_layer_is_the_input_embedding():
    # As GPT-2, the published model: a fed-back state that predicts a token then reads back like that token.
    cfg = load_coconut_config(None, SMALL)
    model = build_model(cfg, build_tokenizer(cfg))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    hidden = torch.randn(1, 1, 32)
    assert torch.equal(model.lm_head(hidden), hidden @ model.get_input_embeddings().weight.T)


def test_untied_on_request():
    cfg = load_coconut_config(None, [*SMALL, "model.tie_embeddings=false"])
    model = build_model(cfg, build_tokenizer(cfg))
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight
