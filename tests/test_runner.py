"""ModelRunner on its own (no Engine): the padded inputs it builds from a batch
of `StepRows` (`prepare_inputs`, which compiles nothing), and one prefill and
one decode step dispatched and fetched against a full forward pass."""

from __future__ import annotations

import dataclasses
import logging
import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.engine import packed
from eaas_jax.engine.runner import DispatchedStep, EmbeddedExperts, ModelRunner, StepRows, TracedStep, bucket
from eaas_jax.model import moe

from conftest import TINY_CONFIG, tiny_model

BLOCK = 4
NUM_BLOCKS = 16
INVALID_SLOT = NUM_BLOCKS * BLOCK  # 64: where padding tokens "write" (dropped)
MAX_ROWS = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.fixture(scope="module")
def runner(model) -> ModelRunner:
    return ModelRunner(model.client, EmbeddedExperts(model.experts), num_blocks=NUM_BLOCKS, block_size=BLOCK,
                       max_rows=MAX_ROWS)


def _sampling(**fields) -> dict:
    row = dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[])
    row.update(fields)
    return row


def _rows(tokens, starts, tables, sampling=None, token_sources=None) -> StepRows:
    sampling = sampling or [_sampling() for _ in tokens]
    return StepRows(tokens, starts, tables, sampling, token_sources)


def _inputs(runner, rows, num_top_logprobs=0, previous=None):
    """prepare_inputs' shape key, its step arguments by name (numpy), and static options."""
    shape, args, static = runner.prepare_inputs(rows, num_top_logprobs, previous)
    _, _, kv_cache, buffer, previous_tokens, _ = args
    assert kv_cache is runner.kv_cache and isinstance(buffer, np.ndarray) and buffer.dtype == np.int32
    tokens, positions, paged, last_index, sampling, sources, window_tokens = jax.tree.map(
        np.asarray, packed.unpack(jnp.asarray(buffer), static.pop("host_layout")))
    named = dict(tokens=tokens, positions=positions, slots=paged.slot_mapping, tables=paged.block_tables,
                 last_index=last_index, sampling=sampling, previous_tokens=previous_tokens, sources=sources,
                 window_tokens=window_tokens)
    return shape, named, static


def _previous_step(next_tokens) -> DispatchedStep:
    """A stand-in for a dispatched step: only its device `next_tokens` are read."""
    nothing, layout = packed.pack_on_device(())
    return DispatchedStep(1, nothing, jnp.asarray(next_tokens, jnp.int32), TracedStep([], layout), num_tokens=1,
                          expert_arrays=None)


def test_bucket_is_the_next_power_of_two_above_a_minimum():
    """Guards the bucketing all step shapes use (a wrong one recompiles per batch)."""
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert bucket(3, 16) == 16 and bucket(17, 16) == 32 and bucket(0) == 1


