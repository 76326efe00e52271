"""Coconut's configuration: typed dataclasses, loaded by ``load_config(..., schema_class=CoconutConfig)``.

Original Coconut YAML names → thinkrl names:
  coconut / cot / no_cot / no_thoughts (booleans) → curriculum.mode (coconut | cot | no_cot | pause)
  c_thought, epochs_per_stage, max_latent_stage, pad_latent_to_max, uniform_prob, reset_optimizer → curriculum.*
  model_id → model.path     load_model_path → model.init_from
  resume (an epoch number) → trainer.resume (a checkpoint)
  num_epochs, batch_size_training → trainer.num_epochs, trainer.batch_size
  gradient_accumulation_steps → optim.grad_accum_steps
  lr, weight_decay → optim.lr, optim.weight_decay       train_path / val_path → data.train_file / data.eval_file
"""

from __future__ import annotations

from dataclasses import dataclass, field

from thinkrl.config import ScratchModelConfig, check_choice, check_positive, described
from thinkrl.errors import ConfigError

MODES = ("coconut", "cot", "no_cot", "pause")
SOURCES = ("synthetic", "gsm8k", "prosqa", "file")


@dataclass
class CoconutModelConfig:
    """The one model Coconut trains, and the tokens it adds."""

    path: str = described(
        "'scratch', 'smollm2-135m-instruct' (offline package), a local HF folder or a hub id", "scratch"
    )
    scratch: ScratchModelConfig = described("sizes when path=scratch", factory=ScratchModelConfig)
    tokenizer: str = described(
        "'auto' (the model's own; 'synthetic' words or 'byte' for scratch models), 'synthetic', 'byte' or a path",
        "auto",
    )
    latent_init_token: str = described(
        "text whose embedding initialises <|start-latent|>, <|end-latent|>, <|latent|>", "<<"
    )
    init_from: str = described(
        "checkpoint folder whose model weights start this run (e.g. the cot stage-0 run); '' = none", ""
    )
    tie_embeddings: bool = described(
        "path=scratch only: share the output layer with the input embeddings, as GPT-2 does, so a continuous "
        "thought (a last hidden state) is read back in the space the output layer decodes from",
        True,
    )
    dtype: str = described("float32 | bfloat16 | float16 (bf16 is slower than fp32 on CPU)", "float32")
    attn_implementation: str = described("sdpa | eager", "sdpa")

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check_choice("model.attn_implementation", self.attn_implementation, ("sdpa", "eager"))


@dataclass
class SyntheticChainConfig:
    """Chained arithmetic mod 10: ``3 +4 *7 -2`` read left to right; each step is one intermediate value."""

    num_ops: int = described("operations per problem (= reasoning steps)", 4)
    train_size: int = described("training problems", 4000)
    eval_size: int = described("validation problems (evaluated during training)", 200)
    test_size: int = described("test problems (thinkrl coconut eval)", 500)

    def __post_init__(self):
        for name in ("num_ops", "train_size", "eval_size", "test_size"):
            check_positive(f"data.synthetic.{name}", getattr(self, name))


@dataclass
class CoconutDataConfig:
    """Problems with a question, reasoning steps and an answer."""

    source: str = described(
        "synthetic (generated) | gsm8k (iCoT) | prosqa | file (iCoT .txt or Coconut .json)", "synthetic"
    )
    data_dir: str = described("folder with icot_gsm8k/, prosqa/ ('auto' = ../shared/data when it exists)", "auto")
    train_file: str = described("training file (path, or relative to data_dir); '' = the source's default", "")
    eval_file: str = described("validation file evaluated during training; '' = the source's default", "")
    test_file: str = described("file for `thinkrl coconut eval`; '' = the source's default", "")
    hub_id: str = described("datasets hub id read when a local file is absent (users with internet)", "")
    max_train: int = described("use at most this many training problems; 0 = all", 0)
    max_eval: int = described("use at most this many validation/test problems; 0 = all", 0)
    chat_template: bool = described("wrap the question in the tokenizer's chat template (instruction models)", False)
    synthetic: SyntheticChainConfig = described("synthetic task settings", factory=SyntheticChainConfig)

    def __post_init__(self):
        check_choice("data.source", self.source, SOURCES)
        check_positive("data.max_train", self.max_train, allow_zero=True)
        check_positive("data.max_eval", self.max_eval, allow_zero=True)
        if self.source == "file" and not self.train_file:
            raise ConfigError("data.source=file needs data.train_file (an iCoT .txt or a Coconut .json file)")

    def resolved_data_dir(self):
        from thinkrl.config import DataConfig

        return DataConfig.resolved_data_dir(self)  # same rule as the RL trainer's data folder


