"""Prompt templates live in ``prompts/`` as plain text with ``{placeholder}`` fields and are referred to by name.

Format (see prompts/README.md): ``{name}`` is a field filled at run time; ``{@other/template}`` inserts another
template's text before anything is filled (so a system text or few-shot block is written once and shared);
``{{``/``}}`` are literal braces. A reasoner template wraps the context the reasoner reads before it writes a
thought and must hold ``{context}`` exactly once.

Chat templates: a file may start with a header between two ``---`` lines (``chat: true``, ``system: NAME``). Such a
template (or any task template under ``data.chat_template=true``) is rendered by the tokenizer's own chat template
(``apply_chat_template``): its text is the user turn, ``system`` names the system turn's template, and the rendering
ends with the generation prompt (the assistant header), after which the thought goes, before the answer. The
thought markers therefore never sit inside a turn's special tokens. Templates with a thinking mode of their own
(Qwen3's ``<think>``) are rendered with it switched off (``enable_thinking=False``; ignored by other templates).
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
HEADER = re.compile(r"\A---\n(.*?)\n---\n", re.S)  # a template's optional header: `key: value` lines
HEADER_KEYS = {"chat": ("true", "false"), "system": None}  # allowed values (None: a prompts/ name, '' = none)
CONTEXT_SLOT = "\x00thinkrl-context\x00"  # stands for {context} while a chat template renders a reasoner template


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


def split_header(name: str, raw: str) -> tuple[dict[str, str], str]:
    """A template file's (header, text): the header's ``key: value`` lines between two leading ``---`` lines
    (``{}`` when there are none), and the text after them, used exactly."""
    match = HEADER.match(raw)
    if match is None:
        return {}, raw
    header = {}
    for line in match.group(1).splitlines():
        key, sep, value = (part.strip() for part in line.partition(":"))
        allowed = HEADER_KEYS.get(key, ())
        if not sep or key not in HEADER_KEYS or (allowed is not None and value not in allowed):
            raise ConfigError(
                f"prompt template {name!r}: bad header line {line!r}; allowed: chat: true|false, system: <prompt name>"
            )
        header[key] = value
    return header, raw[match.end() :]


def template_header(name: str) -> dict[str, str]:
    """The header of template ``name`` (``{}`` when it has none)."""
    return split_header(name, template_path(name).read_text(encoding="utf-8"))[0]


def expand_includes(name: str, text: str, _seen: tuple[str, ...] = ()) -> str:
    """Replace every ``{@other}`` by that template's (expanded) text, its header left out; a cycle is an error."""
    if name in _seen:
        raise ConfigError(f"prompt template {name!r} includes itself ({' -> '.join((*_seen, name))})")

    def insert(match: re.Match) -> str:
        other = match.group(1).strip()
        body = split_header(other, template_path(other).read_text(encoding="utf-8"))[1]
        return expand_includes(other, body, (*_seen, name))

    return INCLUDE.sub(insert, text)


def load_template(name: str, allowed: set[str] | None = None) -> str:
    """The template's text (its header left out), includes expanded; with ``allowed``, every placeholder must be
    one of them."""
    text = expand_includes(name, split_header(name, template_path(name).read_text(encoding="utf-8"))[1])
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


def system_text(name: str, sot: str = "", eot: str = "") -> str:
    """The system turn's text: template ``name`` with the markers filled; '' = no system turn."""
    return load_template(name, set(MARKER_FIELDS)).format(sot=sot, eot=eot) if name else ""