@pytest.mark.parametrize(
    "lengths, num_blocks, banned, penalized, temperatures, logprobs, key",
    [
        # decode rows (one token each) keep one token per row: no 16-token minimum
        ([1, 1, 1], [3, 1, 1], [0, 0, 0], [0, 0, 0], [0, 0, 0], 0, (4, 1, 8, 4, 0, 0, True, -1)),
        ([1], [1], [0], [0], [0], 0, (1, 1, 8, 4, 0, 0, True, -1)),
        # a row of two tokens: the 16-token minimum
        ([2, 1], [1, 1], [0, 0], [0, 0], [0, 0], 0, (2, 16, 8, 4, 0, 0, True, -1)),
        ([5, 3, 1], [2, 1, 1], [0, 2, 0], [0, 0, 0], [0, 0, 0], 0, (4, 16, 8, 4, 0, 0, True, -1)),
        ([17, 1, 1, 1, 1], [9, 1, 1, 1, 1], [5, 0, 0, 0, 0], [0] * 5, [0, 0.5, 0, 0, 0], 3,
         (8, 32, 16, 8, 0, 3, False, -1)),
        # penalized tokens: at least 64 once any row has penalties
        ([1, 1], [1, 1], [0, 0], [3, 0], [0, 0], 0, (2, 1, 8, 4, 64, 0, True, -1)),
        ([1, 1, 1], [1, 1, 1], [0, 0, 0], [5, 70, 0], [0, 0, 0], 0, (4, 1, 8, 4, 128, 0, True, -1)),
    ],
)
def test_shape_key_and_array_shapes_are_bucketed(runner, lengths, num_blocks, banned, penalized, temperatures,
                                                 logprobs, key):
    """Guards the shape key (batch rows, tokens per row, blocks per row, banned
    ids per row, penalized tokens per row, top logprobs, greedy only) and that
    every array is padded to it: a key that missed a dimension would reuse a
    program of another shape."""
    rows = _rows([list(range(1, n + 1)) for n in lengths], [0] * len(lengths),
                 [list(range(b)) for b in num_blocks],
                 [_sampling(banned=list(range(k)), temperature=t,
                            **({"repetition_penalty": 1.5, "penalized": [(i, 0) for i in range(p)]} if p else {}))
                  for k, p, t in zip(banned, penalized, temperatures)])
    shape, x, static = _inputs(runner, rows, logprobs)
    assert shape[:8] == key and shape.window == 1
    batch, seq, blocks, num_banned, num_penalized = key[:5]
    assert x["tokens"].shape == x["positions"].shape == x["slots"].shape == (batch, seq)
    assert x["tables"].shape == (batch, blocks)
    assert x["last_index"].shape == x["sources"].shape == (batch,)
    sampling = x["sampling"]
    assert all(np.shape(getattr(sampling, name)) == (batch,) for name in sampling._fields
               if name not in ("banned", "penalty_ids", "penalty_counts"))
    assert sampling.banned.shape == (batch, num_banned)
    assert sampling.penalty_ids.shape == sampling.penalty_counts.shape == (batch, num_penalized)
    assert x["previous_tokens"].shape == (bucket(MAX_ROWS), 1)  # (a row's tokens: one, no decode windows)
    assert static == {"num_top_logprobs": logprobs, "greedy_only": key[6], "num_prompt_logprobs": -1, "window": 1}
    assert x["window_tokens"].tolist() == [1] * len(lengths) + [0] * (batch - len(lengths))
    for name in ("tokens", "positions", "slots", "tables", "last_index", "sources", "window_tokens"):
        assert x[name].dtype == np.int32, name


def test_the_step_takes_one_host_array(runner):
    """Each host array of a jitted call is a transfer of its own while it
    dispatches (engine.packed): the step's are packed into one."""
    rows = _rows([[5], [6, 7]], [3, 0], [[1], [2]], [_sampling(banned=[3]), _sampling(temperature=1.0)])
    _, args, _ = runner.prepare_inputs(rows, 2, None)
    assert sum(isinstance(x, np.ndarray) for x in jax.tree.leaves(args)) == 1


def test_prefill_tokens_tables_positions_slots_and_last_index(runner):
    """Guards a prefill batch's padded inputs: tokens and block tables copied
    left-aligned, positions counting from the row's start, each token's cache
    slot block * block_size + position % block_size through the row's table,
    padding tokens and padding rows at position 0 with the invalid slot
    num_blocks * block_size (so the cache write drops them), and last_index on
    each row's last real token."""
    rows = _rows([[11, 12, 13, 14, 15], [21, 22, 23], [31]], [0, 0, 0], [[7, 2], [1], [3]])
    shape, x, _ = _inputs(runner, rows)
    assert shape[:3] == (4, 16, 8)
    pad = lambda values, width, fill=0: values + [fill] * (width - len(values))  # noqa: E731
    np.testing.assert_array_equal(x["tokens"], [pad([11, 12, 13, 14, 15], 16), pad([21, 22, 23], 16),
                                                pad([31], 16), pad([], 16)])
    np.testing.assert_array_equal(x["tables"], [pad([7, 2], 8), pad([1], 8), pad([3], 8), pad([], 8)])
    np.testing.assert_array_equal(x["positions"], [pad([0, 1, 2, 3, 4], 16), pad([0, 1, 2], 16),
                                                   pad([0], 16), pad([], 16)])
    np.testing.assert_array_equal(x["slots"], [
        pad([28, 29, 30, 31, 8], 16, INVALID_SLOT),  # block 7, then block 2
        pad([4, 5, 6], 16, INVALID_SLOT),  # block 1
        pad([12], 16, INVALID_SLOT),  # block 3
        pad([], 16, INVALID_SLOT),  # a padding row writes nothing
    ])
    np.testing.assert_array_equal(x["last_index"], [4, 2, 0, 0])


