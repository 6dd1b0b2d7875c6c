"""The software NIC (ffi/nic_model.h): executes mlx5 WQEs exactly, rejects
malformed ones like hardware (error CQE, QP to ERR, later WQEs flushed, no
byte written), and its fault knobs (latency, reordering within the mlx5
ordering rules, loss, a lost link) are real."""

from __future__ import annotations

import os
import random
import struct
import time

import numpy as np
import pytest

from eaas_jax.transport import mlx5_wqe as w
from eaas_jax.transport.nic_model import (
    ACCESS_LOCAL_WRITE,
    SYNDROMES,
    NicError,
    NicModel,
    QpState,
    Queues,
    Violation,
    connect,
)

GUARD = 256  # guard bytes on each side of every region
SIZE = 4096  # bytes of each region
GUARD_BYTE = 0xA5


class Memory:
    """A buffer with GUARD bytes on each side of a registered SIZE-byte
    middle; `region` is its registration."""

    def __init__(self, nic: NicModel, fill: int, access: int | None = None):
        self.buf = np.full(SIZE + 2 * GUARD, GUARD_BYTE, np.uint8)
        self.buf[GUARD : GUARD + SIZE] = fill
        self.mid = self.buf[GUARD : GUARD + SIZE]
        self.region = nic.register(self.mid) if access is None else nic.register(self.mid, access)

    def addr(self, offset: int) -> int:
        return self.region.addr + offset

    def guards_intact(self) -> bool:
        return bool((self.buf[:GUARD] == GUARD_BYTE).all() and (self.buf[GUARD + SIZE :] == GUARD_BYTE).all())


class Pair:
    """Two NICs, one connected QP each; `src` registered on the sender's,
    `dst` (and `ro`, without remote write) on the receiver's."""

    def __init__(self, log_sq_bbs: int = 4, log_cq_entries: int = 4):
        self.a, self.b = NicModel(), NicModel()
        self.src = Memory(self.a, 0)
        self.src.mid[:] = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
        self.dst = Memory(self.b, 0x11)
        self.ro = Memory(self.b, 0x22, access=ACCESS_LOCAL_WRITE)
        self.qa = self.a.create_qp(log_sq_bbs, log_cq_entries)
        self.qb = self.b.create_qp(log_sq_bbs, log_cq_entries)
        connect(self.qa, self.qb)
        self.q = self.qa.queues

    def write(
        self, dst_off: int, src_off: int, size: int, *, flags: int = w.CTRL_CQ_UPDATE, ahead: int = 0
    ) -> bytes:
        """A WRITE of src[src_off:][:size] to dst[dst_off:], for the WQE
        index `ahead` places after the next one."""
        return w.rdma_write(
            (self.q.next_index + ahead) & 0xFFFF,
            self.qa.qpn,
            self.dst.addr(dst_off),
            self.dst.region.rkey,
            self.src.addr(src_off),
            self.src.region.lkey,
            size,
            fm_ce_se=flags,
        )

    def run(self, *wqes: bytes) -> list[w.Cqe]:
        for wqe in wqes:
            self.q.post(wqe)
        self.q.ring()
        self.a.progress()
        return self.q.poll()

    def close(self) -> None:
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_writes_land_byte_exactly(pair):
    expect = pair.dst.mid.copy()
    data = bytes(range(1, 21))
    cqes = pair.run(
        pair.write(100, 7, 1000),
        w.inline_write(1, pair.qa.qpn, pair.dst.addr(3000), pair.dst.region.rkey, data, fm_ce_se=w.CTRL_CQ_UPDATE),
    )
    expect[100:1100] = pair.src.mid[7:1007]
    expect[3000:3020] = np.frombuffer(data, np.uint8)
    assert (pair.dst.mid == expect).all()
    assert pair.dst.guards_intact() and pair.ro.guards_intact()
    assert [(c.opcode, c.wqe_counter, c.qpn) for c in cqes] == [(w.CQE_REQ, 0, pair.qa.qpn), (w.CQE_REQ, 1, pair.qa.qpn)]


