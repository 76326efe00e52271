"""Tokenizer, models and roles.

Roles (base, reasoner, interpreter) map to weight groups: one model per distinct group letter, so
``[A, A, A]`` is one shared model (Quiet-STaR) and ``[A, B, C]`` three. The mixing head always has weights of
its own. Thought markers ``<|startofthought|>``/``<|endofthought|>`` are added to the tokenizer and their
embeddings start as the embedding of ``model.thought_init_token`` ("---" in Quiet-STaR).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from thinkrl.config import ROLES, Config, ModelSpec
from thinkrl.errors import ModelLoadError
from thinkrl.models.checkpointing import enable_checkpointing
from thinkrl.models.mixing_head import MixingHead
from thinkrl.models.parallel_passes import set_attention_kernel
from thinkrl.models.true_tokens import TrueTokenHead

logger = logging.getLogger(__name__)

SOT, EOT = "<|startofthought|>", "<|endofthought|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(path: str) -> str:
    """Alias → converted local folder; local folders as given; anything else is treated as a hub id."""
    from thinkrl.models.smollm2 import SMOLLM2_ALIAS, smollm2_folder

    if path == SMOLLM2_ALIAS:
        return str(smollm2_folder())
    return path


def from_pretrained_or_error(loader, path: str, what: str, **kwargs):
    resolved = resolve_model_path(path)
    try:
        return loader.from_pretrained(resolved, **kwargs)
    except (OSError, ValueError) as exc:
        local = Path(resolved).expanduser()
        if local.exists() or "/" not in path or path.startswith((".", "/", "~")):
            reason = "does not exist" if not local.exists() else f"cannot be loaded ({type(exc).__name__})"
            raise ModelLoadError(
                f"{what} {path!r} {reason}; give an existing HF folder, a hub id, 'scratch' or 'smollm2-135m-instruct'"
            ) from None
        raise ModelLoadError(
            f"{what} {path!r} is not a local folder and the hub could not be reached; download it first "
            f"or use a local path"
        ) from None


def build_tokenizer(cfg: Config):
    """The one tokenizer every role shares, with the thought markers added."""
    name = cfg.model.tokenizer
    if name == "synthetic":
        from thinkrl.models.synthetic_vocab import synthetic_tokenizer

        tok = synthetic_tokenizer(cfg.data.synthetic)
    elif name == "byte":
        from transformers import ByT5Tokenizer

        tok = ByT5Tokenizer()  # needs no files; bytes suit tiny from-scratch models on natural text
        tok.bos_token = tok.bos_token or tok.eos_token
    else:
        if name == "auto":
            name = next(cfg.model.spec(g).path for g in cfg.model.weight_groups if cfg.model.spec(g).path != "scratch")
        tok = from_pretrained_or_error(AutoTokenizer, name, "tokenizer")
    tok.add_tokens([SOT, EOT], special_tokens=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def scratch_model(spec: ModelSpec, tokenizer, dtype: torch.dtype, attn: str) -> PreTrainedModel:
    s = spec.scratch
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s.hidden_size,
        num_hidden_layers=s.num_layers,
        num_attention_heads=s.num_heads,
        num_key_value_heads=s.num_heads,
        intermediate_size=s.intermediate_size,
        max_position_embeddings=s.max_position_embeddings,
        tie_word_embeddings=False,  # vLLM weight sync needs an output layer of its own
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).to(dtype)


def _init_thought_embeddings(model: PreTrainedModel, tokenizer, init_text: str) -> None:
    """New marker rows copy the mean embedding of ``init_text``'s tokens (input and output side)."""
    init_ids = tokenizer.encode(init_text, add_special_tokens=False) or [tokenizer.eos_token_id]
    marker_ids = tokenizer.convert_tokens_to_ids([SOT, EOT])
    with torch.no_grad():
        for emb in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            emb.weight[marker_ids] = emb.weight[init_ids].mean(0, keepdim=True).to(emb.weight.dtype)


def _untie(model: PreTrainedModel) -> None:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight.data_ptr() == inp.weight.data_ptr():
        out.weight = nn.Parameter(inp.weight.detach().clone())
    model.config.tie_word_embeddings = False