def test_decode_rows_start_at_their_position(runner):
    """Guards decode inputs: one token per row at its start position, its slot
    in the table entry that position falls in (block 9 for position 9 with
    blocks of 4), last_index 0, and padding rows on the invalid slot."""
    rows = _rows([[5], [6], [7]], [9, 0, 7], [[5, 14, 9], [4], [0, 6]])
    shape, x, _ = _inputs(runner, rows)
    assert shape[:3] == (4, 1, 8)
    np.testing.assert_array_equal(x["tokens"], [[5], [6], [7], [0]])
    np.testing.assert_array_equal(x["positions"], [[9], [0], [7], [0]])
    # 9 * 4 + 9 % 4, 4 * 4 + 0, 6 * 4 + 7 % 4
    np.testing.assert_array_equal(x["slots"], [[37], [16], [27], [INVALID_SLOT]])
    np.testing.assert_array_equal(x["last_index"], [0, 0, 0, 0])


def test_token_sources_name_rows_of_the_previous_step(runner):
    """Guards token_sources: padded with -1 (no source), the previous step's
    device tokens passed as the step's `previous_tokens` (the runner's
    buffer of none, -1, without a previous step), and a ValueError for sources without a
    previous step or with more than one new token in a row (the device token
    only replaces a row's single token)."""
    _, x, _ = _inputs(runner, _rows([[5], [6]], [4, 8], [[0, 1], [2, 3, 4]]))
    np.testing.assert_array_equal(x["sources"], [-1, -1])
    np.testing.assert_array_equal(x["previous_tokens"], np.full((bucket(MAX_ROWS), 1), -1))

    previous = _previous_step(np.arange(100, 100 + bucket(MAX_ROWS))[:, None])
    rows = _rows([[0], [0], [9]], [4, 8, 2], [[0, 1], [2, 3, 4], [5]], token_sources=[2, 0, -1])
    _, x, _ = _inputs(runner, rows, previous=previous)
    np.testing.assert_array_equal(x["sources"], [2, 0, -1, -1])
    assert x["previous_tokens"] is previous.next_tokens

    with pytest.raises(ValueError, match="previous step"):
        runner.prepare_inputs(rows, 0, None)
    prefill = _rows([[0], [0, 1]], [4, 0], [[0, 1], [2]], token_sources=[0, -1])
    with pytest.raises(ValueError, match="one new token per row"):
        runner.prepare_inputs(prefill, 0, previous)


def test_sampling_inputs_are_padded_with_neutral_rows(runner):
    """Guards the sampling inputs: each row's parameters in its row, padding
    rows greedy with top_p 1 and no filter, banned ids left-aligned and padded
    with -1 to a bucket of at least 4, and greedy_only false as soon as one row
    samples."""
    rows = _rows([[1], [2], [3]], [0, 0, 0], [[0], [1], [2]], [
        _sampling(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, seed=123, stream=1, step=4, banned=[0, 9]),
        _sampling(seed=7, step=2, presence_penalty=0.5, frequency_penalty=-1.0, repetition_penalty=1.2,
                  penalized=[(4, 0), (8, 3)]),
        _sampling(banned=[1, 2, 3, 4, 5]),
    ])
    shape, x, static = _inputs(runner, rows, num_top_logprobs=2)
    s = x["sampling"]
    np.testing.assert_allclose(s.temperature, [0.7, 0, 0, 0])
    np.testing.assert_allclose(s.top_p, [0.9, 1, 1, 1])
    np.testing.assert_array_equal(s.top_k, [5, 0, 0, 0])
    np.testing.assert_allclose(s.min_p, [0.1, 0, 0, 0])
    np.testing.assert_array_equal(s.seed, [123, 7, 0, 0])
    assert s.seed.dtype == np.uint32
    np.testing.assert_array_equal(s.stream, [1, 0, 0, 0])
    np.testing.assert_array_equal(s.step, [4, 2, 0, 0])
    np.testing.assert_array_equal(s.banned, [[0, 9, -1, -1, -1, -1, -1, -1], [-1] * 8,
                                             [1, 2, 3, 4, 5, -1, -1, -1], [-1] * 8])
    np.testing.assert_allclose(s.presence_penalty, [0, 0.5, 0, 0])
    np.testing.assert_allclose(s.frequency_penalty, [0, -1, 0, 0])
    np.testing.assert_allclose(s.repetition_penalty, [1, 1.2, 1, 1])
    np.testing.assert_array_equal(s.penalty_ids[:, :3], [[-1] * 3, [4, 8, -1], [-1] * 3, [-1] * 3])
    np.testing.assert_array_equal(s.penalty_counts[:, :3], [[0] * 3, [0, 3, 0], [0] * 3, [0] * 3])
    assert shape == (4, 1, 8, 8, 64, 2, False, -1, 1)
    assert static == {"num_top_logprobs": 2, "greedy_only": False, "num_prompt_logprobs": -1, "window": 1}


