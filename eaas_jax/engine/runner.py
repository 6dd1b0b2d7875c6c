"""The compiled model step: forward over a padded batch, paged KV cache update,
LM head on each sequence's last token, and in-graph sampling.

Shapes are bucketed to powers of two (batch rows, tokens per row, blocks per row)
so that a whole run compiles a handful of programs; each new one is logged.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import os
import threading
import time
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eaas_jax.engine import packed
from eaas_jax.engine.compile_pool import CompilePool
from eaas_jax.engine.gil import shorten_switch_interval
from eaas_jax.model.experts_backend import ExchangeOutputs, ExchangeReport, ExpertsBackend
from eaas_jax.engine.sampler import NEUTRAL_ROW, SamplingInputs, sample
from eaas_jax.engine.scheduler import StepRows
from eaas_jax.model.attention import PagedAttentionInputs, init_layer_cache
from eaas_jax.model.moe import expert_token_counts
from eaas_jax.model.precision import matmul_precision
from eaas_jax.model.transformer import AttentionClientModel, ExpertStack, KVCache, micro_batch_rows
from eaas_jax.transport import custom_calls

log = logging.getLogger(__name__)


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


class StepShape(NamedTuple):
    """The key of a compiled step program: its padded sizes and static options."""

    batch: int  # rows
    seq: int  # tokens per row
    blocks: int  # KV blocks per row
    banned: int  # banned token ids per row
    penalized: int  # penalized tokens per row (0: no penalties in the program)
    logprobs: int  # top logprobs returned per row
    greedy: bool  # every row greedy
    prompt_logprobs: int  # -1: none; else top ones per prompt token
    window: int = 1  # decode tokens each row samples, one after another, in the program

    @classmethod
    def bucketed(cls, *, rows: int, longest: int, blocks: int, banned: int, penalized: int, logprobs: int,
                 greedy: bool, prompt_logprobs: int = -1, window: int = 1) -> "StepShape":
        """The shape of a step of `rows` rows, the longest of `longest` new
        tokens, of `blocks` KV blocks, `banned` banned ids and `penalized`
        penalized tokens at most: each size bucketed (`bucket`; minimum 16
        tokens unless every row has one, 8 blocks, 4 banned ids, 64 penalized
        tokens, 0 of those when no row has penalties). A few padded rows or
        tokens cost less than a recompile. `window` is not bucketed."""
        return cls(bucket(rows), 1 if longest == 1 else bucket(longest, 16), bucket(blocks, 8), bucket(banned, 4),
                   bucket(penalized, 64) if penalized else 0, logprobs, greedy, prompt_logprobs, window)

    def static(self) -> dict:
        """The jit's static options of this shape."""
        return dict(num_top_logprobs=self.logprobs, greedy_only=self.greedy,
                    num_prompt_logprobs=self.prompt_logprobs, window=self.window)


class StepResult(NamedTuple):
    tokens: np.ndarray  # [rows]
    logprobs: np.ndarray  # [rows]
    ranks: np.ndarray  # [rows]
    top_ids: np.ndarray  # [rows, L]
    top_logprobs: np.ndarray  # [rows, L]
    # A step asked for prompt logprobs (prefill): for each row's token t + 1,
    # its logprob and rank given tokens 0..t, and the top K there. None else.
    prompt_logprobs: np.ndarray | None = None  # [rows, seq - 1]
    prompt_ranks: np.ndarray | None = None  # [rows, seq - 1]
    prompt_top_ids: np.ndarray | None = None  # [rows, seq - 1, K]
    prompt_top_logprobs: np.ndarray | None = None  # [rows, seq - 1, K]


class StepMemory(NamedTuple):
    """Device memory of one compiled step program, by XLA's own accounting."""

    arguments: int  # weights, KV cache and inputs
    new_outputs: int  # outputs not written in place of a donated argument (the KV cache is)
    scratch: int  # temporaries

    @property
    def peak(self) -> int:
        """What the program holds at once at most (its arguments live throughout)."""
        return self.arguments + self.new_outputs + self.scratch

    @classmethod
    def of(cls, compiled: jax.stages.Compiled) -> "StepMemory | None":
        stats = compiled.memory_analysis()  # None where the backend does not say
        if stats is None:
            return None
        return cls(stats.argument_size_in_bytes, stats.output_size_in_bytes - stats.alias_size_in_bytes,
                   stats.temp_size_in_bytes)


