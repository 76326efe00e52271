"""Prompt templates: includes, reasoner wrapping, one-line errors, and every shipped template loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import thinkrl.prompts as prompts
from thinkrl.errors import ConfigError
from thinkrl.prompts import MARKER_FIELDS, ReasonerPrompt, known_templates, load_template


@pytest.fixture
def prompt_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(prompts, "PROMPTS_DIR", tmp_path)

    def write(name: str, text: str) -> None:
        path = tmp_path / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return write


def test_includes_expand_recursively_and_cycles_fail(prompt_dir):
    prompt_dir("system/a", "SYSTEM {sot}x{eot}")
    prompt_dir("block/b", "{@system/a}\nBLOCK")
    prompt_dir("thinking/t", "{@block/b}\n{{literal}} {context}!")
    expanded = load_template("thinking/t", {"context", *MARKER_FIELDS})
    assert expanded == "SYSTEM {sot}x{eot}\nBLOCK\n{{literal}} {context}!"
    prompt_dir("loop/x", "{@loop/y}")
    prompt_dir("loop/y", "{@loop/x}")
    with pytest.raises(ConfigError, match="includes itself"):
        load_template("loop/x")
    prompt_dir("bad/missing", "{@nope/never}")
    with pytest.raises(ConfigError, match="nope/never"):
        load_template("bad/missing")


def test_reasoner_prompt_wraps_tokens_exactly(prompt_dir):
    class Tok:  # one token per character: easy to check by hand
        def encode(self, text, add_special_tokens=False):
            return [ord(ch) for ch in text]

    prompt_dir("thinking/t", "[{sot}]{context}<")
    wrap = ReasonerPrompt("thinking/t", Tok(), "S", "E", bos=[1])
    assert wrap.wrap([1, 50, 51]) == [1, ord("["), ord("S"), ord("]"), 50, 51, ord("<")]  # BOS stays first
    assert wrap.wrap([50]) == [ord("["), ord("S"), ord("]"), 50, ord("<")]
    prompt_dir("thinking/twice", "{context}{context}")
    with pytest.raises(ConfigError, match="exactly once"):
        ReasonerPrompt("thinking/twice", Tok(), "S", "E", bos=[])
    prompt_dir("thinking/unknown", "{context} {question}")
    with pytest.raises(ConfigError, match="question"):
        ReasonerPrompt("thinking/unknown", Tok(), "S", "E", bos=[])


def test_every_shipped_template_loads():
    names = known_templates()
    assert {"system/thinking", "null/default", "thinking/plain", "thinking/fewshot", "scenarios/poem_plan"} <= set(
        names
    )
    for name in names:
        text = load_template(name)
        if name.startswith("thinking/"):
            load_template(name, {"context", *MARKER_FIELDS})
            assert text.count("{context}") == 1
        if name.startswith(("system/", "scenarios/")):
            load_template(name, set(MARKER_FIELDS))
    assert load_template("null/default") == "I will stick with my default distribution"
    assert load_template("null/empty") == ""


def test_prompts_sit_below_the_data_layer():
    """``thinkrl.data.sources`` reads templates and ``bos_prefix`` from here; nothing here imports ``thinkrl.data``
    (not even inside a function), so each module imports alone in a fresh interpreter."""
    tree = ast.parse(Path(prompts.__file__).read_text(encoding="utf-8"))
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [name for name in imported if name.startswith("thinkrl.data")]
    check = "import sys, thinkrl.prompts; assert not [m for m in sys.modules if m.startswith('thinkrl.data')]"
    for code in (check, "import thinkrl.data.sources"):
        subprocess.run([sys.executable, "-c", code], check=True)


def test_header_marks_chat_templates(prompt_dir):
    """A ``---`` header is not part of the text (nor of an include); a chat template's rendering decides the BOS."""

    class ChatTok:  # one token per character; its chat template: [system] user turn, then the generation prompt
        chat_template = "fake"

        def encode(self, text, add_special_tokens=False):
            return [ord(ch) for ch in text]

        def apply_chat_template(self, messages, add_generation_prompt, tokenize, enable_thinking):
            assert add_generation_prompt and not tokenize and enable_thinking is False
            return "^" + "".join(f"<{m['role'][0]}>{m['content']}|" for m in messages) + "<a>"

    prompt_dir("system/s", "sys {sot}")
    prompt_dir("thinking/c", "---\nchat: true\nsystem: system/s\n---\n[{context}]")
    prompt_dir("thinking/uses", "{@thinking/c}!")
    assert prompts.template_header("thinking/c") == {"chat": "true", "system": "system/s"}
    assert load_template("thinking/c") == "[{context}]" and load_template("thinking/uses") == "[{context}]!"
    wrap = ReasonerPrompt("thinking/c", ChatTok(), "S", "E", bos=[1])
    expected = [ord(ch) for ch in "^<s>sys S|<u>["] + [50, 51] + [ord(ch) for ch in "]|<a>"]
    assert wrap.wrap([1, 50, 51]) == wrap.wrap([50, 51]) == expected  # the context's own BOS gives way
    prompt_dir("thinking/bad", "---\nchat: yes\n---\n{context}")
    with pytest.raises(ConfigError, match="bad header line 'chat: yes'"):
        load_template("thinking/bad")
