"""The CUDA path: the default recipe trains in bf16 on a GPU; the scorer and the Coconut latent forward give on CUDA
what they give on the CPU (fp32). Tiny scratch models, nothing downloads; skipped without a CUDA device (conftest).

Run on a GPU machine: ``python -m pytest -q -m gpu tests``."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from thinkrl.coconut.latent_forward import generate_with_latents, latent_forward, left_pad, naive_latent_forward
from thinkrl.config import load_config
from thinkrl.models.roles import build_roles
from thinkrl.rl.scoring import Scorer
from thinkrl.rollout.hf_actor import HFRolloutActor
from thinkrl.rollout.policy import position_seeds
from thinkrl.run.state import find_checkpoints

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # fp32 CUDA vs CPU: different kernels and summation orders, same maths


def _assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """``actual`` (any device) equals ``expected`` (CPU) within TOL relative to the larger of 1 and |expected|max."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.cpu() / scale, expected / scale, atol=TOL, rtol=0, msg=name)


def test_default_recipe_trains_in_bf16_on_cuda(tmp_path):
    """A few LM warm-up and RL steps of configs/default.yaml in bf16: finite losses, weights move, checkpoint."""
    from thinkrl.run.trainer import Trainer

    run = tmp_path / "bf16"
    cfg = load_config(
        ROOT / "configs/default.yaml",
        [
            "model.dtype=bfloat16",
            "trainer.lm_warmup_steps=2",
            "trainer.max_steps=3",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.report_to=none",
            "trainer.progress=false",
            "data.eval_positions=16",
            f"trainer.output_dir={run}",
        ],
    )
    trainer = Trainer(cfg)
    for name, module in trainer.roles.modules().items():
        param = next(module.parameters())
        assert param.device.type == "cuda" and param.dtype == torch.bfloat16, name
    before = {g: [p.detach().clone() for p in m.parameters()] for g, m in trainer.roles.models.items()}
    trainer.train()

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert all(math.isfinite(r["warmup/lm_nll"]) for r in rows if "warmup/lm_nll" in r)
    for group, model in trainer.roles.models.items():  # bf16 rounding hides some tiny updates, not all
        assert any(not torch.equal(a, b) for a, b in zip(before[group], model.parameters())), group
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["final_eval"]["nll_thought"])
    assert [p.name for p in find_checkpoints(run)] == ["checkpoint-3"]
    saved = {k: v for f in (run / "checkpoint-3").glob("model*.safetensors") for k, v in load_file(f).items()}
    assert saved and all(v.dtype == torch.bfloat16 for v in saved.values() if v.is_floating_point())


# Contexts of different lengths so left padding and position ids are exercised (as in tests/rollout/test_kv_cache.py).
CONTEXTS = [[1, 4, 5, 14, 13, 6, 20, 18, 7, 5], [1, 4, 9, 9, 6, 7, 5], [1, 4, 5, 12, 13, 6, 20, 18, 18, 16, 7, 5]]
TARGETS = [[14, 13], [9, 9], [12]]


@pytest.mark.parametrize("groups", ["[A,B,A]", "[A,B,C]"])
def test_scorer_on_cuda_equals_cpu(tiny_config, groups):
    """Scores and the gradients of their sum, CPU vs CUDA, on the same weights and thoughts (fp32)."""
    torch.manual_seed(0)
    cfg = tiny_config(f"model.weight_groups={groups}", "head.form=gate", "rollout.num_thoughts=3")
    roles = build_roles(cfg)
    actor = HFRolloutActor(
        cfg.rollout, roles.model("reasoner"), roles.sot_id, roles.eot_id, roles.tokenizer.pad_token_id
    )
    thoughts = actor.sample(CONTEXTS, 3, position_seeds(len(CONTEXTS), torch.Generator().manual_seed(1)))
    results = []
    for device in ("cpu", "cuda"):
        for module in roles.modules().values():  # the same weights, moved (with no gradient left behind)
            module.zero_grad(set_to_none=True)
            module.to(device)
        scorer = Scorer(roles, [], cfg.data.interpreter_window, "mixed")
        scores = scorer.score(CONTEXTS, TARGETS, thoughts)
        assert scores.logp.device.type == device
        mask = scores.target_mask[:, None, :].expand_as(scores.logp)
        (scores.logp[mask].sum() + scores.logp_base[scores.target_mask].sum()).backward()
        grads = {
            f"{name}.{p_name}": p.grad.detach().clone()
            for name, module in roles.modules().items()
            for p_name, p in module.named_parameters()
            if p.grad is not None
        }
        results.append((scores, grads))
    (cpu, cpu_grads), (cuda, cuda_grads) = results
    assert torch.equal(cuda.target_ids.cpu(), cpu.target_ids) and torch.equal(cuda.target_mask.cpu(), cpu.target_mask)
    for name in ("logp", "logp_reward", "logp_base", "weight"):
        _assert_close_scaled(getattr(cuda, name).detach(), getattr(cpu, name).detach(), name)
    rewards = (cpu.logp_thoughts - cpu.logp_null[:, None]).detach()
    assert float(rewards.abs().max()) > 1e-3, "thoughts should change the scores (else the comparison is weak)"
    assert cpu_grads.keys() == cuda_grads.keys() and cpu_grads
    for name, g in cpu_grads.items():
        _assert_close_scaled(cuda_grads[name], g, name)


