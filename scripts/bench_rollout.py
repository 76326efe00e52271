"""Throughput of the trainer's rollout and scoring paths against the naive way, measured in one run.

Run from the repository root with the venv active:

    python scripts/bench_rollout.py
    python scripts/bench_rollout.py --model smollm2-135m-instruct --positions 4 --max-thought-len 8

(about 40 s and 4.5 min on 2 busy CPU cores; the first smollm2 run also converts the gguf weights, ~20 s).
Runs on the GPU when there is one (``--device cpu`` to measure the CPU there); the header says which.

Rollout: ``HFRolloutActor.sample`` (each context prefilled once, its KV cache repeated K times, all N*K thoughts
decoded together) vs one ``model.generate`` call per thought (no shared context, no batching across thoughts).
Counted: generated thought tokens (policy actions, incl. a sampled end token). By default both sides run in
``rollout.length_mode=fixed`` (the end token is disabled; generate gets ``min_new_tokens``), so both generate exactly
N*K*max_thought_len tokens; ``--length-mode variable`` counts the real tokens of each side instead.

Scoring: ``Scorer.score`` (window computed once per position, shared by the K thoughts, the null thought and the
base row, all batched) vs one uncached forward per (position, thought) sequence ``window + thought + y`` plus one
base forward ``window + y`` per position, each followed by the same mixing head. The naive scorer scores the very
thoughts the trainer path sampled. Counted: scored target tokens y, N * (K + 1) * n_ahead (thought rows + null).

Checks printed before the timings, so that the two sides cannot silently do different work:
  * the fast sampler's log-probs equal an uncached recompute of each sampled thought;
  * greedy decoding (temperature -> 0) gives the same thoughts on the fast path and through ``generate`` (or they
    part only where two tokens have exactly the same logit);
  * the fast scorer's log-probs equal the naive scorer's within 1e-4 (the mlp/concat heads' zero-initialised
    layers get PyTorch's default random init first, so the mixed prediction really depends on the thought).
Every timing is the median of ``--repeats`` runs after one warm-up run, all under ``torch.no_grad`` (on CUDA the clock
is read after ``torch.cuda.synchronize``, see ``thinkrl.timing``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make every op 10-100x slower when the cores are shared with other processes
# (measured here: a 2-layer forward 2 ms -> 80 ms with 2 threads under load). Must be set before torch is imported;
# set OMP_WAIT_POLICY=ACTIVE in the environment to measure the spinning default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import transformers

from thinkrl.config import load_config
from thinkrl.models.roles import build_roles, set_threads
from thinkrl.rl.scoring import Scorer
from thinkrl.rollout.hf_actor import HFRolloutActor
from thinkrl.rollout.policy import policy_logits, position_seeds
from thinkrl.timing import default_device, timed_runs

FALLBACK_TEXT = "The quick brown fox jumps over the lazy dog while the river keeps running to the sea. "
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="scratch", help="'scratch' (random Llama, byte tokenizer) or 'smollm2-135m-instruct'"
    )
    p.add_argument("--hidden-size", type=int, default=256, help="scratch: width (MLP width is 4x)")
    p.add_argument("--layers", type=int, default=4, help="scratch: transformer blocks")
    p.add_argument("--heads", type=int, default=0, help="scratch: attention heads (0 = hidden_size // 64)")
    p.add_argument("--positions", type=int, default=8, help="N thought positions")
    p.add_argument("--k", type=int, default=8, help="K thoughts per position")
    p.add_argument("--context-len", type=int, default=128, help="context tokens before each thought")
    p.add_argument("--max-thought-len", type=int, default=16, help="thought tokens (rollout.max_thought_len)")
    p.add_argument("--n-ahead", type=int, default=4, help="target tokens y scored after each thought")
    p.add_argument("--window", type=int, default=0, help="data.interpreter_window (0 = the whole context)")
    p.add_argument("--length-mode", choices=("fixed", "variable"), default="fixed", help="rollout.length_mode")
    p.add_argument("--head-form", default="mlp", choices=("none", "mlp", "gate", "concat"), help="head.form")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when there is a GPU)")
    p.add_argument("--text", default="", help="text for pretrained models (default: tinyshakespeare if present)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_config(args):
    overrides = [
        f"model.default.path={args.model}",
        "model.weight_groups=[A,A,A]",
        f"head.form={args.head_form}",
        "data.source=text",
        "data.positions=every_k",
        "data.train_file=unused-by-the-benchmark.txt",  # validation wants one; no data pool is built here
        f"data.context_len={args.context_len}",
        f"data.n_ahead={args.n_ahead}",
        f"data.interpreter_window={args.window}",
        f"rollout.num_thoughts={args.k}",
        f"rollout.max_thought_len={args.max_thought_len}",
        f"rollout.length_mode={args.length_mode}",
        f"rollout.temperature={args.temperature}",
        f"rollout.batch_positions={max(32, args.positions)}",  # one chunk, as in a trainer micro-batch
        f"trainer.num_threads={args.threads}",
        "trainer.report_to=none",
    ]
    if args.k == 1:
        overrides.append("learner.include_null=true")
    if args.model == "scratch":
        heads = args.heads or max(1, args.hidden_size // 64)
        needed = args.context_len + args.max_thought_len + args.n_ahead + 8
        overrides += [
            "model.tokenizer=byte",
            f"model.default.scratch.hidden_size={args.hidden_size}",
            f"model.default.scratch.num_layers={args.layers}",
            f"model.default.scratch.num_heads={heads}",
            f"model.default.scratch.intermediate_size={4 * args.hidden_size}",
            f"model.default.scratch.max_position_embeddings={max(512, needed)}",
        ]
    return load_config(None, overrides)


def make_positions(args, cfg, tokenizer, sot: int, eot: int):
    """N (context, target) pairs: random token ids for scratch, real text for pretrained models."""
    n, c, a = args.positions, args.context_len, args.n_ahead
    if args.model == "scratch":
        banned = set(tokenizer.all_special_ids) | {sot, eot}
        allowed = torch.tensor([i for i in range(len(tokenizer)) if i not in banned])
        g = torch.Generator().manual_seed(args.seed)
        ids = allowed[torch.randint(len(allowed), (n, c + a), generator=g)].tolist()
        return [r[:c] for r in ids], [r[c:] for r in ids], "random token ids"
    path = Path(args.text) if args.text else None
    if path is None:
        data_dir = cfg.data.resolved_data_dir()
        path = data_dir / "tinyshakespeare" / "input.txt" if data_dir else None
    if path is not None and path.is_file():
        text, origin = path.read_text(encoding="utf-8", errors="replace")[:400_000], str(path)
    else:
        text, origin = FALLBACK_TEXT * 400, "a repeated sentence"
    tokens = tokenizer.encode(text, add_special_tokens=False)
    span = c + a
    if len(tokens) < span + n:
        sys.exit(f"text {origin} has only {len(tokens)} tokens; need more than {span + n}")
    starts = [i * (len(tokens) - span) // n for i in range(n)]
    return [tokens[s : s + c] for s in starts], [tokens[s + c : s + span] for s in starts], f"text of {origin}"


def randomize_head(head, seed: int) -> None:
    """The mlp/concat heads start with a zero output layer (mixture == base); make them depend on the thought."""
    torch.manual_seed(seed)
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()  # PyTorch's default (Kaiming-uniform) init instead of zeros


def measure(fn, repeats: int):
    """fn returns a token count. -> (median tok/s, median s, runs) over ``repeats`` runs after a warm-up."""
    runs = timed_runs(fn, repeats)
    return statistics.median(t / s for t, s in runs), statistics.median(s for _, s in runs), runs


# ----------------------------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------------------------
def generate_thought(model, context, rc, sot, eot, pad, sample: bool) -> list[int]:
    """The naive way: one generate call for one thought after one context."""
    ids = torch.tensor([context + [sot]], device=model.device)
    kwargs = {"do_sample": False}
    if sample:
        kwargs = {"do_sample": True, "temperature": rc.temperature, "top_p": rc.top_p, "top_k": 0}  # top_k=0: off
    if rc.length_mode == "fixed":
        kwargs["min_new_tokens"] = rc.max_thought_len  # end token disabled until max length, like policy_logits
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=rc.max_thought_len,
        eos_token_id=eot,
        pad_token_id=pad,
        use_cache=True,
        suppress_tokens=[sot],
        **kwargs,
    )
    return out[0, ids.shape[1] :].tolist()


def naive_rollout(model, contexts, k, rc, sot, eot, pad) -> int:
    return sum(len(generate_thought(model, ctx, rc, sot, eot, pad, True)) for ctx in contexts for _ in range(k))


def check_sampler_logps(model, contexts, thoughts, rc, sot, eot) -> float:
    """Largest |fast sampler log-prob - uncached recompute| over every sampled action."""
    worst = 0.0
    for i, ctx in enumerate(contexts):
        for j in range(thoughts.num_thoughts):
            n_act = int(thoughts.thought_mask[i, j].sum())
            actions = thoughts.thought_ids[i, j, :n_act].tolist()
            seq = torch.tensor([ctx + [sot] + actions], device=model.device)
            logits = model(input_ids=seq, use_cache=False, logits_to_keep=n_act + 1).logits[0, :n_act]
            logp = policy_logits(logits, rc.temperature, sot, eot, rc.length_mode == "fixed").log_softmax(-1)
            expected = logp.gather(-1, torch.tensor(actions, device=logp.device)[:, None]).squeeze(-1)
            worst = max(worst, float((thoughts.sampler_logps[i, j, :n_act] - expected).abs().max()))
    return worst


def check_greedy(model, contexts, rc, sot, eot, pad) -> tuple[int, int]:
    """Greedy thoughts (temperature -> 0 on the fast path, do_sample=False in generate): (identical, exact ties).

    A thought that diverges counts as a tie when the two chosen tokens have the same logit (within 1e-5) at the
    first difference: e.g. the new marker tokens start with the output row of ``thought_init_token``, so at
    initialisation they tie with it exactly, and argmax and sampling may break the tie differently."""
    cold = dataclasses.replace(rc, temperature=1e-6)
    fast = HFRolloutActor(cold, model, sot, eot, pad).sample(
        contexts, 1, position_seeds(len(contexts), torch.Generator().manual_seed(0))
    )
    same = ties = 0
    for i, ctx in enumerate(contexts):
        mine = fast.thought_ids[i, 0, : int(fast.thought_mask[i, 0].sum())].tolist()
        theirs = generate_thought(model, ctx, rc, sot, eot, pad, False)
        if mine == theirs:
            same += 1
            continue
        j = next((t for t, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), None)
        if j is None:  # one is a prefix of the other: a stop decision differed
            continue
        seq = torch.tensor([ctx + [sot] + mine[:j]], device=model.device)
        logits = model(input_ids=seq, use_cache=False, logits_to_keep=1).logits[0, -1]
        ties += abs(float(logits[mine[j]] - logits[theirs[j]])) < 1e-5
    return same, ties


# ----------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------
def _target_states(model, seq: list[int], start: int, n: int) -> torch.Tensor:
    """Uncached forward of one sequence; the last-layer states at start .. start+n-1 (they predict y)."""
    out = model(
        input_ids=torch.tensor([seq], device=model.device),
        use_cache=False,
        output_hidden_states=True,
        logits_to_keep=1,
    )
    return out.hidden_states[-1][0, start : start + n]


def naive_score(roles, scorer: Scorer, contexts, targets, thoughts, window: int):
    """One uncached forward per (position, thought) sequence window+thought+y, one base forward per position."""
    interp, base = roles.model("interpreter"), roles.model("base")
    lm_i, lm_b = interp.get_output_embeddings(), base.get_output_embeddings()
    seqs = thoughts.interpreter_sequences(roles.sot_id, roles.eot_id)
    n_pos, k, n = len(contexts), thoughts.num_thoughts, max(len(t) for t in targets)
    logp = torch.zeros((n_pos, k + 1, n))
    logp_base = torch.zeros((n_pos, n))
    for i, (ctx, y) in enumerate(zip(contexts, targets, strict=True)):
        w = ctx[-window:] if window else ctx
        y_ids = torch.tensor(y, device=base.device)[:, None]
        h_base = _target_states(base, w + y[:-1], len(w) - 1, len(y))
        logp_base[i, : len(y)] = torch.log_softmax(lm_b(h_base).float(), -1).gather(-1, y_ids).squeeze(-1).cpu()
        for r, z in enumerate(seqs[i] + [scorer.null_seq]):
            h = _target_states(interp, w + z + y[:-1], len(w) + len(z) - 1, len(y))
            mixed, _ = roles.head(h_base, h, lm_b, lm_i)
            logp[i, r, : len(y)] = mixed.gather(-1, y_ids).squeeze(-1).cpu()
    return logp, logp_base


def scorer_token_counts(contexts, targets, thoughts, scorer: Scorer, window: int) -> tuple[int, int, int]:
    """(scored target tokens, tokens the naive path runs, tokens the shared-prefix path runs incl. padding)."""
    seqs = thoughts.interpreter_sequences(scorer.roles.sot_id, scorer.roles.eot_id)
    scored = naive = fast_prefix = 0
    suffix_lens = []
    for i, (ctx, y) in enumerate(zip(contexts, targets, strict=True)):
        w = ctx[-window:] if window else ctx
        rows = seqs[i] + [scorer.null_seq]
        scored += len(rows) * len(y)
        naive += sum(len(w) + len(z) + len(y) - 1 for z in rows) + len(w) + len(y) - 1
        fast_prefix += len(w) - 1
        suffix_lens += [1 + len(z) + len(y) - 1 for z in rows] + [len(y)]  # + the base row (shared model)
    fast = len(contexts) * max(len(w) - 1 for w in [c[-window:] if window else c for c in contexts])
    fast += len(suffix_lens) * max(suffix_lens)
    return scored, naive, fast


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    cfg = build_config(args)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    roles = build_roles(cfg)
    build_s = time.perf_counter() - t0
    model = roles.model("reasoner")
    model.eval()
    tok = roles.tokenizer
    sot, eot, pad = roles.sot_id, roles.eot_id, tok.pad_token_id
    rc = cfg.rollout
    contexts, targets, origin = make_positions(args, cfg, tok, sot, eot)
    n, k, m = args.positions, args.k, args.max_thought_len
    if args.head_form in ("mlp", "concat"):
        randomize_head(roles.head, args.seed)
    for module in roles.modules().values():  # after the CPU inits: the same weights on every device
        module.to(args.device)
    actor = HFRolloutActor(rc, model, sot, eot, pad)
    scorer = Scorer(roles, [], cfg.data.interpreter_window, cfg.reward.source)

    params = sum(p.numel() for p in model.parameters())
    arch = model.config
    name = "scratch Llama" if args.model == "scratch" else args.model
    desc = f"{name} (hidden {arch.hidden_size}, {arch.num_hidden_layers} layers, {arch.num_attention_heads} heads)"
    print(
        f"settings  model={desc}  params={params / 1e6:.1f}M  vocab={len(tok)}  dtype={cfg.model.dtype}  "
        f"built in {build_s:.1f} s"
    )
    print(
        f"settings  N={n} positions  K={k} thoughts  context={args.context_len} tokens ({origin})  "
        f"thought<={m} tokens ({rc.length_mode} length)  n_ahead={args.n_ahead}  "
        f"window={args.window or 'all'}  head={cfg.head.form}  temperature={rc.temperature}"
    )
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    gpu = f" ({torch.cuda.get_device_name(model.device)})" if model.device.type == "cuda" else ""
    print(
        f"settings  threads={torch.get_num_threads()}  OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}  "
        f"load average {load} on {os.cpu_count()} cores  repeats={args.repeats} (+1 warm-up, median)  "
        f"torch {torch.__version__}  transformers {transformers.__version__}  device={model.device}{gpu}"
    )

    with torch.no_grad():
        g = torch.Generator().manual_seed(args.seed)  # draws the per-position seeds (CPU ints on any device)
        thoughts = actor.sample(
            contexts, k, position_seeds(len(contexts), g)
        )  # these thoughts are scored by both scorer paths

        # ---- checks ----------------------------------------------------------------------------------------
        ok = True
        d_sampler = check_sampler_logps(model, contexts, thoughts, rc, sot, eot)
        ok &= d_sampler <= TOLERANCE
        print(
            f"check     rollout  fast sampler log-probs vs uncached recompute ({n * k} thoughts): "
            f"max|diff|={d_sampler:.2e}  {'OK' if d_sampler <= TOLERANCE else 'FAIL'}"
        )
        same, ties = check_greedy(model, contexts, rc, sot, eot, pad)
        ok &= same + ties == n
        tie_note = f", {ties} diverged only at an exact logit tie" if ties else ""
        print(
            f"check     rollout  greedy thoughts, trainer path vs generate: {same}/{n} identical{tie_note}  "
            f"{'OK' if same + ties == n else 'FAIL'}"
        )
        fast_scores = scorer.score(contexts, targets, thoughts)
        slow_logp, slow_base = naive_score(roles, scorer, contexts, targets, thoughts, cfg.data.interpreter_window)
        mask = fast_scores.target_mask.cpu()
        d_logp = float((fast_scores.logp.cpu() - slow_logp).abs()[mask[:, None].expand_as(slow_logp)].max())
        d_base = float((fast_scores.logp_base.cpu() - slow_base).abs()[mask].max())
        fast_logp = fast_scores.logp.cpu()
        spread = float((fast_logp[:, :-1] - fast_logp[:, -1:]).abs()[:, :, mask[0]].mean())
        good = max(d_logp, d_base) <= TOLERANCE
        ok &= good
        print(
            f"check     scorer   fast vs naive log-probs: max|diff| thoughts+null={d_logp:.2e}  base={d_base:.2e}  "
            f"(mean |logq(y|z) - logq(y|null)| = {spread:.2e}: thoughts change the scores)  "
            f"{'OK' if good else 'FAIL'}"
        )

        # ---- timings ---------------------------------------------------------------------------------------
        fast_roll = measure(
            lambda: int(actor.sample(contexts, k, position_seeds(len(contexts), g)).thought_mask.sum()), args.repeats
        )
        naive_roll = measure(lambda: naive_rollout(model, contexts, k, rc, sot, eot, pad), args.repeats)
        window = cfg.data.interpreter_window
        scored, naive_tok, fast_tok = scorer_token_counts(contexts, targets, thoughts, scorer, window)
        fast_sc = measure(lambda: (scorer.score(contexts, targets, thoughts), scored)[1], args.repeats)
        naive_sc = measure(
            lambda: (naive_score(roles, scorer, contexts, targets, thoughts, cfg.data.interpreter_window), scored)[1],
            args.repeats,
        )

    def row(what, unit, fast, naive, note):
        ratio = fast[0] / naive[0]
        print(
            f"{what:<8} {unit:<22} {fast[0]:>11.1f} ({fast[1]:6.3f} s)  {naive[0]:>9.1f} ({naive[1]:6.3f} s)"
            f"  {ratio:>7.1f}x   {note}"
        )

    print()
    print(f"{'':<8} {'tok/s counts':<22} {'trainer-path':>22}  {'naive':>20}  {'speed-up':>8}")
    roll_tokens = [t for t, _ in fast_roll[2]], [t for t, _ in naive_roll[2]]
    row(
        "rollout",
        "thought tokens (acts)",
        fast_roll,
        naive_roll,
        f"tokens per run: trainer {roll_tokens[0]}, naive {roll_tokens[1]} (N*K*max_thought_len = {n * k * m})",
    )
    row(
        "scorer",
        "scored target tokens",
        fast_sc,
        naive_sc,
        f"{scored} = N*(K+1)*n_ahead per run; forwarded tokens: trainer {fast_tok} (padded), naive {naive_tok}",
    )

    def fmt(runs):
        return "[" + ", ".join(f"{s:.3f}" for _, s in runs) + "]"

    print(
        f"runs (s)  rollout trainer-path {fmt(fast_roll[2])}  naive {fmt(naive_roll[2])}   "
        f"scorer trainer-path {fmt(fast_sc[2])}  naive {fmt(naive_sc[2])}"
    )
    print()
    print(
        "rollout   trainer path: HFRolloutActor.sample, context prefilled once per position, cache repeated K "
        "times, N*K thoughts decoded together"
    )
    print(
        "rollout   naive: one model.generate(do_sample, use_cache) per thought"
        + (", min_new_tokens=max_thought_len (fixed length)" if rc.length_mode == "fixed" else "")
    )
    print("scorer    trainer path: Scorer.score, window once per position, K thoughts + null + base row batched")
    print(
        "scorer    naive: one uncached forward per (position, thought) window+thought+y, one base forward per "
        "position, same mixing head"
    )
    if not ok:
        print("WARNING: a check failed; the two paths did not compute the same thing", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