def chat_prompt(tokenizer, user: str, system: str = "", asked_by: str = "data.chat_template") -> str:
    """``user`` as one user turn (after a ``system`` turn unless it is ''), rendered by the tokenizer's own chat
    template up to and including the generation prompt (the assistant header), where the thought goes.

    Exactly ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
    enable_thinking=False)``: a template with a thinking mode of its own (Qwen3) renders its empty think block, so
    that thinkrl's thought markers, not the model's ``<think>``, follow the header; other templates ignore the flag.
    ``asked_by`` names the setting in the error for a tokenizer without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"{asked_by} needs a chat template, and tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has none; "
            "use a chat (instruct) model's tokenizer or a plain prompt template"
        )
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": user})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False)


class ReasonerPrompt:
    """Wraps token contexts in a reasoner template: ``prefix + context + suffix``, then the actor adds ``<sot>``.

    The template's text around ``{context}`` is tokenised once; the context keeps its own tokens (and a leading
    BOS stays first), so the wrapped prompt is exact whatever the context. A ``chat: true`` template is first
    rendered by the tokenizer's chat template (``chat_prompt``, its text as the user turn, the header's ``system``
    as the system turn) with a stand-in for the context, then split there; the template's rendering decides the BOS,
    so a context's own leading BOS is dropped. (A chat template that trims a turn's text would trim the context's
    edge whitespace, which the token wrapper keeps.)"""

    def __init__(self, name: str, tokenizer, sot: str, eot: str, bos: list[int]):
        text = load_reasoner_template(name)
        fill = lambda part: part.format(sot=sot, eot=eot)  # noqa: E731
        header = template_header(name)
        self.chat = header.get("chat") == "true"
        if self.chat:
            system = system_text(header.get("system", ""), sot, eot)
            user = fill(text.replace("{context}", CONTEXT_SLOT))
            rendered = chat_prompt(tokenizer, user, system, f"reasoner template {name!r} (chat: true)")
            if rendered.count(CONTEXT_SLOT) != 1:
                raise ConfigError(f"the chat template does not keep reasoner template {name!r}'s text in one piece")
            head, tail = rendered.split(CONTEXT_SLOT)
        else:
            head, tail = map(fill, text.split("{context}"))
        encode = lambda part: tokenizer.encode(part, add_special_tokens=False) if part else []  # noqa: E731
        self.name, self.bos = name, bos
        self.prefix, self.suffix = encode(head), encode(tail)

    def wrap(self, context: list[int]) -> list[int]:
        n_bos = len(self.bos) if self.bos and context[: len(self.bos)] == self.bos else 0
        if self.chat:
            return [*self.prefix, *context[n_bos:], *self.suffix]
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


def task_context_encoder(tokenizer, template: str, chat_template: bool = False, system_prompt: str = ""):
    """``encode(prompt) -> context ids`` for a task item's prompt (``template`` filled with the item): what the
    interpreter reads, and the reasoner too unless a reasoner template wraps it; the thought goes at its end.

    Plain: ``bos_prefix + tokens(prompt)``. Chat (``data.chat_template`` or the template's ``chat: true``): the
    tokens of ``chat_prompt(prompt, system)``, system = ``data.system_prompt`` or else the template's ``system``
    (no system turn when both are ''), so the thought follows the generation prompt."""
    header = template_header(template)
    if not (chat_template or header.get("chat") == "true"):
        bos = bos_prefix(tokenizer)
        return lambda prompt: bos + tokenizer.encode(prompt, add_special_tokens=False)
    from thinkrl.models.roles import EOT, SOT  # models import torch: only when a chat prompt is asked for

    system = system_text(system_prompt or header.get("system", ""), SOT, EOT)
    asked_by = "data.chat_template" if chat_template else f"prompt template {template!r} (chat: true)"
    chat_prompt(tokenizer, "", system, asked_by)  # a tokenizer without a chat template fails here, once
    return lambda prompt: tokenizer.encode(chat_prompt(tokenizer, prompt, system, asked_by), add_special_tokens=False)


def reasoner_prompt(name: str, tokenizer) -> ReasonerPrompt | None:
    """The ``rollout.reasoner_template`` wrapper, or None when the reasoner reads the bare context."""
    if not name:
        return None
    from thinkrl.models.roles import EOT, SOT  # models import torch: only when a wrapper is asked for

    return ReasonerPrompt(name, tokenizer, SOT, EOT, bos_prefix(tokenizer))


def wrap_contexts(prompt: ReasonerPrompt | None, contexts: list[list[int]]) -> list[list[int]]:
    return contexts if prompt is None else prompt.wrap_all(contexts)