LATENT, PAD, EOS = 3, 0, 2
# Rows of different lengths with latents at different positions and in different numbers.
ROWS = [
    [1, 10, 11, 12, 4, LATENT, LATENT, LATENT, 5, 20, 21, 22],
    [1, 13, 4, LATENT, LATENT, 5, 23, 24],
    [1, 14, 15, 16, 17, 18, 4, LATENT, LATENT, LATENT, LATENT, 5, 25],
    [1, 19, 20, 21, 22],  # no latent at all
]


def _tiny_llama() -> LlamaForCausalLM:
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


def test_coconut_latent_forward_on_cuda_equals_cpu():
    """Cached latent forward (logits, filled embeddings, passes, gradients) and greedy generation with latents."""
    cpu_model = _tiny_llama()
    cuda_model = copy.deepcopy(cpu_model).to("cuda")
    prompts = [r[: r.index(5) + 1] if 5 in r else r for r in ROWS]
    results = []
    for device, model in (("cpu", cpu_model), ("cuda", cuda_model)):
        ids, mask = left_pad(ROWS, PAD, device)
        latents = (ids == LATENT) & mask.bool()
        model.zero_grad(set_to_none=True)
        out = latent_forward(model, ids, mask, latents)
        out.logits[mask.bool()].pow(2).mean().backward()
        with torch.no_grad():
            naive = naive_latent_forward(model, ids, mask, latents)
            generated = generate_with_latents(model, prompts, LATENT, PAD, EOS, 6)
        assert out.logits.device.type == device
        _assert_close_scaled(out.logits[mask.bool()].detach(), naive.logits[mask.bool()].cpu(), f"{device} naive")
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results.append((out, mask.bool().cpu(), grads, generated))
    (cpu, real, cpu_grads, cpu_gen), (cuda, _, cuda_grads, cuda_gen) = results
    columns = {c for row in left_pad(ROWS, PAD)[0].tolist() for c, tok in enumerate(row) if tok == LATENT}
    assert cuda.num_passes == cpu.num_passes == len(columns) + 1  # one pass per latent column, plus one
    assert cuda.cache.get_seq_length() == cpu.cache.get_seq_length() == real.shape[1]
    _assert_close_scaled(cuda.logits[real].detach(), cpu.logits[real].detach(), "logits")
    _assert_close_scaled(cuda.inputs_embeds.detach(), cpu.inputs_embeds.detach(), "filled embeddings")
    for name, g in cpu_grads.items():
        _assert_close_scaled(cuda_grads[name], g, name)
    assert cuda_gen == cpu_gen and any(cpu_gen)


def test_a_sleeping_colocated_engine_samples_with_the_learners_weights_after_it_wakes(tmp_path):
    """rollout.vllm_sleep on a GPU: the engine sleeps after sampling, an update's sync waits for the wake, and after
    waking its log-probs equal the learner's (the stale-weights-after-wake bug fails this), with CUDA graphs on."""
    pytest.importorskip("vllm")
    from learner_logps import hf_logps

    from thinkrl.rollout import make_actor

    contexts = [[1, 4, 5, 14, 13, 6, 20, 18, 7, 5], [1, 4, 9, 9, 6, 7, 5]]
    torch.manual_seed(0)
    sizes = ["model.default.scratch.hidden_size=64", "model.default.scratch.num_heads=2", "rollout.max_thought_len=5"]
    sleepy = ["rollout.backend=vllm", "rollout.vllm_sleep=true", f"trainer.output_dir={tmp_path}"]
    cfg = load_config(None, [*sizes, *sleepy])
    roles = build_roles(cfg)
    model = roles.model("reasoner").cuda()
    actor = make_actor(cfg.rollout, roles, tmp_path, max_model_len=64)
    first = actor.sample(contexts, 4, position_seeds(2, torch.Generator().manual_seed(1)))
    assert actor._asleep
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.tensor([contexts[0]], device="cuda")
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert float((hf_logps(cfg, roles, first, contexts).cpu() - first.sampler_logps.cpu()).abs().max()) > 1e-2
    actor.after_update()  # deferred: the engine sleeps
    after = actor.sample(contexts, 4, position_seeds(2, torch.Generator().manual_seed(1)))
    gap = (hf_logps(cfg, roles, after, contexts).cpu() - after.sampler_logps.cpu()).abs().max()
    actor.close()
    assert float(gap) < 1e-3, float(gap)  # fp32 with CUDA graphs


def test_a_server_for_a_gpu_recipe_uses_cuda_graphs_and_takes_weights_over_nccl(tmp_path, capsys):
    """`thinkrl serve` on a CUDA machine: no --enforce-eager (CUDA graphs), chunked prefill, vLLM's NCCL weight
    transfer; the trainer's rule picks the same backend. The NCCL transfer itself needs two GPUs (one per rank)."""
    from thinkrl.cli import main
    from thinkrl.rollout.vllm_server import transfer_backend

    cfg = load_config(ROOT / "configs/default.yaml", [f"trainer.output_dir={tmp_path / 'run'}"])
    assert transfer_backend(cfg.rollout) == "nccl"
    main(
        [
            "serve",
            "--config",
            str(ROOT / "configs/default.yaml"),
            f"trainer.output_dir={tmp_path / 'run'}",
            "--dry-run",
        ]
    )
    printed = capsys.readouterr().out
    assert '"backend": "nccl"' in printed
    assert "--enforce-eager" not in printed and "--no-enable-chunked-prefill" not in printed
