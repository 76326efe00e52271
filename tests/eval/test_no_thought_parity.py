"""``--thoughts none`` is the unmodified pretrained model: the thought markers thinkrl adds to the vocabulary take
no probability from true tokens (``models/true_tokens``)."""

from __future__ import annotations

import pytest
import torch
from eval_fixtures import write_eval_data
from transformers import AutoModelForCausalLM, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from thinkrl.config import load_config
from thinkrl.eval.runner import EvalOptions, Evaluator
from thinkrl.eval.setup import EvalSetup
from thinkrl.models.roles import build_roles

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 30


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    """A small pretrained-style HF folder whose tokenizer has no thought markers (as a hub model's has none)."""
    folder = tmp_path_factory.mktemp("stock")
    tok = ByT5Tokenizer()
    tok.bos_token = tok.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        tie_word_embeddings=True,  # like SmolLM2: thinkrl unties and resizes its copy
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked output layer whose copied marker rows take visible mass
        model.get_output_embeddings().weight.mul_(10.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _target_logps(model, context: list[int], targets: list[list[int]]) -> list[torch.Tensor]:
    """Per target: log p(y_j | context, y_<j) from the model's plain log-softmax over its whole vocabulary."""
    out = []
    with torch.no_grad():
        for y in targets:
            logp = torch.log_softmax(model(torch.tensor([context + y])).logits[0].float(), -1)
            out.append(logp[len(context) - 1 : -1].gather(-1, torch.tensor(y)[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("task", ["gsm8k", "csqa", "text"])
def test_thoughts_none_equals_a_plain_transformers_forward(stock_folder, tmp_path, task):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    cfg = load_config(
        "configs/default.yaml",
        [
            f"model.default.path={stock_folder}",
            "model.tokenizer=auto",
            "model.weight_groups=[A,A,A]",
            "data.interpreter_window=0",
            f"data.data_dir={write_eval_data(tmp_path)}",
            "trainer.report_to=none",
            *(
                ("data.source=text", f"data.train_file={text}", "data.positions=every_k", "data.every_k=16")
                if task == "text"
                else ()
            ),
        ],
    )
    roles = build_roles(cfg)
    assert len(roles.tokenizer) == roles.model("base").config.vocab_size > roles.sot_id  # the markers were added
    opts = EvalOptions(
        task=task, model="stock", thoughts="none", generate=False, limit=4, output_dir=str(tmp_path / "e")
    )
    evaluator = Evaluator(opts, EvalSetup(cfg, roles, None))
    evaluator.run()
    plain = AutoModelForCausalLM.from_pretrained(stock_folder, dtype=torch.float32)  # the unmodified weights
    gap = 0.0
    for item, rec in zip(evaluator.items, evaluator.records):
        targets = item.targets if task == "csqa" else item.targets[:1]
        want, unmasked = (_target_logps(m, item.context, targets) for m in (plain, roles.model("base")))
        if task == "text":  # per token
            got, want, unmasked = torch.tensor(rec["logp"]["none"]), want[0], unmasked[0]
        else:  # per answer, summed over its tokens
            got = torch.tensor(
                [rec["none"]["answer_logp"]]
                if task == "gsm8k"
                else rec["none"]["letter_logp"] + rec["none"]["text_logp"]
            )
            want, unmasked = torch.stack([w.sum() for w in want]), torch.stack([u.sum() for u in unmasked])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # The check can fail: the resized model's own log-softmax, markers included, misses these numbers.
        gap = max(gap, float((unmasked - want).abs().max()))
    assert len(evaluator.records) == 4
    assert gap > 1e-4
