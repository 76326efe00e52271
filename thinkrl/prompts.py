"""Prompt templates live in ``prompts/`` as plain text with ``{placeholder}`` fields and are referred to by name."""

from __future__ import annotations

import os
import string
from pathlib import Path

from thinkrl.errors import ConfigError

PROMPTS_DIR = Path(os.environ.get("THINKRL_PROMPTS_DIR", Path(__file__).resolve().parents[1] / "prompts"))


def template_path(name: str) -> Path:
    path = PROMPTS_DIR / f"{name}.txt"
    if not path.is_file():
        known = sorted(str(p.relative_to(PROMPTS_DIR))[:-4] for p in PROMPTS_DIR.rglob("*.txt"))
        raise ConfigError(f"prompt template {name!r} not found in {PROMPTS_DIR}; known: {', '.join(known)}")
    return path


def placeholders(name: str, text: str) -> set[str]:
    try:
        return {field for _, field, _, _ in string.Formatter().parse(text) if field is not None}
    except ValueError as exc:
        raise ConfigError(
            f"prompt template {name!r} has a brace error ({exc}); write literal braces as {{{{ }}}}"
        ) from None


def load_template(name: str, allowed: set[str] | None = None) -> str:
    """The template's text; with ``allowed``, every placeholder must be one of them."""
    text = template_path(name).read_text(encoding="utf-8")
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
