"""Time the OFFICIAL Quiet-STaR code's training step (forward + backward), to compare with thinkrl's own step.

What is timed
-------------
Their ``MistralForCausalLM`` (``modeling_mistral.py`` + ``configuration_mistral.py`` of ezelikman/quiet-star, used
UNMODIFIED: the driver only imports them) in training mode, configured as their ``quiet-star-train.py`` configures it,
with a scratch (randomly initialised) config instead of Mistral-7B weights. One timed step is

    model.zero_grad(set_to_none=True); torch.manual_seed(step_seed)
    out = model(input_ids=X, attention_mask=ones, labels=X)       # their forward: a thought at every token
    out.loss.backward()

with X = ``--batch`` windows of ``--seq`` random byte-token ids (their ``preprocess_function`` gives input_ids,
a 2-D attention_mask of ones and labels = input_ids). Their forward repeats every window ``n_passes`` times
(``repeat_interleave``), then runs n_ahead + n_ahead_talk - 1 model calls over all positions at once, each call
appending one token to every position's thought through their dense (rows, 1, L, L*(k+1)) mask and the KV cache:
the text, <|startthought|>, n_ahead - 3 Gumbel-sampled thought tokens, <|endthought|>, then n_ahead_talk - 1 true
tokens; their loss = 0.5 * NLL(no thought) + 0.5 * mean talk NLL + 1e6 * REINFORCE policy loss (their defaults).
No optimizer step is timed (the same as thinkrl's scripts/bench_every_token.py).

Thought length: their ``n_ahead`` counts the base position too. With start/end markers their code samples
n_ahead - 3 thought tokens (checked at run time: see ``call_trace`` in the JSON), so ``--n-ahead-thought m``
(sampled tokens, thinkrl's ``rollout.max_thought_len``) maps to n_ahead = m + 3 (m + 2 markers + the base position);
``--n-ahead N`` sets their n_ahead directly instead. Defaults: m = 6 (n_ahead 9), n_ahead_talk 2, n_passes 2.

Reference ("plain"): a stock transformers 4.37.2 ``MistralForCausalLM`` of the same size over the same rows
(batch * n_passes rows of seq tokens, labels = input_ids), forward + backward: what training without thoughts costs.

Every time is the median of ``--repeats`` timed steps after one warm-up step. Each of the two measurements runs in
its own fresh child process (the driver re-runs itself with ``--part``), so each peak RSS is that measurement's own:
  peak_rss_mb       ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child at its end (model build + warm-up +
                    timed steps; includes the ~imports)
  rss_before_mb     VmRSS after building the model, before the warm-up step
  step_peak_mb      peak growth over the warm-up step: VmHWM after it (the mark reset just before it with
                    ``echo 5 > /proc/self/clear_refs``) minus rss_before_mb; null where clear_refs is not writable

How to run (the venv is separate from the project's .venv: their code needs transformers 4.37.2)
-----------------------------------------------------------------------------------------------
    # GIT_DIR: a git dir of github.com/ezelikman/quiet-star (e.g. what the search tool's fetch returns)
    bash scripts/quiet_star_official_venv.sh GIT_DIR /work/qs_venv /work/qs_official
    OMP_NUM_THREADS=1 /work/qs_venv/bin/python scripts/bench_quiet_star_official.py \\
        --quiet-star-dir /work/qs_official/quiet_star_model --size tiny --seq 256 --batch 2 --threads 1 \\
        --repeats 3 --json /tmp/qs_official_tiny.json

The venv script exports their two model files unmodified with ``git show HEAD:<file>`` and writes the commit sha
to ``<dir>/COMMIT``; the JSON records the sha and the git blob ids of the two files as imported (compare them with
``git ls-tree HEAD`` to confirm they are unmodified).

How their files are loaded without editing them: they use package-relative imports (``from ...modeling_utils``),
so the driver registers a module ``transformers.models.quiet_star_official`` whose ``__path__`` is their folder and
imports ``transformers.models.quiet_star_official.modeling_mistral`` from it.

What the driver sets, mirroring quiet-star-train.py's ``model_init``:
  config  max_thoughts = n_ahead + n_ahead_talk + 1, merged_talk_heads=True, merged_lm_and_talk_heads=False,
          merged_lm_and_think_heads=True, use_concat_talk_head=True, use_shallow_think=True, use_shallow_talk=False,
          use_complex_think_head=False, use_complex_talk_head=True, use_weighted_talk_head=True
  model   tokenizer, gumbel_detach=True, include_policy_loss=True, use_start_thought_token=True,
          use_end_thought_token=True, n_ahead, n_ahead_talk, n_passes, n_tokens_print = gradient_accumulation_steps
          = 2 (their full_batch_size 8 // (8 // n_passes_global 2)), residual_think_head=False,
          optimize_lm_head_only_at_start=False, gumbel_temperature=1, wandb_enabled=True, original_mode=False,
          config_params={}, run_start, kill_after=100, train()
Departures, all forced by having no hub access or GPU: scratch weights and sizes (``--size``) instead of Mistral-7B;
fp32 on CPU (their script picks fp32 when CUDA is absent); attention = transformers' default for both models (sdpa,
the same default their ``from_pretrained`` got); a stand-in byte tokenizer (ids only: their forward calls
``convert_tokens_to_ids`` for the two marker tokens, ``encode("---")`` to initialise the marker embeddings, and
reads ``pad_token_id``/``bos``/``eos``; vocab = 3 specials + 256 bytes + unused ids + the 2 markers at the top, 1024);
wandb runs ``wandb.init(mode="disabled")`` so that their ``wandb.log`` succeeds as a no-op and their log dict is
reset as in a real run (without an init, log raises inside their try/except and the dict keeps growing).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

# thinkrl.timing needs only the standard library and torch, so this venv (transformers 4.37.2, no thinkrl installed)
# imports it from the checkout
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from thinkrl.timing import proc_status_kb  # noqa: E402

SIZES = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        vocab_size=1024,
    ),
    "large": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        intermediate_size=2048,
        vocab_size=1024,
    ),
}
PKG = "transformers.models.quiet_star_official"
THEIR_FILES = ("modeling_mistral.py", "configuration_mistral.py")
GRAD_ACCUM = 2  # quiet-star-train.py: full_batch_size 8, batch_size = 8 // n_passes_global (2) = 4 -> 8 // 4 = 2


class ByteStandInTokenizer:
    """Ids only, what their forward asks of a tokenizer: 0 unk, 1 bos, 2 eos (= pad, as their script sets),
    3..258 the bytes, the two thought markers at the top of the vocabulary."""

    def __init__(self, vocab_size: int):
        self.unk_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2
        self.pad_token_id = self.eos_token_id
        self.special = {"<|startthought|>": vocab_size - 2, "<|endthought|>": vocab_size - 1}
        self.padding_side = "right"

    def convert_tokens_to_ids(self, token):
        return self.special.get(token, self.unk_token_id)

    def encode(self, text, add_special_tokens=False, **_):
        ids = [b + 3 for b in text.encode("utf-8")]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def __len__(self):
        return max(self.special.values()) + 1


def git_blob_sha1(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def import_official(qs_dir: Path):
    import transformers.models  # noqa: F401  (the parent package must exist first)

    if PKG not in sys.modules:
        pkg = types.ModuleType(PKG)
        pkg.__path__ = [str(qs_dir)]
        pkg.__package__ = PKG
        pkg.__file__ = str(qs_dir / "__init__.py")
        sys.modules[PKG] = pkg
    modeling = importlib.import_module(PKG + ".modeling_mistral")
    configuration = importlib.import_module(PKG + ".configuration_mistral")
    return modeling, configuration


def make_rows(args, vocab_size):
    import torch

    g = torch.Generator().manual_seed(1234)
    return torch.randint(3, 259, (args.batch, args.seq), generator=g)  # byte ids: never pad/eos, never a marker


def build_official(args, modeling, configuration, n_ahead):
    import torch

    torch.manual_seed(0)
    cfg = configuration.MistralConfig(
        **SIZES[args.size],
        max_position_embeddings=4096,
        # quiet-star-train.py's from_pretrained(...) kwargs:
        max_thoughts=n_ahead + args.n_ahead_talk + 1,
        merged_talk_heads=True,
        merged_lm_and_talk_heads=False,
        merged_lm_and_think_heads=True,
        use_concat_talk_head=True,
        use_shallow_think=True,
        use_shallow_talk=False,
        use_complex_think_head=False,
        use_complex_talk_head=True,
        use_weighted_talk_head=True,
    )
    model = modeling.MistralForCausalLM(cfg)
    tokenizer = ByteStandInTokenizer(cfg.vocab_size)
    assert len(tokenizer) == cfg.vocab_size  # their resize_token_embeddings(len(tokenizer)) would be a no-op
    # quiet-star-train.py's model_init, attribute by attribute:
    model.tokenizer = tokenizer
    model.gumbel_detach = True
    model.include_policy_loss = True
    model.use_end_thought_token = True
    model.use_start_thought_token = True
    model.n_ahead = n_ahead
    model.n_ahead_talk = args.n_ahead_talk
    model.n_passes = args.n_passes
    model.n_tokens_print = GRAD_ACCUM
    model.gradient_accumulation_steps = GRAD_ACCUM
    model.residual_think_head = False
    model.optimize_lm_head_only_at_start = False
    model.gumbel_temperature = 1
    model.wandb_enabled = True
    model.original_mode = False
    model.config_params = {}
    model.run_start = int(time.time())
    model.kill_after = 100
    model.train()
    return model, cfg


def trace_calls(model, input_ids, attention_mask):
    """One extra (untimed) forward with a hook on their inner model: what each of its calls fed in (text, S/E marker
    embedding, a sampled or a true token), so the JSON shows how many thought tokens n_ahead really gives."""
    import torch

    trace = []
    emb_w = model.model.embed_tokens.weight.detach()
    start = (model.start_embedding[0] * model.embedding_scale).detach()
    end = (model.end_embedding[0] * model.embedding_scale).detach()

    def hook(_mod, _args, kwargs):
        row = kwargs["inputs_embeds"].detach()[0]  # row 0: (L, hidden)
        e = row[5]  # a sampled or true token is shown at position 5 (any position works)
        # a marker fills every position with the same embedding (a sampled "---" token can equal it at one position:
        # both markers start from the embedding of "---")
        is_marker = torch.allclose(row, start.expand_as(row)) or torch.allclose(row, end.expand_as(row))
        if len(trace) == 0:
            trace.append("text")
        elif is_marker:
            trace.append("E" if "S" in trace else "S")
        else:
            d = (emb_w - e).abs().amax(-1)
            tok = int(d.argmin())
            trace.append(("y" if trace and trace[-1] in ("E", "y") else "z") + f"({tok})")

    h = model.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    finally:
        h.remove()
    return trace


def run_part(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers

    qs_dir = Path(args.quiet_star_dir).resolve()
    vocab = SIZES[args.size]["vocab_size"]
    windows = make_rows(args, vocab)
    res = {"part": args.part}
    if args.part == "qs":
        import wandb

        wandb.init(mode="disabled")
        modeling, configuration = import_official(qs_dir)
        res["module_file"] = modeling.__file__
        n_ahead = args.n_ahead if args.n_ahead is not None else args.n_ahead_thought + 3
        model, cfg = build_official(args, modeling, configuration, n_ahead)
        input_ids = windows
        attention_mask = torch.ones_like(input_ids)

        def step(seed):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
            out.loss.backward()
            return float(out.loss.detach())
    else:
        n_ahead = None
        cfg = transformers.MistralConfig(**SIZES[args.size], max_position_embeddings=4096)
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM(cfg)
        model.train()
        input_ids = windows.repeat_interleave(args.n_passes, dim=0)  # the same rows their forward builds

        def step(seed):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = model(input_ids=input_ids, labels=input_ids)
            out.loss.backward()
            return float(out.loss.detach())

    res["attn_implementation"] = cfg._attn_implementation
    res["n_params"] = sum(p.numel() for p in model.parameters())
    res["rows"] = list(input_ids.shape) if args.part == "plain" else [args.batch * args.n_passes, args.seq]
    rss_before = proc_status_kb("VmRSS")
    cleared = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        cleared = True
    except OSError:
        pass
    t0 = time.perf_counter()
    warm_loss = step(0)
    res["warmup_s"] = time.perf_counter() - t0
    hwm = proc_status_kb("VmHWM")
    res["rss_before_mb"] = rss_before / 1024 if rss_before else None
    res["step_peak_mb"] = (hwm - rss_before) / 1024 if (cleared and hwm and rss_before) else None
    times, losses = [], [warm_loss]
    for i in range(args.repeats):
        t0 = time.perf_counter()
        losses.append(step(i + 1))
        times.append(time.perf_counter() - t0)
    res["times_s"] = times
    res["median_s"] = statistics.median(times)
    res["losses"] = losses
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.part == "qs":
        res["n_ahead"] = n_ahead
        res["training_steps_counter"] = model.training_steps
        if not args.no_trace:
            res["call_trace"] = trace_calls(model, input_ids, attention_mask)
            z = [t for t in res["call_trace"] if t.startswith("z")]
            res["sampled_thought_tokens"] = len(z)
            res["model_calls_per_forward"] = len(res["call_trace"])
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quiet-star-dir", required=True, help="folder with their modeling_mistral.py and configuration_mistral.py"
    )
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--seq", type=int, default=256, help="window length L")
    p.add_argument("--batch", type=int, default=2, help="windows per step")
    p.add_argument("--n-ahead-thought", type=int, default=6, help="sampled thought tokens m (n_ahead = m + 3)")
    p.add_argument("--n-ahead", type=int, default=None, help="their n_ahead directly (overrides --n-ahead-thought)")
    p.add_argument("--n-ahead-talk", type=int, default=2, help="true tokens scored after each thought")
    p.add_argument("--n-passes", type=int, default=2, help="thoughts per position")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="qs,plain", help="which measurements: qs, plain or both")
    p.add_argument("--no-trace", action="store_true", help="skip the untimed forward that records the call trace")
    p.add_argument("--commit", default=None, help="their commit sha (default: <quiet-star-dir>/COMMIT)")
    p.add_argument("--json", default=None)
    p.add_argument("--part", choices=["qs", "plain"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--part-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.part:  # child: one measurement in a fresh process
        res = run_part(args)
        Path(args.part_out).write_text(json.dumps(res))
        return

    qs_dir = Path(args.quiet_star_dir).resolve()
    commit = args.commit
    if commit is None and (qs_dir / "COMMIT").exists():
        commit = (qs_dir / "COMMIT").read_text().strip()
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as thinkrl's benchmarks (spinning threads hurt on shared cores)
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")

    results = {}
    load_start = os.getloadavg()
    t_all = time.perf_counter()
    for part in [s.strip() for s in args.parts.split(",") if s.strip()]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tf:
            out = tf.name
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--part-out", out]
        for a in (
            "quiet_star_dir",
            "size",
            "seq",
            "batch",
            "n_ahead_thought",
            "n_ahead",
            "n_ahead_talk",
            "n_passes",
            "threads",
            "repeats",
        ):
            v = getattr(args, a)
            if v is not None:
                cmd += ["--" + a.replace("_", "-"), str(v)]
        if args.no_trace:
            cmd.append("--no-trace")
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True)
        results[part] = json.loads(Path(out).read_text())
        results[part]["child_wall_s"] = time.perf_counter() - t0
        os.unlink(out)

    import torch
    import transformers

    n_ahead = args.n_ahead if args.n_ahead is not None else args.n_ahead_thought + 3
    summary = {
        "what": "official Quiet-STaR training step (their forward + loss.backward) vs stock Mistral plain step",
        "settings": {
            "size": args.size,
            **SIZES[args.size],
            "seq": args.seq,
            "batch_windows": args.batch,
            "n_ahead": n_ahead,
            "n_ahead_thought_sampled": n_ahead - 3,
            "n_ahead_talk": args.n_ahead_talk,
            "n_passes": args.n_passes,
            "rows": args.batch * args.n_passes,
            "threads": args.threads,
            "repeats": args.repeats,
            "warmup_steps": 1,
            "dtype": "float32",
            "device": "cpu",
            "gradient_accumulation_steps_attr": GRAD_ACCUM,
            "gumbel_temperature": 1,
            "OMP_WAIT_POLICY": env["OMP_WAIT_POLICY"],
        },
        "quiet_star": {
            "repo": "ezelikman/quiet-star",
            "commit": commit,
            "dir": str(qs_dir),
            "git_blob_sha1": {f: git_blob_sha1(qs_dir / f) for f in THEIR_FILES},
        },
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "host": {"cpus": os.cpu_count(), "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
        "results": results,
        "total_wall_s": time.perf_counter() - t_all,
    }
    qs, plain = results.get("qs"), results.get("plain")
    if qs and plain:
        summary["ratio_qs_over_plain"] = qs["median_s"] / plain["median_s"]

    print(
        f"\nofficial Quiet-STaR ({commit[:12] if commit else '?'}), size={args.size} L={args.seq} B={args.batch} "
        f"n_ahead={n_ahead} (sampled thought {n_ahead - 3} + 2 markers) n_ahead_talk={args.n_ahead_talk} "
        f"n_passes={args.n_passes} threads={args.threads} repeats={args.repeats}"
    )
    print(f"{'step':<8}{'median s':>10}{'peak RSS MB':>13}{'step peak MB':>14}{'loss':>10}  times s")
    for name, r in results.items():
        ts = ", ".join(f"{t:.3g}" for t in r["times_s"])
        sp = f"{r['step_peak_mb']:.0f}" if r.get("step_peak_mb") is not None else "-"
        print(f"{name:<8}{r['median_s']:>10.3f}{r['peak_rss_mb']:>13.0f}{sp:>14}{r['losses'][-1]:>10.4g}  {ts}")
    if "ratio_qs_over_plain" in summary:
        print(f"qs/plain = {summary['ratio_qs_over_plain']:.1f}")
    if qs and "call_trace" in qs:
        print("their model calls in one forward:", " ".join(qs["call_trace"]))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
        print("wrote", args.json)


if __name__ == "__main__":
    main()
