"""Decode windows (Engine(decode_window=K), the default without expert
servers): K decode tokens a row in one step program, each fed back on the
device. The reference is the same engine's one-token steps (the session's
`tiny_engine`): every token, logprob and finish reason equal, whatever stops
a row inside a window."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.engine import DEFAULT_DECODE_WINDOW
from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.runner import StepShape
from eaas_jax.engine.scheduler import Scheduler, StepRows, step_rows
from eaas_jax.engine.sequence import Request

WINDOW = DEFAULT_DECODE_WINDOW


def _engine(checkpoint, **options) -> Engine:
    """An engine of the default decode windows with `tiny_engine`'s other settings (and `options`)."""
    return Engine(checkpoint, max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4, **options)


@pytest.fixture(scope="module")
def window_engine(tiny_checkpoint):
    return _engine(tiny_checkpoint)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 4096, size=int(rng.integers(2, 20))).tolist() for _ in range(n)]


def _completions(outputs):
    return [(c.token_ids, c.finish_reason, c.stop_reason) for out in outputs for c in out.outputs]


def _windows_run(engine) -> set[int]:
    return {shape.window for shape in engine.runner.step_memory}


def test_windows_give_the_one_token_steps_tokens_logprobs_and_stops(window_engine, tiny_engine):
    prompts = _prompts(7)
    # Greedy and seeded sampling; lengths that end mid-window; logprobs; a
    # stop token met mid-window (found from the one-token run's tokens).
    params = [SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=10, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=1.0, top_k=5, seed=7, max_tokens=11, n=2, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)]
    free = tiny_engine.generate(prompts[-1:], params[-1], use_tqdm=False)[0].outputs[0].token_ids
    params[-1] = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop_token_ids=[free[6]])
    expected = tiny_engine.generate(prompts, params, use_tqdm=False)
    generated = window_engine.metrics.generated_tokens
    got = window_engine.generate(prompts, params, use_tqdm=False)
    assert _completions(got) == _completions(expected)
    assert window_engine.metrics.generated_tokens - generated == sum(len(c[0]) for c in _completions(got))
    assert _completions(got)[-1][1:] == ("stop", free[6])  # stopped at its 7th token: inside the 2nd window
    for g, e in zip(got[2].outputs[0].logprobs, expected[2].outputs[0].logprobs):
        assert g.keys() == e.keys()
        assert all(abs(g[t].logprob - e[t].logprob) < 1e-5 and g[t].rank == e[t].rank for t in g)
    assert _windows_run(window_engine) >= {1, WINDOW}  # prefills one token; decodes a window
    allocator = window_engine.scheduler.allocator
    assert allocator.num_free == allocator.num_blocks  # the windows' reserved blocks came back


def test_penalties_count_every_token_of_a_window_and_the_window_before(window_engine, tiny_engine):
    """Penalties inside windows: each token the window samples counts for the
    next ones, and the previous window's tokens, still on the device when
    the next window is queued, count too (the host's counts lack them). A
    prompt of one repeated token makes a greedy model repeat without them,
    so every penalty changes the tokens; they are the one-token engine's."""
    prompts = [[11] * 6, [23] * 5] + _prompts(2, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=1.8),
              SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True, presence_penalty=2.0),
              SamplingParams(temperature=0.0, max_tokens=15, ignore_eos=True, frequency_penalty=1.5),
              SamplingParams(temperature=0.9, seed=5, max_tokens=12, ignore_eos=True, frequency_penalty=1.0,
                             presence_penalty=0.5, repetition_penalty=1.2)]
    before = window_engine.metrics.steps
    got = window_engine.generate(prompts, params, use_tqdm=False)
    assert _completions(got) == _completions(tiny_engine.generate(prompts, params, use_tqdm=False))
    assert window_engine.metrics.steps - before == 5  # a prefill (the first token), 4 windows (14 more at most)
    unpenalized = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)]
    assert _completions(tiny_engine.generate(prompts[:1], unpenalized, use_tqdm=False)) != _completions(got[:1])


def test_rows_short_of_min_tokens_run_one_token_steps(window_engine, tiny_engine):
    """min_tokens bans EOS (and stop ids) until reached: a step with such a
    row runs one token, and the tokens are still the one-token engine's."""
    prompts = _prompts(2, seed=1)
    params = [SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=9, min_tokens=9)]
    before = window_engine.metrics.steps
    got = window_engine.generate(prompts, params, use_tqdm=False)
    assert _completions(got) == _completions(tiny_engine.generate(prompts, params, use_tqdm=False))
    # A prefill and 8 one-token decodes (windows would have taken 2)
    assert window_engine.metrics.steps - before == 9
    got = window_engine.generate(prompts[1:], [SamplingParams(temperature=0.0, max_tokens=9, min_tokens=3)],
                                 use_tqdm=False)  # windows once min_tokens is reached
    assert _completions(got) == _completions(
        tiny_engine.generate(prompts[1:], [SamplingParams(temperature=0.0, max_tokens=9, min_tokens=3)],
                             use_tqdm=False))