def test_only_signalled_wqes_complete(pair):
    assert pair.run(*(pair.write(8 * i, i, 8, flags=0, ahead=i) for i in range(3))) == []
    cqes = pair.run(pair.write(24, 3, 8, flags=0), pair.write(32, 4, 8, ahead=1))
    assert [c.wqe_counter for c in cqes] == [4]  # frees every BB up to it
    assert (pair.dst.mid[:40] == np.concatenate([pair.src.mid[i : i + 8] for i in range(5)])).all()


def test_cq_wraps_with_owner_bits():
    p = Pair(log_sq_bbs=3, log_cq_entries=2)  # 8 BBs, 4 CQEs
    try:
        counters, owners = [], []
        for batch in range(9):  # 27 WQEs: the SQ wraps 3 times, the CQ 6 times
            cqes = p.run(*(p.write(16 * (p.q.producer % 200 + i), 0, 16, ahead=i) for i in range(3)))
            counters += [c.wqe_counter for c in cqes]
            owners += [c.owner for c in cqes]
            assert p.q.poll() == []  # entries of the last lap are not taken for new ones
        assert counters == list(range(27))
        assert owners == [(i >> 2) & 1 for i in range(27)]
    finally:
        p.close()


def test_wqe_index_wraps_at_2_16(pair):
    # One inline WRITE re-indexed per slot: fast enough to go round 2^16 once.
    template = bytearray(pair.write(0, 0, 8, flags=0))
    n = (1 << 16) + 48
    for start in range(0, n, 16):
        for i in range(start, start + 16):
            struct.pack_into(">H", template, 1, i & 0xFFFF)
            struct.pack_into(">Q", template, 16, pair.dst.addr(8 * (i % 8)))
            struct.pack_into(">Q", template, 40, pair.src.addr(i % 64))
            pair.q.post(bytes(template))
        pair.q.ring()
        pair.a.progress()
        assert pair.q.poll() == []
    cqes = pair.run(pair.write(64, 0, 8))
    assert [(c.opcode, c.wqe_counter) for c in cqes] == [(w.CQE_REQ, n & 0xFFFF)]
    assert pair.qa.state == QpState.RTS


# --- malformed WQEs -------------------------------------------------------------


