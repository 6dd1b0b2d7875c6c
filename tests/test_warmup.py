"""Warm-up (`Engine.warm_up`, `engine.warmup`): the step shapes it foresees
for the queued requests are those the real scheduler and runner give, a run
of them meets no other, each is compiled once whether warm-up or a step gets
to it first, and a step never waits behind background compiles it does not
need."""

from __future__ import annotations

import threading
import time

import pytest

from eaas_jax.engine import SamplingParams
from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.runner import StepShape
from eaas_jax.engine.scheduler import Scheduler, step_options, step_rows
from eaas_jax.engine.warmup import plan_warmup

from conftest import XLA_COMPILATIONS, compiles_once_per_step_shape


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


def _scheduled_shapes(engine, seqs, *, max_num_seqs, budget, num_blocks):
    """The shapes of the first prefill and the first decode that the real
    scheduler and `prepare_inputs` give for `seqs` (nothing compiled)."""
    scheduler = Scheduler(BlockAllocator(num_blocks, engine.scheduler.allocator.block_size), max_num_seqs, budget,
                          engine.max_model_len)
    for seq in seqs:
        scheduler.add(seq)

    def shape(seqs, is_prefill):
        logprobs, prompt_logprobs = step_options(seqs, is_prefill)
        rows = step_rows(seqs, is_prefill, None, engine.eos_token_ids)
        return engine.runner.prepare_inputs(rows, logprobs, None, prompt_logprobs)[0]

    prefill, _ = scheduler.schedule()
    first = shape(prefill, True)
    for seq in prefill:
        seq.output_ids.append(1)  # its first token, sampled by the prefill
    _, decode = scheduler.schedule()
    return len(prefill), [first, shape(decode, False)]


@pytest.mark.parametrize("max_num_seqs, budget, num_blocks, params", [
    (8, 2048, 512, {}),  # every prompt at once
    (4, 2048, 512, {"logprobs": 2}),  # rows limit the first prefill; logprobs in every step
    (8, 20, 512, {"prompt_logprobs": 1}),  # the token budget does
    (8, 2048, 6, {"presence_penalty": 0.5, "min_tokens": 2}),  # free KV blocks do; penalties, banned EOS
    (8, 2048, 512, {"temperature": 0.7}),  # sampled, not greedy
])
def test_the_first_foreseen_shapes_are_those_the_scheduler_and_runner_give(engine, max_num_seqs, budget,
                                                                           num_blocks, params):
    """Guards the plan's first prefill (the scheduler's admission by rows,
    token budget and free blocks) and first decode, against the real
    `Scheduler` and `prepare_inputs` on the same sequences."""
    builder = engine._request_builder
    seqs = [seq for prompt, n in zip(_prompts(PROMPT_LENGTHS), MAX_TOKENS)
            for seq in builder.build(prompt, _greedy(n) if not params else
                                     SamplingParams(**{"temperature": 0.0, "max_tokens": n, **params}),
                                     None, {}).sequences]
    plan = plan_warmup(seqs, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                       block_size=engine.scheduler.allocator.block_size, num_free_blocks=num_blocks,
                       max_model_len=engine.max_model_len, eos_token_ids=engine.eos_token_ids)
    admitted, expected = _scheduled_shapes(engine, seqs, max_num_seqs=max_num_seqs, budget=budget,
                                           num_blocks=num_blocks)
    assert 0 < admitted
    assert plan.first == expected
    assert len(set(plan.later)) == len(plan.later) and not set(plan.later) & set(plan.first)


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
    try:
        with compiles_once_per_step_shape(engine):
            pool = engine.runner._background_pool()
            for _ in range(pool._max_workers):
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
                              greedy=True) == (4, 1, 8, 4, 0, 0, True, -1)
    assert StepShape.bucketed(rows=5, longest=17, blocks=9, banned=5, penalized=70, logprobs=3, greedy=False,
                              prompt_logprobs=2) == (8, 32, 16, 8, 128, 3, False, 2)
