"""Warm-up: the step shapes a run of the queued sequences will meet, foreseen
from their lengths, their sampling options and the scheduler's limits, so that
their programs compile before (and while) the run goes on instead of stalling
it the first time each shape comes up.

What is foreseen: the first prefill exactly (the scheduler's admission rule);
the first decode of those rows; decode steps at every batch bucket as the run
drains, at every KV-block bucket its sequences grow through; prefills of the
rows admitted later, at the longest remaining prompt's bucket. For a
server's open traffic (requests arriving one by one, `arrivals`), also
prefills of any number of rows at every prompt-length bucket up to the
longest prompt, and decodes of any number of rows at every KV-block bucket
up to the longest completion. The sampling
options are the whole batch's (greedy, logprobs, banned and penalized tokens
at their first values): a step whose rows differ from the batch in those, or
penalized rows that outgrow their first bucket, still compile when first met.
"""

from __future__ import annotations

from typing import NamedTuple

from eaas_jax.engine.runner import StepShape, bucket
from eaas_jax.engine.scheduler import step_options
from eaas_jax.engine.sequence import Sequence


class WarmupPlan(NamedTuple):
    #: the first prefill and the first decode: compiled before the first step
    first: list[StepShape]
    #: shapes later steps are likely to meet: the full batch growing into more
    #: KV blocks, a one-row refill, the batch draining, larger refills
    later: list[StepShape]


class _Row(NamedTuple):
    """What a sequence's rows add to a step's shape."""

    tokens: int  # prompt (and any earlier output) tokens
    final_tokens: int  # at the end of its completion, at most
    ends_at_first_token: bool  # no decode step: the prefill's token ends it
    # banned ids and penalized tokens by phase: prefill, first decode, later
    banned: tuple[int, int, int]
    penalized: tuple[int, int, int]
    # its first decode may sample a window (`Sequence.can_decode_window`)
    windows_at_first_decode: bool


def _row(seq: Sequence, max_model_len: int, eos_token_ids: tuple[int, ...]) -> _Row:
    left = seq.params.max_tokens - len(seq.output_ids) if seq.params.max_tokens is not None else max_model_len
    prefill = seq.sampling_row(eos_token_ids)
    seq.num_pending += 1  # the first decode's row: the prefill's token still on the device
    try:
        decode = seq.sampling_row(eos_token_ids)
        windows_at_first_decode = seq.can_decode_window()
    finally:
        seq.num_pending -= 1
    penalized = [len(r.get("penalized", ())) for r in (prefill, decode)]
    return _Row(
        seq.num_tokens, min(seq.num_tokens + left, max_model_len),
        left <= 1 or seq.num_tokens + 1 >= max_model_len,
        (len(prefill["banned"]), len(decode["banned"]), len(prefill["banned"]) if seq.params.min_tokens >= left else 0),
        (*penalized, penalized[1] + 1 if penalized[1] else 0), windows_at_first_decode)


PREFILL, FIRST_DECODE, LATER = range(3)


