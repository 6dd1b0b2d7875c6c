"""The scheduler and block allocator on their own (no model, no Engine):
admission, continuous batching, decode block reservation, preemption, removal.

The policy under test (eaas_jax/engine/scheduler.py):
- `schedule()` first gives every running sequence the KV block its next
  position needs, in running order (admission order); when the pool is empty
  the most recently admitted running sequence is preempted (possibly the one
  asking): its blocks are freed, it goes to the *front* of the waiting queue
  keeping its sampled tokens, and is prefilled again later over prompt +
  sampled tokens.
- Then waiting sequences are admitted strictly first come, first served: the
  first one that does not fit (rows, free blocks, or prefill token budget, which
  the first prompt of a step may exceed) stops admission, later ones do not
  overtake it. A sequence with a token still pending (on the device) is not
  re-prefilled before that token arrives.

`_step` plays a synchronous engine: each scheduled sequence gets its sampled
token appended before the next `schedule()`; tests of pending tokens set
`num_pending` as the overlapping engine does.
"""

from __future__ import annotations

import pytest

from eaas_jax.engine.block_allocator import BlockAllocator
from eaas_jax.engine.sampling_params import SamplingParams
from eaas_jax.engine.scheduler import Scheduler, step_rows
from eaas_jax.engine.sequence import Request, Sequence

BLOCK = 4
TOKEN = 7  # what every "sampled" token is


def _seq(name: str, prompt_len: int, **params) -> Sequence:
    """The single completion of a request `name` with a prompt of `prompt_len` tokens."""
    params = {"temperature": 0.0, "max_tokens": 100, "ignore_eos": True, **params}
    request = Request(name, None, list(range(1, prompt_len + 1)), SamplingParams(**params), seed=0)
    return request.sequences[0]


def _scheduler(num_blocks: int, *, max_num_seqs: int = 8, max_num_batched_tokens: int = 2048,
               max_model_len: int = 256, seqs=()) -> Scheduler:
    scheduler = Scheduler(BlockAllocator(num_blocks, BLOCK), max_num_seqs, max_num_batched_tokens, max_model_len)
    for seq in seqs:
        scheduler.add(seq)
    return scheduler


def _names(seqs) -> list[str]:
    return [s.request.request_id for s in seqs]


def _step(scheduler: Scheduler) -> tuple[list[str], list[str]]:
    """One schedule; every scheduled sequence then gets its token (as if collected)."""
    prefill, decode = scheduler.schedule()
    for seq in prefill + decode:
        seq.output_ids.append(TOKEN)
    return _names(prefill), _names(decode)


def _held(scheduler: Scheduler) -> int:
    return sum(len(s.blocks) for s in scheduler.running)


# ------------------------------------------------------------------ allocator


def test_allocator_hands_out_low_ids_first_and_reuses_freed_blocks_first():
    """Guards the allocation order the scheduler tests below rely on, the
    free count, and the two errors (over-allocation, double free)."""
    allocator = BlockAllocator(6, BLOCK)
    assert allocator.blocks_for(1) == 1 and allocator.blocks_for(4) == 1 and allocator.blocks_for(5) == 2
    assert allocator.allocate(2) == [0, 1]
    assert allocator.allocate(3) == [2, 3, 4]
    assert allocator.num_free == 1
    allocator.free([0, 1])
    assert allocator.num_free == 3
    assert allocator.allocate(3) == [0, 1, 5]  # freed ones first, in their order
    with pytest.raises(MemoryError):
        allocator.allocate(1)
    allocator.free([0, 1, 5, 2, 3, 4])
    assert allocator.num_free == 6
    with pytest.raises(RuntimeError, match="freed twice"):
        allocator.free([3])
    with pytest.raises(ValueError):
        BlockAllocator(0, BLOCK)


# ------------------------------------------------------------------ admission


def test_admission_is_fcfs_and_takes_blocks_for_the_whole_prompt():
    """Guards FCFS prefill order and that a prompt of n tokens gets exactly
    ceil(n / block_size) blocks, nothing more (no decode block yet)."""
    a, b, c = _seq("a", 5), _seq("b", 4), _seq("c", 9)
    scheduler = _scheduler(16, seqs=[a, b, c])
    assert scheduler.has_work
    prefill, decode = scheduler.schedule()
    assert _names(prefill) == ["a", "b", "c"] and decode == []
    assert (a.blocks, b.blocks, c.blocks) == ([0, 1], [2], [3, 4, 5])
    assert scheduler.allocator.num_free == 10
    assert _names(scheduler.running) == ["a", "b", "c"] and not scheduler.waiting