@dataclass
class CurriculumConfig:
    """Coconut's stage curriculum: at stage k the first k steps become k*c_thought latents."""

    mode: str = described(
        "coconut (continuous thoughts) | cot (all steps as text) | no_cot (answer only) | "
        "pause (the curriculum with <|latent|> as plain pause tokens, no hidden-state feedback)",
        "coconut",
    )
    c_thought: int = described("latent thoughts per replaced reasoning step", 1)
    epochs_per_stage: int = described("epochs spent at each stage (stage = epoch // epochs_per_stage)", 1)
    stage0_epochs: int = described(
        "epochs of stage 0 (plain CoT) before the first latent stage: -1 = epochs_per_stage (the plain formula); "
        "0 = none, start at stage 1 (a run initialised from a CoT checkpoint, as published); n = a longer CoT phase",
        -1,
    )
    max_latent_stage: int = described("most steps replaced; beyond it all remaining text steps are dropped", 3)
    pad_latent_to_max: bool = described(
        "always use max_latent_stage*c_thought latents, even for problems with fewer steps", False
    )
    uniform_prob: float = described(
        "chance that a training problem uses a uniformly drawn stage instead of the current one", 0.0
    )
    reset_optimizer: bool = described("start the optimizer afresh at every stage boundary", True)
    latent_markers: bool = described(
        "wrap the latents in <|start-latent|> ... <|end-latent|> (published). false: latents follow the question "
        "directly, so at the stage that adds a latent its own output is trained on the next text token (that "
        "step's result) and, one stage later, hands it to the next latent (see configs/coconut/synthetic_cpu.yaml)",
        True,
    )

    def __post_init__(self):
        check_choice("curriculum.mode", self.mode, MODES)
        check_positive("curriculum.c_thought", self.c_thought)
        check_positive("curriculum.epochs_per_stage", self.epochs_per_stage)
        check_positive("curriculum.max_latent_stage", self.max_latent_stage, allow_zero=True)
        if self.stage0_epochs < -1:
            raise ConfigError(
                f"curriculum.stage0_epochs must be -1 (= epochs_per_stage), 0 or more, got {self.stage0_epochs}"
            )
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ConfigError(f"curriculum.uniform_prob must be in [0, 1], got {self.uniform_prob}")


@dataclass
class OptimConfig:
    """AdamW."""

    lr: float = described("learning rate", 1e-4)
    weight_decay: float = described("AdamW weight decay", 0.01)
    adam_betas: list = described("AdamW betas", factory=lambda: [0.9, 0.999])
    max_grad_norm: float = described("clip the gradient norm; 0 = off", 1.0)
    grad_accum_steps: int = described("micro-batches per optimizer step", 1)

    def __post_init__(self):
        check_positive("optim.lr", self.lr)
        check_positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("optim.max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_positive("optim.grad_accum_steps", self.grad_accum_steps)


@dataclass
class CoconutTrainerConfig:
    """Loop length, evaluation, checkpoints, logging."""

    output_dir: str = described(
        "run folder: config.yaml, metrics.jsonl, stage_results.json, checkpoint-*/", "runs/coconut"
    )
    num_epochs: int = described("training epochs (the curriculum's clock)", 6)
    max_steps: int = described(
        "stop after this many optimizer steps even mid-epoch (time budgets, tests); 0 = none", 0
    )
    batch_size: int = described("problems per micro-batch", 32)
    eval_batch_size: int = described("problems per generation batch", 64)
    max_new_tokens: int = described("longest generated continuation at evaluation", 64)
    eval_every_epochs: int = described("evaluate on the validation set every this many epochs; 0 = only at the end", 1)
    seed: int = described("seed of initialisation, data order and uniform_prob draws", 0)
    save_every: int = described("optimizer steps between checkpoints; 0 = at the end of each epoch", 0)
    keep_checkpoints: int = described("newest checkpoints kept on disk", 2)
    resume: str = described("auto (newest checkpoint in output_dir) | never | a checkpoint path", "auto")
    report_to: str = described("wandb (offline unless WANDB_MODE says otherwise) | tensorboard | none", "wandb")
    project: str = described("tracker project name", "thinkrl-coconut")
    run_name: str = described("tracker run name ('' = output_dir's name)", "")
    num_threads: int = described("torch CPU threads; 0 = torch's default", 0)
    progress: bool = described("show a progress bar (with the stage)", True)

    def __post_init__(self):
        check_choice("trainer.report_to", self.report_to, ("wandb", "tensorboard", "none"))
        for name in ("num_epochs", "batch_size", "eval_batch_size", "max_new_tokens", "keep_checkpoints"):
            check_positive(f"trainer.{name}", getattr(self, name))
        for name in ("max_steps", "eval_every_epochs", "save_every", "num_threads"):
            check_positive(f"trainer.{name}", getattr(self, name), allow_zero=True)


@dataclass
class CoconutEvalConfig:
    """`thinkrl coconut eval`."""

    checkpoint: str = described("checkpoint folder to evaluate; '' = the newest in trainer.output_dir", "")
    split: str = described("test | valid", "test")
    stage: int = described("latent stage to evaluate at; -1 = the stage of the last training epoch", -1)

    def __post_init__(self):
        check_choice("eval.split", self.split, ("test", "valid"))
        if self.stage < -1:
            raise ConfigError(f"eval.stage must be -1 (last training stage) or >= 0, got {self.stage}")


@dataclass
class CoconutConfig:
    """A whole Coconut run; every field has a default."""

    model: CoconutModelConfig = field(default_factory=CoconutModelConfig)
    data: CoconutDataConfig = field(default_factory=CoconutDataConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: CoconutTrainerConfig = field(default_factory=CoconutTrainerConfig)
    eval: CoconutEvalConfig = field(default_factory=CoconutEvalConfig)

    def __post_init__(self):
        if self.model.tokenizer == "synthetic" and self.data.source != "synthetic":
            raise ConfigError(
                "model.tokenizer=synthetic only knows the synthetic task's words; use auto, byte or a path"
            )
        if self.model.tokenizer == "auto" and self.model.path == "scratch":
            self.model.tokenizer = "synthetic" if self.data.source == "synthetic" else "byte"


def load_coconut_config(path=None, overrides=None) -> CoconutConfig:
    from thinkrl.config import load_config

    return load_config(path, overrides, schema_class=CoconutConfig)
