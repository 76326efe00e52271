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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import MISSING, OmegaConf  # noqa: F401  (MISSING kept for recipe authors)
from omegaconf.errors import OmegaConfBaseException

from thinkrl.errors import ConfigError

# rollout.attention_kernel: the attention of parallel thought passes (models/parallel_passes.set_attention_kernel)
ATTENTION_KERNELS = ("auto", "merge", "flex")

ROLES = ("base", "reasoner", "interpreter")
FREEZABLE = ROLES + ("head",)


def described(text: str, default: Any = None, factory: Any = None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(allowed)}")


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero) or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


# ----------------------------------------------------------------------------------------------------------------
# Models and roles
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ScratchModelConfig:
    """A Llama-architecture model built from a config with random weights (small-scale research)."""

    hidden_size: int = described("width of the residual stream", 64)
    num_layers: int = described("number of transformer blocks", 2)
    num_heads: int = described("attention heads", 4)
    intermediate_size: int = described("MLP width", 256)
    max_position_embeddings: int = described("longest sequence the model accepts", 512)

    def __post_init__(self):
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            check_positive(f"scratch.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"scratch.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )


@dataclass
class LoraSettings:
    """LoRA adapter on a pretrained backbone (peft). r=0 trains the full model."""

    r: int = described("LoRA rank; 0 disables LoRA", 0)
    alpha: int = described("LoRA scaling numerator", 16)
    dropout: float = described("LoRA dropout", 0.0)
    target_modules: List[str] = described(
        "module names that get adapters", factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )


@dataclass
class ModelSpec:
    """Where one weight group's model comes from."""

    path: str = described(
        "'scratch' (random Llama from `scratch`), 'smollm2-135m-instruct' (offline package), a local HF "
        "folder, or a hub id",
        "scratch",
    )
    scratch: ScratchModelConfig = described("sizes when path=scratch", factory=ScratchModelConfig)
    lora: LoraSettings = described("LoRA adapter settings", factory=LoraSettings)
    gradient_checkpointing: bool = described(
        "recompute each decoder layer's activations in the backward pass instead of keeping them (less memory, "
        "about one more forward of compute); works with the shared-prefix KV caches",
        False,
    )


@dataclass
class ModelConfig:
    """Roles (base, reasoner, interpreter), their parameter sharing and where their weights come from."""

    default: ModelSpec = described("model of every weight group not listed in `groups`", factory=ModelSpec)
    groups: Dict[str, ModelSpec] = described("per weight-group model overrides, e.g. {B: {path: ...}}", factory=dict)
    weight_groups: List[str] = described(
        "group letter of base, reasoner, interpreter: [A, A, A] = one shared model (Quiet-STaR), [A, B, C] = separate",
        factory=lambda: ["A", "A", "A"],
    )
    freeze: List[str] = described("roles whose weights stay fixed: base, reasoner, interpreter, head", factory=list)
    tokenizer: str = described(
        "'auto' (the first pretrained model's; synthetic/byte for scratch ones), 'synthetic' (the "
        "synthetic task's words), 'byte' (ByT5 bytes), or a path/hub id",
        "auto",
    )
    thought_init_token: str = described(
        "text whose embedding initialises the thought tokens (Quiet-STaR: '---')", "---"
    )
    dtype: str = described("float32 | bfloat16 | float16 (bf16 is slower than fp32 on CPU)", "float32")
    attn_implementation: str = described("sdpa | eager", "sdpa")
    sharded_loading: str = described(
        "sharded runs: meta (each model is built without weights and every process reads only its shards from the "
        "safetensors files, models/meta_loading.py) | full (every process loads whole models, then shards them)",
        "meta",
    )
    init_from: str = described(
        "start from another run's weights: its run folder (newest whole checkpoint) or a checkpoint-<step> folder; "
        "models (thought markers, LoRA) and a mixing head of the same form come over, the optimizer, step and data "
        "position start fresh in this run's own folder (run/init_from.py); '' = the model paths' weights",
        "",
    )

    def __post_init__(self):
        if len(self.weight_groups) != len(ROLES):
            raise ConfigError(
                f"model.weight_groups needs {len(ROLES)} letters (base, reasoner, interpreter), got "
                f"{list(self.weight_groups)}"
            )
        for role in self.freeze:
            check_choice("model.freeze entry", role, FREEZABLE)
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))
        check_choice("model.sharded_loading", self.sharded_loading, ("meta", "full"))
        unknown = set(self.groups) - set(self.weight_groups)
        if unknown:
            raise ConfigError(
                f"model.groups has {sorted(unknown)} but model.weight_groups only uses "
                f"{sorted(set(self.weight_groups))}"
            )
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

    form: str = described(
        "none (interpreter alone) | mlp (Quiet-STaR: zero-init MLP weight mixing hidden states) | "
        "gate (sigmoid gate mixing probabilities) | concat (zero-init MLP residual on both hidden states)",
        "mlp",
    )
    init_weight: float = described("gate form: initial interpreter weight in (0, 1) (the seed used 0.6)", 0.6)
    hidden_size: int = described("MLP width of the mlp/concat heads; 0 = model width", 0)

    def __post_init__(self):
        check_choice("head.form", self.form, ("none", "mlp", "gate", "concat"))
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

    key_len: int = described("symbols in the key (= tokens to predict)", 2)
    num_symbols: int = described("alphabet of key symbols", 8)
    noise_len: int = described("noise tokens between the key and the recall", 6)
    noise_symbols: int = described("alphabet of noise tokens", 8)

    def __post_init__(self):
        for name in ("key_len", "num_symbols", "noise_len", "noise_symbols"):
            check_positive(f"data.synthetic.{name}", getattr(self, name))


