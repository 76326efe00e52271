"""Tokenizer and model for Coconut, built with the RL trainer's loaders (``thinkrl.models.roles``).

Three tokens are added: ``<|start-latent|>``, ``<|end-latent|>``, ``<|latent|>``; their input (and output)
embeddings start as the mean embedding of ``model.latent_init_token`` (Coconut used ``<<``). Pass the tokenizer
explicitly (``model.tokenizer``) for qwen2-type folders: AutoTokenizer swaps in a digit-splitting one (DESIGN §8).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from thinkrl.coconut.config import CoconutConfig
from thinkrl.coconut.data import SpecialIds
from thinkrl.config import ModelSpec
from thinkrl.errors import ModelLoadError
from thinkrl.models.roles import DTYPES, from_pretrained_or_error, scratch_model

logger = logging.getLogger(__name__)

START, END, LATENT = "<|start-latent|>", "<|end-latent|>", "<|latent|>"


def build_tokenizer(cfg: CoconutConfig):
    name = cfg.model.tokenizer
    if name == "synthetic":
        from thinkrl.coconut.synthetic import chain_tokenizer

        tok = chain_tokenizer()
    elif name == "byte":
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()  # no files needed: bytes suit tiny scratch models on GSM8K text
    else:
        if name == "auto":
            name = cfg.model.path
        tok = from_pretrained_or_error(AutoTokenizer, name, "tokenizer")
    tok.add_tokens([START, END, LATENT], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def special_ids(tokenizer) -> SpecialIds:
    start, end, latent = tokenizer.convert_tokens_to_ids([START, END, LATENT])
    return SpecialIds(start, end, latent, tokenizer.eos_token_id, tokenizer.pad_token_id)


def _init_new_tokens(model: PreTrainedModel, tokenizer, init_text: str) -> None:
    init_ids = [i for i in tokenizer.encode(init_text, add_special_tokens=False) if i != tokenizer.unk_token_id]
    init_ids = init_ids or [tokenizer.eos_token_id]
    new_ids = tokenizer.convert_tokens_to_ids([START, END, LATENT])
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[new_ids] = emb.weight[init_ids].mean(0, keepdim=True).to(emb.weight.dtype)


def tie_output_to_input(model: PreTrainedModel) -> None:
    """Make the output layer use the input embedding matrix (the shared scratch builder unties it for vLLM).

    Coconut feeds the last hidden state back as an input embedding. Tied (GPT-2, the published model), a state that
    predicts a token reads back much like that token's embedding; untied, it lives in a space the input side has
    never seen. With the published marker layout the synthetic task's stage 2 stayed at chance untied and was
    learned tied; the shipped synthetic recipe also learns untied (see configs/coconut/synthetic_cpu.yaml)."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True


def build_model(cfg: CoconutConfig, tokenizer) -> PreTrainedModel:
    mc = cfg.model
    dtype = DTYPES[mc.dtype]
    if mc.path == "scratch":
        model = scratch_model(ModelSpec(path="scratch", scratch=mc.scratch), tokenizer, dtype, mc.attn_implementation)
        if mc.tie_embeddings:
            tie_output_to_input(model)
    else:
        model = from_pretrained_or_error(
            AutoModelForCausalLM, mc.path, "model", dtype=dtype, attn_implementation=mc.attn_implementation
        )
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    _init_new_tokens(model, tokenizer, mc.latent_init_token)
    if mc.init_from:
        load_weights(model, Path(mc.init_from))
    return model


def load_weights(model: PreTrainedModel, checkpoint: Path) -> None:
    """Model weights from a thinkrl coconut checkpoint folder (its accelerate ``model.safetensors``)."""
    from safetensors.torch import load_file

    path = checkpoint / "model.safetensors"
    if not path.is_file():
        raise ModelLoadError(f"model.init_from={checkpoint} has no model.safetensors; give a checkpoint-<step> folder")
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:  # a tied lm_head is not stored separately
        raise ModelLoadError(
            f"model.init_from={checkpoint} does not fit this model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); use the same model and tokenizer settings"
        )
    logger.info("initialised weights from %s", checkpoint)
