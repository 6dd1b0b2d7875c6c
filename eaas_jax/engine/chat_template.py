"""Rendering of HF chat templates (Jinja) into prompt text.

Templates are untrusted input shipped with a checkpoint, so they run in
Jinja's immutable sandbox. The environment offers what HF templates rely on:
`trim_blocks`/`lstrip_blocks`, loop controls, a `tojson` filter that does not
HTML-escape, `raise_exception(msg)` and `strftime_now(fmt)`.
"""

from __future__ import annotations

import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template that does not compile, or rejects the conversation."""


def _raise(message):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(f"message {i} must be a dict with a 'role' string and 'content', got {m!r}")
    return list(messages)


def render_chat(template: str, messages, *, add_generation_prompt: bool = True, **context) -> str:
    """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
    messages = check_messages(messages)
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **context
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on this conversation: {e}") from None