class TracedStep(NamedTuple):
    """What tracing a step program told the host about it."""

    labels: list[tuple[int, int]]  # the (moe_layer, micro_batch) of each of its exchanges
    results: packed.Layout  # its results' buffer: (sampled, exchanges)


class DispatchedStep:
    """A step queued on the device; `fetch()` waits for and returns its results.

    `results` (device) are its sampled tokens and exchange reports packed
    into one buffer (`traced.results` unpacks it: one copy to the host).
    `next_tokens` (device, [max_rows, max_window]) are its sampled tokens,
    each row's in order and -1 past its last, for the `token_sources` of a
    step dispatched before this one is fetched: that step's input is a row's
    last, and all of them are pending for its penalties.
    """

    def __init__(self, num_rows: int, results: jax.Array, next_tokens, traced: TracedStep, *,
                 num_tokens: int, expert_arrays, window: int = 1, row_tokens: list[int] | None = None):
        self.num_rows = num_rows
        self.window = window
        self.row_tokens = row_tokens  # the tokens each row samples (StepRows.window_tokens; None: one)
        self.next_tokens = next_tokens
        self.num_tokens = num_tokens  # rows x tokens per row, padded as compiled
        self.expert_arrays = expert_arrays  # what the step was given (remote: its deadline)
        self.dispatched_at = time.monotonic()
        self._results = results
        self._traced = traced
        results.copy_to_host_async()  # starts as soon as the step ends

    def fetch(self) -> tuple[list[StepResult], ExchangeReport]:
        """Its results, one StepResult per token of its window (one but for
        a decode window), and what its exchanges reported."""
        sampled, (statuses, unserved, unserved_rows, *rest) = packed.unpack_on_host(
            np.asarray(self._results), self._traced.results)
        n = self.num_rows
        results = ([StepResult(*(x[:n] for x in sampled))] if self.window == 1 else
                   [StepResult(*(x[k, :n] for x in sampled)) for k in range(self.window)])
        return results, ExchangeReport(statuses, self._traced.labels, unserved, unserved_rows[:n], *rest)


class EmbeddedExperts:
    """The routed experts computed in the client's own graph (an `ExpertsBackend`)."""

    def __init__(self, experts: ExpertStack):
        self._graphdef, self.arrays = nnx.split(experts)

    def num_micro_batches(self, batch: int) -> int:
        return 1

    def initial_carry(self):
        return None

    def step_arrays(self, num_tokens: int):
        return self.arrays

    def exchange(self, arrays, carry):
        return nnx.merge(self._graphdef, arrays)

    def outputs(self, exchange) -> ExchangeOutputs:
        return ExchangeOutputs.none()

    def traced_exchanges(self) -> list[tuple[int, int]]:
        return []


def _rows_with(token_counts, labels, rows: list[slice], shape: tuple[int, int]) -> jax.Array:
    """[B] bool: the rows holding a token with a nonzero count in any
    exchange's [n] counts (n = a micro-batch's rows x T tokens, `labels`
    saying which micro-batch)."""
    flagged = jnp.zeros(shape[0], bool)
    for counts, (_, micro_batch) in zip(token_counts, labels):
        r = rows[micro_batch]
        flagged = flagged.at[r].set(flagged[r] | (counts.reshape(-1, shape[1]) > 0).any(axis=1))
    return flagged


# Positions the LM head scores at once for prompt logprobs: bounds the
# [positions, vocabulary] float32 arrays (256 x 152k: 155 MB) whatever the
# batch and prompt lengths.
PROMPT_LOGPROBS_CHUNK = 256


