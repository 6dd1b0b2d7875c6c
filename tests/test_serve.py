"""`eaas-jax serve`: the OpenAI HTTP API, driven with the official `openai`
client against a server on an ephemeral loopback port. Greedy completions
and chats, streamed and not, equal `Engine.generate()`; a client going away
mid-stream frees its sequence; 50 concurrent streams complete; bad bodies get
400 naming the field and the server goes on; /metrics parses with
prometheus_client; a full queue gets 429; a failed engine makes /health 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from eaas_jax import openai_protocol
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.prompts import chat_prompts
from eaas_jax.serve import AsyncEngine, build_app
from eaas_jax.serve.streaming import sendable

MODEL = "tiny"
KEY = "test-key"  # the served app checks it: every test goes through its middleware
AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPTS = ["def f(x):", "import os\nimport sys", "class A:", "a"]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    """The tiny random checkpoint with a chat template."""
    path = str(tmp_path_factory.mktemp("serve") / "tiny-chat")
    shutil.copytree(tiny_checkpoint, path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(TEMPLATE)
    return path


class Served:
    def __init__(self, engine: Engine, async_engine: AsyncEngine, url: str):
        self.engine, self.async_engine, self.url = engine, async_engine, url
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def served(checkpoint):
    engine = Engine(checkpoint, max_num_seqs=8, max_model_len=256, dtype="float32", block_size=4)
    async_engine = AsyncEngine(engine, max_queue=64)
    server = uvicorn.Server(uvicorn.Config(build_app(async_engine, model=MODEL, api_key=KEY), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(engine, async_engine, f"http://127.0.0.1:{port}")
    server.should_exit = True
    thread.join(30)
    async_engine.shutdown()
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_engine, checkpoint) -> dict:
    """Greedy texts of Engine.generate() (same weights, another engine) for
    the prompts, and for one chat rendered with the checkpoint's template."""
    from eaas_jax.engine.tokenizer import Tokenizer

    params = SamplingParams(temperature=0.0, max_tokens=12)
    texts = {p: o.outputs[0].text for p, o in zip(PROMPTS, tiny_engine.generate(PROMPTS, params, use_tqdm=False))}
    chat = chat_prompts(Tokenizer.from_directory(checkpoint), [{"role": "user", "content": "hello"}],
                        add_generation_prompt=True)
    texts["chat"] = tiny_engine.generate(chat, params, use_tqdm=False)[0].outputs[0].text
    return texts


def test_completions_and_chat_equal_engine_generate_streamed_or_not(served, reference):
    client = served.client
    for prompt in PROMPTS:
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == reference[prompt] and out.choices[0].finish_reason in ("length", "stop")
        assert out.usage.completion_tokens <= 12 and out.object == "text_completion"
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == reference[prompt]
        # (How many pieces depends on timing: a reader slower than the steps gets
        # the newest text. That a stream comes in pieces: the disconnect test.)
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    # A list of prompts: one choice per prompt, in order.
    out = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [reference[p] for p in PROMPTS]
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == reference["chat"] and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference["chat"]
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert [m.id for m in client.models.list().data] == [MODEL]


def _merged_logprobs(chunks: list[dict]) -> dict:
    """The completion logprobs of streamed chunks, joined list by list."""
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for key, values in (chunk["choices"][0]["logprobs"] or {}).items():
            merged[key] += values
    return merged


