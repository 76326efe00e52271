"""The KV-cached latent forward equals recomputing everything, batched, with latents at different positions."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from thinkrl.coconut.latent_forward import generate_with_latents, latent_forward, left_pad, naive_latent_forward

LATENT, PAD, EOS = 3, 0, 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).eval()


# Rows of different lengths with latents at different positions and in different numbers.
ROWS = [
    [1, 10, 11, 12, 4, LATENT, LATENT, LATENT, 5, 20, 21, 22],
    [1, 13, 4, LATENT, LATENT, 5, 23, 24],
    [1, 14, 15, 16, 17, 18, 4, LATENT, LATENT, LATENT, LATENT, 5, 25],
    [1, 19, 20, 21, 22],  # no latent at all
]


def _unbatched_reference(model, row):
    """One row, no padding, no cache: for each latent recompute the prefix and copy the last hidden state in."""
    embeds = model.get_input_embeddings()(torch.tensor([row]))
    for p, tok in enumerate(row):
        if tok == LATENT:
            h = model(inputs_embeds=embeds[:, :p], output_hidden_states=True).hidden_states[-1][:, -1]
            embeds = embeds.clone()
            embeds[0, p] = h[0]
    return model(inputs_embeds=embeds).logits[0]  # (T, V)


def _right_pad(rows):
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


@pytest.mark.parametrize("padding", ["left", "right"])
def test_cached_equals_recompute_batched(model, padding):
    ids, mask = left_pad(ROWS, PAD) if padding == "left" else _right_pad(ROWS)
    latents = (ids == LATENT) & mask.bool()
    with torch.no_grad():
        cached = latent_forward(model, ids, mask, latents)
        naive = naive_latent_forward(model, ids, mask, latents)
    real = mask.bool()
    assert torch.allclose(cached.logits[real], naive.logits[real], atol=1e-5)
    assert cached.cache.get_seq_length() == ids.shape[1]
    assert cached.num_passes == len(set(torch.nonzero(latents)[:, 1].tolist())) + 1
    for i, row in enumerate(ROWS):  # and each row equals its own unpadded, unbatched computation
        with torch.no_grad():
            ref = _unbatched_reference(model, row)
        assert torch.allclose(cached.logits[i][real[i]], ref, atol=1e-5), f"row {i}"


def test_latents_really_change_the_output(model):
    """A forward that ignored the latent feedback would also pass the test above if the reference did the same."""
    ids, mask = left_pad(ROWS[:1], PAD)
    latents = ids == LATENT
    with torch.no_grad():
        fed = latent_forward(model, ids, mask, latents).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(fed[0, -3:], plain[0, -3:], atol=1e-3)


def test_aligned_latents_cost_n_plus_one_passes(model):
    rows = [[1, 10, 4] + [LATENT] * 4 + [5, 20], [1, 11, 12, 13, 4] + [LATENT] * 4 + [5]]
    # align the start markers by left-padding the shorter prefix (what the collator does)
    ids = torch.tensor([[PAD, PAD] + rows[0], rows[1] + [PAD]])
    mask = torch.tensor([[0, 0] + [1] * len(rows[0]), [1] * len(rows[1]) + [0]])
    with torch.no_grad():
        out = latent_forward(model, ids, mask, ids == LATENT)
        naive = naive_latent_forward(model, ids, mask, ids == LATENT)
    assert out.num_passes == 5
    assert torch.allclose(out.logits[mask.bool()], naive.logits[mask.bool()], atol=1e-5)


def test_gradient_flows_through_the_chain_of_latents(model):
    ids, mask = left_pad(ROWS[:2], PAD)
    emb = model.get_input_embeddings()
    out = latent_forward(model, ids, mask, (ids == LATENT) & mask.bool())
    out.logits[:, -1].sum().backward()
    # token 4 (start marker) only reaches the final logits through the latents' hidden states and attention
    assert emb.weight.grad is not None and emb.weight.grad[4].abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_batched_greedy_generation_equals_one_at_a_time(model, batch_size):
    prompts = [r[: r.index(5) + 1] if 5 in r else r for r in ROWS]
    with torch.no_grad():
        single = [generate_with_latents(model, [p], LATENT, PAD, EOS, 6)[0] for p in prompts]
        batched = []
        for i in range(0, len(prompts), batch_size):
            batched += generate_with_latents(model, prompts[i : i + batch_size], LATENT, PAD, EOS, 6)
    assert batched == single
    for p, new in zip(prompts, single):  # and the first greedy token agrees with the uncached forward
        ref = _unbatched_reference(model, p)
        assert new[0] == int(ref[-1].argmax())


def test_training_gradients_equal_recompute(model):
    """Backprop through the cache (continuous thoughts feeding later passes) gives the recompute's gradients."""
    ids, mask = left_pad(ROWS, PAD)
    latents = (ids == LATENT) & mask.bool()
    grads = []
    for forward in (latent_forward, naive_latent_forward):
        model.zero_grad(set_to_none=True)
        forward(model, ids, mask, latents).logits[mask.bool()].pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    for name, g in grads[1].items():
        assert torch.allclose(grads[0][name], g, atol=1e-5), name
