"""Tokenizer glue: an HF `tokenizers` tokenizer, or none (token-id prompts only)."""

from __future__ import annotations

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: str | None):
        self.path = path
        self._tok = _HFTokenizer.from_file(path) if path else None

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

    def encode(self, text: str) -> list[int]:
        return self._require("a text prompt").encode(text, add_special_tokens=True).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._tok is None:
            return ""
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str | None:
        """The text of one token as it would appear in decoded output."""
        return None if self._tok is None else self._tok.decode([token_id], skip_special_tokens=False)