def test_streamed_logprobs_pieces_join_into_the_whole_answers(tiny_engine, served):
    """A chunk carries only its new tokens' logprobs (its cost follows them),
    and a completion's text offsets go on from the last chunk's: pieces cut
    anywhere join into the non-streamed body's logprobs; so does a live stream."""
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)
    (c,) = tiny_engine.generate("def f(x):", params, use_tqdm=False)[0].outputs
    for kind in ("completion", "chat"):
        whole = openai_protocol.response_body(kind, tiny_engine.generate("def f(x):", params, use_tqdm=False)[0],
                                              MODEL, top_logprobs=2)["choices"][0]["logprobs"]
        chunks, start, offset = [], 0, 0
        for end in (3, 4, 9, len(c.token_ids)):
            piece = dataclasses.replace(c, token_ids=c.token_ids[:end], logprobs=c.logprobs[:end])
            chunks.append(openai_protocol.stream_chunk(kind, "id", 0, MODEL, 0, "", None, piece, start, 2, offset))
            start, offset = end, openai_protocol.text_offset_after(chunks[-1], offset)
        if kind == "completion":
            assert _merged_logprobs(chunks) == whole and whole["text_offset"][-1] > 0
        else:
            assert [e for chunk in chunks for e in chunk["choices"][0]["logprobs"]["content"]] == whole["content"]
    body = {"model": MODEL, "prompt": "def f(x):", "max_tokens": 12, "temperature": 0, "logprobs": 2}
    whole = httpx.post(f"{served.url}/v1/completions", json=body, headers=AUTH, timeout=60).json()
    with httpx.stream("POST", f"{served.url}/v1/completions", json={**body, "stream": True}, headers=AUTH,
                      timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    assert _merged_logprobs(chunks) == whole["choices"][0]["logprobs"]


def test_a_client_going_away_mid_stream_frees_its_sequence(served):
    before = served.metrics()
    stream = served.client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=240, temperature=0,
                                              stream=True)
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].finish_reason is None  # still running
    stream.close()
    deadline = time.monotonic() + 30
    while True:
        now = served.metrics()
        freed = now[("eaas_kv_blocks_used", ())] == 0 and now[("eaas_requests_unfinished", ())] == 0
        if freed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert freed
    assert now[("eaas_http_aborted_requests_total", ())] == before[("eaas_http_aborted_requests_total", ())] + 1
    # generated far fewer than the 240 tokens asked for
    assert now[("eaas_generated_tokens_total", ())] - before[("eaas_generated_tokens_total", ())] < 200


def _wait_until_freed(served) -> dict:
    deadline = time.monotonic() + 30
    while True:
        now = served.metrics()
        if now[("eaas_kv_blocks_used", ())] == 0 and now[("eaas_requests_unfinished", ())] == 0:
            return now
        assert time.monotonic() < deadline, "the request still holds KV blocks"
        time.sleep(0.1)


def test_a_client_going_away_before_a_whole_answer_frees_its_sequence(served):
    """Not streamed: the server notices the closed connection while it
    generates, and aborts."""
    before = served.metrics()
    with pytest.raises(httpx.ReadTimeout):
        # n=8 x 240 tokens: seconds of work, long after the client gives up
        httpx.post(f"{served.url}/v1/completions", json={"model": MODEL, "prompt": "def f(x):", "max_tokens": 240,
                                                         "n": 8, "temperature": 0}, headers=AUTH,
                   timeout=httpx.Timeout(30, read=0.3))
    now = _wait_until_freed(served)
    assert now[("eaas_http_aborted_requests_total", ())] == before[("eaas_http_aborted_requests_total", ())] + 1
    assert now[("eaas_generated_tokens_total", ())] - before[("eaas_generated_tokens_total", ())] < 8 * 200


def test_streamed_completions_of_n_finish_once_each_and_equal_the_whole_answer(served):
    """Choices that end at different steps (stop strings): each finishes
    once, while the others go on."""
    body = dict(model=MODEL, prompt=PROMPTS[:2], max_tokens=24, temperature=1.0, seed=5, n=3, stop=["e", "a", "\n"])
    whole = served.client.completions.create(**body)
    assert len({len(c.text) for c in whole.choices}) > 1 and any(c.finish_reason == "stop" for c in whole.choices)
    chunks = list(served.client.completions.create(**body, stream=True))
    finishes = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finishes) == list(range(6))  # one finish per choice
    texts = {}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in whole.choices}


