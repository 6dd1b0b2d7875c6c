"""Batch input lines and output records, in two formats.

Simple: each line is a prompt string, or an object with ``prompt`` (text or
token ids) or ``messages`` (a chat), an optional ``custom_id`` (default
``line-<n>``) and any ``SamplingParams`` field. Its result record is the
completion (``request_id``, ``prompt``, ``outputs``...) with ``custom_id``.

OpenAI batch: ``{"custom_id", "method": "POST", "url": "/v1/completions" or
"/v1/chat/completions", "body": {...}}``, the body's fields those of the
OpenAI API this engine has (``eaas_jax/openai_protocol.py``: ``model``,
``prompt``/``messages``, ``max_tokens``/``max_completion_tokens``,
``temperature``, ``top_p``, ``n``, ``stop``, ``seed``, the presence and
frequency penalties, ``logprobs`` and chat's ``top_logprobs``). Its record is
OpenAI's batch output line: ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``, the body that of the API
(logprobs in its shape).

A line that cannot be a request (not UTF-8 or JSON, an unknown field, a bad
sampling value or chat) is a :class:`BadLine`: the run writes an error record
for it and goes on. Two lines with one custom_id refuse the whole input.
"""

from __future__ import annotations

import dataclasses
import json
import uuid

from eaas_jax import openai_protocol
from eaas_jax.engine.chat_template import check_messages
from eaas_jax.engine.outputs import RequestOutput
from eaas_jax.engine.sampling_params import SamplingParams

__all__ = ["BadLine", "BatchRequest", "completion_dict", "error_record", "read_requests", "result_record"]

#: OpenAI batch URLs -> what the body asks for.
OPENAI_URLS = openai_protocol.COMPLETION_URLS
_STREAM = frozenset({"stream"})  # taken and ignored: batches do not stream


@dataclasses.dataclass(frozen=True)
class BatchRequest:
    """One request of a batch file."""

    custom_id: str
    where: str  #: "file:line"
    params: SamplingParams
    prompt: str | list[int] | None = None  #: a completion's
    messages: list | None = None  #: a chat's
    openai_url: str | None = None  #: the OpenAI batch URL it came with (its record's format)
    model: str | None = None  #: an OpenAI body's `model` (its record names it)


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line that is no request, and why."""

    custom_id: str
    where: str
    reason: str
    openai_url: str | None = None  #: the URL of an OpenAI batch line (its error record is OpenAI's)


def read_requests(path: str, defaults: SamplingParams) -> list[BatchRequest | BadLine]:
    """Every non-blank line of `path`, as a request or a bad line (in file order).

    Raises:
      OSError: the file cannot be read.
      ValueError: two lines have one custom_id (the results could not be
        told apart, nor a resume know which ran): the input is refused whole,
        as OpenAI's batch API does.
    """
    items: list[BatchRequest | BadLine] = []
    first_line: dict[str, str] = {}
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                items.append(BadLine(f"line-{number}", where, f"not UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            item = _parse(line, where, f"line-{number}", defaults)
            if item.custom_id in first_line:
                raise ValueError(f"{where}: custom_id {item.custom_id!r} is that of {first_line[item.custom_id]} "
                                 "too; every request needs an id of its own")
            first_line[item.custom_id] = where
            items.append(item)
    return items


def _parse(line: str, where: str, default_id: str, defaults: SamplingParams) -> BatchRequest | BadLine:
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as e:
        return BadLine(default_id, where, f"not valid JSON ({e})")
    if isinstance(raw, dict) and "url" in raw and "body" in raw:
        return _parse_openai(raw, where, default_id, defaults)
    if isinstance(raw, str):
        raw = {"prompt": raw}
    if not isinstance(raw, dict):
        return BadLine(default_id, where, "expected a prompt string or an object")
    custom_id = raw.get("custom_id", default_id)
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(default_id, where, f"custom_id must be a non-empty string, got {custom_id!r}")
    if ("prompt" in raw) == ("messages" in raw):
        return BadLine(custom_id, where, "expected exactly one of 'prompt' and 'messages'")
    fields = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(raw) - fields - {"prompt", "messages", "custom_id"})
    if unknown:
        return BadLine(custom_id, where, f"unknown field(s) {unknown}")
    try:
        if "messages" in raw:
            check_messages(raw["messages"])
        params = dataclasses.replace(defaults, **{k: v for k, v in raw.items() if k in fields})
    except (ValueError, TypeError) as e:
        return BadLine(custom_id, where, str(e))
    return BatchRequest(custom_id, where, params, prompt=raw.get("prompt"), messages=raw.get("messages"))


def _parse_openai(raw: dict, where: str, default_id: str, defaults: SamplingParams) -> BatchRequest | BadLine:
    url = raw.get("url")
    custom_id = raw.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BadLine(default_id, where, "an OpenAI batch line needs a custom_id string", url)
    unknown = sorted(set(raw) - {"custom_id", "method", "url", "body"})
    if unknown:
        return BadLine(custom_id, where, f"unknown field(s) {unknown}", url)
    if raw.get("method", "POST") != "POST":
        return BadLine(custom_id, where, f"method must be POST, got {raw.get('method')!r}", url)
    if url not in OPENAI_URLS:
        return BadLine(custom_id, where, f"url must be one of {sorted(OPENAI_URLS)}, got {url!r}", str(url))
    body = raw["body"]
    if not isinstance(body, dict):
        return BadLine(custom_id, where, "body must be an object", url)
    try:
        params, prompt, messages = openai_protocol.parse_body(OPENAI_URLS[url], body, defaults, also_allowed=_STREAM)
    except ValueError as e:
        return BadLine(custom_id, where, str(e), url)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    return BatchRequest(custom_id, where, params, prompt=prompt, messages=messages, openai_url=url, model=model)


# --- records -------------------------------------------------------------------


def _logprob_steps(steps: list | None) -> list | None:
    """Per position, {token id (a JSON key): its Logprob's fields}; None stays None."""
    if steps is None:
        return None
    return [None if step is None else
            {str(token): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for token, lp in step.items()} for step in steps]


def completion_dict(output: RequestOutput) -> dict:
    """A request's output as JSON values (the simple format's record body)."""
    return {
        "request_id": output.request_id,
        "prompt": output.prompt,
        "prompt_token_ids": output.prompt_token_ids,
        **({"prompt_logprobs": _logprob_steps(output.prompt_logprobs)} if output.prompt_logprobs else {}),
        "outputs": [
            {"index": c.index, "text": c.text, "token_ids": c.token_ids, "cumulative_logprob": c.cumulative_logprob,
             "logprobs": _logprob_steps(c.logprobs), "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            for c in output.outputs
        ],
        **({"error": output.error} if output.error else {}),
    }


def result_record(request: BatchRequest, output: RequestOutput, model: str) -> dict:
    """The output line of a request that ran (an error record if it failed)."""
    if output.error:
        return error_record(request.custom_id, request.where, output.error, request.openai_url)
    if request.openai_url is None:
        return {"custom_id": request.custom_id, **completion_dict(output)}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": request.custom_id,
            "response": {"status_code": 200, "request_id": output.request_id,
                         "body": openai_protocol.response_body(OPENAI_URLS[request.openai_url], output,
                                                               request.model or model,
                                                               top_logprobs=request.params.logprobs or 0)},
            "error": None}


def error_record(custom_id: str, where: str, reason: str, openai_url: str | None) -> dict:
    """The output line of a request that could not run, naming its line."""
    message = f"{where}: {reason}"
    if openai_url is None:
        return {"custom_id": custom_id, "error": message}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}
