"""Typed configuration: one dataclass per concern, YAML recipes, dotted ``key=value`` overrides.

Parsing, merging and type checking are OmegaConf's (structured configs): an unknown key or a wrong type is
rejected there. Cross-field rules live in ``__post_init__`` so that every way of building a config (YAML,
overrides, Python) goes through the same checks. All failures surface as one-line ``ConfigError``s.

Seed-note names → thinkrl names (for readers of the original research code):
  trice_samples → rollout.num_thoughts          max_reasoning_len → rollout.max_thought_len
  variable_len → rollout.length_mode            punish_unfinished → reward.unfinished_penalty
  length_penalty → reward.length_penalty        entropy_encouragement_coef → learner.entropy_coef
  policy_loss_beta → learner.policy_weight      nll_loss_beta → learner.interpreter_weight
  mix_interpeter_base_lm (1, 2) → head.form (gate, mlp/concat)
  weight_groups → model.weight_groups (base, reasoner, interpreter; the mixing head always has its own weights)
  share_lm_head/linear_lm_head → head.form (mlp/concat project with the base's LM head)
  use_reasoner=False / max_reasoning_len=0 → rollout.num_thoughts=0 (controls: only the null thought is scored)
  n_ahead (Quiet-STaR thought length) → rollout.max_thought_len with length_mode=fixed
  n_ahead_talk → data.n_ahead (true tokens scored after a thought)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING kept for recipe authors)
from omegaconf.errors import OmegaConfBaseException

from thinkrl.errors import ConfigError

ROLES = ("base", "reasoner", "interpreter")
FREEZABLE = ROLES + ("head",)


def _help(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Models and roles
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ScratchModelConfig:
    """A Llama-architecture model built from a config with random weights (small-scale research)."""

    hidden_size: int = _help("width of the residual stream", 64)
    num_layers: int = _help("number of transformer blocks", 2)
    num_heads: int = _help("attention heads", 4)
    intermediate_size: int = _help("MLP width", 256)
    max_position_embeddings: int = _help("longest sequence the model accepts", 512)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            _positive(f"scratch.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"scratch.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")


@dataclass
class LoraSettings:
    """LoRA adapter on a pretrained backbone (peft). r=0 trains the full model."""

    r: int = _help("LoRA rank; 0 disables LoRA", 0)
    alpha: int = _help("LoRA scaling numerator", 16)
    dropout: float = _help("LoRA dropout", 0.0)
    target_modules: List[str] = _help("module names that get adapters", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class ModelSpec:
    """Where one weight group's model comes from."""

    path: str = _help(
        "'scratch' (random Llama from `scratch`), 'smollm2-135m-instruct' (offline package), a local HF folder, or a hub id",
        "scratch",
    )
    scratch: ScratchModelConfig = _help("sizes when path=scratch", factory=ScratchModelConfig)
    lora: LoraSettings = _help("LoRA adapter settings", factory=LoraSettings)