def test_prompt_logprobs_of_a_prefill_match_a_full_forward_pass(model, runner, monkeypatch):
    """A step that scores its rows' tokens (num_prompt_logprobs): each token
    t + 1's logprob, rank and the top 3 there equal those of a full causal
    forward pass, for rows of different lengths in one padded step, scored
    in chunks of 7 positions (the last one padded)."""
    import eaas_jax.engine.runner as runner_module

    monkeypatch.setattr(runner_module, "PROMPT_LOGPROBS_CHUNK", 7)  # read when the step is traced (here)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23]]
    [result], _ = runner.dispatch(_rows(prompts, [0, 0], [[1, 2], [3, 4]]), 0, num_prompt_logprobs=3).fetch()
    [plain], _ = runner.dispatch(_rows(prompts, [0, 0], [[1, 2], [3, 4]]), 0).fetch()
    assert plain.prompt_logprobs is None and result.tokens.tolist() == plain.tokens.tolist()
    padded = jnp.asarray([p + [0] * (5 - len(p)) for p in prompts], jnp.int32)
    logprobs = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(model, padded), axis=-1))
    for i, p in enumerate(prompts):
        for t in range(len(p) - 1):
            want = logprobs[i, t]
            np.testing.assert_allclose(result.prompt_logprobs[i, t], want[p[t + 1]], rtol=1e-4, atol=1e-4)
            assert result.prompt_ranks[i, t] == 1 + (want > want[p[t + 1]]).sum()
            assert result.prompt_top_ids[i, t].tolist() == np.argsort(-want)[:3].tolist()
            np.testing.assert_allclose(result.prompt_top_logprobs[i, t], np.sort(want)[::-1][:3], rtol=1e-4,
                                       atol=1e-4)


