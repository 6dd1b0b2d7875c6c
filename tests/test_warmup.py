"""Warm-up (`Engine.warm_up`, `engine.warmup`): the step shapes it foresees
for the queued requests are those the real scheduler and runner give, a run
of them meets no other, each is compiled once whether warm-up or a step gets
to it first, and a step never waits behind background compiles it does not
need."""

from __future__ import annotations

import random
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from eaas_jax.engine import SamplingParams, gil, packed
from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.compile_pool import CompilePool
from eaas_jax.engine.runner import DispatchedStep, EmbeddedExperts, ModelRunner, StepShape, TracedStep
from eaas_jax.engine.scheduler import Scheduler, step_options, step_rows
from eaas_jax.engine.warmup import plan_warmup

from conftest import REPO, XLA_COMPILATIONS, compiles_once_per_step_shape, tiny_model


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    """An engine of its own: no other test compiles its step shapes, so the
    ones a run meets are compiled by what a test does."""
    from eaas_jax.engine import Engine

    return Engine(tiny_checkpoint, max_num_seqs=4, max_model_len=128, dtype="float32", block_size=4)

# Prompt lengths and completion lengths that make a run drain through every
# batch bucket and grow past 8 KV blocks of 4 tokens (engine's).
PROMPT_LENGTHS = [5, 9, 3, 12, 7, 4]
MAX_TOKENS = [40, 3, 25, 8, 33, 17]


def _prompts(lengths) -> list[list[int]]:
    return [[7 + (i * 13 + j * 5) % 900 for j in range(n)] for i, n in enumerate(lengths)]