# data.source=hf: the answer extractors and the keys of one data.mixture entry (data/hf_sources.py reads them)
EXTRACTORS = ("none", "gsm8k", "regex", "math-verify")
MIXTURE_KEYS = {"hub_id", "hub_config", "data_files", "split", "text_field", "weight"}


def check_hf_config(cfg) -> None:
    """One-line ConfigErrors for the hf fields of a DataConfig."""
    if cfg.source != "hf":
        what = "data.streaming" if cfg.streaming else "data.mixture"
        raise ConfigError(f"{what} is for data.source=hf (gsm8k/csqa/text read local files); set data.source=hf")
    if not (cfg.hub_id or cfg.data_files or cfg.mixture):
        raise ConfigError("data.source=hf needs data.hub_id (a hub dataset) or data.data_files (local files)")
    if cfg.eval_docs < 1:
        raise ConfigError(f"data.eval_docs must be > 0, got {cfg.eval_docs}")
    if cfg.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
    if cfg.answer_extractor not in EXTRACTORS:
        raise ConfigError(f"data.answer_extractor={cfg.answer_extractor!r} is not one of {', '.join(EXTRACTORS)}")
    if cfg.answer_extractor == "regex":
        if not cfg.answer_regex:
            raise ConfigError("data.answer_extractor=regex needs data.answer_regex (e.g. '####\\s*(\\S+)')")
        try:
            re.compile(cfg.answer_regex)
        except re.error as exc:
            raise ConfigError(f"data.answer_regex does not compile ({exc}); fix the pattern") from None
    if cfg.answer_extractor == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ConfigError(
                "data.answer_extractor=math-verify needs the math-verify package (pip install it)"
            ) from None
    if cfg.question_field and cfg.positions != "task":
        raise ConfigError("an hf QA set (data.question_field) has one position per item: set data.positions=task")
    if not cfg.question_field and cfg.positions == "task":
        raise ConfigError(
            "an hf text corpus has no task positions: set data.positions=every_k or random (or data.question_field "
            "for a QA set)"
        )
    for i, entry in enumerate(cfg.mixture):
        if not isinstance(entry, Mapping):
            raise ConfigError(f"data.mixture[{i}] must be a mapping like {{data_files: [a.parquet], weight: 1}}")
        unknown = set(entry) - MIXTURE_KEYS
        if unknown:
            raise ConfigError(
                f"data.mixture[{i}] has unknown keys {sorted(unknown)}; allowed: {', '.join(sorted(MIXTURE_KEYS))}"
            )
        if not (entry.get("hub_id") or entry.get("data_files")):
            raise ConfigError(f"data.mixture[{i}] needs hub_id or data_files")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ConfigError(f"data.mixture[{i}].weight must be a number > 0, got {weight!r}")
    if cfg.mixture and cfg.question_field:
        raise ConfigError("data.mixture mixes text corpora; drop data.question_field")


