"""`eaas-jax batch`: results written as requests finish, resumed after SIGTERM
or SIGKILL with every request exactly once and equal to an uninterrupted
run's; bad lines become error records naming file:line; OpenAI batch files;
an output that cannot be written fails before any model work."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from eaas_jax import openai_protocol
from eaas_jax.batch.formats import BadLine, BatchRequest, read_requests, result_record
from eaas_jax.batch.results import ResultsFile, ResultsFileError
from eaas_jax.batch.runner import run_batch
from eaas_jax.cli import main
from eaas_jax.engine import Engine, SamplingParams

from conftest import SHIPPED

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [f"def handler_{i}(request):" for i in range(24)]


def batch_command(inp, out, *extra: str) -> list[str]:
    return [sys.executable, "-m", "eaas_jax.cli", "batch", "--model", SHIPPED, "--input", str(inp), "--output",
            str(out), "--max-tokens", "32", "--temperature", "0", "--ignore-eos", "--max-num-seqs", "2",
            "--max-model-len", "64",
            "--dtype", "float32", *extra]


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def by_id(rows: list[dict]) -> dict[str, list[int]]:
    return {r["custom_id"]: r["outputs"][0]["token_ids"] for r in rows}


@pytest.fixture(scope="module")
def engine():
    with Engine(SHIPPED, max_num_seqs=8, max_model_len=64, dtype="float32") as e:
        yield e


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The prompt file and an uninterrupted run's output (the CLI, one process)."""
    directory = tmp_path_factory.mktemp("batch")
    inp = directory / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "custom_id": f"q{i}"}) + "\n" for i, p in enumerate(PROMPTS)))
    out, summary, plot = directory / "reference.jsonl", directory / "summary.json", directory / "run.png"
    run = subprocess.run(batch_command(inp, out, "--summary-json", str(summary), "--plot", str(plot)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    figures = json.loads(summary.read_text())
    assert (figures["completed"], figures["failed"], figures["not_run"]) == (len(PROMPTS), 0, 0)
    assert figures["generated_tokens"] == 32 * len(PROMPTS)
    assert figures["ttft_s_p50"] <= figures["ttft_s_p90"] <= figures["ttft_s_p99"] <= figures["seconds"]
    # 32 tokens each: the per-token time is under the run's time over 31
    assert 0 < figures["tpot_s_p50"] <= figures["tpot_s_p99"] <= figures["seconds"] / 31
    assert "time per output token after the first: p50" in run.stderr
    # warm-up is on by default: at least the first prefill and decode foreseen
    assert figures["warmup_shapes"] >= 2 and "warm-up: " in run.stderr
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    rows = records(out)
    assert sorted(r["custom_id"] for r in rows) == sorted(f"q{i}" for i in range(len(PROMPTS)))
    return inp, by_id(rows)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_run_resumes_with_every_request_once_and_equal(uninterrupted, tmp_path, sig):
    inp, expected = uninterrupted
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(batch_command(inp, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out.exists() and len(out.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, "no results came"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert "interrupted by SIGTERM" in stderr and "run the same command again to resume" in stderr
        assert all(line.endswith("}") for line in out.read_text().splitlines())  # whole lines only
    else:
        assert proc.returncode == -signal.SIGKILL
        with open(out, "a") as f:  # as if it had died inside a write: a partial last line
            f.write('{"custom_id": "q0", "outp')
    first = records(out) if sig == signal.SIGTERM else [json.loads(l) for l in out.read_text().splitlines()[:-1]]
    assert 4 <= len(first) < len(PROMPTS)
    rerun = subprocess.run(batch_command(inp, out), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming: {len(first)} of {len(PROMPTS)}" in rerun.stderr
    rows = records(out)
    assert sorted(r["custom_id"] for r in rows) == sorted(expected)  # each exactly once
    assert by_id(rows) == expected


def test_bad_lines_become_error_records_and_the_run_goes_on(engine, tmp_path):
    lines = [json.dumps({"prompt": p}) for p in PROMPTS[:17]]
    lines.insert(2, "{not json")
    lines.insert(9, json.dumps({"prompt": "x", "temperature": -1}))
    lines.insert(15, json.dumps({"prompt": "x" * 5000}))  # over the context limit
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    items = read_requests(str(inp), GREEDY)
    assert [type(i) for i in items].count(BadLine) == 2  # the third is found bad by the engine
    with ResultsFile(str(out), {i.custom_id for i in items}) as results:
        summary = run_batch(engine, items, results, model="tiny-moe", use_tqdm=False)
    assert (summary.completed, summary.failed, summary.total) == (17, 3, 20)
    assert summary.warmup_shapes >= 2  # warm-up is on by default
    errors = {r["custom_id"]: r["error"] for r in records(out) if "error" in r}
    assert set(errors) == {"line-3", "line-10", "line-16"}
    assert errors["line-3"].startswith(f"{inp}:3: not valid JSON")
    assert errors["line-10"] == f"{inp}:10: temperature must be a finite number >= 0, got -1"
    assert errors["line-16"].startswith(f"{inp}:16: ") and "64" in errors["line-16"]
    assert sum("outputs" in r for r in records(out)) == 17


def test_openai_batch_lines_give_openai_batch_records_equal_to_the_simple_format(engine, tmp_path):
    body = {"model": "tiny-moe", "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
    lines = [
        {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body},
        {"custom_id": "b", "method": "POST", "url": "/v1/completions", "body": {**body, "n": 2, "seed": 3,
                                                                              "temperature": 0.7}},
        {"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": body},
        {"custom_id": "d", "method": "POST", "url": "/v1/embeddings", "body": body},
        {"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {**body, "logit_bias": {"1": 5}}},
        {"prompt": PROMPTS[0], "custom_id": "simple", "max_tokens": 12},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_requests(str(inp), SamplingParams(temperature=0.0, ignore_eos=True))
    with ResultsFile(str(out), {i.custom_id for i in items}) as results:
        summary = run_batch(engine, items, results, model="tiny-moe", use_tqdm=False, warmup=False)
    assert summary.warmup_shapes == 0
    rows = {r["custom_id"]: r for r in records(out)}
    a = rows["a"]
    assert a["id"].startswith("batch_req_") and a["error"] is None and a["response"]["status_code"] == 200
    completion = a["response"]["body"]
    assert completion["object"] == "text_completion" and completion["model"] == "tiny-moe"
    assert completion["choices"][0]["text"] == rows["simple"]["outputs"][0]["text"]
    assert completion["usage"]["completion_tokens"] == 12
    assert len(rows["b"]["response"]["body"]["choices"]) == 2
    for bad, reason in (("c", "method must be POST"), ("d", "url must be one of"),
                        ("e", "body field(s) ['logit_bias'] are not supported")):
        assert rows[bad]["response"] is None and reason in rows[bad]["error"]["message"]
        assert rows[bad]["error"]["message"].startswith(f"{inp}:")


def test_openai_logprobs_come_in_each_endpoints_shape(engine, tmp_path):
    """Completions: parallel token/logprob/top/offset lists; chat: content
    entries with bytes and top_logprobs. Both parse as the official openai
    client's types and carry the engine's numbers. (The shipped checkpoint
    has no chat template: the chat body is made of a completion's output.)"""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat = [{"role": "user", "content": PROMPTS[1]}]
    lines = [
        {"custom_id": "c", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 2}},
        {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": chat, "top_logprobs": 3}},
        {"custom_id": "worse", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "x", "logprobs": True}},
        {"custom_id": "simple", "prompt": PROMPTS[0], "max_tokens": 6, "temperature": 0, "logprobs": 2,
         "prompt_logprobs": 1},
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    items = read_requests(str(inp), SamplingParams(ignore_eos=True))
    with ResultsFile(str(out), {i.custom_id for i in items}) as results:
        run_batch(engine, items, results, model="m", use_tqdm=False)
    rows = {r["custom_id"]: r for r in records(out)}
    lp = Completion.model_validate(rows["c"]["response"]["body"]).choices[0].logprobs
    simple = rows["simple"]["outputs"][0]
    assert lp.token_logprobs == pytest.approx([step[str(t)]["logprob"]
                                               for t, step in zip(simple["token_ids"], simple["logprobs"])])
    assert lp.tokens == [step[str(t)]["decoded_token"] for t, step in zip(simple["token_ids"], simple["logprobs"])]
    assert len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs)  # the top 2, and the sampled token if not in them
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    prompt_steps = rows["simple"]["prompt_logprobs"]
    assert prompt_steps[0] is None and len(prompt_steps) == len(rows["simple"]["prompt_token_ids"])
    assert all(str(t) in step and any(e["rank"] == 1 for e in step.values())
               for t, step in zip(rows["simple"]["prompt_token_ids"][1:], prompt_steps[1:]))
    assert "top_logprobs needs logprobs: true" in rows["bad"]["error"]["message"]
    assert "logprobs must be an integer" in rows["worse"]["error"]["message"]

    output = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3),
                             use_tqdm=False)[0]
    content = ChatCompletion.model_validate(
        openai_protocol.response_body("chat", output, "m", top_logprobs=3)).choices[0].logprobs.content
    steps = output.outputs[0].logprobs
    assert [c.logprob for c in content] == pytest.approx([s[t].logprob for t, s in zip(output.outputs[0].token_ids,
                                                                                         steps)])
    assert all(len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode()) for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob for c in content)
    assert ChatCompletion.model_validate(openai_protocol.response_body(
        "chat", engine.generate([PROMPTS[1]], SamplingParams(max_tokens=2), use_tqdm=False)[0], "m")
    ).choices[0].logprobs is None


def test_plot_without_matplotlib_fails_before_any_model_work(uninterrupted, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib"
                        else find_spec(name, *a))
    inp, _ = uninterrupted
    assert main(["batch", "--model", "/nonexistent-model", "--input", str(inp), "--output",
                 str(tmp_path / "o.jsonl"), "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot needs matplotlib: pip install 'eaas-jax[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_openai_bodies_follow_the_api_for_left_out_and_null_fields(tmp_path):
    """No max_tokens: up to the context limit (the API's default, not the
    command line's); a null field is as one left out."""
    inp = tmp_path / "in.jsonl"
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    inp.write_text("".join(json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions", "body": b})
                           + "\n" for c, b in (("a", body), ("b", {**body, "presence_penalty": None, "seed": None,
                                                                        "max_tokens": None, "max_completion_tokens": 7}))))
    a, b = read_requests(str(inp), SamplingParams(max_tokens=16, seed=3))
    assert a.params.max_tokens is None and a.params.seed == 3
    assert (b.params.max_tokens, b.params.presence_penalty, b.params.seed) == (7, 0.0, 3)
    # A completion without max_tokens gets the API's 16, whatever the defaults
    params, prompt, _ = openai_protocol.parse_body("completion", {"prompt": "x"}, SamplingParams(max_tokens=99))
    assert (params.max_tokens, prompt) == (16, "x")
    # A chat's text content parts are joined by newlines (as vLLM); other parts are refused
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert openai_protocol.parse_body("chat", parts, SamplingParams())[2][0]["content"] == "a\nb"
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    with pytest.raises(ValueError, match="only text content parts"):
        openai_protocol.parse_body("chat", image, SamplingParams())


def test_an_output_that_cannot_be_written_fails_before_any_model_work(uninterrupted, tmp_path, capsys):
    inp, _ = uninterrupted
    for out in (tmp_path / "missing-dir" / "out.jsonl", "/proc/eaas-out.jsonl"):
        started = time.monotonic()
        assert main(["batch", "--model", "/nonexistent-model", "--input", str(inp), "--output", str(out)]) == 2
        assert re.search(f"error: .*{os.path.basename(str(out))}", capsys.readouterr().err)
        assert time.monotonic() - started < 5


def test_an_output_of_another_input_is_refused_and_a_finished_one_is_left_alone(uninterrupted, tmp_path, capsys):
    inp, expected = uninterrupted
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"custom_id": "someone-else", "outputs": []}) + "\n")
    assert main(["batch", "--model", SHIPPED, "--input", str(inp), "--output", str(other)]) == 2
    assert re.search(r"line 1 is no record of this input .*; pass --overwrite", capsys.readouterr().err)
    assert other.read_text().count("\n") == 1
    done = tmp_path / "done.jsonl"
    done.write_text("".join(json.dumps({"custom_id": i, "outputs": [{"token_ids": t}]}) + "\n"
                            for i, t in expected.items()))
    assert main(["batch", "--model", "/nonexistent-model", "--input", str(inp), "--output", str(done)]) == 0
    assert "already" in capsys.readouterr().err


def test_bad_lines_say_why(tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [json.dumps(x).encode() for x in (
        {"prompt": "a", "custom_id": "x"}, {"custom_id": "y"}, {"prompt": "c", "messages": []},
        {"prompt": "d", "colour": "red"}, [1, 2], {"messages": []}, {"messages": {"role": "user"}},
        {"messages": [{"role": "user", "content": "hi"}], "n": 129})]
    inp.write_bytes(b"\n".join(lines) + b"\n" + b'{"prompt": "caf\xe9"}\n')
    items = read_requests(str(inp), GREEDY)
    assert isinstance(items[0], BatchRequest)
    reasons = [item.reason for item in items[1:]]
    assert reasons[:4] == ["expected exactly one of 'prompt' and 'messages'",
                           "expected exactly one of 'prompt' and 'messages'", "unknown field(s) ['colour']",
                           "expected a prompt string or an object"]
    assert reasons[4] == reasons[5] == "a conversation must be a non-empty list of messages"
    assert reasons[6] == "n must be an integer in [1, 128], got 129"
    assert reasons[7].startswith("not UTF-8") and items[8].where == f"{inp}:9"


def test_two_lines_with_one_id_refuse_the_input(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"prompt": "a", "custom_id": "x"}) + "\n" + json.dumps({"prompt": "b", "custom_id": "x"}))
    with pytest.raises(ValueError, match=f"{inp}:2: custom_id 'x' is that of {inp}:1 too"):
        read_requests(str(inp), GREEDY)
    assert main(["batch", "--model", SHIPPED, "--input", str(inp), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "custom_id 'x'" in capsys.readouterr().err


def test_resuming_keeps_a_whole_last_record_without_its_newline_and_counts_failures(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"prompt": p, "custom_id": f"q{i}"}) + "\n" for i, p in enumerate("abc")))
    out.write_text(json.dumps({"custom_id": "q0", "outputs": []}) + "\n"
                   + json.dumps({"custom_id": "q1", "error": "in.jsonl:2: lost"}) + "\n"
                   + json.dumps({"custom_id": "q2", "outputs": []}))  # whole, but no newline
    with ResultsFile(str(out), {"q0", "q1", "q2"}) as results:
        assert results.done == {"q0", "q1", "q2"} and results.failed == {"q1"}
        with pytest.raises(ResultsFileError, match="being written by another run"):
            ResultsFile(str(out), {"q0", "q1", "q2"})
    assert out.read_text().endswith("}\n") and len(records(out)) == 3
    # Everything is there, one error record among it: nothing runs, exit 1.
    assert main(["batch", "--model", "/nonexistent-model", "--input", str(inp), "--output", str(out)]) == 1
    assert "1 of them error records" in capsys.readouterr().err


def test_overwrite_leaves_the_old_results_when_the_run_fails_before_any(uninterrupted, tmp_path):
    inp, _ = uninterrupted
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"custom_id": "q0", "outputs": []}) + "\n")
    assert main(["batch", "--model", "/nonexistent-model", "--input", str(inp), "--output", str(out),
                 "--overwrite"]) == 2
    assert records(out) == [{"custom_id": "q0", "outputs": []}]


def test_a_failed_request_is_an_error_record(engine):
    request = BatchRequest("z", "in.jsonl:7", GREEDY, prompt="p", openai_url="/v1/completions")

    class Failed:
        error, request_id, outputs, prompt_token_ids = "expert server lost", "9", [], [1]

    record = result_record(request, Failed(), "m")
    assert record["response"] is None and record["error"]["message"] == "in.jsonl:7: expert server lost"


def test_results_file_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ResultsFileError, match="does not exist"):
        ResultsFile(str(tmp_path / "no" / "out.jsonl"), set())
