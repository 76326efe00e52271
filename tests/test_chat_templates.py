"""Chat templates: the prompts thinkrl builds equal ``tokenizer.apply_chat_template``'s, with the thought after the
generation prompt, on two real template styles (SmolLM2's ChatML and a Qwen3-style one with a thinking mode of its
own, written into a copy of SmolLM2's tokenizer), and a one-line error for a tokenizer without a chat template."""

from __future__ import annotations

import copy

import pytest

from thinkrl.config import load_config
from thinkrl.errors import ConfigError
from thinkrl.models.roles import EOT, SOT
from thinkrl.prompts import ReasonerPrompt, render, system_text, task_context_encoder

transformers = pytest.importorskip("transformers")

# Qwen3's template, cut to system/user/assistant turns: its thinking mode is on unless enable_thinking is false.
QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
QUESTION = "Tom has 3 apples and buys 4 more. How many apples?"


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from thinkrl.models.smollm2 import smollm2_folder

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_folder())
    tok.add_tokens([SOT, EOT], special_tokens=True)  # as build_tokenizer does
    return tok


@pytest.fixture(scope="module")
def tokenizers(smollm2_tokenizer, tmp_path_factory):
    """SmolLM2's own tokenizer and a copy saved with the Qwen3-style template, reloaded from disk."""
    folder = tmp_path_factory.mktemp("qwen3-style")
    smollm2_tokenizer.save_pretrained(folder)
    qwen = transformers.AutoTokenizer.from_pretrained(folder)
    qwen.chat_template = QWEN3_STYLE
    qwen.save_pretrained(folder)
    qwen = transformers.AutoTokenizer.from_pretrained(folder)
    assert qwen.chat_template == QWEN3_STYLE
    return {"smollm2": smollm2_tokenizer, "qwen3": qwen}


def reference(tok, user: str, system: str = "") -> tuple[str, list[int]]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    kwargs = dict(add_generation_prompt=True, enable_thinking=False)
    text = tok.apply_chat_template(messages, tokenize=False, **kwargs)
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    return text, list(ids)


GENERATION_PROMPT = {"smollm2": "<|im_start|>assistant\n", "qwen3": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}


@pytest.mark.parametrize("style", ["smollm2", "qwen3"])
@pytest.mark.parametrize("system_prompt", ["", "system/answer"])
def test_task_context_equals_apply_chat_template(tokenizers, style, system_prompt):
    tok = tokenizers[style]
    prompt = render("tasks/gsm8k", question=QUESTION)
    ids = task_context_encoder(tok, "tasks/gsm8k", chat_template=True, system_prompt=system_prompt)(prompt)
    text, ref_ids = reference(tok, prompt, system_text(system_prompt, SOT, EOT))
    assert ids == ref_ids
    assert tok.decode(ids) == text
    # The thought follows the generation prompt (Qwen3: after its switched-off think block), then the answer.
    assert text.endswith(GENERATION_PROMPT[style])
    sot, eot = tok.convert_tokens_to_ids([SOT, EOT])
    answer = tok.encode(" 7", add_special_tokens=False)
    sequence = tok.decode([*ids, sot, *tok.encode("3+4", add_special_tokens=False), eot, *answer])
    assert sequence == f"{text}{SOT}3+4{EOT} 7"
    if system_prompt == "" and style == "qwen3":
        assert "system" not in text  # '' = no system turn (SmolLM2's template adds its own default one)


def test_chat_header_switches_a_task_template_on(tokenizers):
    """``tasks/gsm8k_chat`` (header ``chat: true``, ``system: system/answer``) = tasks/gsm8k under data.chat_template
    with that system prompt; data.system_prompt overrides the header's."""
    tok = tokenizers["smollm2"]
    prompt = render("tasks/gsm8k_chat", question=QUESTION)
    assert prompt == render("tasks/gsm8k", question=QUESTION)
    by_header = task_context_encoder(tok, "tasks/gsm8k_chat")(prompt)
    assert by_header == task_context_encoder(tok, "tasks/gsm8k", True, "system/answer")(prompt)
    assert by_header == reference(tok, prompt, system_text("system/answer"))[1]
    plain = task_context_encoder(tok, "tasks/gsm8k")(prompt)
    assert plain == tok.encode(prompt, add_special_tokens=False)  # off: today's context, byte for byte