def test_fifty_concurrent_streams_all_complete(served, reference):
    client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)

    async def one(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(50)))
        finally:
            await client.close()

    texts = asyncio.run(all_of_them())
    assert texts == [reference[PROMPTS[i % len(PROMPTS)]] for i in range(50)]


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "JSON object"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature", "temperature must be"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, 400, "best_of", "best_of"),
    ({"model": MODEL, "prompt": "x", "n": 0}, 400, "n", "n must be"),
    ({"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream", "stream must be"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream"),
    ({"model": MODEL}, 400, "prompt", "prompt"),
    # the field the body gave, not the SamplingParams field it sets
    ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens", "max_tokens must be"),
    ({"model": MODEL, "prompt": "x", "stop": 5}, 400, "stop", "stop must be"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", "non-empty list"),
    ({"model": MODEL, "prompt": [5, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": MODEL, "prompt": "x " * 300}, 400, "prompt", "max_model_len"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "does not exist"),
    # hostile values must not reach (and stop) the engine's steps
    ({"model": MODEL, "prompt": "x", "temperature": 10 ** 400}, 400, "temperature", "finite number"),
    ({"model": MODEL, "prompt": "x", "stop": ["s"] * 17}, 400, "stop", "at most 16"),
    ({"model": MODEL, "prompt": "a\ud800"}, 400, "prompt", "str"),  # a lone surrogate: the tokenizer refuses
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "messages", "content must be"),
])
def test_bad_bodies_get_an_error_naming_the_problem_and_the_server_goes_on(served, body, status, param, words):
    kwargs = {"content": body, "headers": AUTH} if isinstance(body, bytes) else \
        {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json", **AUTH}}
    endpoint = "chat/completions" if isinstance(body, dict) and "messages" in body else "completions"
    response = httpx.post(f"{served.url}/v1/{endpoint}", timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"]
    if "max_model_len" in words:
        assert error["code"] == "context_length_exceeded"
    out = served.client.completions.create(model=MODEL, prompt="a", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_the_openai_client_sees_bad_parameters_as_bad_requests(served):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=2)
    with pytest.raises(openai.BadRequestError, match="'role' string"):
        served.client.chat.completions.create(model=MODEL, messages=[{"content": "x"}])


def test_metrics_parse_and_hold_the_latency_histograms_and_outcomes(served):
    served.client.completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0)
    samples = served.metrics()
    names = {name for name, _ in samples}
    for histogram in ("eaas_time_to_first_token_seconds", "eaas_inter_token_latency_seconds", "eaas_step_seconds"):
        assert {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"} <= names
        assert samples[(f"{histogram}_count", ())] > 0
    assert samples[("eaas_http_requests_total", (("endpoint", "/v1/completions"), ("outcome", "completed")))] >= 1
    assert samples[("eaas_kv_blocks", ())] > 0 and ("eaas_sequences_waiting", ()) in samples
    assert any(name == "eaas_expert_tokens_total" for name, _ in samples)


def test_a_full_queue_answers_429_and_the_server_goes_on(served):
    """The queue counts sequences: a request of n choices is n."""
    served.async_engine.max_queue = 3
    try:
        stream = served.client.completions.create(model=MODEL, prompt="a", max_tokens=200, temperature=0,
                                                  stream=True, n=2)
        next(iter(stream))
        with pytest.raises(openai.RateLimitError, match="2 sequences unfinished and 2 more"):
            served.client.completions.create(model=MODEL, prompt="b", max_tokens=2, n=2)
        for prompt, n in (("b", 4), (["b", "c"], 2)):  # never admissible: 400, not a 429 to retry
            with pytest.raises(openai.BadRequestError, match="more than this server holds") as refused:
                served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, n=n)
            assert refused.value.body["param"] == "n"
        assert served.client.completions.create(model=MODEL, prompt="b", max_tokens=2).choices  # 2 + 1 fit
        stream.close()
    finally:
        served.async_engine.max_queue = 64
    deadline = time.monotonic() + 30
    while served.async_engine.num_unfinished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.client.completions.create(model=MODEL, prompt="b", max_tokens=2).choices


@pytest.mark.parametrize("root_path", ["", "/api"])
def test_an_api_key_guards_the_api_but_not_health(served, root_path):
    app = build_app(served.async_engine, model=MODEL, api_key="s3cret")
    with TestClient(app, root_path=root_path) as http:
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert http.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).json()["data"][0]["id"] == MODEL
        assert http.get("/v1/models", headers={"Authorization": "bearer s3cret"}).status_code == 200
        assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
        assert http.get("/openapi.json").status_code in (401, 404)


def test_a_body_over_the_limit_gets_413_unread_and_the_server_goes_on(served):
    with TestClient(build_app(served.async_engine, model=MODEL, max_body_bytes=2000)) as http:
        big = json.dumps({"model": MODEL, "prompt": "a " * 1000, "max_tokens": 1}).encode()
        for content in (big, iter([big[:1500], big[1500:]])):  # declared length, then chunked (no length)
            response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
            assert response.status_code == 413, response.text
            assert "limit of 2000 bytes" in response.json()["error"]["message"]
        response = http.post("/v1/completions", json={"model": MODEL, "prompt": "a " * 200, "max_tokens": 1,
                                                      "temperature": 0})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1


class _FailingEngine:
    """An engine whose steps fail: what /health and waiting requests see."""

    max_model_len = 64
    tokenizer = None

    def __init__(self, recovers: bool):
        self.requests = []
        self.recovers = recovers
        self.recoveries = 0

    def default_sampling_params(self):
        return SamplingParams()

    def add_request(self, prompt, params, request_id=None):
        self.requests.append(request_id)
        return request_id

    def has_unfinished_requests(self):
        return bool(self.requests)

    def abort_request(self, request_id):
        self.requests.remove(request_id)

    def step(self):
        raise RuntimeError("the device fell over")

    def recover(self):
        if not self.recovers:
            raise RuntimeError("no device left")
        self.recoveries += 1
        self.requests.clear()

    def unservable(self):
        return None


def test_a_failing_step_fails_its_requests_and_the_engine_recovers():
    engine = _FailingEngine(recovers=True)
    async_engine = AsyncEngine(engine, max_queue=4)
    try:
        with TestClient(build_app(async_engine, model=MODEL)) as http:
            for attempt in (1, 2):  # served again after each failure
                response = http.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
                assert response.status_code == 503 and "the device fell over" in response.json()["error"]["message"]
                assert engine.recoveries == attempt and not engine.requests
                assert http.get("/health").status_code == 200
    finally:
        async_engine.shutdown()


def test_an_engine_that_cannot_recover_stops_and_health_says_why():
    async_engine = AsyncEngine(_FailingEngine(recovers=False), max_queue=4)
    try:
        with TestClient(build_app(async_engine, model=MODEL)) as http:
            assert http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 503
            health = http.get("/health")
            assert health.status_code == 503 and "no device left" in health.json()["error"]["message"]
            assert not async_engine.running
    finally:
        async_engine.shutdown()


def test_streamed_text_holds_back_a_partial_character_and_a_stop_string_prefix():
    assert sendable("hello wor", ["world"]) == len("hello ")
    assert sendable("hello w\ufffd", []) == len("hello w")
    assert sendable("abc", ["xyz"]) == 3 and sendable("ab", ["b", "abc"]) == 0


def test_the_serve_command_warms_up_serves_and_stops_on_sigterm(checkpoint):
    """The command line as a user runs it: healthy once warmed up, answers,
    and exits 0 on SIGTERM; a bad --max-queue is one error line."""
    import signal
    import socket
    import subprocess
    import sys

    from conftest import REPO

    bad = subprocess.run([sys.executable, "-m", "eaas_jax.cli", "serve", "--model", checkpoint, "--max-queue", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "--max-queue must be >= 1" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "eaas_jax.cli", "serve", "--model", checkpoint, "--port",
                               str(port), "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "2",
                               "--warmup", "8", "4", "--compile-cache", "off"],
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not healthy in 2 minutes"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.models.list().data[0].id == "tiny-chat"
        out = client.completions.create(model="tiny-chat", prompt="def f(x):", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 or out.choices[0].finish_reason == "stop"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
