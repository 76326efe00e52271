"""Memory and compute plan of a recipe, before any model is built (``thinkrl plan``).

Pure arithmetic on the config and each weight group's architecture numbers (a HF ``config.json``, or the recipe's
``scratch`` sizes), so it works for hub models nobody has downloaded. Run:

    thinkrl plan --config configs/gsm8k/qwen2.5-0.5b_gpu.yaml --gpus 1 --gpu-memory 80 \
        --model-config A=configs/models/qwen2.5-0.5b.json

Symbols. Per weight group: d hidden size, a = heads·head_dim (attention width), kv = kv_heads·head_dim, f MLP width,
h heads, ℓ layers, V embedding rows (the checkpoint's vocabulary + the two thought markers; thinkrl unties the LM
head). b = bytes of the compute dtype (``model.dtype``; bf16 compute under ``--mixed-precision bf16``), w = bytes of
the stored weights (``model.dtype``). World size G = ``--gpus``. Shapes of one micro-batch on one process: N
positions (``trainer.batch_positions / G``), K thoughts (``rollout.num_thoughts``) of at most M tokens, context C
(``data.context_len``; the synthetic task's exact length), interpreter window W (``data.interpreter_window`` or C),
n true tokens (``data.n_ahead``); parallel passes (thoughts at every k-th token of text windows): B windows of
L = C + n tokens with P slots each.

Parameters (Llama/Mistral/Qwen2 layout): non-embedding N = ℓ·(d·a + 2·d·kv + a·d [+ a + 2·kv biases, Qwen2] +
3·d·f + 2·d) + d; total = N + 2·V·d (input embedding and untied LM head); LoRA adds r·(in + out) per adapted
projection and 2·d marker rows, and only those train. Mixing head: gate 2d + 1, mlp 2d·m + 2m + 1, concat
2d·m + m + m·d + d (m = ``head.hidden_size`` or d).

Held memory (per GPU):
  weights     total·w, ÷ G under ``trainer.sharding=fsdp2`` (else every process holds whole models)
  gradients   trainable·w (÷ G under fsdp2); frozen roles and LoRA's frozen base have none
  optimizer   AdamW's two moments, 2·trainable·w (÷ G under fsdp2)
  vLLM        ``rollout.vllm_gpu_memory_utilization`` × GPU memory (a colocated engine per process)
  gathered    fsdp2 only: the whole models in the compute dtype, total·b, held from the first forward of a step to
              after its backward (thinkrl shards with reshard_after_forward=False, see distributed/sharding.py)
  EMA         ``reward.baseline=ema``: a copy of the interpreter's weight group, total·w (÷ G under fsdp2, sharded
              like its model); its forward, gathered and freed before the scorer gathers the live models, adds no peak

Activations: bytes autograd keeps for the backward, counted tensor by tensor for a HF decoder layer (checked against
``torch.autograd.graph.saved_tensors_hooks``), per token and layer:
  RMSNorm       x in fp32, x·rsqrt and the output: 12·d (fp32) or (4 + 2b)·d (bf16/fp16), twice per layer
  MLP (SwiGLU)  gate, SiLU(gate), up and their product: 4·b·f
  attention     causal forward without a mask (a window read): q, k, v, output: b·(2a + 2kv) + 4h (log-sum-exp)
                masked forward (left-padded prefixes and their KV-cached continuations): transformers repeats k, v
                to all h heads, so q, output and o_proj's input b·3a + 4h, and k, v per *row*: rows·(prefix + S)·2a·b
                (the prefix's keys repeated for every continuation row, concatenated with the row's own)
                parallel passes (models/parallel_attention.py): q, k, v views b·(a + 2kv) plus the copies its
                matmuls and the fused call keep, b·7a + 2h·b', and the hand-made scores and probabilities
                h·(span + S)·(8 + b if b < 4) with span the window keys a slot chunk disagrees on (≤ 64)
  per forward   the final norm, (4 + b)·d + 4 bytes per token
  gradient checkpointing keeps only each layer's input, b·d per token and layer (and the KV caches the recompute
                reads), plus one layer of the largest call recomputed during the backward
Loss rows (lean losses, ``learner.lean_losses``): gathered target states and the mixing head, 6·d·b per scored row
(N·(K+1)·n rows) and d·b per policy row (N·K·M), plus one checkpointed chunk of logits at a time:
min(rows, 2^24 / V)·V·16 bytes. ``lean_losses=false`` keeps (rows, V) float32 log-distributions: rows·V·12.
Sampling (no grad): the KV cache of N·K rows of C + 1 + M tokens, 2·kv·ℓ·b each (parallel passes: the windows' cache
plus each slot's thought history), plus one layer's intermediates and the logits of a decoding step. None when the
thoughts are sampled inside the learning passes (``rollout.fused_passes``): those passes are the activations below.

A step's peak growth above what is held before it:
  max(sampling, activations + gradients of the LM heads and one layer (the first ones the backward writes) + chunk,
      gradients + optimizer moments (first step only) + AdamW's temporaries)
AdamW's temporaries: one trainable-sized buffer on CUDA (foreach), two of the largest tensor on CPU (per tensor).

FLOPs: the tokens of every forward the trainer runs (padding included, as ``run/compute.py`` counts them), turned into
FLOPs by ``compute.step_flops``: 2·N per forward token, 2·N + 2·N_trainable per backward token. Counts at maximum
lengths are a bound for variable-length thoughts and contexts; with fixed-length thoughts on text windows (the
Quiet-STaR preset) they are exactly what the trainer logs as ``compute/flops``.

The EMA reference's forward (no grad, once per micro-batch) reads each position's window and targets (or each text
window once) with the interpreter's weight group. Not counted: the CUDA context and allocator slack (``reserve``),
a reasoner template's tokens, a vLLM server's memory (``rollout.vllm_mode=server``), activation offloading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.config import ROLES, Config
from thinkrl.errors import ThinkRLError
from thinkrl.rl.null_row import needs_null_row
from thinkrl.run.compute import step_flops, training_flops

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 2**30
CHUNK_ELEMENTS = 1 << 24  # models/chunked_logps.py: the largest (rows × V) block of logits at a time
SPAN = 64  # models/parallel_attention.py: window keys a slot chunk may disagree on
SLOTS_PER_CALL = 64
LORA_SHAPES = {  # module → (in, out) in terms of d, a, kv, f
    "q_proj": ("d", "a"),
    "k_proj": ("d", "kv"),
    "v_proj": ("d", "kv"),
    "o_proj": ("a", "d"),
    "gate_proj": ("d", "f"),
    "up_proj": ("d", "f"),
    "down_proj": ("f", "d"),
}


class PlanError(ThinkRLError):
    """The plan cannot find a model's architecture numbers."""


