"""Tokens/s of Coconut's KV-cached latent forward vs the naive recompute (every pass from scratch), same run.

A batch of left-padded problems (question, start marker, n latents, end marker, answer text) through a scratch
Llama; both forwards give the same logits (tests/coconut/test_latent_forward.py). Forward only (no_grad, as in
evaluation) and forward+backward (as in training). Tokens/s counts real (unpadded) tokens.

Run: OMP_WAIT_POLICY=PASSIVE python scripts/bench_coconut.py --threads 1
(on the GPU when there is one, ``--device cpu`` to measure the CPU there; the header says which device ran.)
"""

from __future__ import annotations

import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkrl.coconut.latent_forward import latent_forward, naive_latent_forward
from thinkrl.timing import default_device, median_seconds

LATENT, START, END, PAD = 5, 6, 7, 0


def make_batch(batch: int, question: int, answer: int, n_latents: int, vocab: int, seed: int = 0):
    """Questions of varied lengths (so rows are padded), then markers and latents aligned by left padding."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(batch):
        q = torch.randint(10, vocab, (question - (i % 8),), generator=g).tolist()
        a = torch.randint(10, vocab, (answer,), generator=g).tolist()
        rows.append([1] + q + [START] + [LATENT] * n_latents + [END] + a)
    # align the start markers: left-pad each row by its question's shortfall, right-pad to one width
    longest_q = max(r.index(START) for r in rows)
    rows = [[PAD] * (longest_q - r.index(START)) + r for r in rows]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[int(t != PAD) for t in r] + [0] * (width - len(r)) for r in rows])
    return ids, mask, (ids == LATENT) & mask.bool()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--question", type=int, default=96, help="question tokens")
    ap.add_argument("--answer", type=int, default=32, help="text tokens after the latents")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latents", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--device", default=default_device(), help="cuda | cpu (default: cuda when there is a GPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        intermediate_size=4 * args.hidden,
        max_position_embeddings=1024,
        pad_token_id=PAD,
    )
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(args.device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cuda = model.device.type == "cuda"
    where = torch.cuda.get_device_name(model.device) if cuda else f"{args.threads} thread(s)"
    print(
        f"# scratch Llama {params:.1f}M params, batch {args.batch}, question ~{args.question} + answer {args.answer} "
        f"tokens, device {model.device.type} ({where}), median of {args.repeats}"
    )
    print(
        "| latents | passes | real tokens | fwd cached tok/s | fwd naive tok/s | speed-up | "
        "fwd+bwd cached tok/s | fwd+bwd naive tok/s | speed-up | max logit diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in args.latents:
        ids, mask, latents = (
            t.to(model.device) for t in make_batch(args.batch, args.question, args.answer, n, cfg.vocab_size)
        )
        tokens = int(mask.sum())
        with torch.no_grad():
            cached = latent_forward(model, ids, mask, latents)
            naive = naive_latent_forward(model, ids, mask, latents)
            diff = float((cached.logits - naive.logits)[mask.bool()].abs().max())

        def fwd(fn, batch=(ids, mask, latents)):
            def run():
                with torch.no_grad():
                    fn(model, *batch)

            return run

        def train(fn, batch=(ids, mask, latents)):
            def run():
                fn(model, *batch).logits.float().logsumexp(-1).mean().backward()
                model.zero_grad(set_to_none=True)

            return run

        f_c, f_n = (
            median_seconds(fwd(latent_forward), args.repeats),
            median_seconds(fwd(naive_latent_forward), args.repeats),
        )
        t_c, t_n = (
            median_seconds(train(latent_forward), args.repeats),
            median_seconds(train(naive_latent_forward), args.repeats),
        )
        print(
            f"| {n} | {cached.num_passes} | {tokens} | {tokens / f_c:,.0f} | {tokens / f_n:,.0f} | {f_n / f_c:.2f}x | "
            f"{tokens / t_c:,.0f} | {tokens / t_n:,.0f} | {t_n / t_c:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
