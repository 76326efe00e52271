"""Prompt templates live in ``prompts/`` as plain text with ``{placeholder}`` fields and are referred to by name.

Format (see prompts/README.md): ``{name}`` is a field filled at run time; ``{@other/template}`` inserts another
template's text before anything is filled (so a system text or few-shot block is written once and shared);
``{{``/``}}`` are literal braces. A reasoner template wraps the context the reasoner reads before it writes a
thought and must hold ``{context}`` exactly once.
"""

from __future__ import annotations

import os
import re
import string
from pathlib import Path

from thinkrl.errors import ConfigError

PROMPTS_DIR = Path(os.environ.get("THINKRL_PROMPTS_DIR", Path(__file__).resolve().parents[1] / "prompts"))
INCLUDE = re.compile(r"(?<!\{)\{@([^{}]+)\}")
MARKER_FIELDS = ("sot", "eot")  # filled with the thought markers, so few-shot blocks can show thoughts


def known_templates() -> list[str]:
    return sorted(str(p.relative_to(PROMPTS_DIR))[:-4] for p in PROMPTS_DIR.rglob("*.txt"))


def template_path(name: str) -> Path:
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.is_file():
        known = ", ".join(known_templates())
        raise ConfigError(f"prompt template {name!r} not found in {PROMPTS_DIR}; known: {known}")
    return path


def placeholders(name: str, text: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise ConfigError(
            f"prompt template {name!r} has a brace error ({exc}); write literal braces as {{{{ }}}}"
        ) from None


def expand_includes(name: str, text: str, _seen: tuple[str, ...] = ()) -> str:
    """Replace every ``{@other}`` by that template's (expanded) text; a cycle is an error."""
    if name in _seen:
        raise ConfigError(f"prompt template {name!r} includes itself ({' -> '.join((*_seen, name))})")

    def insert(match: re.Match) -> str:
        other = match.group(1).strip()
        return expand_includes(other, template_path(other).read_text(encoding="utf-8"), (*_seen, name))

    return INCLUDE.sub(insert, text)


def load_template(name: str, allowed: set[str] | None = None) -> str:
    """The template's text, includes expanded; with ``allowed``, every placeholder must be one of them."""
    text = expand_includes(name, template_path(name).read_text(encoding="utf-8"))
    if allowed is None:
        return text
    unknown = placeholders(name, text) - allowed
    if unknown:
        raise ConfigError(
            f"prompt template {name!r} uses unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    try:  # a trial fill catches what parsing alone lets through (nested fields in a spec, bad conversions)
        text.format(**dict.fromkeys(allowed, ""))
    except (KeyError, ValueError, IndexError) as exc:
        raise ConfigError(
            f"prompt template {name!r} cannot be filled ({type(exc).__name__}: {exc}); fix its braces"
        ) from None
    return text


def render(name: str, **values: str) -> str:
    return load_template(name, set(values)).format(**values)


def load_reasoner_template(name: str) -> str:
    """A reasoner template's text: only {context} and the markers as fields, and {context} exactly once."""
    text = load_template(name, {"context", *MARKER_FIELDS})
    if "context" not in placeholders(name, text) or text.count("{context}") != 1:
        raise ConfigError(f"reasoner template {name!r} must contain {{context}} exactly once")
    return text


class ReasonerPrompt:
    """Wraps token contexts in a reasoner template: ``prefix + context + suffix``, then the actor adds ``<sot>``.

    The template's text around ``{context}`` is tokenised once; the context keeps its own tokens (and a leading
    BOS stays first), so the wrapped prompt is exact whatever the context."""

    def __init__(self, name: str, tokenizer, sot: str, eot: str, bos: list[int]):
        head, tail = load_reasoner_template(name).split("{context}")
        fill = lambda part: part.format(sot=sot, eot=eot)  # noqa: E731
        encode = lambda part: tokenizer.encode(fill(part), add_special_tokens=False) if part else []  # noqa: E731
        self.name, self.bos = name, bos
        self.prefix, self.suffix = encode(head), encode(tail)

    def wrap(self, context: list[int]) -> list[int]:
        n_bos = len(self.bos) if self.bos and context[: len(self.bos)] == self.bos else 0
        return [*context[:n_bos], *self.prefix, *context[n_bos:], *self.suffix]

    def wrap_all(self, contexts: list[list[int]]) -> list[list[int]]:
        return [self.wrap(c) for c in contexts]


def null_thought_ids(name: str, tokenizer) -> list[int]:
    """Tokens of the null thought's phrase (``rollout.null_thought``); '' is the empty thought."""
    return tokenizer.encode(load_template(name, set()), add_special_tokens=False) if name else []


def bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself starts texts with it (Llama-style), else [] (SmolLM2, GPT-2, ByT5).

    Every tokenised prompt starts with it: task contexts (``thinkrl.data``), Coconut questions and the reasoner's
    wrapped context. It lives here, below the data layer, so that ``thinkrl.data.sources`` can import this module
    and nothing here imports data."""
    ids = tokenizer("a")["input_ids"]
    return ids[:1] if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else []


def reasoner_prompt(name: str, tokenizer) -> ReasonerPrompt | None:
    """The ``rollout.reasoner_template`` wrapper, or None when the reasoner reads the bare context."""
    if not name:
        return None
    from thinkrl.models.roles import EOT, SOT  # models import torch: only when a wrapper is asked for

    return ReasonerPrompt(name, tokenizer, SOT, EOT, bos_prefix(tokenizer))


def wrap_contexts(prompt: ReasonerPrompt | None, contexts: list[list[int]]) -> list[list[int]]:
    return contexts if prompt is None else prompt.wrap_all(contexts)