# ------------------------------------------------------------------------------------------------ architectures
@dataclass(frozen=True)
class Arch:
    """Architecture numbers of one weight group's model."""

    source: str
    vocab: int  # embedding rows as thinkrl uses them (markers added)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    qkv_bias: bool = False

    @property
    def a(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def non_embedding(self) -> int:
        d, a, kv, f = self.hidden, self.a, self.kv, self.intermediate
        per_layer = d * a + 2 * d * kv + a * d + 3 * d * f + 2 * d + ((a + 2 * kv) if self.qkv_bias else 0)
        return self.layers * per_layer + d

    def total(self) -> int:
        return self.non_embedding() + 2 * self.vocab * self.hidden

    def lora(self, r: int, targets) -> int:
        dims = {"d": self.hidden, "a": self.a, "kv": self.kv, "f": self.intermediate}
        per_layer = sum(r * (dims[i] + dims[o]) for name, (i, o) in LORA_SHAPES.items() if name in targets)
        return self.layers * per_layer

    def largest_tensor(self) -> int:
        return max(self.vocab * self.hidden, self.hidden * self.intermediate, self.hidden * self.a)


def arch_from_config(config: dict, source: str, vocab_rows: int | None = None) -> Arch:
    """A HF ``config.json`` (Llama, Mistral, Qwen2/3, SmolLM2, ...) → ``Arch``; ``vocab_rows`` when the tokenizer is
    known, else the checkpoint's vocabulary + the two thought markers."""
    cfg = config.get("text_config") or config
    need = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if k not in cfg]
    if missing:
        raise PlanError(
            f"{source} lacks {', '.join(missing)}: thinkrl plan reads Llama-family config.json files (Llama, Mistral, "
            "Qwen2, SmolLM2); pass --model-config PATH with those fields"
        )
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    qkv_bias = bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2"))
    return Arch(
        source=source,
        vocab=max(int(cfg["vocab_size"]), vocab_rows or int(cfg["vocab_size"]) + 2),
        hidden=int(cfg["hidden_size"]),
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate=int(cfg["intermediate_size"]),
        qkv_bias=qkv_bias,
    )