def plan_warmup(waiting: list[Sequence], *, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
                num_free_blocks: int, max_model_len: int, eos_token_ids: tuple[int, ...],
                arrivals: bool = False, decode_window: int = 1) -> WarmupPlan:
    """The shapes a run of `waiting` (in queue order, none running) meets;
    with `arrivals`, also those of requests like them (at most as long)
    arriving at any time, a few at once. Decodes of rows past their
    min_tokens run windows of `decode_window` (`Scheduler`)."""
    if not waiting:
        return WarmupPlan([], [])
    rows = {id(seq): _row(seq, max_model_len, eos_token_ids) for seq in waiting}

    def blocks(num_tokens: int) -> int:
        return -(-num_tokens // block_size)

    def window_of(seqs: list[Sequence], phase: int) -> int:
        """Decode tokens a row in a step of `seqs` in `phase` (the Scheduler's
        rule, `Sequence.can_decode_window`: min_tokens reached)."""
        if phase == PREFILL:
            return 1
        if phase == FIRST_DECODE and not all(rows[id(seq)].windows_at_first_decode for seq in seqs):
            return 1
        return decode_window

    def shape(seqs: list[Sequence], phase: int, num_rows: int, *, longest: int, num_blocks: int,
              window: int | None = None) -> StepShape:
        logprobs, prompt_logprobs = step_options(seqs, phase == PREFILL)
        of = [rows[id(seq)] for seq in seqs]
        return StepShape.bucketed(
            rows=num_rows, longest=longest, blocks=num_blocks, banned=max(r.banned[phase] for r in of),
            penalized=max(r.penalized[phase] for r in of), logprobs=logprobs,
            greedy=all(seq.params.temperature == 0 for seq in seqs), prompt_logprobs=prompt_logprobs,
            window=window_of(seqs, phase) if window is None else window)

    first = _first_admitted(waiting, rows, max_num_seqs, max_num_batched_tokens, num_free_blocks, blocks)
    prompt = max(rows[id(seq)].tokens for seq in first)
    first_shapes = [shape(first, PREFILL, len(first), longest=prompt, num_blocks=blocks(prompt))]
    decoding = [seq for seq in first if not rows[id(seq)].ends_at_first_token]
    if decoding:
        # Its rows hold the blocks of the positions it writes: a window's, as
        # far as the rows' lengths allow.
        first_window = window_of(decoding, FIRST_DECODE)
        written = [r.tokens + min(first_window, max(r.final_tokens - r.tokens, 1))
                   for r in (rows[id(seq)] for seq in decoding)]
        first_shapes.append(shape(decoding, FIRST_DECODE, len(decoding), longest=1, num_blocks=blocks(max(written))))
    # Decode as the run goes on: the full batch through every block bucket its
    # sequences grow into, then each smaller batch as it drains, longest first.
    decoders = [seq for seq in waiting if not rows[id(seq)].ends_at_first_token]
    decode_rows, block_buckets = 0, []
    if decoders:
        decode_rows = bucket(min(max_num_seqs, len(decoders)))
        block_buckets = _powers_of_two(bucket(min(blocks(rows[id(s)].tokens + 1) for s in decoders), 8),
                                       bucket(max(blocks(rows[id(s)].final_tokens) for s in decoders), 8))

    # A row short of its min_tokens at its first decode runs one-token steps
    # (so does everyone running with it), and refills start their first
    # decodes at any batch and blocks: each later decode shape in windows
    # has its one-token twin then.
    one_token_too = not all(rows[id(seq)].windows_at_first_decode for seq in decoders)

    def decode(n: int, num_blocks: int) -> list[StepShape]:
        windowed = shape(decoders, LATER, n, longest=1, num_blocks=num_blocks)
        if windowed.window == 1 or not one_token_too:
            return [windowed]
        return [windowed, shape(decoders, LATER, n, longest=1, num_blocks=num_blocks, window=1)]

    later = [s for b in block_buckets for s in decode(decode_rows, b)]
    # Rows admitted as others finish (one at a time is the commonest, so first).
    remaining = waiting[len(first):]
    refills = []
    if remaining:
        longest = max(rows[id(seq)].tokens for seq in remaining)
        refills = [shape(remaining, PREFILL, n, longest=longest, num_blocks=blocks(longest))
                   for n in _powers_of_two(1, bucket(min(max_num_seqs, len(remaining))))]
    later += refills[:1]
    for n in reversed(_powers_of_two(1, decode_rows // 2)):
        later += [s for b in reversed(block_buckets) for s in decode(n, b)]
    later += refills[1:]
    if arrivals:  # first: a server's load starts light
        later = _arrival_shapes(waiting, decoders, shape, decode, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, blocks=blocks,
                                final_tokens=max(r.final_tokens for r in rows.values())) + later
    later = [s for s in dict.fromkeys(later) if s not in first_shapes]
    return WarmupPlan(list(dict.fromkeys(first_shapes)), later)


def _arrival_shapes(waiting, decoders, shape, decode, *, max_num_seqs, max_num_batched_tokens, blocks,
                    final_tokens) -> list[StepShape]:
    """Requests arriving apart: a prefill admits however many have arrived
    (any prompt length up to the longest, within the token budget), and
    decodes run with however many are running (any KV length up to the
    longest completion: `decode(rows, blocks)`'s shapes). Fewest rows and
    shortest first: the commonest at a light load."""
    longest = max(seq.num_tokens for seq in waiting)
    out = []
    for n in _powers_of_two(1, bucket(max_num_seqs)):
        # A prefill in row bucket n (> 1) has more than n / 2 rows; in length
        # bucket L (> 16) its longest has more than L / 2 tokens, the others
        # one at least. Its first row is admitted whatever the budget.
        out += [shape(waiting, PREFILL, n, longest=length, num_blocks=blocks(length))
                for length in _powers_of_two(16, bucket(longest, 16))
                if n == 1 or (length // 2 + 1 if length > 16 else 1) + n // 2 <= max_num_batched_tokens]
        if decoders:
            out += [s for b in _powers_of_two(bucket(1, 8), bucket(blocks(final_tokens), 8)) for s in decode(n, b)]
    return out


def _first_admitted(waiting, rows, max_num_seqs, max_num_batched_tokens, num_free_blocks, blocks) -> list[Sequence]:
    """The sequences the scheduler's first step prefills (`Scheduler.schedule`'s rule)."""
    admitted, budget, free = [], max_num_batched_tokens, num_free_blocks
    for seq in waiting:
        tokens = rows[id(seq)].tokens
        if len(admitted) == max_num_seqs or blocks(tokens) > free or (admitted and tokens > budget):
            break
        admitted.append(seq)
        budget -= tokens
        free -= blocks(tokens)
    return admitted or waiting[:1]


def _powers_of_two(low: int, high: int) -> list[int]:
    """low, 2 low, ... up to high (powers of two both)."""
    out = []
    while low <= high:
        out.append(low)
        low *= 2
    return out