def test_admission_stops_at_the_first_sequence_without_enough_free_blocks():
    """Guards head-of-line FCFS: a sequence that does not fit the free blocks
    stops admission; a smaller one behind it does not overtake it. A prompt
    that fits exactly takes the last free block."""
    a, b, c = _seq("a", 16), _seq("b", 12), _seq("c", 4)  # 4, 3 and 1 blocks
    scheduler = _scheduler(6, seqs=[a, b, c])
    assert _step(scheduler) == (["a"], [])
    assert _names(scheduler.waiting) == ["b", "c"]
    assert scheduler.allocator.num_free == 2  # c's one block would fit; it waits behind b
    assert b.blocks == [] and c.blocks == []

    exact = _scheduler(3, seqs=[_seq("x", 12)])
    assert _step(exact) == (["x"], [])
    assert exact.allocator.num_free == 0


def test_admission_respects_max_num_seqs_counting_running_sequences():
    """Guards the row limit: running (decoding) sequences count against
    max_num_seqs, so a waiting one joins only when a row frees."""
    a, b, c = _seq("a", 4), _seq("b", 4), _seq("c", 4)
    scheduler = _scheduler(16, max_num_seqs=2, seqs=[a, b, c])
    assert _step(scheduler) == (["a", "b"], [])
    assert _step(scheduler) == ([], ["a", "b"])  # plenty of blocks, but no row for c
    assert _names(scheduler.waiting) == ["c"] and c.blocks == []
    scheduler.remove(a)
    assert _step(scheduler) == (["c"], ["b"])
    assert _names(scheduler.running) == ["b", "c"]


def test_prefill_token_budget_admits_whole_prompts_in_order_and_always_the_first():
    """Guards max_num_batched_tokens: prompts are admitted while their summed
    lengths fit, in order (a short prompt does not overtake a long one), and
    the first prompt of a step is admitted even when longer than the budget
    (it would otherwise never run)."""
    a, b, c, d = _seq("a", 6), _seq("b", 5), _seq("c", 3), _seq("d", 20)
    scheduler = _scheduler(32, max_num_batched_tokens=10, seqs=[a, b, c, d])
    assert _step(scheduler) == (["a"], [])  # 6 + 5 > 10; c (3) would fit but waits behind b
    assert _names(scheduler.waiting) == ["b", "c", "d"]
    assert _step(scheduler) == (["b", "c"], ["a"])  # 5 + 3 <= 10; 8 + 20 > 10
    assert _step(scheduler) == (["d"], ["a", "b", "c"])  # 20 > 10, alone
    assert len(d.blocks) == 5


# ----------------------------------------------------------- continuous batching


def test_decode_takes_a_block_only_when_its_position_enters_a_new_one():
    """Guards decode block reservation: the position written by a decode step
    is num_tokens - 1 (the last sampled token); a block is added exactly when
    that position crosses a block boundary."""
    a = _seq("a", 3)
    scheduler = _scheduler(8, seqs=[a])
    free = []
    for _ in range(7):
        _step(scheduler)
        free.append(scheduler.allocator.num_free)
    # prefill (positions 0-2), then decode positions 3, 4 (new block), 5, 6, 7, 8 (new block)
    assert free == [7, 7, 6, 6, 6, 6, 5]
    assert a.blocks == [0, 1, 2] and a.num_tokens == 10


def test_new_sequences_join_after_running_ones_and_finished_ones_free_their_blocks():
    """Guards continuous batching: a sequence added while others decode is
    prefilled in the next step and then decodes after them (decode rows in
    admission order); blocks are handed out as positions need them; a finished
    sequence's blocks go back to the pool and are reused by the next prompt."""
    a = _seq("a", 3)
    scheduler = _scheduler(8, seqs=[a])
    assert _step(scheduler) == (["a"], [])
    b = _seq("b", 4)
    scheduler.add(b)
    assert _step(scheduler) == (["b"], ["a"])  # a at position 3: no new block
    assert _step(scheduler) == ([], ["a", "b"])  # both at position 4: one block each
    assert (a.blocks, b.blocks) == ([0, 2], [1, 3])
    assert scheduler.allocator.num_free == 4

    scheduler.finish(a)
    assert a.blocks == [] and scheduler.allocator.num_free == 6
    assert _names(scheduler.running) == ["b"]
    c = _seq("c", 8)
    scheduler.add(c)
    assert _step(scheduler) == (["c"], ["b"])
    assert c.blocks == [0, 2]  # a's blocks, reused first
    assert _names(scheduler.running) == ["b", "c"]
    assert _step(scheduler) == ([], ["b", "c"])
    assert scheduler.allocator.num_free + _held(scheduler) == 8


