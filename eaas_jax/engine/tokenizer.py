"""Tokenizer glue: an HF `tokenizers` tokenizer and its chat template, or none
(token-id prompts only).

A checkpoint directory may hold `tokenizer.json`, `tokenizer_config.json`
(special tokens, and the chat template in older exports) and
`chat_template.jinja` (newer exports); every one is optional.
"""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from eaas_jax.checkpoint.directory import TOKENIZER_FILE
from eaas_jax.engine.chat_template import render_chat

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, path: str | None, *, chat_template: str | None = None,
                 special_tokens: dict[str, str] | None = None):
        self.path = path
        self._tok = _HFTokenizer.from_file(path) if path else None
        self.chat_template = chat_template
        self.special_tokens = special_tokens or {}

    @classmethod
    def from_directory(cls, directory: str | os.PathLike) -> "Tokenizer":
        directory = os.fspath(directory)
        path = os.path.join(directory, TOKENIZER_FILE)
        config = {}
        config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
        if os.path.isfile(config_path):
            try:
                with open(config_path) as f:
                    config = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        template_path = os.path.join(directory, CHAT_TEMPLATE_FILE)
        if os.path.isfile(template_path):
            with open(template_path) as f:
                template = f.read()
        special = {
            name: text
            for name in ("bos_token", "eos_token", "pad_token", "unk_token")
            if (text := _token_text(config.get(name))) is not None
        }
        return cls(path if os.path.isfile(path) else None, chat_template=template,
                   special_tokens=special)

    @property
    def available(self) -> bool:
        return self._tok is not None

    def _require(self, what: str) -> _HFTokenizer:
        if self._tok is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this checkpoint has no tokenizer.json: "
                "pass prompts as lists of token ids"
            )
        return self._tok

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self._require("a text prompt").encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """The text of one token as it would appear in decoded output."""
        return None if self._tok is None else self._tok.decode([token_id], skip_special_tokens=False)

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a conversation, rendered with the checkpoint's template."""
        self._require("a chat")
        if not self.chat_template:
            raise ValueError(
                "this checkpoint has no chat template (tokenizer_config.json 'chat_template' "
                f"or {CHAT_TEMPLATE_FILE}); format the prompt yourself and call generate()"
            )
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           **self.special_tokens)
