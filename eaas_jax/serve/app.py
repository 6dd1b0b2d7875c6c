"""The OpenAI-compatible HTTP API over an `AsyncEngine` (FastAPI).

Routes: POST /v1/completions and /v1/chat/completions (streamed as
server-sent events with `stream: true`), GET /v1/models, GET /health (503
while the engine cannot serve) and GET /metrics (Prometheus). Bodies are
checked by `openai_protocol` (the batch runner's rules too); a bad one gets a
400 naming the field. A client that goes away aborts its requests, freeing
their KV blocks. With an API key, /v1/* need `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from eaas_jax import openai_protocol
from eaas_jax.engine.prompts import chat_prompts
from eaas_jax.serve.async_engine import AsyncEngine, EngineStopped, ServerBusy
from eaas_jax.serve.streaming import TextStream

# Body fields the server reads besides openai_protocol's.
_STREAM_FIELDS = frozenset({"stream", "stream_options"})
# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.25
# The status of a request whose client went away (nginx's; nobody reads it).
CLIENT_CLOSED = 499
# Bodies larger are refused (413) before being read whole: a prompt at a
# 128k-token context is ~1 MB of JSON, so this bounds memory, not users.
MAX_BODY_BYTES = 16 << 20


class ApiError(Exception):
    """An error response: its status and OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = openai_protocol.error_body(message, kind, param, code)


