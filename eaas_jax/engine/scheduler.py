"""Continuous batching: which sequences run in the next step.

Every step, running sequences first get the KV block their next token needs
(preempting the most recently admitted ones when the pool is exhausted: their
blocks are freed and they go back to the front of the queue, to be recomputed
later, so nothing is lost); then waiting sequences are admitted for prefill
while there are free rows, free blocks and prefill token budget.

Sequences may have tokens pending (sampled by a step still on the device):
they count for positions and blocks; a sequence whose pending tokens end it by
length is not scheduled again, and a preempted one is not re-prefilled before
its pending tokens have arrived. With a decode window, a decode row's blocks
cover every position its window writes.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import NamedTuple

from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.sampling_params import MAX_LOGPROBS
from eaas_jax.engine.sequence import Sequence

log = logging.getLogger(__name__)


class StepRows(NamedTuple):
    """One row per sequence, built on the host (numpy), before padding."""

    tokens: list[list[int]]  # new tokens of each sequence
    start_positions: list[int]  # position of each row's first new token
    block_tables: list[list[int]]
    sampling: list[dict]  # SamplingInputs fields per row
    # Per row, -1, or the row of the previous dispatched step whose sampled token
    # is this row's (single) new token: a token still on the device, in place
    # of the placeholder in `tokens`.
    token_sources: list[int] | None = None
    # Decode tokens each row samples in the step, one after another (a decode
    # window: ModelRunner.runs_windows), at most `window`; None: one each.
    window: int = 1
    window_tokens: list[int] | None = None


class Scheduler:
    """`decode_window` > 1: decode steps sample up to that many tokens a row
    (`window` says the last scheduled one's), when every running sequence
    `can_decode_window`; each row's KV blocks are reserved for its window."""

    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, decode_window: int = 1):
        self.allocator = allocator
        self.decode_window = decode_window
        self.window = 1
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """Returns (sequences to prefill, sequences to decode) for the next step."""
        decode = self._reserve_decode_blocks()
        prefill, budget = [], self.max_num_batched_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break
            num_tokens = seq.num_tokens
            need = self.allocator.blocks_for(num_tokens)
            if need > self.allocator.num_free or (prefill and num_tokens > budget):
                break
            self.waiting.popleft()
            metrics = seq.request.metrics
            metrics.first_scheduled_time = metrics.first_scheduled_time or time.time()
            seq.blocks = self.allocator.allocate(need)
            budget -= num_tokens
            self.running.append(seq)
            prefill.append(seq)
        return prefill, decode

    def _reserve_decode_blocks(self) -> list[Sequence]:
        decode, preempted = [], set()
        block_size = self.allocator.block_size
        self.window = window = (self.decode_window if self.decode_window > 1 and
                                all(seq.can_decode_window() for seq in self.running) else 1)
        for seq in list(self.running):
            if preempted and seq in preempted:  # preempted below for an earlier sequence
                continue
            if seq.num_pending and seq.ends_with_pending_token(self.max_model_len):
                continue
            # The last sampled token, not yet cached, and the window's next ones
            position = seq.num_tokens - 1
            if window > 1:
                position += window_tokens(seq, window, self.max_model_len) - 1
            while position // block_size >= len(seq.blocks):
                if self.allocator.num_free:
                    seq.blocks += self.allocator.allocate(1)
                else:
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.add(victim)
                    if victim is seq:
                        break
            if seq not in preempted:
                decode.append(seq)
        return decode

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        log.info("preempted a sequence of %d tokens (KV cache full); it will be recomputed", seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []

    def remove(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is (an aborted request)."""
        if seq in self.running:
            self.finish(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)


def window_tokens(seq: Sequence, window: int, max_model_len: int) -> int:
    """The tokens `seq` samples in a decode step of `window`: all, or what
    its length limits leave."""
    return 1 if window == 1 else min(window, seq.tokens_left(max_model_len))


def step_rows(seqs: list[Sequence], is_prefill: bool, previous: list[Sequence] | None,
              eos_token_ids: tuple[int, ...], window: int = 1, max_model_len: int | None = None) -> StepRows:
    """The runner's rows for a step of `seqs`: a prefill of every token, or a
    decode of the last one (and of the `window` - 1 tokens after it that the
    step samples: `Scheduler.window`, with the engine's `max_model_len`). A
    decode row whose last token is still pending on
    the device names its row in the step of `previous` (that step's
    sequences in row order) instead; `token_sources` is None when no row does."""
    source_row = {id(seq): i for i, seq in enumerate(previous)} if previous else {}
    rows = StepRows([], [], [], [], [])
    any_pending = False
    for seq in seqs:
        if seq.num_pending:
            any_pending = True
            rows.tokens.append([0])  # placeholder for the token on the device
            rows.token_sources.append(source_row[id(seq)])
        else:
            rows.tokens.append(seq.all_ids if is_prefill else [seq.last_token])
            rows.token_sources.append(-1)
        rows.start_positions.append(0 if is_prefill else seq.num_tokens - 1)
        rows.block_tables.append(seq.blocks)
        rows.sampling.append(seq.sampling_row(eos_token_ids))
    if window > 1:
        if max_model_len is None:
            raise ValueError("a decode window's rows need max_model_len (their length limit)")
        rows = rows._replace(window=window, window_tokens=[window_tokens(seq, window, max_model_len) for seq in seqs])
    return rows if any_pending else rows._replace(token_sources=None)


def step_options(seqs: list[Sequence], is_prefill: bool) -> tuple[int, int]:
    """(top logprobs per row, top logprobs per prompt token or -1 for none)
    of a step of `seqs`: a step computes the most any of its rows asks for."""
    want_logprobs = any(seq.params.logprobs is not None for seq in seqs)
    want_prompt_logprobs = is_prefill and any(seq.request.wants_prompt_logprobs for seq in seqs)
    return MAX_LOGPROBS if want_logprobs else 0, MAX_LOGPROBS if want_prompt_logprobs else -1