def _patch(wqe: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(wqe.ljust(64, b"\0"))
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _ds(wqe: bytes, ds: int) -> bytes:
    out = bytearray(wqe.ljust(64, b"\0"))
    out[7] = ds
    return bytes(out)


def _inline(p: Pair, data_len: int, byte_count: int, ds: int) -> bytes:
    """An inline WRITE whose byte count field and DS are given."""
    wqe = w.inline_write(p.q.next_index, p.qa.qpn, p.dst.addr(0), p.dst.region.rkey, bytes(data_len))
    return _ds(_patch(wqe, 32, ">I", byte_count), ds)


END = SIZE  # one past the region
MALFORMED = {
    # name: (build the bad WQE, violation)
    "opcode_send": (lambda p: _patch(p.write(0, 0, 64), 3, ">B", 0x0A), Violation.OPCODE),
    "opcode_nop": (lambda p: _patch(p.write(0, 0, 64), 3, ">B", 0x00), Violation.OPCODE),
    "write_imm": (
        lambda p: w.rdma_write(p.q.next_index, p.qa.qpn, p.dst.addr(0), p.dst.region.rkey, p.src.addr(0),
                               p.src.region.lkey, 64, imm=7),
        Violation.NO_RECEIVE_QUEUE,
    ),
    "ds_zero": (lambda p: _ds(p.write(0, 0, 64), 0), Violation.DS_ZERO),
    "ds_too_large": (lambda p: _ds(p.write(0, 0, 64), 5), Violation.DS_TOO_LARGE),
    "ds_too_small": (lambda p: _ds(p.write(0, 0, 64), 2), Violation.DS_MISMATCH),
    "ds_data_plus_one": (lambda p: _ds(p.write(0, 0, 64), 4), Violation.DS_MISMATCH),
    "ds_inline_short": (lambda p: _inline(p, 28, 28 | 0x80000000, 3), Violation.DS_MISMATCH),
    "inline_too_long": (lambda p: _inline(p, 28, 29 | 0x80000000, 4), Violation.INLINE_TOO_LONG),
    "inline_huge_count": (lambda p: _inline(p, 28, 0xFFFFFFFF, 4), Violation.INLINE_TOO_LONG),
    "inline_without_flag": (lambda p: _inline(p, 20, 20, 4), Violation.DS_MISMATCH),
    # 8 bytes: DS 3 like a data segment, so its bytes are read as an lkey (0).
    "seq_word_without_inline_flag": (lambda p: _inline(p, 8, 8, 3), Violation.BAD_LKEY),
    "wqe_index_ahead": (lambda p: _patch(p.write(0, 0, 64), 1, ">H", p.q.next_index + 1), Violation.WQE_INDEX),
    "wqe_index_behind": (lambda p: _patch(p.write(0, 0, 64), 1, ">H", p.q.next_index - 1), Violation.WQE_INDEX),
    "qpn_mismatch": (lambda p: _patch(p.write(0, 0, 64), 4, ">I", (((p.qa.qpn + 1) << 8) | 3)), Violation.QPN),
    "bad_lkey": (lambda p: _patch(p.write(0, 0, 64), 36, ">I", p.src.region.lkey ^ 0xFF000000), Violation.BAD_LKEY),
    "rkey_as_lkey": (lambda p: _patch(p.write(0, 0, 64), 36, ">I", p.src.region.rkey), Violation.BAD_LKEY),
    "local_past_end": (lambda p: p.write(0, END - 63, 64), Violation.LOCAL_BOUNDS),
    "local_before_start": (lambda p: _patch(p.write(0, 0, 64), 40, ">Q", p.src.addr(0) - 1), Violation.LOCAL_BOUNDS),
    "local_zero_count": (lambda p: p.write(0, 0, 0), Violation.LOCAL_BOUNDS),  # 0 means 2^31 bytes
    "bad_rkey": (lambda p: _patch(p.write(0, 0, 64), 24, ">I", p.dst.region.rkey ^ 0xFF000000), Violation.BAD_RKEY),
    "lkey_as_rkey": (lambda p: _patch(p.write(0, 0, 64), 24, ">I", p.dst.region.lkey), Violation.BAD_RKEY),
    "senders_own_rkey": (lambda p: _patch(p.write(0, 0, 64), 24, ">I", p.src.region.rkey), Violation.BAD_RKEY),
    "remote_past_end": (lambda p: p.write(END - 63, 0, 64), Violation.REMOTE_BOUNDS),
    "remote_before_start": (lambda p: _patch(p.write(0, 0, 64), 16, ">Q", p.dst.addr(0) - 8), Violation.REMOTE_BOUNDS),
    "remote_wraps": (lambda p: _patch(p.write(0, 0, 64), 16, ">Q", (1 << 64) - 32), Violation.REMOTE_BOUNDS),
    "remote_no_write_access": (
        lambda p: _patch(_patch(p.write(0, 0, 64), 24, ">I", p.ro.region.rkey), 16, ">Q", p.ro.addr(0)),
        Violation.REMOTE_ACCESS,
    ),
    "inline_remote_past_end": (
        lambda p: w.inline_write(p.q.next_index, p.qa.qpn, p.dst.addr(END - 4), p.dst.region.rkey, bytes(8)),
        Violation.REMOTE_BOUNDS,
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_wqe_is_rejected(pair, kind):
    build, violation = MALFORMED[kind]
    expect = pair.dst.mid.copy()
    expect_ro = pair.ro.mid.copy()
    good = pair.write(1024, 0, 200)  # completes before the bad one
    expect[1024:1224] = pair.src.mid[:200]
    pair.q.post(good)
    bad = build(pair)
    pair.q.post(bad)
    after = pair.write(2048, 0, 200, flags=0)  # flushed (error CQEs need no signal)
    cqes = pair.run(after)
    assert [(c.opcode, c.wqe_counter, c.syndrome, c.vendor_syndrome) for c in cqes] == [
        (w.CQE_REQ, 0, 0, 0),
        (w.CQE_REQ_ERR, 1, SYNDROMES[violation], violation),
        (w.CQE_REQ_ERR, 2, SYNDROMES[Violation.FLUSHED], Violation.FLUSHED),
    ]
    assert pair.qa.state == QpState.ERR
    assert (pair.dst.mid == expect).all() and (pair.ro.mid == expect_ro).all()
    assert pair.dst.guards_intact() and pair.ro.guards_intact() and pair.src.guards_intact()
    # Still flushing later posts.
    cqes = pair.run(pair.write(0, 0, 8))
    assert [(c.wqe_counter, c.vendor_syndrome) for c in cqes] == [(3, Violation.FLUSHED)]
    assert (pair.dst.mid == expect).all()


@pytest.mark.parametrize("state", [QpState.INIT, QpState.RTR])
def test_qp_not_ready_rejects(state):
    a = NicModel()
    try:
        src = Memory(a, 1)
        qp, peer = a.create_qp(), a.create_qp()
        qp.modify(QpState.INIT)
        if state == QpState.RTR:
            qp.modify(QpState.RTR, peer)
        peer.modify(QpState.INIT)
        peer.modify(QpState.RTR, qp)
        q = qp.queues
        q.post(w.rdma_write(0, qp.qpn, src.addr(0), src.region.rkey, src.addr(8), src.region.lkey, 8))
        q.post(w.rdma_write(1, qp.qpn, src.addr(0), src.region.rkey, src.addr(8), src.region.lkey, 8))
        q.ring()
        a.progress()
        assert [(c.wqe_counter, c.syndrome, c.vendor_syndrome) for c in q.poll()] == [
            (0, SYNDROMES[Violation.QP_STATE], Violation.QP_STATE),
            (1, SYNDROMES[Violation.FLUSHED], Violation.FLUSHED),
        ]
        assert qp.state == QpState.ERR
        assert (src.mid == 1).all() and src.guards_intact()
    finally:
        a.close()


def test_qp_in_reset_ignores_the_doorbell(pair):
    pair.qa.modify(QpState.RESET)
    pair.q.post(pair.write(0, 0, 8))
    pair.q.ring()
    assert pair.a.progress() == 0 and pair.q.poll() == [] and (pair.dst.mid == 0x11).all()


def test_qp_in_error_flushes(pair):
    pair.qa.modify(QpState.ERR)
    cqes = pair.run(pair.write(0, 0, 8, flags=0), pair.write(8, 0, 8, ahead=1))
    assert [(c.wqe_counter, c.syndrome) for c in cqes] == [(0, 0x05), (1, 0x05)]
    assert (pair.dst.mid == 0x11).all()


def test_peer_qp_in_error_is_retry_exceeded(pair):
    pair.qb.modify(QpState.ERR)
    cqes = pair.run(pair.write(0, 0, 8))
    assert [(c.syndrome, c.vendor_syndrome) for c in cqes] == [(0x15, Violation.PEER_GONE)]
    assert (pair.dst.mid == 0x11).all()


@pytest.mark.parametrize("record", ["backwards", "past_the_queue"])
def test_doorbell_record_out_of_range(pair, record):
    assert len(pair.run(pair.write(0, 0, 8))) == 1  # consumer at 1
    pair.q.post(pair.write(8, 0, 8))
    pair.q.ring(0xFFFF if record == "backwards" else 1 + 16 + 1)  # the SQ holds 16
    pair.a.progress()
    cqes = pair.q.poll()
    assert [(c.wqe_counter, c.syndrome, c.vendor_syndrome) for c in cqes] == [(1, 0x02, Violation.DOORBELL)]
    assert pair.qa.state == QpState.ERR
    assert (pair.dst.mid[8:] == 0x11).all() and pair.dst.guards_intact()


# --- many random WRITEs against a numpy reference --------------------------------


def drain(nic: NicModel) -> None:
    """Progress until the NIC has nothing left to do (bounded: a NIC that
    never settles fails the test instead of hanging it)."""
    for _ in range(100_000):
        if not nic.progress():
            return
    raise AssertionError("the NIC never ran out of work")


def _random_writes(p: Pair, rng: random.Random, count: int, expect: np.ndarray, fence: int) -> list[int]:
    """Posts `count` random WRITEs in random batches, applying each to
    `expect`, with `fence` in every WQE's flags; returns the WQE indices
    that asked for a CQE."""
    signalled = []
    posted = 0
    while posted < count:
        for _ in range(min(rng.randint(1, 16), count - posted)):
            flags = (w.CTRL_CQ_UPDATE if rng.random() < 0.3 else 0) | fence
            if flags & w.CTRL_CQ_UPDATE:
                signalled.append(p.q.next_index)
            if rng.random() < 0.5:
                size = rng.randint(1, 1024)
                d, s = rng.randint(0, SIZE - size), rng.randint(0, SIZE - size)
                p.q.post(p.write(d, s, size, flags=flags))
                expect[d : d + size] = p.src.mid[s : s + size]
            else:
                size = rng.randint(0, w.MAX_INLINE_BYTES)
                d = rng.randint(0, SIZE - size)
                data = rng.randbytes(size)
                p.q.post(w.inline_write(p.q.next_index, p.qa.qpn, p.dst.addr(d), p.dst.region.rkey, data,
                                        fm_ce_se=flags))
                expect[d : d + size] = np.frombuffer(data, np.uint8)
            posted += 1
        p.q.ring()
        p.a.progress()
    return signalled


@pytest.mark.parametrize(
    "faults",
    [
        {},
        {"loss_permille": 300, "retry_count": 100},
        # Overlapping WRITEs land in posting order only because each is fenced.
        {"reorder": True, "loss_permille": 100, "retry_count": 100},
    ],
)
def test_random_writes_match_reference(faults):
    p = Pair(log_sq_bbs=4, log_cq_entries=6)
    try:
        p.a.set_faults(**faults, seed=5)
        rng = random.Random(1)
        expect = p.dst.mid.copy()
        signalled, seen = [], []
        for _ in range(25):
            signalled += _random_writes(p, rng, 12, expect, w.CTRL_FENCE if faults.get("reorder") else 0)
            drain(p.a)
            seen += [c.wqe_counter for c in p.q.poll()]
        assert seen == signalled
        assert (p.dst.mid == expect).all() and p.dst.guards_intact() and p.ro.guards_intact()
    finally:
        p.close()


# --- faults ----------------------------------------------------------------------


def _publish(p: Pair, seq: int, fenced: bool) -> None:
    """A 512-byte payload WRITE, then the sequence word 8 bytes after it."""
    p.q.post(p.write(0, 64 * (seq % 8), 512, flags=0))
    seq_wqe = (
        w.sequence_word(p.q.next_index, p.qa.qpn, p.dst.addr(512), p.dst.region.rkey, seq, signaled=True)
        if fenced
        else w.inline_write(p.q.next_index, p.qa.qpn, p.dst.addr(512), p.dst.region.rkey, struct.pack("<Q", seq),
                            fm_ce_se=w.CTRL_CQ_UPDATE)
    )
    p.q.post(seq_wqe)
    p.q.ring()


def _stale_publications(fenced: bool, trials: int = 40) -> int:
    """How often a reader polling between single chunk placements sees the
    new sequence word with a stale payload."""
    p = Pair()
    try:
        p.a.set_faults(reorder=True, seed=11)
        stale = 0
        for seq in range(1, trials + 1):
            _publish(p, seq, fenced)
            payload = p.src.mid[64 * (seq % 8) : 64 * (seq % 8) + 512]
            for _ in range(1000):  # 512 + 8 bytes: at most 10 chunks
                if p.q.poll():
                    break
                p.a.progress(1)
                if int(p.dst.mid[512:520].view(np.uint64)[0]) == seq and not (p.dst.mid[:512] == payload).all():
                    stale += 1
                    break
            drain(p.a)  # finish the trial
            p.q.poll()
            assert (p.dst.mid[:512] == payload).all()  # every write lands in the end
        return stale
    finally:
        p.close()


def test_reordering_never_breaks_a_fenced_publication():
    assert _stale_publications(fenced=True) == 0


def test_reordering_is_real_without_the_fence():
    assert _stale_publications(fenced=False) > 0


def test_wqes_after_a_fence_wait_with_it():
    """A (1 KiB), F (fenced), B: B is issued after F, so it never lands
    before A is complete either."""
    p = Pair()
    try:
        p.a.set_faults(reorder=True, seed=7)
        early = 0
        for trial in range(1, 21):
            p.q.post(p.write(0, trial, 1024, flags=0))
            for off, flags in ((2048, w.CTRL_FENCE), (3072, w.CTRL_CQ_UPDATE)):
                p.q.post(w.inline_write(p.q.next_index, p.qa.qpn, p.dst.addr(off), p.dst.region.rkey,
                                        struct.pack("<Q", trial), fm_ce_se=flags))
            p.q.ring()
            for _ in range(1000):
                if p.q.poll():
                    break
                p.a.progress(1)
                b_landed = int(p.dst.mid[3072:3080].view(np.uint64)[0]) == trial
                early += b_landed and not (p.dst.mid[:1024] == p.src.mid[trial : trial + 1024]).all()
            assert int(p.dst.mid[3072:3080].view(np.uint64)[0]) == trial
        assert early == 0
    finally:
        p.close()


def test_reordering_keeps_cqes_in_order():
    p = Pair(log_cq_entries=6)
    try:
        p.a.set_faults(reorder=True, seed=3)
        for i in range(16):
            p.q.post(p.write(128 * i, 0, 128))
        p.q.ring()
        counters = []
        for _ in range(1000):  # 16 x 128 bytes: 32 chunks
            p.a.progress(1)
            counters += [c.wqe_counter for c in p.q.poll()]
        assert counters == list(range(16))
    finally:
        p.close()


def test_added_latency(pair):
    pair.a.set_faults(latency_us=30_000)
    start = time.monotonic()
    assert pair.run(pair.write(0, 0, 64)) == []
    assert (pair.dst.mid == 0x11).all()
    deadline = time.monotonic() + 5
    while not (cqes := pair.q.poll()) and time.monotonic() < deadline:
        pair.a.progress()
    assert [c.wqe_counter for c in cqes] == [0]
    assert time.monotonic() - start >= 0.03
    assert (pair.dst.mid[:64] == pair.src.mid[:64]).all()


def test_lost_link_is_retry_exceeded(pair):
    pair.a.set_faults(link_down=True, retry_count=3)
    pair.q.post(pair.write(0, 0, 64, flags=0))
    pair.q.post(pair.write(64, 0, 64))
    pair.q.ring()
    for _ in range(10):
        pair.a.progress()
    cqes = pair.q.poll()
    assert [(c.wqe_counter, c.syndrome, c.vendor_syndrome) for c in cqes] == [
        (0, 0x15, Violation.RETRY_EXCEEDED),
        (1, 0x05, Violation.FLUSHED),
    ]
    assert pair.qa.state == QpState.ERR and (pair.dst.mid == 0x11).all()


# --- the queues in shared memory, the progress thread ---------------------------


def test_queues_mapped_by_name_post_like_another_process(pair):
    other = Queues.map(pair.qa.segment_name)
    try:
        assert other.qpn == pair.qa.qpn and other.base != pair.q.base
        other.post(pair.write(0, 0, 100))
        other.ring()
        pair.a.progress()
        assert [c.wqe_counter for c in other.poll()] == [0]
        assert (pair.dst.mid[:100] == pair.src.mid[:100]).all()
    finally:
        other.close()


def test_mapping_refuses_a_segment_of_the_wrong_mode(pair):
    path = "/dev/shm" + pair.qa.segment_name
    os.chmod(path, 0o644)
    with pytest.raises(NicError, match="mode is not 0600"):
        Queues.map(pair.qa.segment_name)
    with pytest.raises(NicError, match="cannot open"):
        Queues.map("/eaas-nic-does-not-exist")


def test_progress_thread(pair):
    pair.a.start(interval_us=200)
    pair.q.post(pair.write(0, 0, 256))
    pair.q.ring()
    deadline = time.monotonic() + 5
    while not (cqes := pair.q.poll()) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert [c.wqe_counter for c in cqes] == [0]
    assert (pair.dst.mid[:256] == pair.src.mid[:256]).all()
