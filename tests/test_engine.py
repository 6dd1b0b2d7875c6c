"""Engine behaviour on a tiny random model: batching, paging, sampling, stopping, validation."""

from __future__ import annotations

import numpy as np
import pytest

from eaas_jax.engine import Engine, SamplingParams

from conftest import compiles_once_per_step_shape

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def _prompts(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 4096, size=int(rng.integers(2, 30))).tolist() for _ in range(n)]


def _ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module", autouse=True)
def compilations_before(tiny_engine):
    """The session's engine's programs when this module started: other
    modules' tests may have run it first."""
    return tiny_engine.num_compilations


def test_batched_greedy_equals_each_prompt_alone(tiny_engine):
    prompts = _prompts()
    together = _ids(tiny_engine.generate(prompts, GREEDY, use_tqdm=False))
    alone = [_ids(tiny_engine.generate([p], GREEDY, use_tqdm=False))[0] for p in prompts]
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert len({tuple(t) for t in together}) > 1


def test_requests_join_and_leave_at_every_step_and_free_their_blocks(tiny_engine):
    allocator = tiny_engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks
    prompts = _prompts(12, seed=1)
    lengths = [3 + (i * 5) % 11 for i in range(12)]  # different finishing steps
    ids = [
        tiny_engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
        for p, n in zip(prompts, lengths)
    ]
    running_history, finished = [], {}
    while tiny_engine.has_unfinished_requests():
        for out in tiny_engine.step():
            if out.finished:
                finished[out.request_id] = out
        running = tiny_engine.scheduler.running
        running_history.append({s.request.request_id for s in running})
        # No block leaks at any step: free + held by running sequences = pool.
        assert allocator.num_free + sum(len(s.blocks) for s in running) == allocator.num_blocks
    assert set(finished) == set(ids)
    assert [len(finished[i].outputs[0].token_ids) for i in ids] == lengths
    assert max(len(r) for r in running_history) == 8  # max_num_seqs
    # Request 8 waited for a free row, then joined after one of the first eight
    # left and while others of them were still running.
    joined = next(k for k, r in enumerate(running_history) if ids[8] in r)
    assert set(ids[:8]) & running_history[joined]
    assert not set(ids[:8]) <= running_history[joined]
    assert allocator.num_free == allocator.num_blocks  # every block came back
    # Same tokens as generating them one by one.
    for i, p, n in zip(ids, prompts, lengths):
        alone = tiny_engine.generate([p], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True), use_tqdm=False)
        assert alone[0].outputs[0].token_ids == finished[i].outputs[0].token_ids


def test_preemption_when_the_kv_pool_runs_out_loses_nothing(tiny_checkpoint, tiny_engine):
    prompts = _prompts(4, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    # 4 sequences of up to ~70 tokens need ~70 blocks of 4; give the pool 40.
    small = Engine(tiny_checkpoint, max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4, num_kv_blocks=40)
    got = _ids(small.generate(prompts, params, use_tqdm=False))
    assert small.scheduler.num_preemptions > 0
    assert f"eaas_preemptions {float(small.scheduler.num_preemptions)}" in small.metrics_text()
    assert got == _ids(tiny_engine.generate(prompts, params, use_tqdm=False))
    assert small.scheduler.allocator.num_free == 40


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_engine):
    prompts = _prompts(3, seed=3)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    first = _ids(tiny_engine.generate(prompts, params, use_tqdm=False))
    again = _ids(tiny_engine.generate(prompts[::-1], params, use_tqdm=False))[::-1]
    assert first == again
    other = _ids(tiny_engine.generate(prompts, SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True), use_tqdm=False))
    assert other != first


def test_n_completions_differ_and_are_reproducible(tiny_engine):
    params = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    out = tiny_engine.generate([[1, 2, 3, 4]], params, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ids = [c.token_ids for c in out.outputs]
    assert len({tuple(i) for i in ids}) == 3
    assert [c.token_ids for c in tiny_engine.generate([[1, 2, 3, 4]], params, use_tqdm=False)[0].outputs] == ids


def test_stop_token_ids_end_the_output_at_the_first_occurrence(tiny_engine):
    prompt = _prompts(1, seed=4)[0]
    base = tiny_engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = base[4]
    first = base.index(stop)
    out = tiny_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop], ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop)