@dataclass
class ModelConfig:
    """Roles (base, reasoner, interpreter), their parameter sharing and where their weights come from."""

    default: ModelSpec = _help("model of every weight group not listed in `groups`", factory=ModelSpec)
    groups: Dict[str, ModelSpec] = _help("per weight-group model overrides, e.g. {B: {path: ...}}", factory=dict)
    weight_groups: List[str] = _help(
        "group letter of base, reasoner, interpreter: [A, A, A] = one shared model (Quiet-STaR), [A, B, C] = separate",
        factory=lambda: ["A", "A", "A"],
    )
    freeze: List[str] = _help("roles whose weights stay fixed: base, reasoner, interpreter, head", factory=list)
    tokenizer: str = _help(
        "'auto' (the first pretrained model's; synthetic/byte for scratch ones), 'synthetic' (the synthetic task's words), 'byte' (ByT5 bytes), or a path/hub id",
        "auto",
    )
    thought_init_token: str = _help("text whose embedding initialises the thought tokens (Quiet-STaR: '---')", "---")
    dtype: str = _help("float32 | bfloat16 | float16 (bf16 is slower than fp32 on CPU)", "float32")
    attn_implementation: str = _help("sdpa | eager", "sdpa")

    def __post_init__(self):
        if len(self.weight_groups) != len(ROLES):
            raise ConfigError(
                f"model.weight_groups needs {len(ROLES)} letters (base, reasoner, interpreter), got {list(self.weight_groups)}"
            )
        for role in self.freeze:
            _choice("model.freeze entry", role, FREEZABLE)
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        unknown = set(self.groups) - set(self.weight_groups)
        if unknown:
            raise ConfigError(f"model.groups has {sorted(unknown)} but model.weight_groups only uses {sorted(set(self.weight_groups))}")
        # A shared model cannot be frozen for one role and trained for another.
        for group in set(self.weight_groups):
            roles = [r for r, g in zip(ROLES, self.weight_groups) if g == group]
            frozen = [r for r in roles if r in self.freeze]
            if frozen and len(frozen) != len(roles):
                raise ConfigError(
                    f"roles {roles} share weight group {group} but only {frozen} is frozen; "
                    "give the frozen role its own group in model.weight_groups or freeze them all"
                )

    def spec(self, group: str) -> ModelSpec:
        return self.groups.get(group, self.default)

    def group_of(self, role: str) -> str:
        return self.weight_groups[ROLES.index(role)]


@dataclass
class HeadConfig:
    """Mixing head: blends the base's (no-thought) and the interpreter's (after-thought) predictions per token."""

    form: str = _help(
        "none (interpreter alone) | mlp (Quiet-STaR: zero-init MLP weight mixing hidden states) | "
        "gate (sigmoid gate mixing probabilities) | concat (zero-init MLP residual on both hidden states)",
        "mlp",
    )
    init_weight: float = _help("gate form: initial interpreter weight in (0, 1) (the seed used 0.6)", 0.6)
    hidden_size: int = _help("MLP width of the mlp/concat heads; 0 = model width", 0)

    def __post_init__(self):
        _choice("head.form", self.form, ("none", "mlp", "gate", "concat"))
        if not 0.0 < self.init_weight < 1.0:
            raise ConfigError(f"head.init_weight must be in (0, 1), got {self.init_weight}")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SyntheticTaskConfig:
    """Key recall: a key is written at the start, noise follows, then the key must be recalled.

    The interpreter sees only the last `data.interpreter_window` tokens, so it can predict the key only if the
    reasoner (which sees everything) writes it into the thought."""

    key_len: int = _help("symbols in the key (= tokens to predict)", 2)
    num_symbols: int = _help("alphabet of key symbols", 8)
    noise_len: int = _help("noise tokens between the key and the recall", 6)
    noise_symbols: int = _help("alphabet of noise tokens", 8)

    def __post_init__(self):
        for name in ("key_len", "num_symbols", "noise_len", "noise_symbols"):
            _positive(f"data.synthetic.{name}", getattr(self, name))