@pytest.mark.parametrize("style", ["smollm2", "qwen3"])
def test_chat_reasoner_template_wraps_tokens_as_apply_chat_template(tokenizers, style):
    tok = tokenizers[style]
    wrap = ReasonerPrompt("thinking/chat", tok, SOT, EOT, bos=[])
    context = "The cat sat on the mat. Then the"
    text, ref_ids = reference(tok, context, system_text("system/thinking", SOT, EOT))
    wrapped = wrap.wrap(tok.encode(context, add_special_tokens=False))
    assert wrapped == ref_ids
    assert tok.decode(wrapped) == text and text.endswith(GENERATION_PROMPT[style])
    if style == "smollm2":  # the typed ChatML it replaces, byte for byte
        chatml = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
        assert text == chatml.format(system_text("system/thinking", SOT, EOT), context)


def test_tokenizer_without_chat_template_is_a_one_line_error(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    with pytest.raises(ConfigError, match=r"data.chat_template needs a chat template") as info:
        task_context_encoder(tok, "tasks/gsm8k", chat_template=True)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"reasoner template 'thinking/chat' \(chat: true\) needs a chat template"):
        ReasonerPrompt("thinking/chat", tok, SOT, EOT, bos=[])
    task_context_encoder(tok, "tasks/gsm8k")  # off: no template needed


def test_chat_template_config():
    cfg = load_config(None, ["data.source=gsm8k", "data.chat_template=true", "data.system_prompt=system/answer"])
    assert cfg.data.chat_template and cfg.data.system_prompt == "system/answer"
    with pytest.raises(ConfigError, match="text corpus has no turn"):
        load_config(
            None, ["data.source=text", "data.train_file=x.txt", "data.positions=every_k", "data.chat_template=true"]
        )


@pytest.mark.slow
def test_gsm8k_chat_run_feeds_the_chat_prompts(tmp_path, smollm2_tokenizer):
    """One RL step on GSM8K with data.chat_template=true (tiny scratch model, SmolLM2's tokenizer): the trainer's
    training and held-out contexts, and ``thinkrl eval``'s items, are apply_chat_template's tokens."""
    from conftest import TINY
    from eval_fixtures import GSM8K_ROWS, write_eval_data

    from thinkrl.eval.tasks import load_items
    from thinkrl.models.smollm2 import smollm2_folder
    from thinkrl.run.trainer import Trainer

    data = write_eval_data(tmp_path)
    (data / "gsm8k/train.jsonl").write_text((data / "gsm8k/test.jsonl").read_text())
    cfg = load_config(
        None,
        [
            *TINY,
            "data.source=gsm8k",
            f"data.data_dir={data}",
            "data.chat_template=true",
            "data.system_prompt=system/answer",
            "data.context_len=256",  # the whole turn: a left-truncated chat would lose its header
            f"model.tokenizer={smollm2_folder()}",
            "trainer.max_steps=1",
            "data.eval_positions=2",
            "trainer.dump_rollouts=false",
            f"trainer.output_dir={tmp_path / 'run'}",
        ],
    )
    system = system_text("system/answer", SOT, EOT)
    expected = [
        reference(smollm2_tokenizer, render("tasks/gsm8k", question=r["question"]), system)[1] for r in GSM8K_ROWS
    ]
    trainer = Trainer(cfg)
    assert [p.context_ids for p in trainer.train_pool] == expected
    assert [it.context for it in load_items("gsm8k", cfg, trainer.roles.tokenizer, 0, 0)] == expected
    trainer.train()
    assert trainer.state.step == 1