@dataclass
class DataConfig:
    """Where text comes from and where thoughts are placed."""

    source: str = described(
        "synthetic | text | gsm8k | csqa | hf (any datasets corpus or QA set; gsm8k and csqa are its presets)",
        "synthetic",
    )
    data_dir: str = described("folder with gsm8k/, csqa/, ... ('auto' = ../shared/data when it exists)", "auto")
    train_file: str = described(
        "file for source=text (path, or relative to data_dir); task sources pick their own", ""
    )
    eval_file: str = described("held-out file; '' = the task's held-out split, or the tail of train_file for text", "")
    hub_id: str = described(
        "datasets hub id: source=hf's dataset when data.data_files is empty; gsm8k/csqa read it when the local file "
        "is absent (users with internet)",
        "",
    )
    hub_config: str = described("hf: the dataset's configuration name (load_dataset's name, e.g. main)", "")
    data_files: list = described(
        "hf: local parquet/json/jsonl/csv/arrow/txt files of the training split (paths, or relative to data_dir); "
        "the builder follows the extension",
        factory=list,
    )
    split: str = described("hf: the training split", "train")
    eval_split: str = described(
        "hf: the held-out split ('' = the last data.eval_docs documents of the training split); with data_files, "
        "the held-out files are data.eval_file",
        "",
    )
    eval_docs: int = described("hf without eval_split: documents/items held out from the end of the split", 100)
    streaming: bool = described(
        "hf: stream the split (datasets IterableDataset, buffer-shuffled by the seed; its order differs from the "
        "non-streamed one) for corpora that do not fit in memory",
        False,
    )
    shuffle_buffer: int = described("hf streaming: documents in the shuffle buffer (0 = stream order)", 10_000)
    text_field: str = described("hf text corpus: the column holding the text", "text")
    question_field: str = described("hf: the question column; set, the dataset is a QA task (one position each)", "")
    answer_field: str = described("hf QA: the answer column", "answer")
    answer_extractor: str = described(
        "hf QA: how the gold answer comes out of answer_field: none (the field, stripped) | gsm8k (after '####', "
        "commas dropped) | regex (data.answer_regex) | math-verify (the final LaTeX answer, e.g. \\boxed{...})",
        "none",
    )
    answer_regex: str = described("hf QA, answer_extractor=regex: its first group (or the match) is the answer", "")
    mixture: list = described(
        "hf text corpora mixed by weight: a list of {hub_id or data_files, hub_config, split, text_field, weight}; "
        "documents are drawn from each at its weight, reproducibly by the seed",
        factory=list,
    )
    cache_dir: str = described("hf: datasets' cache folder ('' = datasets' default)", "")
    positions: str = described("task (task-defined, e.g. before an answer) | every_k | random", "task")
    every_k: int = described("every_k: distance between thought positions", 16)
    positions_per_doc: int = described("random: thought positions drawn per document window", 4)
    context_len: int = described("most context tokens kept before a thought position (left-truncated)", 128)
    n_ahead: int = described("true tokens y scored after each thought (Quiet-STaR's n_ahead_talk)", 4)
    interpreter_window: int = described(
        "context tokens the interpreter and base see before the thought; 0 = all (the reasoner always sees all)", 0
    )
    prompt_template: str = described("prompts/ name that formats task items (gsm8k, csqa, hf QA: tasks/gsm8k)", "")
    chat_template: bool = described(
        "task items as a chat turn rendered by the tokenizer's chat template (apply_chat_template, thinking mode "
        "off); the thought follows the generation prompt, before the answer (docs/evaluation.md)",
        False,
    )
    system_prompt: str = described("chat: prompts/ name of the system turn ('' = none, or the template's own)", "")
    max_docs: int = described("read at most this many documents/items per split; 0 = all", 0)
    eval_positions: int = described("held-out thought positions used by every evaluation", 64)
    synthetic: SyntheticTaskConfig = described("synthetic task settings", factory=SyntheticTaskConfig)

    def __post_init__(self):
        check_choice("data.source", self.source, ("synthetic", "text", "gsm8k", "csqa", "hf"))
        check_choice("data.positions", self.positions, ("task", "every_k", "random"))
        for name in ("every_k", "positions_per_doc", "context_len", "n_ahead", "eval_positions"):
            check_positive(f"data.{name}", getattr(self, name))
        if self.interpreter_window == 1 or self.context_len < 2:
            raise ConfigError(
                "data.interpreter_window must be 0 (all) or >= 2 and data.context_len >= 2 "
                "(one token is the shared prefix, one starts the thought)"
            )
        check_positive("data.interpreter_window", self.interpreter_window, allow_zero=True)
        check_positive("data.max_docs", self.max_docs, allow_zero=True)
        if self.chat_template and self.is_text_corpus():  # synthetic: the default that `eval --task` replaces
            raise ConfigError(
                "data.chat_template renders task items; a text corpus has no turn to wrap: use a chat reasoner "
                "template (rollout.reasoner_template=thinking/chat) for the reasoner"
            )
        if self.source == "text" and self.positions == "task":
            raise ConfigError("data.source=text has no task positions; set data.positions=every_k or random")
        if self.source == "text" and not self.train_file:
            raise ConfigError("data.source=text needs data.train_file (e.g. tinyshakespeare/input.txt)")
        if self.source == "hf" or self.streaming or self.mixture:
            check_hf_config(self)

    def is_text_corpus(self) -> bool:
        """Whether the data is running text (positions inside documents) rather than a task's items."""
        return self.source == "text" or (self.source == "hf" and not self.question_field)

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

    backend: str = described(
        "hf (transformers, KV-cached, samples with the learner's own weights) | vllm (colocated engine)", "hf"
    )
    num_thoughts: int = described(
        "K thoughts sampled per position (TRICE samples); 0 = control run, null thought only", 8
    )
    max_thought_len: int = described("most thought tokens between the start/end markers", 8)
    length_mode: str = described(
        "variable (stop at the end-of-thought token) | fixed (always max_thought_len)", "variable"
    )
    temperature: float = described("sampling temperature; the learner scores with the same one", 1.0)
    top_p: float = described("nucleus sampling mass", 1.0)
    null_thought: str = described("'' = empty thought <sot><eot>, or a prompts/ name holding a phrase", "")
    reasoner_template: str = described(
        "'' = the reasoner reads the bare context, or a prompts/ name wrapping it (e.g. thinking/system)", ""
    )
    batch_positions: int = described(
        "positions sampled together in one batch (memory knob; parallel passes sample a step's windows at once)", 32
    )
    thought_passes: str = described(
        "auto | parallel | per_position: parallel reads each text window once and grows the thoughts of all its "
        "positions together (every_k/random positions on text); per_position gives each position its own sequence "
        "(task positions); auto picks parallel where it applies",
        "auto",
    )
    attention_kernel: str = described(
        "auto | merge | flex: the attention of parallel thought passes. merge: the window keys a chunk of slots "
        "shares in one fused scaled_dot_product_attention call, the few keys its slots differ on and each "
        "thought's own earlier tokens by hand, merged exactly by log-sum-exp (any device); flex: one torch "
        "flex_attention call with a block mask over the window keys and each thought's own tokens, compiled on "
        "CUDA (elsewhere an unfused reference that holds the whole score matrix: slow, for tests); auto = merge, "
        "until a GPU benchmark shows flex faster (scripts/bench_every_token.py --attention-kernel flex)",
        "auto",
    )
    fused_passes: str = described(
        "auto | true | false: sample each thought token inside the passes that learn from it (parallel passes, HF "
        "backend, one model as reasoner and interpreter, interpreter_window 0, async_steps 0, updates_per_rollout 1, "
        "unsharded): the window is read once per step and no thought token is run twice; the same thoughts, loss "
        "and gradients as the two phases (tests/rl/test_parallel_passes.py). auto: where all of that holds; "
        "false: always two phases (sample without grad, then teacher-force). Sampling then runs inside the "
        "learner's forward and timing/rollout holds it (docs/every-token.md)",
        "auto",
    )
    sync_every: int = described(
        "vllm: push the learner's weights into the engine every N updates (staleness <= N-1)", 1
    )
    async_steps: int = described(
        "vllm: overlapped sampling; the sampler works on the batches of the next N steps while the learner trains "
        "(staleness <= N, corrected by the clipped importance ratio); 0 = sample, then learn (docs/rollouts.md)",
        0,
    )
    vllm_mode: str = described(
        "vllm: colocate (an engine inside each training process) | server (running vLLM servers, rollout.vllm_urls; "
        "start one with `thinkrl serve`)",
        "colocate",
    )
    vllm_urls: list = described(
        "vllm_mode=server: the servers' URLs (http://host:port); a step's positions are shared among them",
        factory=list,
    )
    vllm_sync: str = described(
        "vllm: how weights reach the engine: auto (= memory) | memory (vLLM's weight-transfer API over a gloo group, "
        "no files) | disk (save_pretrained + reload, the fallback)",
        "auto",
    )
    vllm_transfer: str = described(
        "vllm_mode=server: what carries the weights to the servers: auto (nccl where this machine has CUDA, as TRL's "
        "server mode does; gloo without) | gloo (TCP, any machine) | nccl; thinkrl serve picks the same for a recipe",
        "auto",
    )
    vllm_sync_timeout_s: float = described(
        "vllm: a weight transfer that has not finished after this many seconds ends the run with one line", 300.0
    )
    vllm_enforce_eager: str = described(
        "vllm: auto (CUDA graphs on GPUs, eager on CPU, where vLLM has none) | true (eager everywhere) | false", "auto"
    )
    vllm_sleep: bool = described(
        "vllm colocate on GPUs: put the engine to sleep (level 1: weights to host memory, KV cache freed) while the "
        "learner scores and updates; it wakes before sampling and takes the new weights after waking",
        False,
    )
    vllm_kv_cache_gb: int = described("vllm on CPU: KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE)", 1)
    vllm_gpu_memory_utilization: float = described("vllm on GPU: share of GPU memory the engine may take", 0.3)
    vllm_block_size: int = described(
        "vllm: KV-cache block size in tokens, 0 = the engine's default (128 on CPU); the prefix cache shares whole "
        "blocks only, so thoughts at every token share more text with smaller blocks (32)",
        0,
    )

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, ("hf", "vllm"))
        check_choice("rollout.length_mode", self.length_mode, ("variable", "fixed"))
        check_choice("rollout.vllm_sync", self.vllm_sync, ("auto", "memory", "disk"))
        check_choice("rollout.vllm_mode", self.vllm_mode, ("colocate", "server"))
        check_choice("rollout.vllm_transfer", self.vllm_transfer, ("auto", "gloo", "nccl"))
        self.vllm_enforce_eager = str(self.vllm_enforce_eager).lower()
        check_choice("rollout.vllm_enforce_eager", self.vllm_enforce_eager, ("auto", "true", "false"))
        self.fused_passes = str(self.fused_passes).lower()
        check_choice("rollout.fused_passes", self.fused_passes, ("auto", "true", "false"))
        check_positive("rollout.vllm_sync_timeout_s", self.vllm_sync_timeout_s)
        check_choice("rollout.thought_passes", self.thought_passes, ("auto", "parallel", "per_position"))
        check_choice("rollout.attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        check_positive("rollout.num_thoughts", self.num_thoughts, allow_zero=True)
        check_positive("rollout.max_thought_len", self.max_thought_len)
        check_positive("rollout.temperature", self.temperature)
        check_positive("rollout.batch_positions", self.batch_positions)
        check_positive("rollout.sync_every", self.sync_every)
        check_positive("rollout.async_steps", self.async_steps, allow_zero=True)
        if self.async_steps:
            self._check_async()
        check_positive("rollout.vllm_kv_cache_gb", self.vllm_kv_cache_gb)
        check_positive("rollout.vllm_block_size", self.vllm_block_size, allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")

    def _check_async(self) -> None:
        """Overlap needs a sampler with weights and compute of its own; the staleness bound needs a sync per step."""
        if self.backend != "vllm":
            raise ConfigError(
                "rollout.async_steps needs rollout.backend=vllm: the HF sampler is the learner's own model, so it "
                "cannot sample while that model trains"
            )
        if self.sync_every != 1:
            raise ConfigError(
                "rollout.async_steps bounds staleness itself: keep rollout.sync_every=1 (weights pushed every update)"
            )
        if self.vllm_sleep:
            raise ConfigError(
                "rollout.async_steps keeps the engine sampling while the learner trains: set rollout.vllm_sleep=false"
            )


@dataclass
class RewardConfig:
    """r(z) = log q(y|x,z) - log q(y|x,reference), then shaping used by the advantages."""

    baseline: str | None = described(
        "what a thought's prediction is compared with: null (the null thought, TRICE; YAML's null means it too) | "
        "no_thought (the base model reading no thought, Quiet-STaR) | ema (an exponential moving average of the "
        "interpreter's weights reading no thought, RLP; sharded like the interpreter under fsdp2/hsdp)",
        "null",
    )
    ema_decay: float = described(
        "reward.baseline=ema: EMA weight kept per optimizer step (1 = frozen at the start)", 0.999
    )
    source: str = described("mixed (through the mixing head) | interpreter (the interpreter alone)", "mixed")
    discount: float = described("weight gamma^j of the j-th predicted token in the summed reward (1 = plain sum)", 1.0)
    clip: float = described("clip rewards to [-clip, clip] before advantages; 0 = off", 0.0)
    length_penalty: float = described("subtracted per thought token", 0.0)
    unfinished_penalty: float = described("subtracted when a thought hits max_thought_len without its end token", 0.0)
    copy_penalty: float = described(
        "subtracted (after the clip, like the other penalties) from the reward of a thought whose tokens contain the "
        "first target token y_1, against the reward hacking of repeating the target (docs/evaluation.md, copy "
        "gauge). It changes what is learned: it also penalises thoughts that legitimately predict y_1. 0 = off",
        0.0,
    )

    def __post_init__(self):
        check_choice("reward.source", self.source, ("mixed", "interpreter"))
        if self.baseline is None:  # `baseline: null` in YAML parses to None: it names the null thought
            self.baseline = "null"
        check_choice("reward.baseline", self.baseline, ("null", "no_thought", "ema"))
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ConfigError(f"reward.ema_decay must be in [0, 1], got {self.ema_decay}")
        if not 0.0 < self.discount <= 1.0:
            raise ConfigError(f"reward.discount must be in (0, 1], got {self.discount}")
        for name in ("clip", "length_penalty", "unfinished_penalty", "copy_penalty"):
            check_positive(f"reward.{name}", getattr(self, name), allow_zero=True)


@dataclass
class LearnerConfig:
    """TRICE-style policy gradient for the reasoner, NLL for the interpreter, optimisation."""

    objective: str = described(
        "thoughts (the thought RL loss below) | lm (the no-thought baseline: plain continued LM training of the base "
        "and interpreter models on the same positions' target tokens, no thought, no RL, no mixing head; sets "
        "rollout.num_thoughts=0, so evaluation scores the null thought and the base only)",
        "thoughts",
    )
    baseline: str = described(
        "leave_one_out (TRICE) | mean (Quiet-STaR: group mean incl. self) | none", "leave_one_out"
    )
    include_null: bool = described("the null thought (reward 0) joins the baseline group", False)
    positive_only: bool = described("keep only positive advantages (Quiet-STaR's 1[r>0])", False)
    normalize: str = described("none | std (divide a position's advantages by their std)", "none")
    policy_weight: float = described("weight of the policy-gradient loss", 1.0)
    entropy_coef: float = described("entropy bonus on thought tokens (keeps thoughts from collapsing)", 0.01)
    interpreter_weight: float = described("weight of NLL(y | x, thought) through the mixing head", 1.0)
    interpreter_null: bool = described(
        "the interpreter also learns from the null thought, keeping the baseline of r(z) a calibrated "
        "no-thought guess",
        True,
    )
    interpreter_only_helpful: bool = described(
        "interpreter learns only from thoughts that beat the null thought", False
    )
    base_weight: float = described("weight of NLL(y | x) with no thought (keeps plain language modelling)", 0.0)
    score_null: str = described(
        "auto: training scores the null thought only when its loss needs it (the interpreter learns from it, or it "
        "is the reward reference and does not cancel in the advantages: a reward clip, include_null, baseline none); "
        "without it train/reward, train/null_rate and train/reward_copy_share are not logged (held-out eval/ keeps "
        "them) | always: score it every step",
        "auto",
    )
    ratio_clip: float = described("PPO-style clip of the importance ratio learner/sampler", 0.2)
    tis_cap: float = described(
        "truncated importance sampling: weight each thought token by min(learner/sampler probability, tis_cap) "
        "instead of clipping the ratio against the sampler (for a lagging or bf16 sampler; 2.0 is verl's usual cap); "
        "0 = off",
        0.0,
    )
    updates_per_rollout: int = described("optimizer steps on one batch of rollouts (>1 makes the sampler stale)", 1)
    lr: float = described("learning rate of every role not in role_lr", 1e-3)
    role_lr: Dict[str, float] = described(
        "per-role learning rates {reasoner: .., interpreter: .., base: .., head: ..}", factory=dict
    )
    weight_decay: float = described("AdamW weight decay", 0.0)
    adam_betas: List[float] = described("AdamW betas", factory=lambda: [0.9, 0.999])
    max_grad_norm: float = described("clip the global gradient norm; 0 = off", 1.0)
    grad_accum_steps: int = described("rollout micro-batches per optimizer step", 1)
    scheduler: str = described(
        "transformers scheduler name: constant | constant_with_warmup | linear | cosine", "constant"
    )
    warmup_steps: int = described("scheduler warm-up steps", 0)
    lean_losses: bool = described(
        "compute target log-probs, policy log-probs and entropies from hidden states through the LM heads in "
        "checkpointed row chunks, never a (rows x vocabulary) tensor (same values); false = from full logits",
        True,
    )

    def __post_init__(self):
        check_choice("learner.objective", self.objective, ("thoughts", "lm"))
        check_choice("learner.baseline", self.baseline, ("leave_one_out", "mean", "none"))
        check_choice("learner.normalize", self.normalize, ("none", "std"))
        check_choice("learner.score_null", self.score_null, ("auto", "always"))
        check_choice("learner.scheduler", self.scheduler, ("constant", "constant_with_warmup", "linear", "cosine"))
        for role in self.role_lr:
            check_choice("learner.role_lr key", role, FREEZABLE)
        check_positive("learner.lr", self.lr)
        for name in (
            "policy_weight",
            "entropy_coef",
            "interpreter_weight",
            "base_weight",
            "max_grad_norm",
            "ratio_clip",
        ):
            check_positive(f"learner.{name}", getattr(self, name), allow_zero=True)
        check_positive("learner.grad_accum_steps", self.grad_accum_steps)
        check_positive("learner.updates_per_rollout", self.updates_per_rollout)
        check_positive("learner.tis_cap", self.tis_cap, allow_zero=True)
        if self.tis_cap and self.updates_per_rollout > 1:
            raise ConfigError(
                "learner.tis_cap takes the learner's log-probs of this update as the old policy: keep "
                "learner.updates_per_rollout=1"
            )
        if self.updates_per_rollout > 1 and self.grad_accum_steps > 1:
            raise ConfigError("use learner.updates_per_rollout>1 or learner.grad_accum_steps>1, not both")


# ----------------------------------------------------------------------------------------------------------------
# Trainer and logging
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    """Loop length, evaluation, checkpoints, logging."""

    output_dir: str = described(
        "run folder: config, metrics.jsonl, rollouts/, checkpoint-*/, summary.json", "runs/default"
    )
    max_steps: int = described("optimizer steps", 100)
    max_flops: float = described(
        "also stop once the run's training FLOPs (compute/flops_total, see run/compute.py) reach this; 0 = off",
        0.0,
    )
    compute_match: str = described(
        "a finished run folder: stop once this run's training FLOPs reach that run's (its summary.json "
        "compute.flops_total), e.g. a learner.objective=lm baseline matched to a thought run; '' = off",
        "",
    )
    batch_positions: int = described(
        "thought positions per micro-batch; with parallel passes, whole windows: batch_positions // positions per "
        "window (at least one)",
        8,
    )
    seed: int = described("seed of data order, sampling and initialisation", 0)
    lm_warmup_steps: int = described("plain LM training steps on the training text before RL (for scratch models)", 0)
    log_every: int = described("steps between metric logs and rollout dumps", 1)
    eval_every: int = described(
        "steps between held-out evaluations; 0 = only at start and end (under compute_match: as often per FLOP as "
        "the matched run)",
        50,
    )
    save_every: int = described(
        "steps between checkpoints; 0 = only at the end (under compute_match: as often per FLOP as the matched run)",
        50,
    )
    keep_checkpoints: int = described("newest checkpoints kept on disk", 2)
    resume: str = described("auto (newest checkpoint in output_dir) | never | a checkpoint path", "auto")
    report_to: str = described("wandb (offline unless WANDB_MODE says otherwise) | tensorboard | none", "wandb")
    project: str = described("tracker project name", "thinkrl")
    run_name: str = described("tracker run name ('' = output_dir's name)", "")
    dump_rollouts: bool = described("write decoded thoughts, rewards and advantages of logged steps", True)
    num_threads: int = described("torch CPU threads; 0 = torch's default", 0)
    progress: bool = described("show a progress bar", True)
    sharding: str = described(
        "none (each process holds whole models; gradients averaged) | fsdp2 (PyTorch FSDP2: every decoder layer, "
        "each model and the mixing head sharded across the processes; sharded checkpoints) | hsdp (FSDP2 on a 2-D "
        "mesh: sharded within a machine, replicated across machines). An accelerate launch with the FSDP plugin "
        "(fsdp_version: 2) selects fsdp2 too",
        "none",
    )
    grad_bucket_mb: float = described(
        "unsharded multi-process runs: gradients are averaged in flat buckets of this many MB, all-reduced "
        "asynchronously while backward runs (as in DDP; distributed/grad_buckets.py); 0 = one blocking all-reduce per "
        "parameter, kept only as the baseline of scripts/bench_grad_buckets.py",
        25.0,
    )

    def __post_init__(self):
        check_choice("trainer.report_to", self.report_to, ("wandb", "tensorboard", "none"))
        check_choice("trainer.sharding", self.sharding, ("none", "fsdp2", "hsdp"))
        check_positive("trainer.max_steps", self.max_steps, allow_zero=True)
        check_positive("trainer.batch_positions", self.batch_positions)
        check_positive("trainer.log_every", self.log_every)
        for name in ("eval_every", "save_every", "num_threads", "lm_warmup_steps"):
            check_positive(f"trainer.{name}", getattr(self, name), allow_zero=True)
        check_positive("trainer.keep_checkpoints", self.keep_checkpoints)
        check_positive("trainer.max_flops", self.max_flops, allow_zero=True)
        check_positive("trainer.grad_bucket_mb", self.grad_bucket_mb, allow_zero=True)
        if self.max_flops and self.compute_match:
            raise ConfigError("set trainer.max_flops or trainer.compute_match (which reads the budget), not both")


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
        if self.learner.objective == "lm":  # the no-thought baseline: nothing is sampled or scored after a thought
            self.rollout.num_thoughts = 0
            self.rollout.backend = "hf"  # the HF actor samples nothing at K=0; a vLLM engine would idle
            self.rollout.async_steps = 0
            if all(r in self.model.freeze for r in ("base", "interpreter")):
                raise ConfigError("learner.objective=lm trains the base and interpreter models: unfreeze one")
        k = self.rollout.num_thoughts
        if self.learner.baseline == "leave_one_out" and k == 1 and not self.learner.include_null:
            raise ConfigError(
                "leave-one-out needs at least 2 thoughts per group: set rollout.num_thoughts>=2 or "
                "learner.include_null=true"
            )
        lm = self.learner.objective == "lm"
        if k == 0 and self.learner.policy_weight > 0 and "reasoner" not in self.model.freeze and not lm:
            raise ConfigError(
                "rollout.num_thoughts=0 (control run) has no policy to train: set learner.policy_weight=0"
            )
        if self.rollout.async_steps and self.learner.updates_per_rollout > 1:
            raise ConfigError(
                "rollout.async_steps and learner.updates_per_rollout>1 both make rollouts stale: use one of them"
            )
        if self.head.form == "none" and self.reward.source == "mixed":
            self.reward.source = "interpreter"  # nothing to mix: both names mean the interpreter's prediction
        if self.model.tokenizer == "synthetic" and self.data.source != "synthetic":
            raise ConfigError(
                "model.tokenizer=synthetic only knows the synthetic task's words; use auto, byte or a path"
            )
        if self.model.tokenizer == "auto" and self.all_scratch():
            # Random models have no tokenizer of their own: the task's words, or bytes for natural text.
            self.model.tokenizer = "synthetic" if self.data.source == "synthetic" else "byte"

        if self.rollout.thought_passes == "parallel":
            if self.data.streaming:
                raise ConfigError(
                    "rollout.thought_passes=parallel needs the windows in memory; data.streaming reads documents one "
                    "by one: use rollout.thought_passes=per_position (or auto)"
                )
            if self.data.positions == "task":
                raise ConfigError(
                    "rollout.thought_passes=parallel needs many positions per text (data.positions=every_k or "
                    "random); task positions use rollout.thought_passes=per_position"
                )
            if self.rollout.reasoner_template:
                raise ConfigError(
                    "rollout.reasoner_template wraps each position's context, which parallel passes share; set "
                    "rollout.thought_passes=per_position or drop the template"
                )

        if self.rollout.fused_passes == "true":
            missing = self._fused_missing()
            if missing:
                raise ConfigError(f"rollout.fused_passes=true needs {', '.join(missing)}; or set it to auto or false")

    def _fused_missing(self) -> list[str]:
        """What ``rollout.fused_passes`` needs and this config lacks (empty: thoughts can be sampled in the passes)."""
        wg = self.model.weight_groups
        needs = {
            "parallel thought passes (rollout.thought_passes)": self.parallel_passes(),
            "rollout.backend=hf": self.rollout.backend == "hf",
            "one model as reasoner and interpreter (model.weight_groups [x, A, A])": wg[1] == wg[2],
            "data.interpreter_window=0": not self.data.interpreter_window,
            "rollout.async_steps=0": not self.rollout.async_steps,
            "learner.updates_per_rollout=1": self.learner.updates_per_rollout == 1,
            "trainer.sharding=none": self.trainer.sharding == "none",
        }
        return [name for name, ok in needs.items() if not ok]

    def fused_sampling(self) -> bool:
        """Whether thoughts are sampled inside the learning passes (``rollout.fused_passes``; auto: where it can)."""
        mode = self.rollout.fused_passes
        return mode == "true" or (mode == "auto" and not self._fused_missing())

    def parallel_passes(self) -> bool:
        """Whether thoughts are grown in parallel passes over whole windows (see ``rollout.thought_passes``)."""
        mode = self.rollout.thought_passes
        if mode == "auto":
            return (
                self.data.is_text_corpus()
                and not self.data.streaming
                and self.data.positions != "task"
                and not self.rollout.reasoner_template
            )
        return mode == "parallel"

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
            recipe = OmegaConf.load(path)
            if not OmegaConf.is_dict(recipe) or not recipe:  # an empty file would silently train the defaults
                raise ConfigError(
                    f"config file {path} is {'empty' if not recipe else 'not a YAML mapping'}; "
                    "give a recipe (e.g. configs/default.yaml) or leave out --config to use only overrides"
                )
            merged = OmegaConf.merge(merged, recipe)
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. trainer.max_steps=10)")
            for override in overrides:
                try:
                    parsed = OmegaConf.from_dotlist([override])
                except Exception as exc:
                    raise ConfigError(
                        f"cannot parse override {override!r} ({_one_line(exc)}); quote YAML-special "
                        f"values: key='\"value\"'"
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