@dataclass
class DataConfig:
    """Where text comes from and where thoughts are placed."""

    source: str = _help("synthetic | text | gsm8k | csqa", "synthetic")
    data_dir: str = _help("folder with gsm8k/, csqa/, ... ('auto' = ../shared/data when it exists)", "auto")
    train_file: str = _help("file for source=text (path, or relative to data_dir); task sources pick their own", "")
    eval_file: str = _help("held-out file; '' = the task's held-out split, or the tail of train_file for text", "")
    hub_id: str = _help("datasets hub id used when the local file is absent (users with internet)", "")
    positions: str = _help("task (task-defined, e.g. before an answer) | every_k | random", "task")
    every_k: int = _help("every_k: distance between thought positions", 16)
    positions_per_doc: int = _help("random: thought positions drawn per document window", 4)
    context_len: int = _help("most context tokens kept before a thought position (left-truncated)", 128)
    n_ahead: int = _help("true tokens y scored after each thought (Quiet-STaR's n_ahead_talk)", 4)
    interpreter_window: int = _help(
        "context tokens the interpreter and base see before the thought; 0 = all (the reasoner always sees all)", 0
    )
    prompt_template: str = _help("prompts/ name that formats task items (gsm8k, csqa)", "")
    max_docs: int = _help("read at most this many documents/items per split; 0 = all", 0)
    eval_positions: int = _help("held-out thought positions used by every evaluation", 64)
    synthetic: SyntheticTaskConfig = _help("synthetic task settings", factory=SyntheticTaskConfig)

    def __post_init__(self):
        _choice("data.source", self.source, ("synthetic", "text", "gsm8k", "csqa"))
        _choice("data.positions", self.positions, ("task", "every_k", "random"))
        for name in ("every_k", "positions_per_doc", "context_len", "n_ahead", "eval_positions"):
            _positive(f"data.{name}", getattr(self, name))
        if self.interpreter_window == 1 or self.context_len < 2:
            raise ConfigError("data.interpreter_window must be 0 (all) or >= 2 and data.context_len >= 2 "
                              "(one token is the shared prefix, one starts the thought)")
        _positive("data.interpreter_window", self.interpreter_window, allow_zero=True)
        _positive("data.max_docs", self.max_docs, allow_zero=True)
        if self.source == "text" and self.positions == "task":
            raise ConfigError("data.source=text has no task positions; set data.positions=every_k or random")
        if self.source == "text" and not self.train_file:
            raise ConfigError("data.source=text needs data.train_file (e.g. tinyshakespeare/input.txt)")

    def resolved_data_dir(self) -> Path | None:
        """The data folder: as given, or ../shared/data next to the working directory or the checkout."""
        if self.data_dir != "auto":
            return Path(self.data_dir).expanduser()
        here = Path(__file__).resolve().parents[1]
        for base in (Path.cwd(), here):
            candidate = base.parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
        return None


# ----------------------------------------------------------------------------------------------------------------
# Rollout, reward, learner
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class RolloutConfig:
    """How thoughts are sampled."""

    backend: str = _help("hf (transformers, KV-cached, samples with the learner's own weights) | vllm (colocated engine)", "hf")
    num_thoughts: int = _help("K thoughts sampled per position (TRICE samples); 0 = control run, null thought only", 8)
    max_thought_len: int = _help("most thought tokens between the start/end markers", 8)
    length_mode: str = _help("variable (stop at the end-of-thought token) | fixed (always max_thought_len)", "variable")
    temperature: float = _help("sampling temperature; the learner scores with the same one", 1.0)
    top_p: float = _help("nucleus sampling mass", 1.0)
    null_thought: str = _help("'' = empty thought <sot><eot>, or a prompts/ name holding a phrase", "")
    batch_positions: int = _help("positions sampled together in one batch (memory knob)", 32)
    sync_every: int = _help("vllm: push the learner's weights into the engine every N updates (staleness <= N-1)", 1)
    vllm_kv_cache_gb: int = _help("vllm on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", 1)
    vllm_gpu_memory_utilization: float = _help("vllm on GPU: share of GPU memory the engine may take", 0.3)

    def __post_init__(self):
        _choice("rollout.backend", self.backend, ("hf", "vllm"))
        _choice("rollout.length_mode", self.length_mode, ("variable", "fixed"))
        _positive("rollout.num_thoughts", self.num_thoughts, allow_zero=True)
        _positive("rollout.max_thought_len", self.max_thought_len)
        _positive("rollout.temperature", self.temperature)
        _positive("rollout.batch_positions", self.batch_positions)
        _positive("rollout.sync_every", self.sync_every)
        _positive("rollout.vllm_kv_cache_gb", self.vllm_kv_cache_gb)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RewardConfig:
    """r(z) = log q(y|x,z) - log q(y|x,z0), then shaping used by the advantages."""

    source: str = _help("mixed (through the mixing head) | interpreter (the interpreter alone)", "mixed")
    discount: float = _help("weight gamma^j of the j-th predicted token in the summed reward (1 = plain sum)", 1.0)
    clip: float = _help("clip rewards to [-clip, clip] before advantages; 0 = off", 0.0)
    length_penalty: float = _help("subtracted per thought token", 0.0)
    unfinished_penalty: float = _help("subtracted when a thought hits max_thought_len without its end token", 0.0)

    def __post_init__(self):
        _choice("reward.source", self.source, ("mixed", "interpreter"))
        if not 0.0 < self.discount <= 1.0:
            raise ConfigError(f"reward.discount must be in (0, 1], got {self.discount}")
        for name in ("clip", "length_penalty", "unfinished_penalty"):
            _positive(f"reward.{name}", getattr(self, name), allow_zero=True)