class _ServerMetrics:
    """What the HTTP layer counts (the engine counts the rest)."""

    def __init__(self, async_engine: AsyncEngine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("eaas_http_requests", "HTTP generation requests by endpoint and outcome.",
                                ["endpoint", "outcome"], registry=self.registry)
        Gauge("eaas_http_requests_in_progress", "Generation requests the server is answering now.",
              registry=self.registry).set_function(lambda: async_engine.num_unfinished)
        self.registry.register(_AbortedRequests(async_engine))


class _AbortedRequests(Collector):
    def __init__(self, async_engine: AsyncEngine):
        self.async_engine = async_engine

    def collect(self):
        yield CounterMetricFamily("eaas_http_aborted_requests", "Requests aborted because their client went away.",
                                  value=self.async_engine.num_aborted)


def build_app(async_engine: AsyncEngine, *, model: str, api_key: str | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The API of `async_engine`'s engine, serving it under the name `model`."""
    engine = async_engine.engine
    defaults = engine.default_sampling_params()
    metrics = _ServerMetrics(async_engine)
    app = FastAPI(title="eaas-jax", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key is not None:
        app.add_middleware(_RequireApiKey, key=api_key)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status)

    @app.get("/health")
    async def health():
        try:
            problem = await asyncio.wait_for(async_engine.call(lambda e: async_engine.unservable()), timeout=30)
        except EngineStopped as e:
            problem = str(e)
        except asyncio.TimeoutError:
            problem = "the engine loop did not answer within 30 s"
        if problem:
            return JSONResponse(openai_protocol.error_body(problem, "server_error"), status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        try:
            engine_text = await async_engine.call(lambda e: e.metrics_text())
        except EngineStopped:
            engine_text = ""
        return PlainTextResponse(engine_text + generate_latest(metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model, "object": "model", "created": int(time.time()),
                                            "owned_by": "eaas-jax", "max_model_len": engine.max_model_len}]}

    async def generate(request: Request, kind: str):
        endpoint = request.url.path
        try:
            response = await _generate(request, kind)
        except ApiError as e:
            outcome = {429: "rejected", 503: "failed", CLIENT_CLOSED: "aborted"}.get(e.status, "invalid")
            metrics.requests.labels(endpoint, outcome).inc()
            raise
        metrics.requests.labels(endpoint, "streamed" if isinstance(response, StreamingResponse) else "completed").inc()
        return response

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    async def _generate(request: Request, kind: str):
        body = await _json_body(request, max_body_bytes)
        if isinstance(body.get("model"), str) and body["model"] != model:
            raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {model!r}",
                           param="model", code="model_not_found")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        include_usage = _include_usage(body, stream)
        try:
            params, prompt, messages = openai_protocol.parse_body(kind, body, defaults, also_allowed=_STREAM_FIELDS)
        except openai_protocol.BodyError as e:
            raise ApiError(400, str(e), param=e.param) from None
        try:
            prompts = (_completion_prompts(prompt) if kind == "completion" else
                       chat_prompts(engine.tokenizer, [messages], add_generation_prompt=True))
        except (ValueError, TypeError, UnicodeError) as e:  # the prompt's or the conversation's
            raise ApiError(400, str(e), param="prompt" if kind == "completion" else "messages") from None
        if len(prompts) * params.n > async_engine.max_queue:  # could never be admitted: not a 429
            raise ApiError(400, f"{len(prompts)} prompt(s) x n={params.n} sequences are more than this server "
                                f"holds at once ({async_engine.max_queue}, --max-queue)", param="n")
        top_logprobs = (params.logprobs or 0) if kind == "chat" else 0
        # Ids chosen here, so that however this ends (an error, the client
        # gone, a cancelled task) every request can be aborted at once
        # (aborting one that finished does nothing).
        rids = [f"{openai_protocol.response_id(kind)}-{i}" for i in range(len(prompts))]

        streams = [async_engine.generate(p, params, rid) for p, rid in zip(prompts, rids)]
        pumps: list[asyncio.Task] = []  # a stream's tasks, cancelled when it ends however it ends

        def abort_all() -> None:
            for pump in pumps:
                pump.cancel()
            for rid in rids:
                async_engine.abort(rid)

        try:
            firsts = await _until_disconnected(request, _gather_or_fail([_first_output(s, kind) for s in streams]))
            if stream:
                events = _events(kind, model, streams, firsts, params, include_usage, top_logprobs, pumps)
                return _AbortingStream(events, on_close=abort_all)
            outputs = await _until_disconnected(
                request, _gather_or_fail([_last(s, f) for s, f in zip(streams, firsts)]))
        except BaseException:
            abort_all()
            raise
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise ApiError(503, f"expert servers did not serve this request: {errors[0]}", "server_error")
        return openai_protocol.response_body(kind, outputs, model, top_logprobs)

    return app


class _RequireApiKey:
    """ASGI middleware: every path but /health and /metrics needs
    `Authorization: Bearer KEY` (a mounted app's prefix or root_path
    included). Not Starlette's BaseHTTPMiddleware: it hides a client's
    disconnect from the routes, and a request whose client left would run to
    its end."""

    OPEN = frozenset({"/health", "/metrics"})

    def __init__(self, app, key: str):
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._open(scope):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
                response = JSONResponse(openai_protocol.error_body("missing or wrong API key", "authentication_error",
                                                                   code="invalid_api_key"), status_code=401)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _open(self, scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        return path in self.OPEN


class _AbortingStream(StreamingResponse):
    """A server-sent event stream that aborts its requests when it ends,
    however it ends (a client gone before the first event or in a blocked
    send included), without waiting for the garbage collector to finalise
    the generators."""

    def __init__(self, content, *, on_close):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _gather_or_fail(awaitables: list):
    """asyncio.gather, except that the first failure cancels the others."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()


async def _json_body(request: Request, limit: int) -> dict:
    too_large = ApiError(413, f"the body is larger than this server's limit of {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # also bounds a chunked body, which declares no length
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options needs stream: true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise ApiError(400, f"stream_options must be {{\"include_usage\": true|false}}, got {options!r}",
                       param="stream_options")
    return options.get("include_usage", False)


def _completion_prompts(prompt) -> list:
    """A completions body's prompts: a string, token ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return prompt
    raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of either")


async def _first_output(stream: AsyncIterator, kind: str):
    """Queues the request (its first `__anext__`) and waits for its first
    output: a bad prompt or a full queue fails here, before any response."""
    try:
        return await stream.__anext__()
    except ServerBusy as e:
        raise ApiError(429, str(e), "server_busy", code="server_busy") from None
    except (EngineStopped, RuntimeError) as e:
        raise ApiError(503, str(e), "server_error") from None
    except (ValueError, TypeError, UnicodeError) as e:
        code = "context_length_exceeded" if "does not fit max_model_len" in str(e) else None
        raise ApiError(400, str(e), param="prompt" if kind == "completion" else "messages", code=code) from None


async def _last(stream: AsyncIterator, output):
    try:
        while not output.finished:
            output = await stream.__anext__()
    except (EngineStopped, RuntimeError) as e:
        raise ApiError(503, str(e), "server_error") from None
    return output


async def _until_disconnected(request: Request, work):
    """`work`'s result; if the client goes away first, `work` is cancelled
    (its requests aborted) and ApiError(CLIENT_CLOSED) raised."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not done and await request.is_disconnected():
                raise ApiError(CLIENT_CLOSED, "the client went away")
        return task.result()
    finally:
        task.cancel()  # no-op once done


async def _events(kind, model, streams, firsts, params, include_usage, top_logprobs, pumps: list
                  ) -> AsyncIterator[str]:
    """The server-sent events of a streamed response over every prompt's
    outputs as they come. Outputs are cumulative, so a slow reader gets the
    latest of each request, not a backlog (memory stays bounded). Its tasks
    go into `pumps` (the response cancels them when it ends)."""
    response, created = openai_protocol.response_id(kind), int(time.time())
    n = params.n
    latest: dict[int, object] = {}  # prompt -> its newest output (or the error that ended it)
    changed = asyncio.Event()

    async def pump(i, stream, first):
        # A task per prompt: cancelling it ends that request's iteration.
        try:
            output = first
            while True:
                latest[i] = output
                changed.set()
                if output.finished:
                    return
                output = await stream.__anext__()
        except Exception as e:  # noqa: BLE001 - handed to the response, which ends with it
            latest[i] = e
            changed.set()

    def event(chunk: dict) -> str:
        return f"data: {json.dumps(chunk)}\n\n"

    pumps += [asyncio.ensure_future(pump(i, s, f)) for i, (s, f) in enumerate(zip(streams, firsts))]
    texts = {}  # choice index -> its TextStream
    ended: set[int] = set()  # choice indices whose finish was sent
    done: dict[int, object] = {}  # prompt -> its finished output
    try:
        if kind == "chat":
            for i in range(len(streams) * n):
                yield event(openai_protocol.stream_chunk(kind, response, created, model, i, None, None))
        while len(done) < len(streams):
            await changed.wait()
            changed.clear()
            for i in list(latest):
                output = latest.pop(i)  # the newest: pumps may have moved on while earlier events were sent
                if isinstance(output, BaseException):
                    yield event(openai_protocol.error_body(str(output), "server_error"))
                    return
                for c in output.outputs:
                    index = i * n + c.index
                    if index in ended:
                        continue
                    text = texts.setdefault(index, TextStream(params.stop))
                    finished = c.finish_reason is not None
                    delta = text.delta(c.text, finished)
                    new_tokens = len(c.token_ids) > text.tokens
                    if not (delta or finished or (c.logprobs is not None and new_tokens)):
                        continue
                    chunk = openai_protocol.stream_chunk(
                        kind, response, created, model, index, delta, c.finish_reason if finished else None,
                        c if c.logprobs is not None else None, text.tokens, top_logprobs, text.token_chars)
                    yield event(chunk)
                    text.tokens = len(c.token_ids)
                    text.token_chars = openai_protocol.text_offset_after(chunk, text.token_chars)
                    if finished:
                        ended.add(index)
                if output.error:
                    yield event(openai_protocol.error_body(output.error, "server_error"))
                if output.finished:
                    done[i] = output
        if include_usage:
            yield event({"id": response, "object": "text_completion" if kind == "completion" else
                         "chat.completion.chunk", "created": created, "model": model, "choices": [],
                         "usage": openai_protocol.usage([done[i] for i in sorted(done)])})
        yield "data: [DONE]\n\n"
    finally:
        for p in pumps:
            p.cancel()