def _greedy(max_tokens: int, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def _scheduled_shapes(engine, seqs, *, max_num_seqs, budget, num_blocks, decode_window=1):
    """The shapes of the first prefill and the first decode (if any) that the
    real scheduler and `prepare_inputs` give for `seqs`, the prefill's token
    pending on the device as in the engine (nothing compiled)."""
    scheduler = Scheduler(BlockAllocator(num_blocks, engine.scheduler.allocator.block_size), max_num_seqs, budget,
                          engine.max_model_len, decode_window=decode_window)
    for seq in seqs:
        scheduler.add(seq)
    nothing, layout = packed.pack_on_device(())
    prefill_step = DispatchedStep(1, nothing, jnp.zeros((8,), jnp.int32), TracedStep([], layout), num_tokens=1,
                                  expert_arrays=None)

    def shape(seqs, is_prefill, previous=None):
        logprobs, prompt_logprobs = step_options(seqs, is_prefill)
        rows = step_rows(seqs, is_prefill, previous, engine.eos_token_ids, 1 if is_prefill else scheduler.window,
                         engine.max_model_len)
        return engine.runner.prepare_inputs(rows, logprobs, prefill_step if previous else None, prompt_logprobs)[0]

    prefill, _ = scheduler.schedule()
    shapes = [shape(prefill, True)]
    for seq in prefill:
        seq.num_pending = 1  # the prefill's token, still on the device
    _, decode = scheduler.schedule()
    if decode:
        shapes.append(shape(decode, False, prefill))
    return len(prefill), shapes


# Per case: the engine's limits, and each request's SamplingParams fields (cycled over the prompts).
FIRST_STEP_CASES = {
    "every prompt at once": (8, 2048, 512, [{}]),
    "rows limit the prefill; logprobs": (4, 2048, 512, [{"logprobs": 2}]),
    "the token budget does; prompt logprobs": (8, 20, 512, [{"prompt_logprobs": 1}]),
    "free KV blocks do; penalties, banned EOS": (8, 2048, 6, [{"presence_penalty": 0.5, "min_tokens": 2}]),
    "sampled": (8, 2048, 512, [{"temperature": 0.7}]),
    # rows whose first token ends them are no decode rows
    "some end with their first token": (8, 2048, 512, [{"max_tokens": 1}, {}, {"max_tokens": 1}]),
    "all end with their first token (scoring)": (8, 2048, 512, [{"max_tokens": 1, "prompt_logprobs": 0}]),
    # banned ids until min_tokens: the first decode samples the second token
    "min_tokens 1 and many stop ids": (8, 2048, 512, [{"min_tokens": 1, "stop_token_ids": [3, 4, 5, 6, 7]}]),
    "min_tokens 2 and many stop ids": (8, 2048, 512, [{"min_tokens": 2, "stop_token_ids": [3, 4, 5, 6, 7]}]),
    # short of min_tokens with nothing to ban: no window all the same
    "min_tokens 2, EOS ignored": (8, 2048, 512, [{"min_tokens": 2, "ignore_eos": True}]),
}


@pytest.mark.parametrize("decode_window", [1, 4])
@pytest.mark.parametrize("case", FIRST_STEP_CASES)
def test_the_first_foreseen_shapes_are_those_the_scheduler_and_runner_give(engine, case, decode_window):
    """Guards the plan's first prefill (the scheduler's admission by rows,
    token budget and free blocks) and first decode (its rows, banned ids,
    penalized tokens with the prefill's token pending, and its window),
    against the real `Scheduler` and `prepare_inputs` on the same sequences."""
    max_num_seqs, budget, num_blocks, fields = FIRST_STEP_CASES[case]
    builder = engine._request_builder
    seqs = []
    for i, (prompt, n) in enumerate(zip(_prompts(PROMPT_LENGTHS), MAX_TOKENS)):
        params = SamplingParams(**{"temperature": 0.0, "max_tokens": n, **fields[i % len(fields)]})
        seqs += builder.build(prompt, params, None, {}).sequences
    plan = plan_warmup(seqs, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       block_size=engine.scheduler.allocator.block_size, num_free_blocks=num_blocks,
                       max_model_len=engine.max_model_len, eos_token_ids=engine.eos_token_ids,
                       decode_window=decode_window)
    admitted, expected = _scheduled_shapes(engine, seqs, max_num_seqs=max_num_seqs, budget=budget,
                                           num_blocks=num_blocks, decode_window=decode_window)
    assert 0 < admitted
    assert plan.first == expected
    assert len(set(plan.later)) == len(plan.later) and not set(plan.later) & set(plan.first)


def test_the_first_decode_counts_the_penalized_tokens_the_host_knows(engine):
    """Guards the first decode's penalized tokens: a prompt of 64 distinct
    tokens fills the 64 bucket; the prefill's token is pending (counted on
    the device), so it does not take the row to 128."""
    prompt = list(range(10, 74))
    seqs = engine._request_builder.build(prompt, _greedy(8, presence_penalty=0.5), None, {}).sequences
    plan = plan_warmup(seqs, max_num_seqs=4, max_num_batched_tokens=2048, block_size=4, num_free_blocks=512,
                       max_model_len=128, eos_token_ids=(0,))
    assert [s.penalized for s in plan.first] == [64, 64]
    assert plan.first == _scheduled_shapes(engine, seqs, max_num_seqs=4, budget=2048, num_blocks=512)[1]


def test_the_plan_covers_growth_past_a_block_bucket_and_the_drain(engine):
    """Guards the later shapes: the full batch at every KV-block bucket its
    sequences grow into, every smaller batch bucket, and refills of the
    requests left waiting."""
    seqs = [engine._request_builder.build(p, _greedy(n), None, {}).sequences[0]
            for p, n in zip(_prompts(PROMPT_LENGTHS), MAX_TOKENS)]
    plan = plan_warmup(seqs, max_num_seqs=4, max_num_batched_tokens=2048, block_size=4, num_free_blocks=512,
                       max_model_len=128, eos_token_ids=(0,))
    decode = {(s.batch, s.blocks) for s in plan.first + plan.later if s.seq == 1}
    # 5 + 40 tokens need 12 blocks of 4: the 16-block bucket
    assert decode == {(b, blocks) for b in (1, 2, 4) for blocks in (8, 16)}
    refills = {s.batch for s in plan.later if s.seq > 1}
    assert refills == {1, 2}  # two requests wait for rows: one or both at once
    assert all(s.greedy and s.logprobs == 0 and s.prompt_logprobs == -1 for s in plan.first + plan.later)


def _run_queued(engine) -> dict[str, list[int]]:
    tokens = {}
    while engine.has_unfinished_requests():
        for out in engine.step_finished():
            tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


def test_a_run_warmed_up_now_meets_no_shape_it_did_not_compile(engine):
    """Guards the whole plan on a run that refills, drains and grows (the
    engine's first: nothing compiled before): with every foreseen shape
    compiled first, no step compiles or waits, each shape is compiled once,
    and the tokens equal a run without warm-up."""
    prompts, params = _prompts(PROMPT_LENGTHS), [_greedy(n, min_tokens=2) for n in MAX_TOKENS]
    assert engine.num_compilations == 0
    with compiles_once_per_step_shape(engine):
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        plan = engine.warm_up(later="now", use_tqdm=False)
        assert engine.num_compilations == len(plan.first) + len(plan.later)
        waits, compiles = engine.runner.num_compile_waits, XLA_COMPILATIONS["jit(_step)"]
        tokens = _run_queued(engine)
        assert engine.runner.num_compile_waits == waits
        assert XLA_COMPILATIONS["jit(_step)"] == compiles
    reference = [out.outputs[0].token_ids for out in engine.generate(prompts, params, use_tqdm=False)]
    assert [tokens[i] for i in ids] == reference


def test_a_step_takes_over_a_queued_background_compile_instead_of_waiting_behind_others(engine):
    """Guards the background compiles: a step whose shape is still queued
    behind other compiles compiles it itself (else it would wait for all of
    them: here, forever, as a blocked compile thread holds the queue), and
    no shape is compiled twice, foreseen or not."""
    # logprobs: shapes no other test compiled, so warm-up has work to queue
    prompts, params = _prompts(PROMPT_LENGTHS), [_greedy(n, logprobs=1) for n in MAX_TOKENS]
    release = threading.Event()
    safety = threading.Timer(120, release.set)  # a regression hangs for 2 minutes, then fails below
    safety.start()
    switch_interval = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # the interpreter's default
        engine.runner.stop_compiling()  # the next background pool is a new one
        with compiles_once_per_step_shape(engine):
            pool = engine.runner._background_pool()
            # its tracing threads would hold the GIL for 5 ms at a time against the steps' thread
            assert sys.getswitchinterval() == pytest.approx(gil.SWITCH_INTERVAL_S)
            for _ in range(pool.num_threads):
                pool.submit(release.wait)  # every compile thread busy: warm-up's queue stays queued
            for p, sp in zip(prompts, params):
                engine.add_request(p, sp)
            plan = engine.warm_up(later="background", use_tqdm=False)
            assert plan.later
            start = time.monotonic()
            waits = engine.runner.num_compile_waits
            tokens = _run_queued(engine)
            elapsed = time.monotonic() - start
            assert engine.runner.num_compile_waits > waits  # the steps compiled what they met
            release.set()
            engine.stop_warm_up()  # background compiles left: dropped, or finished
    finally:
        release.set()
        safety.cancel()
        sys.setswitchinterval(switch_interval)
    assert elapsed < 100, "a step waited behind the blocked background compiles"
    assert sorted(len(t) for t in tokens.values()) == sorted(MAX_TOKENS)


def test_warm_up_refuses_a_running_engine_and_an_unknown_mode(engine):
    with pytest.raises(ValueError, match="later must be"):
        engine.warm_up(later="soon")
    engine.add_request([5, 6, 7], _greedy(4))
    engine.step()
    try:
        with pytest.raises(RuntimeError, match="before the first step"):
            engine.warm_up()
    finally:
        _run_queued(engine)


def test_step_shape_buckets_match_the_runners_key():
    """StepShape.bucketed is the runner's key: minimum buckets and no
    penalties when no row has them."""
    assert StepShape.bucketed(rows=3, longest=1, blocks=2, banned=0, penalized=0, logprobs=0,
                              greedy=True) == (4, 1, 8, 4, 0, 0, True, -1, 1)
    assert StepShape.bucketed(rows=5, longest=17, blocks=9, banned=5, penalized=70, logprobs=3, greedy=False,
                              prompt_logprobs=2) == (8, 32, 16, 8, 128, 3, False, 2, 1)


class _LabelledExperts(EmbeddedExperts):
    """Embedded experts whose exchange labels say which trace made them."""

    def __init__(self, experts):
        super().__init__(experts)
        self.traces = 0

    def exchange(self, arrays, carry):
        self.traces += 1
        return super().exchange(arrays, carry)

    def traced_exchanges(self):
        return [(self.traces, 0)]


def test_a_shape_whose_compile_failed_keeps_its_own_labels_when_compiled_again(monkeypatch):
    """Guards the labels of a retried compile: jit keeps the trace of a
    failed compile, so the retry does not trace again; the labels must be
    that trace's, not those of the shape traced last."""
    model = tiny_model(seed=5)
    runner = ModelRunner(model.client, _LabelledExperts(model.experts), num_blocks=64, block_size=4, max_rows=4)
    one, two = (StepShape.bucketed(rows=n, longest=1, blocks=1, banned=0, penalized=0, logprobs=0, greedy=True)
                for n in (1, 2))
    compile_program = jax.stages.Lowered.compile
    failures = iter([RuntimeError("out of memory (a test's)")])

    def compile_failing_once(self, *args, **kwargs):
        error = next(failures, None)
        if error is not None:
            raise error
        return compile_program(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_failing_once)
    with pytest.raises(RuntimeError, match="a test's"):
        runner.compile([one])
    assert runner.num_compilations == 0  # forgotten: the next step of its shape tries again
    runner.compile([two])
    first = runner.dispatch(runner._placeholder_rows(one), 0)
    assert first._traced.labels == [(1, 0)]  # the first trace's, not the second's
    assert runner.dispatch(runner._placeholder_rows(two), 0)._traced.labels == [(2, 0)]


def test_the_compile_pool_drops_queued_work_on_stop_and_at_exit():
    """Guards the background pool: stop() cancels what is queued without
    waiting for what runs, and a process that never stops it exits without
    running its queue (a thread pool would run every queued compile first)."""
    pool = CompilePool(1, "test-pool")
    started, release = threading.Event(), threading.Event()

    def occupy():
        started.set()
        return release.wait()

    running = pool.submit(occupy)
    queued = [pool.submit(time.sleep, 5) for _ in range(3)]
    assert started.wait(10)
    start = time.monotonic()
    pool.stop()
    assert time.monotonic() - start < 1 and all(f.cancelled() for f in queued) and not running.done()
    release.set()
    pool.join()
    assert running.result() is True
    with pytest.raises(RuntimeError, match="stopped"):
        pool.submit(print)
    code = ("import time; from eaas_jax.engine.compile_pool import CompilePool; "
            "pool = CompilePool(1, 'p'); [pool.submit(time.sleep, 2) for _ in range(10)]")
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=60)
    assert time.monotonic() - start < 10  # one running sleep, not ten