@dataclass
class LearnerConfig:
    """TRICE-style policy gradient for the reasoner, NLL for the interpreter, optimisation."""

    baseline: str = _help("leave_one_out (TRICE) | mean (Quiet-STaR: group mean incl. self) | none", "leave_one_out")
    include_null: bool = _help("the null thought (reward 0) joins the baseline group", False)
    positive_only: bool = _help("keep only positive advantages (Quiet-STaR's 1[r>0])", False)
    normalize: str = _help("none | std (divide a position's advantages by their std)", "none")
    policy_weight: float = _help("weight of the policy-gradient loss", 1.0)
    entropy_coef: float = _help("entropy bonus on thought tokens (keeps thoughts from collapsing)", 0.01)
    interpreter_weight: float = _help("weight of NLL(y | x, thought) through the mixing head", 1.0)
    interpreter_null: bool = _help(
        "the interpreter also learns from the null thought, keeping the baseline of r(z) a calibrated no-thought guess", True
    )
    interpreter_only_helpful: bool = _help("interpreter learns only from thoughts that beat the null thought", False)
    base_weight: float = _help("weight of NLL(y | x) with no thought (keeps plain language modelling)", 0.0)
    ratio_clip: float = _help("PPO-style clip of the importance ratio learner/sampler", 0.2)
    updates_per_rollout: int = _help("optimizer steps on one batch of rollouts (>1 makes the sampler stale)", 1)
    lr: float = _help("learning rate of every role not in role_lr", 1e-3)
    role_lr: Dict[str, float] = _help("per-role learning rates {reasoner: .., interpreter: .., base: .., head: ..}", factory=dict)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    adam_betas: List[float] = _help("AdamW betas", factory=lambda: [0.9, 0.999])
    max_grad_norm: float = _help("clip the global gradient norm; 0 = off", 1.0)
    grad_accum_steps: int = _help("rollout micro-batches per optimizer step", 1)
    scheduler: str = _help("transformers scheduler name: constant | constant_with_warmup | linear | cosine", "constant")
    warmup_steps: int = _help("scheduler warm-up steps", 0)

    def __post_init__(self):
        _choice("learner.baseline", self.baseline, ("leave_one_out", "mean", "none"))
        _choice("learner.normalize", self.normalize, ("none", "std"))
        _choice("learner.scheduler", self.scheduler, ("constant", "constant_with_warmup", "linear", "cosine"))
        for role in self.role_lr:
            _choice("learner.role_lr key", role, FREEZABLE)
        _positive("learner.lr", self.lr)
        for name in ("policy_weight", "entropy_coef", "interpreter_weight", "base_weight", "max_grad_norm", "ratio_clip"):
            _positive(f"learner.{name}", getattr(self, name), allow_zero=True)
        _positive("learner.grad_accum_steps", self.grad_accum_steps)
        _positive("learner.updates_per_rollout", self.updates_per_rollout)
        if self.updates_per_rollout > 1 and self.grad_accum_steps > 1:
            raise ConfigError("use learner.updates_per_rollout>1 or learner.grad_accum_steps>1, not both")


