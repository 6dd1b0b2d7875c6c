"""The OpenAI API as this engine speaks it: which request-body fields map to
which ``SamplingParams``, and the response bodies of ``/v1/completions`` and
``/v1/chat/completions`` (choices, logprobs in each endpoint's own shape,
usage, and the chunks of a streamed response). Used by the batch runner's
OpenAI format and the HTTP server; one place, so that the shapes are the same
wherever a client reads them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

from eaas_jax.engine.chat_template import check_messages
from eaas_jax.engine.outputs import CompletionOutput, RequestOutput
from eaas_jax.engine.sampling_params import MAX_LOGPROBS, InvalidParam, SamplingParams

__all__ = ["COMPLETION_URLS", "IGNORED_FIELDS", "BodyError", "check_body", "error_body", "params_of_body", "parse_body",
           "response_body", "stream_chunk", "usage"]

#: URL -> what its body asks for.
COMPLETION_URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
# Body fields -> SamplingParams fields, as they are (the rest is mapped below or refused).
_PARAMS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "temperature": "temperature",
           "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed", "presence_penalty": "presence_penalty",
           "frequency_penalty": "frequency_penalty"}
#: Fields taken and not acted on: the model is the server's; `user` is the client's label.
IGNORED_FIELDS = frozenset({"model", "user"})
# Logprob fields by endpoint: completions' `logprobs` is a count; chat's is a
# flag with the count in `top_logprobs`.
_LOGPROB_FIELDS = {"completion": {"logprobs"}, "chat": {"logprobs", "top_logprobs"}}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class BodyError(ValueError):
    """A request body that cannot be served; `param` is the body field at
    fault (None: the body as a whole), for the API's error body."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def check_body(kind: str, body: dict, also_allowed: frozenset = frozenset()) -> None:
    """Raises BodyError naming the field if `body` (of a `kind` request:
    "completion" or "chat") cannot be served. `also_allowed`: fields the
    caller handles itself (e.g. ``stream``)."""
    text_key = "prompt" if kind == "completion" else "messages"
    unsupported = sorted(set(body) - set(_PARAMS) - IGNORED_FIELDS - _LOGPROB_FIELDS[kind] - also_allowed
                         - {text_key})
    if unsupported:
        raise BodyError(f"body field(s) {unsupported} are not supported", unsupported[0])
    if text_key not in body:
        raise BodyError(f"body needs '{text_key}'", text_key)
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise BodyError("body gives both max_tokens and max_completion_tokens", "max_completion_tokens")
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    # Completions' `logprobs` is SamplingParams.logprobs itself: its check says what is wrong.
    if kind == "chat":
        if logprobs is not None and not isinstance(logprobs, bool):
            raise BodyError(f"logprobs must be true or false, got {logprobs!r}", "logprobs")
        if top is not None and not (_is_int(top) and 0 <= top <= MAX_LOGPROBS):
            raise BodyError(f"top_logprobs must be an integer in [0, {MAX_LOGPROBS}] or null, got {top!r}",
                            "top_logprobs")
        if top is not None and not logprobs:
            raise BodyError("top_logprobs needs logprobs: true", "top_logprobs")


def _body_field(kind: str, body: dict, field: str) -> str | None:
    """The field of `body` that set SamplingParams' `field` (None: a server default)."""
    if field == "logprobs":
        return "logprobs" if kind == "completion" or body.get("top_logprobs") is None else "top_logprobs"
    return next((k for k, f in _PARAMS.items() if f == field and body.get(k) is not None), None)


#: Tokens a /v1/completions body without max_tokens gets (the API's default;
#: a chat without one may run to the context limit).
COMPLETION_MAX_TOKENS = 16


def params_of_body(kind: str, body: dict) -> dict:
    """The SamplingParams fields a body sets (check_body(kind, body) must
    pass). A field that is null is as one left out, as in the API; without
    max_tokens a completion gets COMPLETION_MAX_TOKENS and a chat may run to
    the context limit (the API's defaults)."""
    fields = {_PARAMS[k]: v for k, v in body.items() if k in _PARAMS and v is not None}
    fields.setdefault("max_tokens", COMPLETION_MAX_TOKENS if kind == "completion" else None)
    if kind == "completion" and body.get("logprobs") is not None:
        fields["logprobs"] = body["logprobs"]
    if kind == "chat" and body.get("logprobs"):
        fields["logprobs"] = body.get("top_logprobs") or 0
    return fields


def parse_body(kind: str, body: dict, defaults: SamplingParams, also_allowed: frozenset = frozenset()
               ) -> tuple[SamplingParams, str | list | None, list | None]:
    """A `kind` body's (sampling params over `defaults`, prompt, messages).
    Raises BodyError naming the field for a body that cannot be served."""
    check_body(kind, body, also_allowed)
    try:
        messages = _text_messages(body["messages"]) if kind == "chat" else None
    except ValueError as e:
        raise BodyError(str(e), "messages") from None
    try:
        params = dataclasses.replace(defaults, **params_of_body(kind, body))
    except InvalidParam as e:
        raise BodyError(str(e), _body_field(kind, body, e.field)) from None
    return params, body.get("prompt"), messages