def test_min_tokens_suppresses_stop_ids_until_reached(tiny_engine):
    prompt = _prompts(1, seed=4)[0]
    base = tiny_engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop = base[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, min_tokens=3, stop_token_ids=[stop], ignore_eos=True)
    out = tiny_engine.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert stop not in out.token_ids[:3]
    assert len(out.token_ids) >= 3
    assert out.finish_reason == ("stop" if stop in out.token_ids else "length")


def test_eos_ends_the_output_unless_ignored(tiny_engine):
    prompt = _prompts(1, seed=6)[0]
    base = tiny_engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    eos = tiny_engine.eos_token_ids
    tiny_engine.eos_token_ids = (base[2],)  # pretend that token is EOS
    try:
        out = tiny_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0].outputs[0]
        ignored = tiny_engine.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    finally:
        tiny_engine.eos_token_ids = eos
    assert out.token_ids == base[: base.index(base[2]) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    assert ignored.token_ids == base and ignored.finish_reason == "length"


def test_context_limit_ends_with_length(tiny_engine):
    prompt = list(range(1, 121))  # max_model_len is 128
    out = tiny_engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 8
    assert out.outputs[0].finish_reason == "length"


def test_logprobs_are_reported_and_consistent(tiny_engine):
    params = SamplingParams(temperature=1.0, max_tokens=6, logprobs=3, seed=0, ignore_eos=True)
    out = tiny_engine.generate([[5, 6, 7]], params, use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 6
    total = 0.0
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        ranked = sorted((lp.rank, lp.logprob) for t, lp in entry.items() if lp.rank <= 3)
        assert [r for r, _ in ranked] == [1, 2, 3]
        assert all(a >= b for (_, a), (_, b) in zip(ranked, ranked[1:]))
        assert entry[token].logprob <= ranked[0][1]
        total += entry[token].logprob
    assert out.cumulative_logprob == pytest.approx(total, rel=1e-5)
    assert tiny_engine.generate([[5, 6, 7]], GREEDY, use_tqdm=False)[0].outputs[0].logprobs is None


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        (list(range(1, 129)), None, "max_model_len"),
        ([], None, "empty prompt"),
        ([1, 2, 99999], None, "outside the vocabulary"),
        ([1, -2], None, "outside the vocabulary"),
        ([1, 2], SamplingParams(stop_token_ids=[10**6]), "outside the vocabulary"),
    ],
)
def test_invalid_requests_fail_before_any_work(tiny_engine, prompt, params, message):
    compiled = tiny_engine.num_compilations
    with pytest.raises(ValueError, match=message):
        tiny_engine.generate([[1, 2, 3], prompt], params, use_tqdm=False)
    assert not tiny_engine.has_unfinished_requests()  # the good prompt was not queued either
    assert tiny_engine.num_compilations == compiled


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -3}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n must"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"seed": -1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"repetition_penalty": True}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_params_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_engine_keeps_serving_after_a_rejected_request(tiny_engine):
    good = tiny_engine.add_request([1, 2, 3], GREEDY)
    with pytest.raises(ValueError):
        tiny_engine.add_request([1, 2, 3], SamplingParams(temperature=float("nan")))
    with pytest.raises(ValueError):
        tiny_engine.add_request(list(range(200)))
    done = {}
    while tiny_engine.has_unfinished_requests():
        done.update({o.request_id: o for o in tiny_engine.step() if o.finished})
    assert list(done) == [good]
    assert done[good].outputs[0].token_ids == tiny_engine.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_each_step_is_queued_before_the_previous_ones_tokens_are_awaited(tiny_engine, monkeypatch):
    """The host's bookkeeping of step n overlaps the device's step n+1: in a
    steady decode, every wait for tokens comes after the next step was queued,
    and that step reads its input tokens on the device (token_sources)."""
    from eaas_jax.engine import runner

    events = []
    dispatch, fetch = runner.ModelRunner.dispatch, runner.DispatchedStep.fetch

    def recording_dispatch(self, rows, *args, **kwargs):
        events.append(("dispatch", rows.token_sources is not None))
        return dispatch(self, rows, *args, **kwargs)

    def recording_fetch(self):
        events.append(("fetch", None))
        return fetch(self)

    monkeypatch.setattr(runner.ModelRunner, "dispatch", recording_dispatch)
    monkeypatch.setattr(runner.DispatchedStep, "fetch", recording_fetch)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = tiny_engine.generate(_prompts(3, seed=4), params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6, 6]
    # prefill, then 5 decode steps (the 6th token of each sequence is the last).
    assert events == [("dispatch", False)] + [("dispatch", True), ("fetch", None)] * 5 + [("fetch", None)]