def scratch_arch(spec, vocab: int) -> Arch:
    s = spec.scratch
    return Arch(
        "scratch",
        vocab,
        s.hidden_size,
        s.num_layers,
        s.num_heads,
        s.num_heads,
        s.hidden_size // s.num_heads,
        s.intermediate_size,
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PlanError(f"cannot read {what} {path} ({type(exc).__name__})") from None


def hub_config(repo_id: str) -> dict:
    """Only ``config.json`` of a hub model: downloaded, or from the local HF cache offline."""
    try:
        from huggingface_hub import hf_hub_download

        return _read_json(Path(hf_hub_download(repo_id, "config.json")), "config.json of")
    except PlanError:
        raise
    except Exception:
        raise PlanError(
            f"no config.json for {repo_id!r}: the hub cannot be reached and it is not cached; pass a local folder or "
            f"--model-config PATH (configs/models/ has some)"
        ) from None


def model_config_of(path: str) -> tuple[dict, str]:
    """(config.json contents, where they came from) for ``model.*.path``: a local folder, the SmolLM2 alias (its
    converted folder, else the stored numbers in configs/models/), or a hub id."""
    from thinkrl.models.smollm2 import FOLDER_NAME, SMOLLM2_ALIAS, default_cache_dir

    if path == SMOLLM2_ALIAS:
        built = default_cache_dir() / FOLDER_NAME / "config.json"
        stored = Path(__file__).resolve().parents[2] / "configs" / "models" / "smollm2-135m-instruct.json"
        source = built if built.is_file() else stored
        return _read_json(source, "model config"), str(source)
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_json(local / "config.json", "model config"), str(local / "config.json")
    if local.suffix == ".json" and local.is_file():
        return _read_json(local, "model config"), str(local)
    if "/" not in path or path.startswith((".", "/", "~")):
        raise PlanError(f"model {path!r} is not a local folder; give an existing HF folder or a hub id")
    return hub_config(path), f"hub:{path}"


def _tokenizer_rows(cfg: Config) -> int | None:
    """Vocabulary with the markers when the tokenizer is built without files (synthetic, byte), else None."""
    if cfg.model.tokenizer in ("synthetic", "byte"):
        from thinkrl.models.roles import build_tokenizer

        return len(build_tokenizer(cfg))
    return None


def resolve_archs(cfg: Config, model_configs: dict[str, str] | None = None) -> dict[str, Arch]:
    """Every weight group's ``Arch``. ``model_configs`` maps a group letter (or '*' for all) to a config.json file
    that replaces the group's own source (for hub models offline: configs/models/)."""
    model_configs = model_configs or {}
    rows = _tokenizer_rows(cfg)
    archs = {}
    for group in dict.fromkeys(cfg.model.weight_groups):
        spec = cfg.model.spec(group)
        override = model_configs.get(group) or model_configs.get("*")
        if override:
            archs[group] = arch_from_config(_read_json(Path(override), "--model-config"), override, rows)
        elif spec.path == "scratch":
            archs[group] = scratch_arch(spec, rows or 0)
        else:
            config, source = model_config_of(spec.path)
            archs[group] = arch_from_config(config, source, rows)
    return archs


# ------------------------------------------------------------------------------------------------ step shapes
@dataclass
class Shapes:
    """One micro-batch on one process, at the recipe's maximum lengths unless told the batch's real ones."""

    positions: int  # N (per-position path) or B·P valid slots (parallel)
    thoughts: int  # K
    thought_len: int  # M: longest thought in the batch
    context: int  # C: longest context in the batch
    window: int  # W: longest interpreter window
    n_ahead: int
    null_len: int  # the null thought's tokens with its markers
    windows: int = 0  # B (parallel passes)
    window_len: int = 0  # L
    slots: int = 0  # P
    span: float = 0.0  # mean window keys a slot chunk disagrees on
    rollout_chunk: int = 0  # positions sampled together


def slots_of(cfg: Config, window_len: int) -> list[int]:
    """Context lengths of the thought slots of a full text window (data/positions.py ``text_pool``)."""
    valid = range(2, window_len - cfg.data.n_ahead + 1)
    if cfg.data.positions == "every_k":
        k = cfg.data.every_k
        chosen = [t for t in valid if t % k == 0] if len(valid) >= k else list(valid)[-1:]
        return chosen
    return list(valid)[:: max(1, len(valid) // cfg.data.positions_per_doc)][: cfg.data.positions_per_doc]


def chunk_span(slot_len: list[int]) -> float:
    """Mean over slots of the window keys their chunk disagrees on (``parallel_attention.chunk_plan``'s rule)."""
    total, p0 = 0, 0
    while p0 < len(slot_len):
        p1, lo, hi = p0 + 1, slot_len[p0], slot_len[p0]
        while p1 < len(slot_len) and p1 - p0 < SLOTS_PER_CALL and max(hi, slot_len[p1]) - lo <= SPAN:
            hi, p1 = max(hi, slot_len[p1]), p1 + 1
        total += (p1 - p0) * (hi - lo)
        p0 = p1
    return total / max(1, len(slot_len))


def null_tokens(cfg: Config) -> int:
    """The null thought's length with its markers: 2 for ``<sot><eot>``, else a bound (a token has >= 1 character)."""
    if not cfg.rollout.null_thought:
        return 2
    from thinkrl.prompts import load_prompt

    return 2 + len(load_prompt(cfg.rollout.null_thought))


def context_bound(cfg: Config) -> tuple[int, int]:
    """(longest context, true tokens) the data source can give: the synthetic task's exact length, else the
    recipe's ``data.context_len`` and ``data.n_ahead``."""
    d = cfg.data
    if d.source == "synthetic":
        s = d.synthetic
        return min(d.context_len, 7 + s.key_len + s.noise_len), s.key_len
    return d.context_len, d.n_ahead


def step_shapes(cfg: Config, world: int, context: int | None = None, thought_len: int | None = None) -> Shapes:
    """The shapes of one micro-batch on one process; ``context``/``thought_len``: the batch's real longest ones."""
    max_context, n = context_bound(cfg)
    c = min(context or max_context, max_context) if context else max_context
    m = thought_len if thought_len is not None else cfg.rollout.max_thought_len
    k = cfg.rollout.num_thoughts
    window = min(cfg.data.interpreter_window or c, c)
    if cfg.parallel_passes():
        length = cfg.data.context_len + cfg.data.n_ahead
        slots = slots_of(cfg, length)
        batch_windows = max(1, cfg.trainer.batch_positions // len(slots))
        b = max(1, batch_windows // world)
        return Shapes(
            b * len(slots),
            k,
            m,
            length - n,
            window,
            n,
            null_tokens(cfg),
            b,
            length,
            len(slots),
            chunk_span(slots),
            b * len(slots),
        )
    per_process = max(1, cfg.trainer.batch_positions // world)
    return Shapes(
        per_process, k, m, c, window, n, null_tokens(cfg), rollout_chunk=min(per_process, cfg.rollout.batch_positions)
    )


# ------------------------------------------------------------------------------------------------ forwards
@dataclass
class Forward:
    """One model call of a training step: its token slots and the shapes its activations depend on."""

    group: str
    phase: str  # rollout | score_and_loss
    tokens: int
    grad: bool = False
    kind: str = "causal"  # causal (no mask) | masked (padded prefix or KV-cached continuation) | passes
    rows: int = 0  # continuation rows reading a cached prefix (masked) ...
    prefix: int = 0  # ... of this many tokens
    seq: int = 0  # tokens per row (continuations; S of a pass)
    span: float = 0.0  # passes: window keys a chunk disagrees on
    keeps_kv: int = 0  # gradient checkpointing: cached keys/values (token slots) the recompute reads
    per_update: bool = True  # run again for each of learner.updates_per_rollout (the EMA reference's is not)


def step_forwards(cfg: Config, shapes: Shapes, trainable: dict[str, bool]) -> list[Forward]:
    """Every forward of one micro-batch, in the trainer's order (run/trainer.py ``step``), one process."""
    role = dict(zip(ROLES, cfg.model.weight_groups))
    rg, ig, bg = role["reasoner"], role["interpreter"], role["base"]
    s = shapes
    k, m, n = s.thoughts, s.thought_len, s.n_ahead
    out: list[Forward] = []
    lm = cfg.learner.objective == "lm"
    policy = k > 0 and (cfg.learner.policy_weight > 0 or cfg.learner.entropy_coef > 0) and not lm
    if s.windows:  # parallel passes over whole windows
        b, length, p = s.windows, s.window_len, s.slots
        if lm:
            for g in dict.fromkeys(g for g in (bg, ig) if trainable[g]):
                out.append(Forward(g, "score_and_loss", b * length, True))
            return out
        read = {}
        fused = k and cfg.fused_sampling()
        if fused:  # the learning passes sample (window_scoring.sample_in_passes): one read, one token per pass,
            # then the n + 1 tokens after the last sample in one pass (one each with checkpointed layers)
            read[ig] = Forward(ig, "rollout", b * length, trainable[ig])
            out.append(read[ig])
            tail = [1] * (n + 1) if cfg.model.spec(ig).gradient_checkpointing else [n + 1]
            out += [
                Forward(ig, "rollout", b * k * p * w, trainable[ig], "passes", seq=w, span=s.span, keeps_kv=b * length)
                for w in [1] * m + tail
            ]
        elif k and cfg.rollout.backend == "hf":
            out.append(Forward(rg, "rollout", b * length))
            out += [Forward(rg, "rollout", b * k * p, kind="passes", seq=1) for _ in range(m)]
        elif k:
            out.append(Forward(rg, "rollout", s.positions * (s.context + 1) + s.positions * k * (m + 1)))

        def read_of(group):
            if group not in read:
                read[group] = Forward(group, "score_and_loss", b * length, trainable[group])
                out.append(read[group])

        if cfg.data.interpreter_window:  # per-position scores (window_scoring.py): see the branch below
            out += _position_scores(cfg, s, ig, bg, trainable)
        else:
            read_of(ig)
            if k and not fused:  # fused: the thought rows are the sampling passes above
                width = m + 1 + n
                out.append(
                    Forward(
                        ig,
                        "score_and_loss",
                        b * k * p * width,
                        trainable[ig],
                        "passes",
                        seq=width,
                        span=s.span,
                        keeps_kv=b * length,
                    )
                )
            if needs_null_row(cfg, k):
                width = s.null_len + n - 1
                out.append(
                    Forward(
                        ig,
                        "score_and_loss",
                        b * p * width,
                        trainable[ig],
                        "passes",
                        seq=width,
                        span=s.span,
                        keeps_kv=b * length,
                    )
                )
            if bg != ig:
                read_of(bg)
        out += _ema_forwards(cfg, s, ig)
        if policy and not (rg == ig and not cfg.data.interpreter_window):
            read_of(rg)
            out.append(
                Forward(
                    rg,
                    "score_and_loss",
                    b * k * p * m,
                    trainable[rg],
                    "passes",
                    seq=m,
                    span=s.span,
                    keeps_kv=b * length,
                )
            )
        return out

    npos, c = s.positions, s.context
    if lm:
        for g in dict.fromkeys(g for g in (bg, ig) if trainable[g]):
            out.append(Forward(g, "score_and_loss", npos * (s.window - 1), True, "masked"))
            out.append(
                Forward(
                    g,
                    "score_and_loss",
                    npos * n,
                    True,
                    "masked",
                    npos,
                    s.window - 1,
                    n,
                    keeps_kv=npos * (s.window - 1),
                )
            )
        return out
    if k and cfg.rollout.backend == "hf":
        chunk = s.rollout_chunk or npos
        for start in range(0, npos, chunk):
            rows = min(chunk, npos - start)
            out.append(Forward(rg, "rollout", rows * (c + 1), kind="masked"))
            out += [Forward(rg, "rollout", rows * k, kind="masked") for _ in range(m - 1)]
    elif k:  # a vLLM engine's prompt and generated tokens, at most
        out.append(Forward(rg, "rollout", npos * (c + 1) + npos * k * (m + 1)))
    out += _ema_forwards(cfg, s, ig)
    out += _position_scores(cfg, s, ig, bg, trainable)
    if policy:
        out.append(Forward(rg, "score_and_loss", npos * (c - 1), trainable[rg], "masked"))
        rows = npos * k
        out.append(
            Forward(
                rg,
                "score_and_loss",
                rows * (m + 2),
                trainable[rg],
                "masked",
                rows,
                c - 1,
                m + 2,
                keeps_kv=rows * (c - 1),
            )
        )
    return out


def _ema_forwards(cfg: Config, s: Shapes, ig: str) -> list[Forward]:
    """``reward.baseline=ema``: the EMA copy of the interpreter reads, with no grad, each text window once (parallel
    passes seeing the whole window) or each position's window then its targets (``Trainer._target_logps``)."""
    if cfg.reward.baseline != "ema":
        return []
    if s.windows and not cfg.data.interpreter_window:
        return [Forward(ig, "score_and_loss", s.windows * s.window_len, per_update=False)]
    npos, w, n = s.positions, s.window, s.n_ahead
    return [
        Forward(ig, "score_and_loss", npos * (w - 1), kind="masked", per_update=False),
        Forward(ig, "score_and_loss", npos * n, kind="masked", rows=npos, prefix=w - 1, seq=n, per_update=False),
    ]


def _position_scores(cfg: Config, s: Shapes, ig: str, bg: str, trainable: dict[str, bool]) -> list[Forward]:
    """The scorer's forwards (rl/scoring.py ``_states``): the window once, then K thoughts + null (when the loss needs
    it, ``rl.null_row``) (+ base) rows."""
    npos, w, n, k, m = s.positions, s.window, s.n_ahead, s.thoughts, s.thought_len
    shared = bg == ig
    null = needs_null_row(cfg, k)
    rows = npos * (k + int(null) + (1 if shared else 0))
    width = 1 + max(m + 2 if k else 0, s.null_len if null else 0) + n - 1
    out = [
        Forward(ig, "score_and_loss", npos * (w - 1), trainable[ig], "masked"),
        Forward(
            ig, "score_and_loss", rows * width, trainable[ig], "masked", rows, w - 1, width, keeps_kv=rows * (w - 1)
        ),
    ]
    if not shared:
        out.append(Forward(bg, "score_and_loss", npos * (w - 1), trainable[bg], "masked"))
        out.append(
            Forward(bg, "score_and_loss", npos * n, trainable[bg], "masked", npos, w - 1, n, keeps_kv=npos * (w - 1))
        )
    return out


# ------------------------------------------------------------------------------------------------ bytes
def norm_bytes(d: int, b: int) -> int:
    """One RMSNorm under grad: x in fp32, x·rsqrt(var) and the output (12·d in fp32; (4 + 2b)·d in 16 bits)."""
    return (12 if b == 4 else 4 + 2 * b) * d + 4


def layer_bytes(arch: Arch, b: int, f: Forward) -> float:
    """Bytes one decoder layer keeps for the backward, for the whole forward ``f`` (see the module docstring)."""
    d, a, kv, h = arch.hidden, arch.a, arch.kv, arch.heads
    per_token = 2 * norm_bytes(d, b) + 4 * b * arch.intermediate
    if f.kind == "causal":
        return f.tokens * (per_token + b * (2 * a + 2 * kv) + 4 * h)
    if f.kind == "masked":
        total = f.tokens * (per_token + b * 3 * a + 4 * h)
        # keys and values repeated to all heads: per token without a cached prefix, per row with one
        kv_slots = f.rows * (f.prefix + f.seq) if f.rows else f.tokens
        return total + kv_slots * 2 * a * b
    wide = 4 if b < 4 else b  # the fused call runs in float32 for 16-bit models
    scores = h * (f.span + f.seq) * (8 + (b if b < 4 else 0))
    return f.tokens * (per_token + b * (a + 2 * kv) + b * 5 * a + wide * 2 * (a + h) + 8 * h + scores)


def checkpointed_layer_bytes(arch: Arch, b: int, f: Forward) -> float:
    """Gradient checkpointing: the layer's input per token, and the cached keys/values its recompute reads."""
    return f.tokens * b * arch.hidden + f.keeps_kv * 2 * arch.kv * b


def forward_bytes(arch: Arch, b: int, f: Forward) -> float:
    """Bytes kept per forward besides its layers: the final norm's input and product, and the token ids."""
    return f.tokens * ((4 + b) * arch.hidden + 4 + 8)


def sampling_bytes(cfg: Config, arch: Arch, b: int, shapes: Shapes) -> float:
    """Peak of the no-grad sampling phase (HF backend): the KV cache of every thought row at full length, one layer's
    intermediates of the prefill, and one decoding step's logits."""
    s = shapes
    k, m = s.thoughts, s.thought_len
    if not k or cfg.rollout.backend != "hf":
        return 0.0
    kv_token = 2 * arch.kv * arch.layers * b
    if s.windows:
        tokens = s.windows * s.window_len
        rows = s.windows * k * s.slots
        cache = tokens * kv_token + rows * m * kv_token
        prefill = tokens * (arch.layers + 1) * arch.hidden * b  # output_hidden_states of the window read
        return cache + prefill + rows * arch.vocab * (b + 16)
    chunk = s.rollout_chunk or s.positions
    cache = chunk * k * (s.context + 1 + m) * kv_token
    prefill = chunk * (s.context + 1) * b * (2 * arch.hidden + 4 * arch.a + 3 * arch.intermediate)
    return cache + max(prefill, chunk * k * arch.vocab * (b + 16))


def head_params(form: str, d: int, hidden: int) -> int:
    m = hidden or d
    return {"none": 0, "gate": 2 * d + 1, "mlp": 2 * d * m + m + m + 1, "concat": 2 * d * m + m + m * d + d}[form]


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Per-GPU bytes by component, per-step tokens and FLOPs, and whether it fits."""

    recipe: str
    gpus: int
    gpu_memory: float  # bytes
    sharding: str
    dtype: str
    compute_dtype: str
    groups: dict  # group → {roles, source, params, non_embedding, trainable, layers, hidden, vocab}
    shapes: dict
    memory: dict  # component → bytes per GPU
    phases: dict  # phase → bytes of the step's transient memory at that moment
    activations: dict  # with/without gradient checkpointing: {"as configured", "checkpointing", "no checkpointing"}
    tokens: dict  # {group: {phase: tokens}}, one optimizer step, all processes
    backward_tokens: dict
    flops: dict  # {phase: FLOPs}
    flops_step: int
    step1_growth: float
    step2_growth: float
    total: float
    fits: bool
    knobs: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items()}


def plan(
    cfg: Config,
    archs: dict[str, Arch],
    gpus: int = 1,
    gpu_memory_gb: float = 80.0,
    mixed_precision: str = "no",
    device: str = "cuda",
    reserve_gb: float | None = None,
    context: int | None = None,
    thought_len: int | None = None,
    recipe: str = "",
    knobs: bool = True,
) -> Plan:
    """The plan of ``cfg`` on ``gpus`` processes of ``gpu_memory_gb`` each (see the module docstring).
    ``context``/``thought_len``: a batch's real longest lengths instead of the recipe's maxima."""
    if gpus < 1:
        raise ThinkRLError("--gpus must be >= 1")
    world = gpus
    w = DTYPE_BYTES[cfg.model.dtype]
    b = 2 if mixed_precision == "bf16" else w
    sharded = cfg.trainer.sharding in ("fsdp2", "hsdp")  # hsdp shards over one machine's GPUs
    shard = world if sharded else 1
    role = dict(zip(ROLES, cfg.model.weight_groups))
    frozen_groups = {role[r] for r in cfg.model.freeze if r in role}
    shapes = step_shapes(cfg, world, context, thought_len)

    groups, trainable_any = {}, {}
    for g, arch in archs.items():
        spec = cfg.model.spec(g)
        lora = arch.lora(spec.lora.r, spec.lora.target_modules) + 2 * arch.hidden if spec.lora.r > 0 else 0
        total = arch.total() + lora
        non_embedding = arch.non_embedding() + (lora - 2 * arch.hidden if lora else 0)
        if g in frozen_groups:
            trainable = 0
        elif lora:
            trainable = lora
        else:
            trainable = total
        trainable_any[g] = trainable > 0
        groups[g] = {
            "roles": [r for r in ROLES if role[r] == g],
            "source": arch.source,
            "params": total,
            "non_embedding": non_embedding,
            "trainable": trainable,
            "trainable_non_embedding": 0 if not trainable else (non_embedding if not lora else lora - 2 * arch.hidden),
            "layers": arch.layers,
            "hidden": arch.hidden,
            "vocab": arch.vocab,
            "gradient_checkpointing": cfg.model.spec(g).gradient_checkpointing,
        }
    interp = archs[role["interpreter"]]
    head = head_params(cfg.head.form, interp.hidden, cfg.head.hidden_size)
    head_trainable = 0 if "head" in cfg.model.freeze else head
    params = sum(v["params"] for v in groups.values()) + head
    trainable = sum(v["trainable"] for v in groups.values()) + head_trainable

    # ---- tokens and FLOPs of one optimizer step, summed over processes (compute.py's accounting)
    forwards = step_forwards(cfg, shapes, trainable_any)
    repeat = cfg.learner.grad_accum_steps * world
    tokens: dict[str, dict[str, int]] = {}
    backward: dict[str, int] = {}
    updates = cfg.learner.updates_per_rollout
    for f in forwards:
        times = repeat * (updates if f.phase == "score_and_loss" and f.per_update else 1)
        tokens.setdefault(f.group, {}).setdefault(f.phase, 0)
        tokens[f.group][f.phase] += f.tokens * times
        if f.grad:
            backward[f.group] = backward.get(f.group, 0) + f.tokens * times
    sizes = {g: {"params": v["non_embedding"], "trainable": v["trainable_non_embedding"]} for g, v in groups.items()}
    flops = step_flops(tokens, backward, sizes)

    # ---- activations of one micro-batch (the backward of one micro-batch runs before the next forward)
    def activations(checkpointing: bool | None) -> tuple[float, float]:
        """(kept for the backward, transient of the backward: one layer recomputed under checkpointing)."""
        kept, recompute = 0.0, 0.0
        for f in forwards:
            if not f.grad:
                continue
            arch = archs[f.group]
            gc = cfg.model.spec(f.group).gradient_checkpointing if checkpointing is None else checkpointing
            kept += forward_bytes(arch, b, f)
            if gc:
                kept += arch.layers * checkpointed_layer_bytes(arch, b, f)
                recompute = max(recompute, layer_bytes(arch, b, f))
            else:
                kept += arch.layers * layer_bytes(arch, b, f)
        return kept, recompute

    s = shapes
    score_rows = s.positions * (s.thoughts + 1) * s.n_ahead if cfg.learner.objective == "thoughts" else 0
    base_rows = s.positions * s.n_ahead
    policy_rows = s.positions * s.thoughts * s.thought_len
    d, vocab = interp.hidden, interp.vocab
    if cfg.learner.lean_losses:
        loss_rows = (6 * d * (score_rows + base_rows) + d * policy_rows) * b
        biggest = max(score_rows, base_rows, policy_rows)
        chunk = min(biggest, max(1, CHUNK_ELEMENTS // vocab)) * vocab * 16
    else:
        loss_rows = (score_rows + base_rows + policy_rows) * vocab * 12 + (score_rows + policy_rows) * d * b
        chunk = 0
    kept, recompute = activations(None)
    act = kept + loss_rows
    with_gc = sum(activations(True)) + loss_rows
    without_gc = sum(activations(False)) + loss_rows
    # gradients the backward writes first: each trainable model's LM head (untied) and one layer (all of a LoRA
    # model's adapters), and the mixing head's
    top_grads = head_trainable * w
    for g, v in groups.items():
        arch = archs[g]
        if v["trainable"] == v["params"]:
            top_grads += (arch.vocab * arch.hidden + arch.non_embedding() // max(1, arch.layers)) * w
        else:
            top_grads += v["trainable"] * w
    top_grads /= shard
    grads = trainable * w / shard
    moments = 2 * trainable * w / shard
    if device == "cuda":
        adam_temp = trainable * w / shard
    else:
        adam_temp = 2 * max(a.largest_tensor() for a in archs.values()) * w
    gathered = params * b if sharded else 0.0
    # Sampled inside the learning passes (rollout.fused_passes): no no-grad phase of its own; the window's keys are
    # the learning read's and the sampled rows' states are the activations counted below.
    sampling = 0.0 if cfg.fused_sampling() else sampling_bytes(cfg, archs[role["reasoner"]], b, s)
    backward_peak = act + recompute + min(top_grads, grads) + chunk
    phases = {
        "rollout": sampling,
        "score_and_loss + backward": backward_peak,
        "optimizer (first step)": grads + moments + adam_temp,
        "optimizer (later steps)": grads + adam_temp,
    }
    step1 = gathered + max(sampling, backward_peak, grads + moments + adam_temp)
    step2 = gathered + max(sampling, backward_peak, grads + adam_temp)
    vllm = 0.0
    notes = []
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm_mode == "colocate" and device == "cuda":
        vllm = cfg.rollout.vllm_gpu_memory_utilization * gpu_memory_gb * GiB
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm_mode == "server":
        notes.append("rollout.vllm_mode=server: the engines' memory is on their own GPUs, not counted here")
    if reserve_gb is None:
        reserve_gb = 1.0 if device == "cuda" else 0.0
    weights = params * w / shard
    ema = 0.0
    if cfg.reward.baseline == "ema" and cfg.learner.objective == "thoughts":
        ema = groups[role["interpreter"]]["params"] * w / shard
    memory = {
        "weights": weights,
        "ema reference": ema,
        "gradients": grads,
        "optimizer": moments,
        "activations": act + recompute + chunk,
        "sampling": sampling,
        "fsdp2 gathered weights": gathered,
        "vllm engine": vllm,
        "reserve": reserve_gb * GiB,
    }
    # Held: weights and moments; the step adds its growth (gradients, activations or the optimizer's peak) on top.
    total = weights + ema + moments + step2 + vllm + reserve_gb * GiB
    total = max(total, weights + ema + step1 + vllm + reserve_gb * GiB)
    gpu_memory = gpu_memory_gb * GiB
    result = Plan(
        recipe=recipe,
        gpus=gpus,
        gpu_memory=gpu_memory,
        sharding=cfg.trainer.sharding,
        dtype=cfg.model.dtype,
        compute_dtype="bfloat16" if b == 2 and mixed_precision == "bf16" else cfg.model.dtype,
        groups={**groups, "head": {"form": cfg.head.form, "params": head, "trainable": head_trainable}},
        shapes=vars(shapes),
        memory=memory,
        phases=phases,
        activations={"as configured": act + recompute, "checkpointing": with_gc, "no checkpointing": without_gc},
        tokens=tokens,
        backward_tokens=backward,
        flops={k: int(v) for k, v in flops.items()},
        flops_step=int(training_flops(flops)),
        step1_growth=step1,
        step2_growth=step2,
        total=total,
        fits=total <= gpu_memory,
        notes=notes,
    )
    if knobs and not result.fits:
        result.knobs = suggest_knobs(cfg, archs, result, gpus, gpu_memory_gb, mixed_precision, device, reserve_gb)
    return result


def _with(cfg: Config, **changes) -> Config:
    """A copy of ``cfg`` with dotted changes (no validation needed: each is a legal value)."""
    import copy

    new = copy.deepcopy(cfg)
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        obj = new
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, last, value)
    return new


def suggest_knobs(cfg, archs, current: Plan, gpus, gpu_memory_gb, mixed_precision, device, reserve_gb) -> list:
    """The first knobs to turn, each with the total it gives (re-planned), best first."""
    candidates = []
    specs = [cfg.model.default, *cfg.model.groups.values()]
    if not all(s.gradient_checkpointing for s in specs):
        new = _with(cfg)
        for s in [new.model.default, *new.model.groups.values()]:
            s.gradient_checkpointing = True
        candidates.append(("model.default.gradient_checkpointing=true", new, gpus))
    if cfg.trainer.sharding == "none" and gpus > 1:
        candidates.append(("trainer.sharding=fsdp2", _with(cfg, trainer__sharding="fsdp2"), gpus))
    if cfg.trainer.batch_positions > 1:
        half = max(1, cfg.trainer.batch_positions // 2)
        new = _with(cfg, trainer__batch_positions=half)
        new.learner.grad_accum_steps = cfg.learner.grad_accum_steps * 2
        candidates.append(
            (f"trainer.batch_positions={half} learner.grad_accum_steps={cfg.learner.grad_accum_steps * 2}", new, gpus)
        )
    if cfg.rollout.backend == "vllm" and cfg.rollout.vllm_mode == "colocate":
        util = round(cfg.rollout.vllm_gpu_memory_utilization / 2, 3)
        candidates.append(
            (
                f"rollout.vllm_gpu_memory_utilization={util}",
                _with(cfg, rollout__vllm_gpu_memory_utilization=util),
                gpus,
            )
        )
    if cfg.model.dtype == "float32":
        candidates.append(("model.dtype=bfloat16", _with(cfg, model__dtype="bfloat16"), gpus))
    if cfg.model.default.lora.r == 0:
        new = _with(cfg)
        new.model.default.lora.r = 16
        candidates.append(("model.default.lora.r=16", new, gpus))
    if cfg.trainer.sharding == "fsdp2" or gpus > 1:
        candidates.append((f"--gpus {gpus * 2}", cfg, gpus * 2))
    out = []
    for change, new, n in candidates:
        p = plan(new, archs, n, gpu_memory_gb, mixed_precision, device, reserve_gb, knobs=False)
        if p.total < current.total:
            out.append({"change": change, "total": p.total, "fits": p.fits})
    out.sort(key=lambda k: k["total"])
    return out[:4]


# ------------------------------------------------------------------------------------------------ report
def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def fmt_flops(n: float) -> str:
    exp = int(math.floor(math.log10(n))) if n > 0 else 0
    return f"{n / 10**exp:.3f}e{exp}" if n else "0"


def report(p: Plan) -> str:
    """The plan as a readable table."""
    lines = [
        f"plan: {p.recipe or 'recipe'} on {p.gpus} GPU(s) of {p.gpu_memory / GiB:.0f} GiB, sharding {p.sharding}, "
        f"weights {p.dtype}, compute {p.compute_dtype}",
    ]
    for g, v in p.groups.items():
        if g == "head":
            lines.append(f"  head   {v['form']}: {v['params']:,} parameters ({v['trainable']:,} trainable)")
            continue
        lines.append(
            f"  group {g} ({'/'.join(v['roles'])}): {v['params'] / 1e6:,.1f}M parameters "
            f"({v['non_embedding'] / 1e6:,.1f}M non-embedding, {v['trainable'] / 1e6:,.1f}M trainable), "
            f"{v['layers']} layers × {v['hidden']}, vocabulary {v['vocab']:,}  [{v['source']}]"
        )
    s = p.shapes
    if s["windows"]:
        shape = (
            f"{s['windows']} windows × {s['window_len']} tokens, {s['slots']} thought slots each, "
            f"K={s['thoughts']} thoughts of {s['thought_len']}, n={s['n_ahead']}"
        )
    else:
        shape = (
            f"{s['positions']} positions, context ≤ {s['context']}, interpreter window {s['window']}, "
            f"K={s['thoughts']} thoughts of ≤ {s['thought_len']}, n={s['n_ahead']}"
        )
    lines.append(f"micro-batch per GPU: {shape}")
    lines.append("")
    lines.append("per-GPU memory")
    for name, value in p.memory.items():
        if value:
            lines.append(f"  {name:<24} {fmt_bytes(value):>12}")
    lines.append(f"  {'total (peak)':<24} {fmt_bytes(p.total):>12}   of {fmt_bytes(p.gpu_memory)}")
    lines.append("  activations: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.activations.items()))
    lines.append("  step growth by phase: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in p.phases.items()))
    lines.append(
        f"  step peak growth: first step {fmt_bytes(p.step1_growth)}, later steps {fmt_bytes(p.step2_growth)}"
    )
    lines.append("")
    lines.append("per optimizer step (all GPUs; compute/flops as the trainer logs it)")
    for g, by_phase in p.tokens.items():
        parts = ", ".join(f"{ph} {n:,}" for ph, n in by_phase.items())
        back = p.backward_tokens.get(g, 0)
        lines.append(f"  tokens {g}: {parts}; backward {back:,}")
    lines.append(
        "  FLOPs: "
        + ", ".join(f"{ph} {fmt_flops(v)}" for ph, v in p.flops.items())
        + f"; training total {fmt_flops(p.flops_step)}"
    )
    lines.append("")
    verdict = "FITS" if p.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: {fmt_bytes(p.total)} of {fmt_bytes(p.gpu_memory)} per GPU")
    for k in p.knobs:
        lines.append(f"  try {k['change']}: {fmt_bytes(k['total'])}{' (fits)' if k['fits'] else ''}")
    for note in p.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def parse_model_configs(items: list[str]) -> dict[str, str]:
    """``--model-config PATH`` (every group) or ``GROUP=PATH`` → {group or '*': path}."""
    out = {}
    for item in items or []:
        group, sep, path = item.partition("=")
        if sep and len(group) <= 3 and os.sep not in group:
            out[group] = path
        else:
            out["*"] = item
        target = Path(out.get(group if sep else "*", item))
        if not target.is_file():
            raise PlanError(f"--model-config {item}: {target} is not a file (a config.json, e.g. configs/models/)")
    return out
