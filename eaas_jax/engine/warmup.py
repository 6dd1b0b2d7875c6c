"""Warm-up: the step shapes a run of the queued sequences will meet, foreseen
from their lengths, their sampling options and the scheduler's limits, so that
their programs compile before (and while) the run goes on instead of stalling
it the first time each shape comes up.

What is foreseen: the first prefill exactly (the scheduler's admission rule);
the first decode of those rows; decode steps at every batch bucket as the run
drains, at every KV-block bucket its sequences grow through; prefills of the
rows admitted later, at the longest remaining prompt's bucket. The sampling
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
    #: shapes later steps are likely to meet, the likeliest and soonest first
    later: list[StepShape]


class _Row(NamedTuple):
    """What a sequence's rows add to a step's shape."""

    tokens: int  # prompt (and any earlier output) tokens
    final_tokens: int  # at the end of its completion, at most
    banned: int  # at its first step
    banned_later: int  # once min_tokens are out
    penalized: int  # at its first step


def _row(seq: Sequence, max_model_len: int, eos_token_ids: tuple[int, ...]) -> _Row:
    left = seq.params.max_tokens - len(seq.output_ids) if seq.params.max_tokens is not None else max_model_len
    sampling = seq.sampling_row(eos_token_ids)
    banned = len(sampling["banned"])
    return _Row(seq.num_tokens, min(seq.num_tokens + left, max_model_len), banned,
                banned if seq.params.min_tokens >= left else 0, len(sampling.get("penalized", ())))


def plan_warmup(waiting: list[Sequence], *, max_num_seqs: int, max_num_batched_tokens: int, block_size: int,
         num_free_blocks: int, max_model_len: int, eos_token_ids: tuple[int, ...]) -> WarmupPlan:
    """The shapes a run of `waiting` (in queue order, none running) meets."""
    if not waiting:
        return WarmupPlan([], [])
    rows = {id(seq): _row(seq, max_model_len, eos_token_ids) for seq in waiting}

    def blocks(num_tokens: int) -> int:
        return -(-num_tokens // block_size)

    def shape(seqs: list[Sequence], is_prefill: bool, num_rows: int, *, longest: int, num_blocks: int,
              penalized_extra: int = 0, later: bool = False) -> StepShape:
        logprobs, prompt_logprobs = step_options(seqs, is_prefill)
        of = [rows[id(seq)] for seq in seqs]
        return StepShape.bucketed(
            rows=num_rows, longest=longest, blocks=num_blocks,
            banned=max(r.banned_later if later else r.banned for r in of),
            penalized=max(r.penalized + penalized_extra if r.penalized else 0 for r in of), logprobs=logprobs,
            greedy=all(seq.params.temperature == 0 for seq in seqs), prompt_logprobs=prompt_logprobs)

    first = _first_admitted(waiting, rows, max_num_seqs, max_num_batched_tokens, num_free_blocks, blocks)
    prompt = max(rows[id(seq)].tokens for seq in first)
    first_shapes = [
        shape(first, True, len(first), longest=prompt, num_blocks=blocks(prompt)),
        shape(first, False, len(first), longest=1, num_blocks=blocks(prompt + 1), penalized_extra=1),
    ]

    # Decode as the run goes on: the full batch through every block bucket its
    # sequences grow into, then each smaller batch as it drains, longest first.
    decode_rows = bucket(min(max_num_seqs, len(waiting)))
    block_buckets = _powers_of_two(bucket(min(blocks(rows[id(s)].tokens + 1) for s in waiting), 8),
                                   bucket(max(blocks(r.final_tokens) for r in rows.values()), 8))
    def decode(n: int, num_blocks: int) -> StepShape:
        return shape(waiting, False, n, longest=1, num_blocks=num_blocks, penalized_extra=1, later=True)

    later = [decode(decode_rows, b) for b in block_buckets]
    # Rows admitted as others finish (one at a time is the commonest, so first).
    remaining = waiting[len(first):]
    refills = []
    if remaining:
        longest = max(rows[id(seq)].tokens for seq in remaining)
        refills = [shape(remaining, True, n, longest=longest, num_blocks=blocks(longest))
                   for n in _powers_of_two(1, bucket(min(max_num_seqs, len(remaining))))]
    later += refills[:1]
    for n in reversed(_powers_of_two(1, decode_rows // 2)):
        later += [decode(n, b) for b in reversed(block_buckets)]
    later += refills[1:]
    later = [s for s in dict.fromkeys(later) if s not in first_shapes]
    return WarmupPlan(list(dict.fromkeys(first_shapes)), later)


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