def _text_messages(messages) -> list[dict]:
    """A chat's messages with each content a string: the API's content parts
    ([{"type": "text", "text": ...}, ...]) joined by newlines; other parts refused."""
    out = []
    for i, m in enumerate(check_messages(messages)):
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ValueError(f"message {i}: only text content parts ({{'type': 'text', 'text': ...}}) "
                                 "are supported")
            m = {**m, "content": "\n".join(p["text"] for p in content)}  # as vLLM joins them
        elif not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of text parts, got {content!r}")
        out.append(m)
    return out


def _completion_logprobs(c: CompletionOutput, start: int = 0, offset: int = 0) -> dict | None:
    """/v1/completions' shape, for the tokens from `start` on (`offset`: the
    characters of the tokens before it): parallel lists of the sampled
    tokens' text, logprob, the top candidates ({text: logprob}) and text
    offsets (from the completion's start)."""
    if c.logprobs is None:
        return None
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, step in zip(c.token_ids[start:], c.logprobs[start:]):
        text = step[token_id].decoded_token or ""
        tokens.append(text)
        token_logprobs.append(step[token_id].logprob)
        top.append({lp.decoded_token or "": lp.logprob for lp in sorted(step.values(), key=lambda lp: lp.rank)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def text_offset_after(chunk: dict, offset: int) -> int:
    """The text offset of the token after a streamed completion `chunk`'s
    logprobs (`offset` if it has none): the next chunk's first."""
    logprobs = chunk["choices"][0].get("logprobs") if chunk["object"] == "text_completion" else None
    if not logprobs or not logprobs["tokens"]:
        return offset
    return logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])


def _chat_logprobs(c: CompletionOutput, top_n: int, start: int = 0) -> dict | None:
    """/v1/chat/completions' shape, for the tokens from `start` on: per
    sampled token its text, logprob, UTF-8 bytes and the `top_n` most likely
    candidates."""
    if c.logprobs is None:
        return None

    def entry(lp) -> dict:
        text = lp.decoded_token or ""
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    content = []
    for token_id, step in zip(c.token_ids[start:], c.logprobs[start:]):
        # The top_n most likely (the sampled token may share a rank in a tie).
        best = sorted((lp for lp in step.values() if lp.rank <= top_n), key=lambda lp: lp.rank)[:top_n]
        content.append({**entry(step[token_id]), "top_logprobs": [entry(lp) for lp in best]})
    return {"content": content}


def usage(outputs: list[RequestOutput]) -> dict:
    """The token counts of a response to `outputs` (one per prompt)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    completion_tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _prefix(kind: str) -> str:
    return "cmpl" if kind == "completion" else "chatcmpl"


def response_id(kind: str) -> str:
    return f"{_prefix(kind)}-{uuid.uuid4().hex}"


def response_body(kind: str, output: RequestOutput | list[RequestOutput], model: str, top_logprobs: int = 0) -> dict:
    """The response body of a finished request, or of the requests of a
    completion's list of prompts (choice i*n + j: prompt i's completion j).
    `top_logprobs`: the candidates a chat asked for per token."""
    outputs = output if isinstance(output, list) else [output]
    choices = []
    for i, out in enumerate(outputs):
        for c in out.outputs:
            index = i * len(out.outputs) + c.index
            if kind == "completion":
                choices.append({"index": index, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": _completion_logprobs(c)})
            else:
                choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": c.finish_reason, "logprobs": _chat_logprobs(c, top_logprobs)})
    return {"id": response_id(kind), "object": "text_completion" if kind == "completion" else "chat.completion",
            "created": int(time.time()), "model": model, "choices": choices, "usage": usage(outputs)}


def stream_chunk(kind: str, response: str, created: int, model: str, index: int, text: str | None,
                 finish_reason: str | None, completion: CompletionOutput | None = None, first_token: int = 0,
                 top_logprobs: int = 0, first_offset: int = 0) -> dict:
    """One server-sent event's body: choice `index`'s new `text` (a chat's
    first chunk, `text` None, says the role), its finish reason once ended,
    and the logprobs of `completion`'s tokens from `first_token` on (a
    completion's text offsets count from `first_offset`: see
    `text_offset_after`). Its cost follows the new tokens, not the whole
    completion."""
    if kind == "completion":
        logprobs = _completion_logprobs(completion, first_token, first_offset) if completion is not None else None
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return {"id": response, "object": "text_completion", "created": created, "model": model,
                "choices": [choice]}
    delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
    choice = {"index": index, "delta": delta, "finish_reason": finish_reason,
              "logprobs": _chat_logprobs(completion, top_logprobs, first_token) if completion is not None else None}
    return {"id": response, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [choice]}


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error response's body, as the API writes it."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