def test_warming_up_for_traffic_compiles_what_such_requests_meet_and_moves_no_seed(engine):
    """Guards a server's warm-up: with nothing queued, the shapes of
    max_num_seqs requests of the given size (default sampling: not greedy)
    are compiled, and requests of that size then wait for no compile; the
    engine's request ids and unseeded requests' seeds are those of an engine
    that did not warm up."""
    builder = engine._request_builder
    rng_state, ids = builder._rng.bit_generator.state, repr(builder._ids)
    plan = engine.warm_up(traffic=(10, 20), later="now", use_tqdm=False)
    assert plan.first and not plan.first[0].greedy and plan.first[0].batch == engine.scheduler.max_num_seqs
    assert any(s.greedy for s in plan.first)  # greedy requests run another program: foreseen too
    assert builder._rng.bit_generator.state == rng_state and repr(builder._ids) == ids
    waits = engine.runner.num_compile_waits
    for prompt in _prompts([10] * 4):
        engine.add_request(prompt, SamplingParams(max_tokens=20))
    _run_queued(engine)
    assert engine.runner.num_compile_waits == waits
    with pytest.raises(ValueError, match="traffic must be"):
        engine.warm_up(traffic=(engine.max_model_len, 4))


def test_warming_up_for_traffic_covers_requests_arriving_apart(engine):
    """Guards a server under open traffic: requests no longer than the
    warm-up's, arriving a few at a time while others run (prefills of 1-3
    rows, decodes of every batch size as they come and go), greedy or
    sampled, wait for no compile."""
    engine.warm_up(traffic=(12, 24), later="now", use_tqdm=False)
    waits = engine.runner.num_compile_waits
    rng = random.Random(0)
    arriving = [([7 + rng.randrange(900) for _ in range(rng.randint(1, 12))],
                 SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0.0, 1.0])))
                for _ in range(16)]
    while arriving or engine.has_unfinished_requests():
        for _ in range(min(len(arriving), rng.choice([0, 0, 1, 1, 2, 3]))):
            engine.add_request(*arriving.pop())
        engine.step_finished()
    assert engine.runner.num_compile_waits == waits