def build_model(spec: ModelSpec, tokenizer, cfg: Config, meta: bool = False) -> PreTrainedModel:
    """``meta``: a pretrained model comes without weights (the meta device), to be sharded and then filled from
    its files (``models/meta_loading``, which also makes the thought-marker rows); scratch models are built whole."""
    dtype = DTYPES[cfg.model.dtype]
    if spec.path == "scratch":
        model = scratch_model(spec, tokenizer, dtype, cfg.model.attn_implementation)
    elif meta:
        from thinkrl.models.meta_loading import meta_model

        model = meta_model(spec.path, tokenizer, dtype, cfg.model.attn_implementation)
    else:
        model = from_pretrained_or_error(
            AutoModelForCausalLM, spec.path, "model", dtype=dtype, attn_implementation=cfg.model.attn_implementation
        )
        _untie(model)
        if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        _untie(model)
    if not is_meta(model):
        _init_thought_embeddings(model, tokenizer, cfg.model.thought_init_token)
    if spec.lora.r > 0:
        from peft import LoraConfig, get_peft_model

        sot, eot = tokenizer.convert_tokens_to_ids([SOT, EOT])
        lora = LoraConfig(
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(spec.lora.target_modules),
            task_type="CAUSAL_LM",
            trainable_token_indices=[sot, eot],  # the markers are new: their embeddings must learn too
        )
        model = get_peft_model(model, lora)
    if spec.gradient_checkpointing:  # thinkrl's own, cache-aware (see models/checkpointing.py for why not HF's)
        enable_checkpointing(model)
    return model


@dataclass
class RoleModels:
    """Models by weight group, the role → group map, the mixing head and the shared tokenizer."""

    models: dict[str, PreTrainedModel]
    role_group: dict[str, str]
    head: MixingHead
    tokenizer: object
    sot_id: int
    eot_id: int

    def model(self, role: str) -> PreTrainedModel:
        return self.models[self.role_group[role]]

    @property
    def marker_ids(self) -> list[int]:
        """The thought markers: never a prediction of a true token (``models/true_tokens``)."""
        return [self.sot_id, self.eot_id]

    def true_token_head(self, role: str) -> TrueTokenHead:
        """The role's LM head for predicting true tokens: the thought markers masked out (``models/true_tokens``)."""
        return TrueTokenHead(self.model(role).get_output_embeddings(), self.marker_ids)

    def shared(self, role_a: str, role_b: str) -> bool:
        return self.role_group[role_a] == self.role_group[role_b]

    def modules(self) -> dict[str, nn.Module]:
        """Every distinct trainable container, by name (group letters and 'head')."""
        return {**self.models, "head": self.head}


def hidden_size(model: PreTrainedModel) -> int:
    return model.config.get_text_config().hidden_size


def is_meta(model: nn.Module) -> bool:
    """Built without weights (``build_model(meta=True)``): to be filled after sharding."""
    return any(p.is_meta for p in model.parameters())


def build_roles(cfg: Config, tokenizer=None, meta: bool = False) -> RoleModels:
    """Build every weight group's model, the mixing head, and apply freezing (``meta``: see build_model)."""
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    groups = dict.fromkeys(cfg.model.weight_groups)  # ordered, unique
    models = {g: build_model(cfg.model.spec(g), tokenizer, cfg, meta) for g in groups}
    for model in models.values():  # before any copy (the EMA reference keeps it)
        set_attention_kernel(model, cfg.rollout.attention_kernel)
    role_group = dict(zip(ROLES, cfg.model.weight_groups))
    # A checkpoint's embedding may hold more rows than its tokenizer has tokens (Qwen pads 151,669 tokens to 151,936
    # rows); those spare rows stay, unused by any text, as in the original model.
    rows = {m.get_input_embeddings().weight.shape[0] for m in models.values()}
    if len(rows) > 1 or min(rows) < len(tokenizer):
        raise ModelLoadError(
            "the role models have different vocabularies; every weight group must share one tokenizer"
        )
    base, interp = models[role_group["base"]], models[role_group["interpreter"]]
    if cfg.head.form in ("mlp", "concat", "gate") and hidden_size(base) != hidden_size(interp):
        raise ModelLoadError(
            "head.form mixes hidden states: base and interpreter need the same hidden size (or head.form=none)"
        )
    head = MixingHead(cfg.head.form, hidden_size(interp), cfg.head.init_weight, cfg.head.hidden_size)
    head.to(next(base.parameters()).dtype)
    sot, eot = tokenizer.convert_tokens_to_ids([SOT, EOT])
    roles = RoleModels(models, role_group, head, tokenizer, sot, eot)
    _apply_freezing(roles, cfg)
    return roles


def _apply_freezing(roles: RoleModels, cfg: Config) -> None:
    frozen_groups = {roles.role_group[r] for r in cfg.model.freeze if r in roles.role_group}
    for group, model in roles.models.items():
        if group in frozen_groups:
            model.requires_grad_(False)
    if "head" in cfg.model.freeze:
        roles.head.requires_grad_(False)
    # mlp/concat heads project with the base's LM head: a separate interpreter's own LM head gets no gradient.
    if cfg.head.form in ("mlp", "concat") and not roles.shared("base", "interpreter"):
        interp = roles.model("interpreter")
        if not roles.shared("interpreter", "reasoner"):
            interp.get_output_embeddings().requires_grad_(False)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)