def test_windows_preempted_when_the_kv_pool_runs_out_lose_nothing(tiny_checkpoint, tiny_engine):
    prompts = _prompts(4, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    small = _engine(tiny_checkpoint, num_kv_blocks=40)
    got = small.generate(prompts, params, use_tqdm=False)
    assert small.scheduler.num_preemptions > 0
    assert _completions(got) == _completions(tiny_engine.generate(prompts, params, use_tqdm=False))
    assert small.scheduler.allocator.num_free == 40


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices")
def test_windows_with_experts_sharded_over_devices(tiny_checkpoint, tiny_engine):
    """The window's scan over the expert-parallel model (its all-reduce inside the loop)."""
    prompts = _prompts(3, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    parallel = _engine(tiny_checkpoint, expert_parallel=2)
    got = parallel.generate(prompts, params, use_tqdm=False)
    assert WINDOW in _windows_run(parallel)
    expected = tiny_engine.generate(prompts, params, use_tqdm=False)
    assert [c[0] for c in _completions(got)] == [c[0] for c in _completions(expected)]


def test_warm_up_foresees_the_window_programs(window_engine):
    # 31 prompt tokens: the first window writes positions 31-34, into a 9th
    # block of 4, past the first decode's bucket of 8 blocks had it one token.
    for prompt in [[5] * 31] + _prompts(2, seed=4):
        window_engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    plan = window_engine.warm_up(later="now", use_tqdm=False)
    decodes = [s for s in plan.first + plan.later if s.seq == 1]
    assert decodes and all(s.window == WINDOW for s in decodes)
    assert plan.first[1].blocks == 16  # the first decode's program, compiled before the first step
    compiled = window_engine.num_compilations
    while window_engine.has_unfinished_requests():
        window_engine.step()
    assert window_engine.num_compilations == compiled  # every step's program was foreseen


def _seq(name, prompt_len, **params):
    params = {"temperature": 0.0, "max_tokens": 100, "ignore_eos": True, **params}
    return Request(name, None, list(range(1, prompt_len + 1)), SamplingParams(**params), seed=0).sequences[0]


def test_the_scheduler_reserves_each_rows_window_and_the_rows_say_its_tokens():
    scheduler = Scheduler(BlockAllocator(64, 4), 8, 2048, 64, decode_window=WINDOW)
    a, b, c = _seq("a", 3), _seq("b", 4, max_tokens=3), _seq("c", 60)  # c: 4 tokens to max_model_len
    for seq in (a, b, c):
        scheduler.add(seq)
    prefill, _ = scheduler.schedule()
    for seq in prefill:
        seq.output_ids.append(7)  # the prefill's token
    _, decode = scheduler.schedule()
    assert scheduler.window == WINDOW and decode == [a, b, c]
    rows = step_rows(decode, False, None, (0,), scheduler.window, 64)
    # a samples 4 (positions 3..6 written), b the 2 its max_tokens leave, c the 3 the context leaves
    assert rows.window == WINDOW and rows.window_tokens == [4, 2, 3]
    assert [len(s.blocks) for s in decode] == [2, 2, 16]  # blocks of 4 for the last position each writes
    short = _seq("p", 3, min_tokens=5)
    scheduler.add(short)
    prefill, _ = scheduler.schedule()
    assert prefill == [short] and scheduler.window == WINDOW  # (it was not running yet)
    scheduler.schedule()
    assert scheduler.window == 1  # a running row short of its min_tokens: one-token steps


def test_the_runner_refuses_a_window_it_cannot_compute(window_engine):
    runner = window_engine.runner
    row = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 0, "stream": 0, "step": 0,
           "banned": []}

    def rows(**changes):
        return StepRows(**{**dict(tokens=[[5]], start_positions=[3], block_tables=[[1, 2]], sampling=[row],
                                  window=WINDOW, window_tokens=[WINDOW]), **changes})

    runner.prepare_inputs(rows(), 0, None)  # positions 3..6: blocks 0 and 1
    with pytest.raises(ValueError, match="lack KV blocks"):
        runner.prepare_inputs(rows(block_tables=[[1]]), 0, None)
    with pytest.raises(ValueError, match="no banned tokens"):
        runner.prepare_inputs(rows(sampling=[dict(row, banned=[0])]), 0, None)
    with pytest.raises(ValueError, match="over this runner's 4"):
        runner.prepare_inputs(rows(window=WINDOW + 1, window_tokens=[1]), 0, None)
    with pytest.raises(ValueError, match="1 to 4 tokens"):
        runner.prepare_inputs(rows(window_tokens=[5]), 0, None)
    with pytest.raises(ValueError, match="one new token each"):
        runner.prepare_inputs(rows(tokens=[[5, 6]]), 0, None)
    assert StepShape.bucketed(rows=1, longest=1, blocks=2, banned=0, penalized=0, logprobs=0, greedy=True,
                              window=WINDOW).static()["window"] == WINDOW


def test_windows_are_the_default_without_expert_servers(window_engine):
    assert window_engine.scheduler.decode_window == WINDOW > 1


@pytest.mark.parametrize("window", [0, -1, 2.0, True])
def test_a_bad_decode_window_is_refused(tiny_checkpoint, window):
    with pytest.raises(ValueError, match="decode_window must be an integer >= 1"):
        Engine(tiny_checkpoint, decode_window=window)


def test_expert_servers_refuse_windows(tiny_checkpoint):
    with pytest.raises(ValueError, match="decode_window > 1 needs the experts in the engine"):
        Engine(tiny_checkpoint, deployment="configs/deploy/any.toml", decode_window=2)