# ----------------------------------------------------------------------------------------------------------------
# Trainer and logging
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """Loop length, evaluation, checkpoints, logging."""

    output_dir: str = _help("run folder: config, metrics.jsonl, rollouts/, checkpoint-*/, summary.json", "runs/default")
    max_steps: int = _help("optimizer steps", 100)
    batch_positions: int = _help("thought positions per micro-batch", 8)
    seed: int = _help("seed of data order, sampling and initialisation", 0)
    lm_warmup_steps: int = _help("plain LM training steps on the training text before RL (for scratch models)", 0)
    log_every: int = _help("steps between metric logs and rollout dumps", 1)
    eval_every: int = _help("steps between held-out evaluations; 0 = only at start and end", 50)
    save_every: int = _help("steps between checkpoints; 0 = only at the end", 50)
    keep_checkpoints: int = _help("newest checkpoints kept on disk", 2)
    resume: str = _help("auto (newest checkpoint in output_dir) | never | a checkpoint path", "auto")
    report_to: str = _help("wandb (offline unless WANDB_MODE says otherwise) | tensorboard | none", "wandb")
    project: str = _help("tracker project name", "thinkrl")
    run_name: str = _help("tracker run name ('' = output_dir's name)", "")
    dump_rollouts: bool = _help("write decoded thoughts, rewards and advantages of logged steps", True)
    num_threads: int = _help("torch CPU threads; 0 = torch's default", 0)
    progress: bool = _help("show a progress bar", True)

    def __post_init__(self):
        _choice("trainer.report_to", self.report_to, ("wandb", "tensorboard", "none"))
        _positive("trainer.max_steps", self.max_steps, allow_zero=True)
        _positive("trainer.batch_positions", self.batch_positions)
        _positive("trainer.log_every", self.log_every)
        for name in ("eval_every", "save_every", "num_threads", "lm_warmup_steps"):
            _positive(f"trainer.{name}", getattr(self, name), allow_zero=True)
        _positive("trainer.keep_checkpoints", self.keep_checkpoints)


@dataclass
class Config:
    """A whole run. Every field has a default; recipes in configs/ change what they need."""

    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        k = self.rollout.num_thoughts
        if self.learner.baseline == "leave_one_out" and k == 1 and not self.learner.include_null:
            raise ConfigError(
                "leave-one-out needs at least 2 thoughts per group: set rollout.num_thoughts>=2 or learner.include_null=true"
            )
        if k == 0 and self.learner.policy_weight > 0 and "reasoner" not in self.model.freeze:
            raise ConfigError("rollout.num_thoughts=0 (control run) has no policy to train: set learner.policy_weight=0")
        if self.head.form == "none" and self.reward.source == "mixed":
            self.reward.source = "interpreter"  # nothing to mix: both names mean the interpreter's prediction
        if self.model.tokenizer == "synthetic" and self.data.source != "synthetic":
            raise ConfigError("model.tokenizer=synthetic only knows the synthetic task's words; use auto, byte or a path")
        if self.model.tokenizer == "auto" and self.all_scratch():
            # Random models have no tokenizer of their own: the task's words, or bytes for natural text.
            self.model.tokenizer = "synthetic" if self.data.source == "synthetic" else "byte"

    def all_scratch(self) -> bool:
        return all(self.model.spec(g).path == "scratch" for g in set(self.model.weight_groups))


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def _one_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema_class: type = None):
    """YAML recipe (optional) + dotted overrides → validated ``schema_class`` instance (default ``Config``).

    Raises ``ConfigError`` with one line. Other commands (e.g. Coconut) pass their own dataclass."""
    schema = OmegaConf.structured(schema_class or Config)
    try:
        merged = schema
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist; pass --config with a YAML file from configs/")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. trainer.max_steps=10)")
            for override in overrides:
                try:
                    parsed = OmegaConf.from_dotlist([override])
                except Exception as exc:
                    raise ConfigError(
                        f"cannot parse override {override!r} ({_one_line(exc)}); quote YAML-special values: key='\"value\"'"
                    ) from None
                merged = OmegaConf.merge(merged, parsed)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        where = f" at {key}" if key else ""
        msg = _one_line(exc)
        if "Key" in type(exc).__name__ or "not in struct" in msg:
            raise ConfigError(f"unknown config key{where}: {msg}; see thinkrl/config.py for the valid keys") from None
        raise ConfigError(f"bad config value{where}: {msg}") from None
    except Exception as exc:  # YAML syntax errors and the like
        raise ConfigError(f"cannot read config {path}: {_one_line(exc)}") from None


def to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
