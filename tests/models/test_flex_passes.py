"""The flex_attention kernel of parallel passes (``rollout.attention_kernel=flex``, ``thinkrl.models.flex_passes``)
equals the hand merge (``parallel_attention``): hidden states and every parameter's gradient, teacher-forced and one
token per pass with history, with and without grouped-query attention. On CPU the flex path is its dense reference
(the mask_mod's mask in ``scaled_dot_product_attention``); its block mask is checked against that mask here, and the
compiled CUDA kernel by the gpu-marked test."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask
from transformers import LlamaConfig, LlamaForCausalLM

import thinkrl.models.flex_passes as fp
from thinkrl.config import load_config
from thinkrl.errors import ConfigError
from thinkrl.models.parallel_passes import KERNEL_ATTR, read_window, run_passes, set_attention_kernel

TOL = 1e-5
FLEX_FORWARD = fp.flex_passes_forward
# two windows, four slots each with different contexts (the last window's tail is padding for its slots)
IDS = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(0))
SLOT_LEN = torch.tensor([[2, 5, 9, 12], [3, 4, 7, 11]])
TOKENS = torch.randint(0, 40, (2, 2, 4, 3), generator=torch.Generator().manual_seed(1))  # (B, R=2, P=4, S=3)
SMALL = (IDS, SLOT_LEN, TOKENS)


def _large():
    """Windows of 300 tokens, 148 slots, R=2, S=3: 888 queries and 1188 keys, many blocks of 128 (most skipped)."""
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 40, (2, 300), generator=gen)
    slot_len = torch.stack([torch.arange(148) * 2 + 2, (torch.arange(148) * 2 + 3).clamp_max(250)])
    return ids, slot_len, torch.randint(0, 40, (2, 2, 148, 3), generator=gen)


def _llama(kv_heads: int, width: int = 32, heads: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=width,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=64,
    )
    return LlamaForCausalLM(config).eval()


# the S = 3 tokens in passes: all at once (teacher-forced), one per pass (sampling), one then two (history + S > 1)
PASSES = {"teacher-forced": [(0, 3)], "one-token-passes": [(0, 1), (1, 2), (2, 3)], "1+2": [(0, 1), (1, 3)]}


def _run(model, kernel: str, passes: list, device: str, monkeypatch, data=SMALL):
    """(hidden (B, R, P, S, d), grads, history) of ``passes`` with ``kernel``; the loss weighs each hidden state
    by fixed random weights, so every gradient entry matters."""
    calls = []

    def counted(*args):
        calls.append(1)
        return FLEX_FORWARD(*args)

    monkeypatch.setattr(fp, "flex_passes_forward", counted)
    set_attention_kernel(model, kernel)
    model.zero_grad(set_to_none=True)
    ids, slot_len, tokens = (x.to(device) for x in data)
    window = read_window(model, ids)
    history: dict | None = {} if len(passes) > 1 else None  # kept across passes
    hidden = torch.cat([run_passes(model, window, tokens[..., a:b], slot_len, a, history)[0] for a, b in passes], -2)
    weights = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (hidden * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    layers = model.config.num_hidden_layers
    assert len(calls) == (layers * len(passes) if kernel == "flex" else 0)  # the kernel that ran
    return hidden.detach(), grads, history or {}


def _assert_kernels_agree(model, passes: list, device: str, monkeypatch, data=SMALL):
    h0, g0, hist0 = _run(model, "merge", passes, device, monkeypatch, data)
    h1, g1, hist1 = _run(model, "flex", passes, device, monkeypatch, data)
    torch.testing.assert_close(h1, h0, atol=TOL, rtol=0)
    assert g0.keys() == g1.keys() == {n for n, _ in model.named_parameters()} - {"lm_head.weight"}
    for name in g0:
        scale = max(1.0, float(g0[name].abs().max()))
        torch.testing.assert_close(g1[name] / scale, g0[name] / scale, atol=TOL, rtol=0, msg=name)
    assert hist0.keys() == hist1.keys()  # the same history: per pass, keys/values (B, Hkv, R, P, S_i, D)
    for layer in hist0:
        for entries0, entries1 in zip(hist0[layer], hist1[layer]):
            assert len(entries0) == len(entries1) == len(passes)
            for (p0, p1), a, b in zip(passes, entries0, entries1):
                shape = (2, model.config.num_key_value_heads, *data[2].shape[1:-1], p1 - p0, a.shape[-1])
                assert a.shape == b.shape == shape
                torch.testing.assert_close(b, a, atol=TOL, rtol=0)


@pytest.mark.parametrize("passes", list(PASSES))
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_flex_equals_merge_on_cpu(kv_heads, passes, monkeypatch):
    _assert_kernels_agree(_llama(kv_heads), PASSES[passes], "cpu", monkeypatch)


def test_a_flex_mask_that_lets_slots_see_each_other_is_caught(monkeypatch):
    """Each thought also sees the other slots' thoughts of its row: the comparison above must fail."""
    real = fp.passes_mask_mod

    def leaky(slot_len, length, slots, tokens, span, rows):
        own = real(slot_len, length, slots, tokens, span, rows)

        def mask_mod(b, h, q, kv):
            same_row = (kv - length) // (slots * span) == q // (slots * tokens)
            return own(b, h, q, kv) | ((kv >= length) & same_row)

        return mask_mod

    monkeypatch.setattr(fp, "passes_mask_mod", leaky)
    with pytest.raises(AssertionError, match="not close"):
        _assert_kernels_agree(_llama(2), PASSES["teacher-forced"], "cpu", monkeypatch)