def test_a_request_aborted_while_its_step_is_in_flight_leaves_the_others_intact(tiny_engine):
    prompts = _prompts(3, seed=5)
    kept = [tiny_engine.add_request(p, GREEDY) for p in prompts[:2]]
    doomed = tiny_engine.add_request(prompts[2], GREEDY)
    tiny_engine.step()  # the prefill is queued
    tiny_engine.step()  # the first decode step is queued
    tiny_engine.abort_request(doomed)
    done = {}
    while tiny_engine.has_unfinished_requests():
        for out in tiny_engine.step():
            assert out.request_id != doomed
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    assert list(done) == kept
    assert [done[i] for i in kept] == _ids(tiny_engine.generate(prompts[:2], GREEDY, use_tqdm=False))
    allocator = tiny_engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks


def test_a_step_that_fails_on_the_device_is_run_again(tiny_engine, monkeypatch):
    """Tokens of a step whose results cannot be fetched (e.g. an expert server
    missed its deadline) are dropped with the step queued after it; the next
    steps compute those positions again and the outputs are unchanged."""
    from eaas_jax.engine import runner

    prompts = _prompts(3, seed=6)
    expected = _ids(tiny_engine.generate(prompts, GREEDY, use_tqdm=False))
    for p in prompts:
        tiny_engine.add_request(p, GREEDY)
    for _ in range(4):
        tiny_engine.step()
    fetch = runner.DispatchedStep.fetch

    def failing_fetch(self):
        monkeypatch.setattr(runner.DispatchedStep, "fetch", fetch)  # fail once
        raise RuntimeError("the step failed")

    monkeypatch.setattr(runner.DispatchedStep, "fetch", failing_fetch)
    with pytest.raises(RuntimeError, match="the step failed"):
        tiny_engine.step()
    done = {}
    while tiny_engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in tiny_engine.step() if o.finished})
    assert list(done.values()) == expected


def test_compilations_stay_few(tiny_engine, compilations_before):
    # Shape bucketing: the dozens of distinct batch sizes, prompt lengths and
    # context lengths above ran through a handful of programs (16 when written;
    # 21 since all-greedy steps compile apart from sampled ones). Counted from
    # this module's start (the engine is the session's).
    assert tiny_engine.num_compilations - compilations_before <= 24


def test_each_step_shape_compiles_once(tiny_checkpoint):
    # Requests of staggered lengths: the batch grows and shrinks, and the first
    # step of each shape runs with and without a step queued before it (the
    # KV cache and the previous step's tokens come from the host or the device).
    engine = Engine(tiny_checkpoint, max_num_seqs=4, max_model_len=64, dtype="float32", block_size=4)
    lengths = [3, 9, 5, 14, 2, 7]
    with compiles_once_per_step_shape(engine):
        engine.generate(_prompts(len(lengths)), [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                                  for n in lengths], use_tqdm=False)
    assert engine.num_compilations >= 3


def test_a_dict_as_sampling_params_says_how_to_make_one(tiny_engine):
    for call in (lambda: tiny_engine.generate(["x"], {"max_tokens": 3}, use_tqdm=False),
                 lambda: tiny_engine.add_request("x", {"max_tokens": 3})):
        with pytest.raises(TypeError, match=r"got (a )?dict; for a dict d of its fields, pass SamplingParams\(\*\*d\)"):
            call()
    assert not tiny_engine.has_unfinished_requests()