def _prompt_logprobs(client, hidden: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """For each row's token t + 1: its logprob and rank given tokens 0..t, and
    the `k` most likely tokens there (ids, logprobs): [B, S - 1] and [B, S - 1, k].
    The LM head over every position, PROMPT_LOGPROBS_CHUNK at a time: only
    for steps that ask."""
    rows, seq, width = hidden.shape
    n = rows * (seq - 1)
    pad = -n % PROMPT_LOGPROBS_CHUNK
    states = jnp.pad(hidden[:, :-1].reshape(n, width), ((0, pad), (0, 0)))
    targets = jnp.pad(tokens[:, 1:].reshape(n), (0, pad))

    def score(chunk):
        states, targets = chunk
        logprobs = jax.nn.log_softmax(client.logits(states), axis=-1)
        target = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        rank = 1 + jnp.sum(logprobs > target[:, None], axis=-1, dtype=jnp.int32)
        top_logprobs, top_ids = jax.lax.top_k(logprobs, k)
        return target, rank, top_ids.astype(jnp.int32), top_logprobs

    scored = jax.lax.map(score, (states.reshape(-1, PROMPT_LOGPROBS_CHUNK, width),
                                 targets.reshape(-1, PROMPT_LOGPROBS_CHUNK)))
    return tuple(x.reshape(-1, *x.shape[2:])[:n].reshape(rows, seq - 1, *x.shape[2:]) for x in scored)


def _step(client_graphdef, client_treedef, expert_treedef, backend, block_size, client_leaves, expert_leaves,
          kv_cache, host_buffer, previous_tokens, exchange_carry, *, host_layout, num_top_logprobs, greedy_only,
          num_prompt_logprobs, window):
    # Parameters arrive as flat leaves: flattening nnx state in Python on
    # every call would cost the host ~0.5 ms per step. The host's inputs
    # arrive as one buffer (engine.packed).
    tokens, positions, paged, last_index, sampling, token_sources, window_tokens = packed.unpack(
        host_buffer, host_layout)
    client = nnx.merge(client_graphdef, jax.tree.unflatten(client_treedef, client_leaves))
    expert_arrays = jax.tree.unflatten(expert_treedef, expert_leaves)
    # A row read from the previous step takes that step's tokens for it
    # ([rows, max_window], -1 past its last): its input is the last, and all
    # are pending for its penalties (the host's counts lack them until it
    # fetches that step).
    pending = jnp.where(token_sources[:, None] >= 0, previous_tokens[jnp.maximum(token_sources, 0)], -1)
    last = jnp.maximum(jnp.sum(pending >= 0, axis=1) - 1, 0)
    from_previous = jnp.take_along_axis(pending, last[:, None], axis=1)[:, 0]
    tokens = tokens.at[:, 0].set(jnp.where(token_sources >= 0, from_previous, tokens[:, 0]))
    experts = backend.exchange(expert_arrays, exchange_carry)
    if window > 1:
        return _decode_window(client, experts, backend, block_size, kv_cache, tokens, positions, paged, sampling,
                              pending, window_tokens, previous_tokens, exchange_carry, window=window,
                              num_top_logprobs=num_top_logprobs, greedy_only=greedy_only)
    token_mask = paged.slot_mapping < kv_cache[0].num_slots
    num_micro_batches = backend.num_micro_batches(tokens.shape[0])
    hidden, kv_cache, routings = client.hidden_states(
        tokens, positions, experts, kv_cache, paged, num_micro_batches=num_micro_batches, token_mask=token_mask,
    )
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    logits = client.logits(last)
    traced = backend.outputs(experts)
    statuses = jnp.stack(traced.statuses) if traced.statuses else jnp.zeros((0, 0), jnp.int32)
    unserved = (jnp.stack([jnp.sum(t) for t in traced.unserved_tokens]) if traced.unserved_tokens
                else jnp.zeros((0,), jnp.int32))
    unserved_rows = _rows_with(traced.unserved_tokens, traced.unserved_labels,
                               micro_batch_rows(tokens.shape[0], num_micro_batches), tokens.shape)
    expert_tokens = expert_token_counts(routings, token_mask, client.config.num_experts)
    exchanges = (statuses, unserved, unserved_rows, expert_tokens, traced.server_slots, traced.server_wait_us)
    sampled = sample(logits, sampling, num_top_logprobs, greedy_only, pending)
    if num_prompt_logprobs >= 0:
        sampled += _prompt_logprobs(client, hidden, tokens, num_prompt_logprobs)
    next_tokens = jnp.full_like(previous_tokens, -1).at[: sampled[0].shape[0], 0].set(sampled[0])
    return sampled, kv_cache, exchanges, next_tokens, traced.carry


def _decode_window(client, experts, backend, block_size, kv_cache, tokens, positions, paged, sampling, pending,
                   window_tokens, previous_tokens, exchange_carry, *, window, num_top_logprobs, greedy_only):
    """`window` decode tokens a row, one after another, each row's sampled
    token the next one's input: a window of decode steps in one program, for
    experts in the client's graph (no exchanges to report, no carry). Row b
    samples its first `window_tokens[b]` tokens (cache writes for the rest
    are dropped, their tokens ignored by the host); its token k has position
    positions[b] + k, its cache slot read off the row's block table here.
    `pending` ([B, P]: the previous step's tokens of each row) grows by each
    token the window samples, for the next one's penalties.
    Returns what `_step` does, its sampled arrays [window, B, ...]."""
    num_slots = kv_cache[0].num_slots
    tables = paged.block_tables
    rows, earlier = pending.shape
    pending = jnp.concatenate([pending, jnp.full((rows, window), -1, pending.dtype)], axis=1)

    def one_token(carry, k):
        kv_cache, tokens, pending = carry
        valid = (k < window_tokens)[:, None]
        position = jnp.where(valid, positions + k, 0)
        block = jnp.minimum(position // block_size, tables.shape[1] - 1)
        slots = jnp.where(valid, jnp.take_along_axis(tables, block, axis=1) * block_size + position % block_size,
                          num_slots)
        hidden, kv_cache, routings = client.hidden_states(
            tokens, position, experts, kv_cache, paged._replace(slot_mapping=slots), token_mask=valid)
        sampled = sample(client.logits(hidden[:, 0]), sampling._replace(step=sampling.step + k), num_top_logprobs,
                         greedy_only, pending)
        counts = expert_token_counts(routings, valid, client.config.num_experts)
        pending = pending.at[:, earlier + k].set(jnp.where(valid[:, 0], sampled[0], -1))
        return (kv_cache, sampled[0][:, None], pending), (sampled, counts)

    (kv_cache, _, pending), (sampled, counts) = jax.lax.scan(
        one_token, (kv_cache, tokens, pending), jnp.arange(window, dtype=jnp.int32))
    traced = backend.outputs(experts)
    exchanges = (jnp.zeros((0, 0), jnp.int32), jnp.zeros((0,), jnp.int32), jnp.zeros((rows,), bool),
                 counts.sum(axis=0), traced.server_slots, traced.server_wait_us)
    next_tokens = jnp.full_like(previous_tokens, -1).at[:rows, :window].set(pending[:, earlier:])
    return sampled, kv_cache, exchanges, next_tokens, exchange_carry


class ModelRunner:
    """Runs steps of `client` with routed experts from `experts`, an
    `ExpertsBackend` (`model.experts_backend`). A backend's carry is device
    state one step hands the next in dispatch order (remote: the servers still
    live), so a step queued before the host fetched its predecessor still
    learns what that one found.

    Steps are dispatched without waiting (`dispatch`), so that the host can
    prepare step n+1, feeding it step n's tokens on the device, while step n
    runs; `max_rows` bounds the rows of any step, `max_window` the tokens a
    decode window samples a row. `sharding` places the client's
    parameters, the KV cache and the step's other device inputs (default: the
    default device).
    """

    def __init__(self, client: AttentionClientModel, experts: ExpertsBackend, *, num_blocks: int, block_size: int,
                 max_rows: int, sharding: jax.sharding.Sharding | None = None, max_window: int = 1):
        self.config = client.config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.experts = experts
        client_graphdef, client_params = nnx.split(client)
        dtype = client.embed_tokens.embedding.get_value().dtype

        def empty_cache() -> KVCache:
            return tuple(init_layer_cache(self.config, num_blocks, block_size, dtype)
                         for _ in range(self.config.num_layers))

        # Every device input the host makes is committed to `sharding`, as the
        # step outputs that later steps take in their place are: jit keys its
        # cache on whether an argument is committed, so an uncommitted first KV
        # cache, token buffer or carry compiles each step shape twice (on W1 a
        # ~25 s stall when the batch first shrinks).
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self._empty_cache = jax.jit(empty_cache, out_shardings=sharding)
        self._sharding = sharding
        self.kv_cache = self._empty_cache()
        client_params = jax.device_put(client_params, sharding)
        self._client_leaves, client_treedef = jax.tree.flatten(client_params)
        self._expert_arrays = experts.arrays
        self._expert_leaves, self._expert_treedef = jax.tree.flatten(experts.arrays)
        # Traces of the step by each thread (jit calls the Python function only
        # to trace, in the calling thread): per thread, so that a background
        # compile tracing another shape is not taken for this thread's call
        # tracing again.
        self._traces = threading.local()

        def step(*args, **kwargs):
            self._traces.count = self._thread_traces() + 1
            with matmul_precision(dtype):
                sampled, kv_cache, exchanges, next_tokens, carry = _step(
                    client_graphdef, client_treedef, self._expert_treedef, experts, block_size, *args, **kwargs)
            results, self._traces.results_layout = packed.pack_on_device((sampled, exchanges))
            return results, kv_cache, next_tokens, carry

        step.__name__ = step.__qualname__ = "_step"  # the program's name in JAX's logs and events
        self._jitted = jax.jit(
            step,
            donate_argnums=(2,),
            static_argnames=("host_layout", "num_top_logprobs", "greedy_only", "num_prompt_logprobs", "window"),
            compiler_options=custom_calls.COMPILER_OPTIONS,
        )
        self.max_window = max_window
        self._no_previous_tokens = jax.device_put(jnp.full((bucket(max_rows), max_window), -1, jnp.int32), sharding)
        self._carry = jax.device_put(experts.initial_carry(), sharding)
        # What compiling each step shape gave (or will): what its trace told
        # (a TracedStep). Warm-up fills it ahead of the steps,
        # from other threads; tracing is one at a time (a trace's exchanges are
        # read off the backend after it), XLA's compiles run in parallel.
        self._compiled: dict[StepShape, concurrent.futures.Future] = {}
        self._compiled_lock = threading.RLock()  # cancelling a compile calls _forget_failed
        self._trace_lock = threading.Lock()
        # What each shape's trace told (its exchanges' labels, its results'
        # layout), kept when its compile fails: jit keeps the trace too, so a
        # retry does not trace (nor tell) again.
        self._traced: dict[StepShape, TracedStep] = {}
        self._background: CompilePool | None = None
        # Each compiled shape's device memory (what fits on a device: bench/).
        self.step_memory: dict[StepShape, StepMemory | None] = {}
        self.num_compile_waits = 0  # steps that waited for their program to compile
        # The KV cache as compiling sees it: shapes and placement (the cache
        # itself is donated to each step, so another thread must not hold it).
        self._kv_cache_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                           self.kv_cache)
        self._last_fetched_at = 0.0  # monotonic time the host last had a step's results

    def _thread_traces(self) -> int:
        """How many times this thread has traced the step."""
        return getattr(self._traces, "count", 0)

    @property
    def num_compilations(self) -> int:
        """Step shapes compiled or being compiled."""
        with self._compiled_lock:
            return sum(not _failed(future) for future in self._compiled.values())

    @property
    def num_compiling(self) -> int:
        """Step shapes queued for a compile or compiling now."""
        with self._compiled_lock:
            return sum(not future.done() for future in self._compiled.values())

    def prepare_inputs(self, rows: StepRows, num_top_logprobs: int, previous: DispatchedStep | None,
                       num_prompt_logprobs: int = -1):
        """The step's inputs for `rows`, built on the host without compiling:
        `(shape, args, static)`. `shape` is the compiled program's key
        (`StepShape.bucketed` of the rows' sizes, with `num_top_logprobs`,
        whether every row is greedy, and `num_prompt_logprobs`). `args` are the
        step's positional arguments, the host's inputs packed into one buffer
        (`packed.pack`; `static["host_layout"]` unpacks them: tokens, positions,
        paged-attention inputs, last_index, sampling inputs, token_sources),
        padded: padding tokens and rows get position 0 and the invalid slot
        `num_blocks * block_size` (their cache writes are dropped);
        `last_index` is each row's last real token; `token_sources` (-1 where
        absent) need `previous` and one token per row (ValueError otherwise).
        `static` holds the jit's static options."""
        n = len(rows.tokens)
        row_lengths = [len(t) for t in rows.tokens]
        table_lengths = [len(b) for b in rows.block_tables]
        shape = StepShape.bucketed(
            rows=n, longest=max(row_lengths), blocks=max(table_lengths),
            banned=max(len(s["banned"]) for s in rows.sampling),
            penalized=max(len(s.get("penalized", ())) for s in rows.sampling), logprobs=num_top_logprobs,
            greedy=all(s["temperature"] == 0 for s in rows.sampling), prompt_logprobs=num_prompt_logprobs,
            window=rows.window)
        batch, seq, max_blocks, num_banned, num_penalized = shape[:5]
        window_tokens = np.zeros((batch,), np.int32)
        window_tokens[:n] = 1 if rows.window_tokens is None else rows.window_tokens
        if rows.window > 1:
            self._check_window(rows, window_tokens[:n], seq, num_prompt_logprobs)

        # Ragged rows laid into padded arrays in one numpy call each (not a
        # call per row: at hundreds of rows those bound the host's step).
        tokens = np.zeros((batch, seq), np.int32)
        tables = np.zeros((batch, max_blocks), np.int32)
        lengths = np.zeros((batch,), np.int32)
        lengths[:n] = row_lengths
        tokens[:n][np.arange(seq) < lengths[:n, None]] = np.fromiter(
            itertools.chain.from_iterable(rows.tokens), np.int32, sum(row_lengths))
        tables[:n][np.arange(max_blocks) < np.asarray(table_lengths)[:, None]] = np.fromiter(
            itertools.chain.from_iterable(rows.block_tables), np.int32, sum(table_lengths))
        starts = np.zeros((batch,), np.int32)
        starts[:n] = rows.start_positions
        positions = starts[:, None] + np.arange(seq, dtype=np.int32)[None, :]
        block_index = np.minimum(positions // self.block_size, max_blocks - 1)
        slots = np.take_along_axis(tables, block_index, axis=1) * self.block_size + positions % self.block_size
        invalid_slot = self.num_blocks * self.block_size  # dropped by the cache write
        is_token = np.arange(seq)[None, :] < lengths[:, None]
        slots = np.where(is_token, slots, invalid_slot).astype(np.int32)
        positions = np.where(is_token, positions, 0).astype(np.int32)
        last_index = np.maximum(lengths - 1, 0)
        sources = np.full((batch,), -1, np.int32)
        if rows.token_sources is not None:
            if previous is None or seq != 1:
                raise ValueError("token_sources need a previous step and one new token per row")
            sources[:n] = rows.token_sources
        sampling = SamplingInputs.padded(rows.sampling, batch, num_banned, num_penalized)
        arrays = self.experts.step_arrays(batch * seq)
        if arrays is not self._expert_arrays:  # e.g. a new liveness mask or deadline
            self._expert_arrays = arrays
            self._expert_leaves, treedef = jax.tree.flatten(self._expert_arrays)
            if treedef != self._expert_treedef:
                raise ValueError("the experts backend changed the structure of its arrays")
        buffer, layout = packed.pack(
            (tokens, positions, PagedAttentionInputs(slots, tables), last_index, sampling, sources, window_tokens))
        args = (
            self._client_leaves,
            self._expert_leaves,
            self.kv_cache,
            buffer,
            self._no_previous_tokens if previous is None else previous.next_tokens,
            self._carry,
        )
        return shape, args, {**shape.static(), "host_layout": layout}

    @property
    def runs_windows(self) -> bool:
        """Whether a step may decode a window of several tokens a row: its
        experts are in the client's graph. Expert servers' exchanges report
        each step to the host (failover, deadlines), so they run one."""
        return self.experts.initial_carry() is None

    def _check_window(self, rows: StepRows, window_tokens: np.ndarray, seq: int, num_prompt_logprobs: int) -> None:
        """A decode window's rows are what `_decode_window` computes."""
        if not self.runs_windows:
            raise ValueError("decode windows need the experts in the client's graph")
        if seq != 1 or num_prompt_logprobs >= 0:
            raise ValueError("a decode window is of decode rows (one new token each, no prompt logprobs)")
        if rows.window > self.max_window:
            raise ValueError(f"a decode window of {rows.window} tokens is over this runner's {self.max_window}")
        if any(s["banned"] for s in rows.sampling):
            raise ValueError("a decode window's rows must have no banned tokens (the host updates those "
                             "between tokens)")
        if not ((window_tokens >= 1) & (window_tokens <= rows.window)).all():
            raise ValueError(f"each row samples 1 to {rows.window} tokens of the window, got {window_tokens.tolist()}")
        # (a row's window writes the cache at positions start .. start + its tokens - 1)
        short = [i for i, (start, k, table) in enumerate(zip(rows.start_positions, window_tokens.tolist(),
                                                             rows.block_tables))
                 if (start + k - 1) // self.block_size >= len(table)]
        if short:
            raise ValueError(f"rows {short} lack KV blocks for their window's tokens")

    def reset(self) -> None:
        """A fresh KV cache and carry, for after a step failed (the cache it
        was given is donated, and may be gone). The compiled programs stay."""
        self.kv_cache = self._empty_cache()
        self._carry = jax.device_put(self.experts.initial_carry(), self._sharding)

    def fetch(self, step: DispatchedStep) -> tuple[list[StepResult], ExchangeReport, float]:
        """Waits for `step` (fetched in dispatch order); returns its results
        (`DispatchedStep.fetch`) and its time on the device: from when it was queued or the step before
        it ended, whichever came later, to now (an upper bound when the host
        fetches late)."""
        results, report = step.fetch()
        fetched_at = time.monotonic()
        seconds = fetched_at - max(step.dispatched_at, self._last_fetched_at)
        self._last_fetched_at = fetched_at
        return results, report, seconds

    def wait(self) -> None:
        """Blocks until every dispatched step has run. A failure is logged, not
        raised: it belongs to a step whose results nobody will fetch (the
        engine fetches those it keeps)."""
        try:
            jax.block_until_ready(self.kv_cache)  # each step's cache feeds the next
        except Exception as e:  # noqa: BLE001 - see above
            log.info("a step dropped before its results were fetched failed: %s", e)

    def lower(self, rows: StepRows, num_top_logprobs: int = 0) -> jax.stages.Lowered:
        """The compiled step for `rows`' shapes, lowered (to inspect its HLO)."""
        shape, args, static = self.prepare_inputs(rows, num_top_logprobs, None)
        return self._lower(shape, args, static)[0]

    def _lower(self, shape: StepShape, args, static) -> tuple[jax.stages.Lowered, TracedStep]:
        """The step of `shape` lowered, and what its trace told (its
        exchanges' labels, read off the backend, and its results' layout;
        kept for the shape)."""
        with self._trace_lock:
            start = time.monotonic()
            traces = self._thread_traces()
            lowered = self._jitted.lower(*args, **static)
            if self._thread_traces() != traces:
                self._traced[shape] = TracedStep(self.experts.traced_exchanges(), self._traces.results_layout)
                # Traces take turns (this lock, and Python's GIL) while XLA's
                # compiles run side by side: this bounds a warm-up's pace.
                log.info("traced and lowered model step %s in %.1f s", shape, time.monotonic() - start)
            return lowered, self._traced[shape]

    def _lower_against_cache_spec(self, shape: StepShape, args, static
                                  ) -> tuple[jax.stages.Lowered, TracedStep]:
        """`_lower` with the KV cache's spec for the cache (which each step is
        donated, so the program is compiled against its spec, not an array)."""
        return self._lower(shape, (*args[:2], self._kv_cache_spec, *args[3:]), static)

    def optimized_hlo(self, shape: StepShape) -> str:
        """The step program of `shape` as XLA optimized it, as HLO text: its
        fusions are the kernels a device profile names, each with the source
        line it came from (bench/w1_decode_gpu.py's profile reads them). Lowers
        it again; JAX's in-memory cache of compiled programs then returns the
        step's own executable, without compiling."""
        args, static = self._placeholder_inputs(shape)
        return self._lower_against_cache_spec(shape, args, static)[0].compile().as_text()

    def _placeholder_rows(self, shape: StepShape) -> StepRows:
        """Rows whose step has `shape` (their values are never run)."""
        # (a window's rows ban nothing: their banned ids pad to the same bucket)
        row = {**NEUTRAL_ROW, "temperature": 0.0 if shape.greedy else 1.0,
               "banned": [0] * shape.banned if shape.window == 1 else []}
        if shape.penalized:
            row["penalized"] = [(0, 0)] * shape.penalized
        return StepRows([[0] * shape.seq] * shape.batch, [0] * shape.batch, [[0] * shape.blocks] * shape.batch,
                        [row] * shape.batch, window=shape.window)

    def _placeholder_inputs(self, shape: StepShape) -> tuple[tuple, dict]:
        """The step's (args, static options) for `shape`, of placeholder rows."""
        _, args, static = self.prepare_inputs(self._placeholder_rows(shape), shape.logprobs, None,
                                              shape.prompt_logprobs)
        return args, static

    def _compile(self, shape: StepShape, args, static) -> TracedStep:
        """Compiles the step program of `shape` (jit's caches keep it for the
        step's own call); returns what its trace told."""
        start = time.monotonic()
        lowered, traced = self._lower_against_cache_spec(shape, args, static)
        memory = self.step_memory[shape] = StepMemory.of(lowered.compile())
        log.info("compiled model step %s in %.1f s%s", shape, time.monotonic() - start,
                 f" ({memory.peak / 2**30:.2f} GiB of device memory at its peak)" if memory else "")
        return traced

    def _compiling(self, shape: StepShape, args, static, pool: CompilePool | None = None
                   ) -> tuple[concurrent.futures.Future, bool]:
        """The compile of `shape`, and whether this call started it: the one
        started before, else a new one on `pool` (None: here, now: a step needs
        it; one still queued in the background is taken over, not waited for
        behind others). A failed one is forgotten (the next step of that shape
        tries again)."""
        with self._compiled_lock:
            future = self._compiled.get(shape)
            if future is not None and not _failed(future) and (pool is not None or not future.cancel()):
                return future, False
            future = pool.submit(self._compile, shape, args, static) if pool is not None \
                else concurrent.futures.Future()
            self._compiled[shape] = future
        future.add_done_callback(functools.partial(self._forget_failed, shape))
        if pool is None:
            future.set_running_or_notify_cancel()
            try:
                log.info("compiling model step #%d: %s", len(self._compiled), shape)
                future.set_result(self._compile(shape, args, static))
            except BaseException as e:
                future.set_exception(e)
        return future, True

    def _forget_failed(self, shape: StepShape, future: concurrent.futures.Future) -> None:
        # A callback runs after the future's readers wake: until then
        # `_compiling` and `num_compilations` tell a failed one apart themselves.
        if _failed(future):
            if not future.cancelled():
                log.warning("compiling model step %s failed: %s", shape, future.exception())
            with self._compiled_lock:
                if self._compiled.get(shape) is future:
                    del self._compiled[shape]

    def compile(self, shapes: Iterable[StepShape], *, background: bool = False,
                on_done=None) -> list[concurrent.futures.Future]:
        """Compiles the step programs of `shapes` not compiled yet (warm-up).
        In parallel; then waits for them, unless `background`: then they
        compile on a pool of threads while steps run (a step of a shape still
        compiling waits for it). `on_done(future)` is called as each finishes."""
        futures = []
        pool = self._background_pool() if background else CompilePool(_compile_threads(), "eaas-compile")
        try:
            for shape in shapes:
                args, static = self._placeholder_inputs(shape)
                futures.append(self._compiling(shape, args, static, pool)[0])
                if on_done is not None:
                    futures[-1].add_done_callback(on_done)
            if not background:
                for future in futures:
                    future.result()  # raises a compile's error
        finally:
            if not background:
                pool.stop()  # what is left after an error or an interrupt
        return futures

    def _background_pool(self) -> CompilePool:
        if self._background is None:
            shorten_switch_interval()  # its compiles trace the model in Python while steps run
            self._background = CompilePool(max(1, _compile_threads() // 2), "eaas-compile-background")
        return self._background

    def stop_compiling(self) -> None:
        """Drops the background compiles not started; those running finish on
        their own (a step that needs one waits for it). Returns at once."""
        if self._background is not None:
            self._background.stop()
            self._background = None

    def dispatch(self, rows: StepRows, num_top_logprobs: int,
                 previous: DispatchedStep | None = None, num_prompt_logprobs: int = -1) -> DispatchedStep:
        """Queues a step for `rows` on the device; `previous` is the step whose
        tokens `rows.token_sources` name; `num_prompt_logprobs` >= 0 also
        scores every token of the rows (prompt logprobs, with that many top ones).
        A shape met for the first time is compiled first (or waited for, if
        warm-up is compiling it; compiled here if that compile failed)."""
        shape, args, static = self.prepare_inputs(rows, num_top_logprobs, previous, num_prompt_logprobs)
        future, started = self._compiling(shape, args, static)
        if started or not future.done():
            self.num_compile_waits += 1
        try:
            traced = future.result()
        except Exception:  # noqa: BLE001 - a background compile's failure: this step's own try says
            if started:
                raise
            traced = self._compiling(shape, args, static)[0].result()
        traces = self._thread_traces()
        results, self.kv_cache, next_tokens, self._carry = self._jitted(*args, **static)
        if self._thread_traces() != traces:
            # Compiled for another context than this call's (a JAX setting
            # scoped to the calling thread, e.g. default_matmul_precision).
            log.warning("model step %s was traced again at its call: the compiled program did not match it "
                        "(a thread-scoped JAX setting?); warm-up cannot compile ahead for this caller", shape)
            traced = traced._replace(results=self._traces.results_layout)  # (this program's own)
        return DispatchedStep(len(rows.tokens), results, next_tokens, traced, num_tokens=shape.batch * shape.seq,
                              expert_arrays=self._expert_arrays, window=shape.window, row_tokens=rows.window_tokens)


def _failed(future: concurrent.futures.Future) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)


def _num_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _compile_threads() -> int:
    """Threads compiling step programs at once: XLA's compiles release the
    GIL, and each also uses a few threads of its own."""
    return max(1, min(8, _num_cores() // 2))


def compiles_alongside_steps() -> bool:
    """Whether compiling while steps run costs the steps little: their device
    is an accelerator, or the CPU that runs them has cores to spare."""
    return jax.default_backend() != "cpu" or _num_cores() >= 8