@pytest.mark.parametrize("block", [2, 4, 8])
@pytest.mark.parametrize("stepwise", [False, True])
def test_block_layout_covers_the_mask(block, stepwise):
    """Every visible key lies in a block the kernel visits, and a full block (no mask_mod) holds visible keys only;
    thought-key blocks of other thoughts and window blocks beyond every query's context are skipped."""
    b, r, p, s, length = 2, 2, 4, (1 if stepwise else 3), 12
    span = 3 if stepwise else s  # a one-token pass after two earlier ones
    n_q, n_kv = r * p * s, length + r * p * span
    mask = fp.dense_mask(fp.passes_mask_mod(SLOT_LEN, length, p, s, span, r), b, n_q, n_kv, "cpu")[:, 0]
    partial, full = fp.block_layout(SLOT_LEN, length, p, s, span, n_q, n_kv, block)
    assert not (partial & full).any()
    nq, nk = partial.shape[1:]
    grid = torch.zeros(b, nq * block, nk * block, dtype=torch.bool)
    grid[:, :n_q, :n_kv] = mask
    blocks = grid.view(b, nq, block, nk, block)
    seen = blocks.any(dim=(2, 4))
    pad_true = torch.ones_like(grid)
    pad_true[:, :n_q, :n_kv] = mask
    whole = pad_true.view(b, nq, block, nk, block).all(dim=4).all(dim=2)
    assert not (seen & ~(partial | full)).any(), "a visible key in a skipped block"
    assert not (full & ~whole).any(), "a hidden key in a full block"
    # torch's own block mask of the mask_mod (exact, from the dense mask): ours visits at least its blocks, and
    # skips the mask_mod on the same full blocks
    theirs = create_block_mask(fp.passes_mask_mod(SLOT_LEN, length, p, s, span, r), b, None, n_q, n_kv, "cpu", block)
    ours = fp.passes_block_mask(SLOT_LEN, length, p, s, span, r, block)
    assert not (theirs.to_dense().bool() & ~ours.to_dense().bool()).any()
    assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
    if block == 2:  # small enough blocks for these few tokens to be sparse
        assert full.any()  # window blocks below every query's context skip the mask_mod
        assert int((partial | full).sum()) < partial.numel() / 2  # most blocks are skipped


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_eager_flex_attention_equals_the_reference_path():
    """torch's own flex_attention (eager here, compiled on CUDA) with the block mask, GQA and scale the kernel
    passes, against the CPU path's dense mask in scaled_dot_product_attention."""
    b, r, p, s, span, length, h, hkv, d = 2, 2, 4, 2, 3, 12, 4, 2, 8
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(b, h, r * p * s, d, generator=gen)
    keys, values = (torch.randn(b, hkv, length + r * p * span, d, generator=gen) for _ in range(2))
    block_mask = fp.passes_block_mask(SLOT_LEN, length, p, s, span, r, block=8)
    out = fp.attend_flex(query, keys, values, block_mask, 0.3)
    mask = fp.dense_mask(fp.passes_mask_mod(SLOT_LEN, length, p, s, span, r), b, r * p * s, keys.shape[2], "cpu")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ref = sdpa(query, keys, values, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(out, ref, atol=TOL, rtol=0)


def test_kernel_setting():
    assert load_config(None, []).rollout.attention_kernel == "auto"
    assert load_config(None, ["rollout.attention_kernel=flex"]).rollout.attention_kernel == "flex"
    with pytest.raises(ConfigError, match=r"rollout.attention_kernel='bogus' is not one of auto, merge, flex"):
        load_config(None, ["rollout.attention_kernel=bogus"])
    model = torch.nn.Linear(1, 1)
    assert getattr(model, KERNEL_ATTR, "merge") == "merge"  # run_passes' default
    for kernel, used in (("auto", "merge"), ("flex", "flex"), ("merge", "merge")):
        set_attention_kernel(model, kernel)
        assert getattr(model, KERNEL_ATTR) == used
    with pytest.raises(ValueError, match="bogus"):
        set_attention_kernel(model, "bogus")


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_compiled_flex_equals_merge_on_cuda(kv_heads, monkeypatch):
    """The compiled block-sparse kernel on CUDA (fp32, head dim 32), teacher-forced and one token per pass; on
    windows of one block and on windows of many, where it skips blocks."""
    model = _llama(kv_heads, width=128).cuda()
    for data in (SMALL, _large()):
        for passes in PASSES.values():
            _assert_kernels_agree(model, passes, "cuda", monkeypatch, data)
    assert fp._compiled is not None


def test_the_trainer_runs_the_kernel_it_is_set_to(tiny_config, tmp_path, monkeypatch):
    """rollout.attention_kernel reaches the trainer's models, and the step's passes run it (auto = merge: see
    test_kernel_setting; every other trainer test runs merge)."""
    from thinkrl.run.trainer import Trainer

    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat and the dog sat on the log. " * 4)
    calls = []
    monkeypatch.setattr(fp, "flex_passes_forward", lambda *a: calls.append(1) or FLEX_FORWARD(*a))
    cfg = tiny_config(
        "model.tokenizer=byte",
        "data.source=text",
        f"data.train_file={text}",
        "data.positions=every_k",
        "data.every_k=4",
        "data.context_len=16",
        "rollout.num_thoughts=2",
        "rollout.max_thought_len=2",
        "rollout.attention_kernel=flex",
    )
    trainer = Trainer(cfg)
    assert trainer.parallel
    assert {getattr(m, KERNEL_ATTR) for m in trainer.roles.models.values()} == {"flex"}
    trainer.step()
    assert calls