# ------------------------------------------------------------------ preemption


def test_preemption_evicts_the_most_recently_admitted_and_requeues_it_first():
    """Guards the preemption policy: when a decoding sequence needs a block and
    none is free, the last admitted running sequence is preempted (here c, for
    a), even if it is the one asking (b); preempted sequences lose their blocks,
    are not decoded in that step, go to the front of the waiting queue in
    admission order (ahead of d, which was waiting before), keep their sampled
    tokens, and are prefilled again over prompt + sampled tokens once blocks
    free."""
    a, b, c, d = _seq("a", 8), _seq("b", 4), _seq("c", 4), _seq("d", 4)
    scheduler = _scheduler(4, max_num_seqs=3, seqs=[a, b, c, d])
    assert _step(scheduler) == (["a", "b", "c"], [])
    assert (a.blocks, b.blocks, c.blocks) == ([0, 1], [2], [3])
    assert scheduler.allocator.num_free == 0

    # a (position 8) and b (position 4) each need a new block; none is free.
    assert _step(scheduler) == ([], ["a"])
    assert scheduler.num_preemptions == 2
    assert a.blocks == [0, 1, 3]  # c's block
    assert b.blocks == [] and c.blocks == []
    assert _names(scheduler.running) == ["a"]
    assert _names(scheduler.waiting) == ["b", "c", "d"]
    assert scheduler.allocator.num_free == 1  # b's block: b now needs 2 (5 tokens)
    assert b.output_ids == [TOKEN] and b.num_tokens == 5

    assert _step(scheduler) == ([], ["a"])  # b still does not fit; nothing overtakes it
    assert scheduler.num_preemptions == 2

    scheduler.finish(a)
    assert scheduler.allocator.num_free == 4
    prefill, decode = scheduler.schedule()
    assert _names(prefill) == ["b", "c"] and decode == []
    # Re-prefilled over the prompt and the token sampled before preemption.
    assert b.all_ids == [1, 2, 3, 4, TOKEN] and c.all_ids == [1, 2, 3, 4, TOKEN]
    assert len(b.blocks) == 2 and len(c.blocks) == 2
    assert scheduler.allocator.num_free == 0
    assert _names(scheduler.waiting) == ["d"]


def test_pending_tokens_count_for_blocks_and_hold_back_readmission():
    """Guards the overlapping engine's contract: a token still on the device
    (num_pending) counts for the decode position, so a sequence whose pending
    token starts a new block is given one; a preempted sequence with a pending
    token is not re-prefilled (and nothing overtakes it) until the token has
    arrived."""
    a, b, c = _seq("a", 4), _seq("b", 4), _seq("c", 4)
    scheduler = _scheduler(3, seqs=[a, b, c])
    prefill, _ = scheduler.schedule()
    assert _names(prefill) == ["a", "b", "c"]
    for seq in prefill:
        seq.num_pending = 1  # dispatched, not fetched
    d = _seq("d", 1)
    scheduler.add(d)

    prefill, decode = scheduler.schedule()
    assert _names(prefill) == [] and _names(decode) == ["a"]  # c preempted for a, b for itself
    assert a.blocks == [0, 2]
    assert _names(scheduler.waiting) == ["b", "c", "d"]

    scheduler.finish(a)
    assert scheduler.allocator.num_free == 3  # b needs 2 (5 tokens with its pending one), d 1
    assert scheduler.schedule() == ([], [])
    assert _names(scheduler.waiting) == ["b", "c", "d"]

    b.num_pending, c.num_pending = 0, 0  # their tokens arrive
    b.output_ids.append(TOKEN)
    c.output_ids.append(TOKEN)
    prefill, decode = scheduler.schedule()
    assert _names(prefill) == ["b"] and decode == []  # c needs 2 blocks, 1 is free
    assert len(b.blocks) == 2 and scheduler.allocator.num_free == 1


