"""Prompts into requests: tokenized and checked before anything is queued."""

from __future__ import annotations

import itertools
from typing import Callable, Container, Sequence as Seq

import numpy as np

from eaas_jax.engine.chat_template import check_messages
from eaas_jax.engine.sampling_params import SamplingParams
from eaas_jax.engine.sequence import Request
from eaas_jax.engine.tokenizer import Tokenizer

Prompt = str | Seq[int]


_NOT_PARAMS = ("sampling params must be SamplingParams (one, or one per prompt), got {kind}; "
               "for a dict d of its fields, pass SamplingParams(**d)")


class ChatPrompt(str):
    """Prompt text rendered from a chat template: tokenized without adding
    special tokens, since the template already wrote them."""

    __slots__ = ()


def paired_with_params(prompts: Prompt | Seq[Prompt], sampling_params, default: Callable[[], SamplingParams]
                       ) -> tuple[list[Prompt], list[SamplingParams]]:
    """`generate`'s arguments as a list of prompts and one SamplingParams
    each: a single prompt (text or token ids) is a list of one; one (or no,
    then `default()`) SamplingParams serves every prompt."""
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], (int, np.integer))
    ):
        prompts = [prompts]
    prompts = list(prompts)
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return prompts, [sampling_params or default()] * len(prompts)
    if isinstance(sampling_params, dict):
        raise TypeError(_NOT_PARAMS.format(kind="a dict"))
    params = list(sampling_params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    return prompts, params


def chat_prompts(tokenizer: Tokenizer, messages, *, add_generation_prompt: bool) -> list[ChatPrompt]:
    """One conversation ([{"role": ..., "content": ...}]) or a list of them,
    each rendered with the tokenizer's chat template; ValueError names the
    conversation at fault."""
    conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    prompts = []
    for i, conversation in enumerate(conversations):
        try:
            text = tokenizer.apply_chat_template(check_messages(conversation),
                                                 add_generation_prompt=add_generation_prompt)
        except ValueError as e:
            raise type(e)(f"conversation {i}: {e}") from None
        prompts.append(ChatPrompt(text))
    return prompts


def abbreviated(indices: list[int], shown: int = 8) -> str:
    """"0, 3, 5" or "0, 1, ..., 7 and 4 more" for an error message."""
    text = ", ".join(map(str, indices[:shown]))
    return text + (f" and {len(indices) - shown} more" if len(indices) > shown else "")


class RequestBuilder:
    """Makes `Request`s for one engine: ids from a counter unless given, and
    seeds from `seed`'s generator for requests that set none."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, seed: int):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()

    def build(self, prompt: Prompt, params: SamplingParams, request_id: str | None,
              in_use: Container[str]) -> Request:
        """The request for `prompt`; raises ValueError or TypeError naming what
        is wrong with it (or with a `request_id` already `in_use`)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(_NOT_PARAMS.format(kind=type(params).__name__))
        ids, text = self._tokens(prompt)
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len} "
                "(at least one token must be generated)"
            )
        if params.stop and not self.tokenizer.available:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids instead")
        bad_stops = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside the vocabulary")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in in_use:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**32))
        return Request(request_id, text, ids, params, seed)

    def _tokens(self, prompt: Prompt) -> tuple[list[int], str | None]:
        """The prompt's token ids and text (None for a token-id prompt)."""
        if isinstance(prompt, ChatPrompt):
            ids, text = self.tokenizer.encode(prompt, add_special_tokens=False), str(prompt)
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            ids, text = self.tokenizer.encode(prompt), prompt
        else:
            ids, text = list(prompt), None
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise ValueError("a token-id prompt must be a list of integers")
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("empty prompt")
        return ids, text