def test_prefill_then_decode_steps_match_a_full_forward_pass(model, runner):
    """Guards the whole step end to end: three prompts prefilled in scattered
    blocks (one in block 0, where padding tokens and the padding row would land
    if their slots were not the invalid one) and then decoded with their tokens
    read on the device from the prefill step through token_sources, in another
    row order; every greedy token and its log-probability equal those of a
    full causal forward pass. One program per step shape."""
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34, 35, 36, 37]]
    tables = [[7, 2], [0, 9], [4, 12]]
    compiled = runner.num_compilations
    prefill = runner.dispatch(_rows(prompts, [0, 0, 0], tables), 0)
    [first], _ = prefill.fetch()
    assert first.tokens.shape == (3,)  # padding rows dropped

    # Decode rows in reverse order: row i reads prefill row 2 - i.
    order = [2, 1, 0]
    rows = _rows([[0]] * 3, [len(prompts[i]) for i in order], [tables[i] for i in order],
                 [_sampling(step=1)] * 3, token_sources=order)
    [second], _ = runner.dispatch(rows, 0, prefill).fetch()
    assert runner.num_compilations - compiled == 2

    full = [p + [int(first.tokens[i])] for i, p in enumerate(prompts)]
    width = max(map(len, full))
    padded = jnp.asarray([f + [0] * (width - len(f)) for f in full], jnp.int32)  # causal: padding after is inert
    logprobs = np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(model, padded), axis=-1))
    for i, p in enumerate(prompts):
        at_prefill, at_decode = logprobs[i, len(p) - 1], logprobs[i, len(p)]
        assert first.tokens[i] == at_prefill.argmax()
        np.testing.assert_allclose(first.logprobs[i], at_prefill.max(), rtol=1e-4, atol=1e-4)
        row = order.index(i)
        assert second.tokens[row] == at_decode.argmax()
        np.testing.assert_allclose(second.logprobs[row], at_decode.max(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype, precision", [(jnp.float32, "HIGHEST"), (jnp.bfloat16, None)])
def test_float32_models_trace_float32_matmuls(dtype, precision):
    """JAX's default precision computes float32 dots in TF32 on NVIDIA GPUs;
    a float32 model's step asks for float32 in every dot (bfloat16 ones keep
    the default)."""
    model = tiny_model(seed=3, dtype=dtype)
    runner = ModelRunner(model.client, EmbeddedExperts(model.experts), num_blocks=NUM_BLOCKS, block_size=BLOCK,
                         max_rows=MAX_ROWS)
    with jax.default_matmul_precision("default"):  # not conftest's "highest"
        text = runner.lower(_rows([[5, 6]], [0], [[0]])).as_text()
    dots = re.findall(r"stablehlo\.dot_general.*", text)
    assert dots
    if precision:
        assert all(f"precision = [{precision}, {precision}]" in d for d in dots)
    else:
        assert not any("HIGHEST" in d for d in dots)


def test_a_trace_in_another_thread_is_not_this_calls_retrace(runner, caplog):
    """Warm-up traces other shapes on background threads while steps run: a
    step whose program was compiled must not be reported as traced again
    because another thread traced meanwhile; a step that does trace again at
    its call (a setting scoped to the calling thread) still is."""
    rows = _rows([[5, 6, 7]], [0], [[1]])
    runner.dispatch(rows, 0).fetch()  # compiled
    jitted = runner._jitted

    class TracesElsewhereFirst:
        """The step's jit, except that a call first lets another thread trace
        another shape (the interleaving a background compile makes)."""
        lower = jitted.lower

        def __call__(self, *args, **kwargs):
            other = threading.Thread(target=runner.lower, args=(_rows([[5] * 9] * 3, [0] * 3, [[2, 3, 4]] * 3),))
            other.start()
            other.join()
            return jitted(*args, **kwargs)

    runner._jitted = TracesElsewhereFirst()
    try:
        with caplog.at_level(logging.WARNING, logger="eaas_jax.engine.runner"):
            runner.dispatch(rows, 0).fetch()
            assert "traced again" not in caplog.text
            with jax.default_matmul_precision("bfloat16"):  # this thread's setting: another program
                runner.dispatch(rows, 0).fetch()
            assert "traced again" in caplog.text
    finally:
        runner._jitted = jitted


def test_each_compiled_step_records_its_device_memory(model, runner):
    """What fits on a device is read off compiled steps (bench/): a step's
    arguments hold the weights and the whole KV cache, which it updates in
    place (donated: no second copy among its outputs); a step of more rows
    holds more."""
    small, large = (runner.prepare_inputs(_rows([[5]] * n, [3] * n, [[1]] * n), 0, None)[0] for n in (1, MAX_ROWS))
    for n in (1, MAX_ROWS):
        runner.dispatch(_rows([[5]] * n, [3] * n, [[1]] * n), 0).fetch()
    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    kv_cache = sum(x.nbytes for x in jax.tree.leaves(runner.kv_cache))
    one, many = runner.step_memory[small], runner.step_memory[large]
    assert weights + kv_cache <= one.arguments < weights + kv_cache + 4096
    assert one.new_outputs < kv_cache // 2
    assert many.peak > one.peak and many.scratch + many.new_outputs > one.scratch + one.new_outputs


def test_optimized_hlo_names_the_compiled_steps_fusions_and_their_source(runner):
    """A device profile names a step's kernels after XLA's fusions; the
    optimized HLO says which model line each came from (bench/w1_decode_gpu.py)."""
    shape = runner.prepare_inputs(_rows([[5]], [3], [[1]]), 0, None)[0]
    runner.dispatch(_rows([[5]], [3], [[1]]), 0).fetch()
    hlo = runner.optimized_hlo(shape)
    assert hlo.startswith("HloModule") and re.search(r"= .*\bfusion\(.*metadata=", hlo)  # optimized: fused
    assert "eaas_jax/model/attention.py" in hlo  # where its ops came from


def test_a_step_traces_its_routed_experts_once_for_all_layers(monkeypatch, fresh_expert_traces):
    """Tracing and lowering the expert kernels is what makes a GPU step
    program slow to compile (W1's server warm-up took minutes): the MoE
    layers share one trace of them per program, not one each."""
    # 3 MoE layers
    model = tiny_model(dataclasses.replace(TINY_CONFIG, num_layers=4, moe_intermediate_size=20))
    runner = ModelRunner(model.client, EmbeddedExperts(model.experts), num_blocks=NUM_BLOCKS, block_size=BLOCK,
                         max_rows=MAX_ROWS)
    traced = []
    for name in ("_gathered_experts", "_grouped_experts"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _f=original, _n=name: traced.append(_n) or _f(*a))
    steps = (_rows([[5]], [3], [[1]]), _rows([[5] * 9] * 2, [0, 0], [[1, 2, 3], [4, 5, 6]]))  # decode, prefill
    shapes = [runner.prepare_inputs(rows, 0, None)[0] for rows in steps]
    runner.compile(shapes)
    assert len(traced) == len(shapes), traced
    for rows in steps:
        runner.dispatch(rows, 0).fetch()  # the compiled programs run, and nothing traces again
    assert len(traced) == len(shapes)