def test_a_sequence_ended_by_its_pending_token_is_not_decoded_but_keeps_its_row():
    """Guards `ends_with_pending_token`: a sequence whose pending token reaches
    max_tokens or max_model_len gets no decode row (nothing to compute after
    it) while its token is in flight; until it is removed it still holds its
    blocks and its row (so a waiting sequence is not admitted for it)."""
    by_tokens = _seq("by_tokens", 4, max_tokens=1)
    by_length = _seq("by_length", 7)  # max_model_len 8: its first sampled token is the last
    going = _seq("going", 6)
    waiting = _seq("waiting", 2)
    scheduler = _scheduler(16, max_num_seqs=3, max_model_len=8, seqs=[by_tokens, by_length, going, waiting])
    prefill, _ = scheduler.schedule()
    assert _names(prefill) == ["by_tokens", "by_length", "going"]
    for seq in prefill:
        seq.num_pending = 1
    free = scheduler.allocator.num_free
    prefill, decode = scheduler.schedule()
    assert prefill == [] and _names(decode) == ["going"]
    assert len(by_tokens.blocks) == 1 and len(by_length.blocks) == 2
    assert _names(scheduler.waiting) == ["waiting"]
    assert scheduler.allocator.num_free == free  # going's position 6 is in its 2nd block

    scheduler.remove(by_tokens)  # its token arrived and ended it
    prefill, _ = scheduler.schedule()
    assert _names(prefill) == ["waiting"]


# -------------------------------------------------------------------- removal


def test_remove_a_waiting_sequence_touches_no_blocks():
    """Guards removing (aborting) a waiting sequence: it leaves the queue, the
    pool is unchanged, and a later one is admitted in its place."""
    a, b, c = _seq("a", 7), _seq("b", 8), _seq("c", 4)
    scheduler = _scheduler(3, seqs=[a, b, c])
    assert _step(scheduler) == (["a"], [])  # b (2 blocks) does not fit the 1 free
    scheduler.remove(b)
    assert _names(scheduler.waiting) == ["c"]
    assert scheduler.allocator.num_free == 1 and a.blocks == [0, 1]
    assert _step(scheduler) == (["c"], ["a"])
    assert c.blocks == [2]


def test_remove_a_running_sequence_frees_its_blocks_once():
    """Guards removing a running sequence: its blocks return to the pool (and
    serve the next waiting prompt), it leaves the running list; removing it
    again, or removing a preempted (waiting, blockless) one, frees nothing
    twice."""
    a, b, c = _seq("a", 8), _seq("b", 3), _seq("c", 8)
    scheduler = _scheduler(3, seqs=[a, b, c])
    assert _step(scheduler) == (["a", "b"], [])
    scheduler.remove(a)
    assert a.blocks == [] and _names(scheduler.running) == ["b"]
    assert scheduler.allocator.num_free == 2
    scheduler.remove(a)  # already gone: a no-op, not a double free
    assert scheduler.allocator.num_free == 2
    assert _step(scheduler) == (["c"], ["b"])
    assert c.blocks == [0, 1]

    # b (position 4) needs a block, none is free: c, the last admitted, is preempted.
    assert _step(scheduler) == ([], ["b"])
    assert _names(scheduler.waiting) == ["c"] and c.blocks == []
    free = scheduler.allocator.num_free
    scheduler.remove(c)
    assert not scheduler.waiting and scheduler.allocator.num_free == free
    scheduler.remove(b)
    assert scheduler.allocator.num_free == 3
    assert not scheduler.has_work


def test_step_rows_prefill_whole_prompts_and_decode_last_tokens_or_their_source_rows():
    """What the scheduler's choice hands the runner (`step_rows`): a prefill row
    holds the prompt from position 0; a decode row its last token at its
    position, or, with that token still pending on the device, a placeholder
    and the row of the previous step that sampled it."""
    a, b, c = _seq("a", 5), _seq("b", 3), _seq("c", 2)
    scheduler = _scheduler(16, seqs=[a, b, c])
    prefill, _ = scheduler.schedule()
    rows = step_rows(prefill, True, None, eos_token_ids=(0,))
    assert rows.tokens == [[1, 2, 3, 4, 5], [1, 2, 3], [1, 2]] and rows.start_positions == [0, 0, 0]
    assert rows.block_tables == [a.blocks, b.blocks, c.blocks] and rows.token_sources is None
    assert [r["temperature"] for r in rows.sampling] == [0.0] * 3

    a.output_ids.append(TOKEN)
    b.output_ids.append(9)
    c.num_pending = 1  # its first token is still on the device, sampled in row 2 of `prefill`'s step
    rows = step_rows([b, c, a], False, prefill, eos_token_ids=(0,))
    assert rows.tokens == [[9], [0], [TOKEN]]
    assert rows.start_positions == [3, 2, 5]  # the position of each row's new token
    assert rows.token_sources == [-1, 2, -1]
