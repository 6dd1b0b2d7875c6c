"""Two software NICs (ffi/nic_model.h) in two processes, joined by a TCP
link: WRITEs to the remote QP travel as PSN frames, the responder checks them
like local writes (NAK -> error CQE, nothing written), loss is repaired by
go-back-N retransmission, a lost link ends in retry-exceeded CQEs, and
hostile frames cannot write or crash the NIC. The far NIC is tests/nic_peer.py;
every wait is bounded and the peer is killed in teardown."""

from __future__ import annotations

import glob
import json
import os
import queue
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from eaas_jax.transport import mlx5_wqe as w
from eaas_jax.transport.nic_model import NicModel, QpState, Violation

GUARD, SIZE, GUARD_BYTE = 256, 16384, 0xA5  # tests/nic_peer.py's buffer
FRAME = struct.Struct("<IHHIIIIQII")  # nic_link.h's FrameHeader
MAGIC, VERSION, KIND_WRITE, KIND_HELLO = 0x4B4E4C45, 1, 1, 4
WAIT_S = 5.0  # a command's answer, a process's exit
# The peer's first line comes after it imported JAX (eaas_jax.transport.native):
# about 4 s under CI's ASan build on an idle machine, more on a loaded one.
STARTUP_S = 60.0


class Peer:
    """tests/nic_peer.py in a subprocess: a NIC with a guarded region and a QP."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("nic_peer.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._take(self._reply(STARTUP_S))

    def _take(self, info: dict) -> None:
        self.port, self.key = info["port"], info["key"]
        self.qpn, self.rkey, self.addr = info["qpn"], info["rkey"], info["addr"]

    def reset(self) -> None:
        """A fresh NIC in the peer process; the old one's links close."""
        self._take(self.cmd("reset"))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def _reply(self, wait_s: float = WAIT_S) -> dict:
        try:
            return json.loads(self.lines.get(timeout=wait_s))
        except queue.Empty:
            raise AssertionError("the peer NIC process does not answer") from None

    def cmd(self, cmd: str, **args) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def buffer(self) -> np.ndarray:
        """The peer's whole buffer: guards and region."""
        return np.frombuffer(bytes.fromhex(self.cmd("read")["buf"]), np.uint8)

    def region(self) -> np.ndarray:
        buf = self.buffer()
        assert (buf[:GUARD] == GUARD_BYTE).all() and (buf[GUARD + SIZE :] == GUARD_BYTE).all(), "guard bytes"
        return buf[GUARD : GUARD + SIZE]

    def kill(self) -> None:
        """SIGKILL; then removes the queue segments it could not (as whoever
        supervises NIC processes must)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT_S)
        for path in glob.glob(f"/dev/shm/eaas-nic-{self.proc.pid}-*"):
            os.unlink(path)

    def close(self) -> None:
        """Ends the process the normal way (its stdin closes: it closes its NIC)."""
        self.proc.stdin.close()
        self.proc.wait(timeout=WAIT_S)


class Link:
    """This process's NIC, a source region and a QP connected to the peer's QP."""

    def __init__(self, peer: Peer, faults: dict | None = None):
        self.peer = peer
        self.nic = NicModel()
        self.src = np.random.default_rng(0).integers(0, 256, SIZE, dtype=np.uint8)
        self.region = self.nic.register(self.src)
        self.qp = self.nic.create_qp(6, 6)
        self.q = self.qp.queues
        if faults:
            self.nic.set_faults(**faults)
        peer.cmd("connect", peer_qpn=self.qp.qpn)
        self.qp.connect_remote(peer.qpn, port=peer.port, key=peer.key)
        self.nic.start(interval_us=50)

    def write(self, dst_off: int, src_off: int, size: int, *, flags: int = 0, rkey: int | None = None,
              raddr: int | None = None) -> int:
        return self.q.post(w.rdma_write(
            self.q.next_index, self.qp.qpn, self.peer.addr + dst_off if raddr is None else raddr,
            self.peer.rkey if rkey is None else rkey, self.region.addr + src_off, self.region.lkey, size,
            fm_ce_se=flags))

    def inline(self, dst_off: int, data: bytes, *, flags: int = 0) -> int:
        return self.q.post(w.inline_write(self.q.next_index, self.qp.qpn, self.peer.addr + dst_off,
                                          self.peer.rkey, data, fm_ce_se=flags))

    def cqes(self, count: int, timeout: float = WAIT_S) -> list[w.Cqe]:
        """The next `count` CQEs (bounded wait)."""
        out: list[w.Cqe] = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            out += self.q.poll()
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(out)} of {count} CQEs after {timeout} s")
            time.sleep(0.0005)
        return out

    def close(self) -> None:
        self.nic.close()


@pytest.fixture(scope="module")
def peer_process():
    p = Peer()  # one process for the module: starting Python with numpy takes a while
    yield p
    p.close()
    assert not glob.glob(f"/dev/shm/eaas-nic-{p.proc.pid}-*"), "a closed NIC left its queue segments"


@pytest.fixture
def peer(peer_process):
    peer_process.reset()
    return peer_process


@pytest.fixture
def link(peer):
    lk = Link(peer)
    yield lk
    lk.close()


def _ok(cqes: list[w.Cqe]) -> bool:
    return all(c.syndrome == 0 for c in cqes)


@pytest.mark.parametrize("loss_permille", [0, 250])
def test_random_writes_match_reference(peer, loss_permille):
    lk = Link(peer, {"loss_permille": loss_permille, "retry_count": 50, "seed": 3})
    try:
        rng = random.Random(7)
        expect = np.full(SIZE, 0x11, np.uint8)
        for _ in range(10):
            batch = rng.randint(1, 12)
            for i in range(batch):
                flags = w.CTRL_CQ_UPDATE if i == batch - 1 else 0
                if rng.random() < 0.7:  # up to 3 packets (kMtu 4096)
                    size = rng.randint(1, 3 * 4096)
                    d, s = rng.randint(0, SIZE - size), rng.randint(0, SIZE - size)
                    lk.write(d, s, size, flags=flags)
                    expect[d : d + size] = lk.src[s : s + size]
                else:
                    data = rng.randbytes(rng.randint(0, w.MAX_INLINE_BYTES))
                    d = rng.randint(0, SIZE - len(data))
                    lk.inline(d, data, flags=flags)
                    expect[d : d + len(data)] = np.frombuffer(data, np.uint8)
            lk.q.ring()
            assert _ok(lk.cqes(1))
        assert (peer.region() == expect).all()
    finally:
        lk.close()


def _stale_publications(peer: Peer, fenced: bool, rounds: int = 30) -> int:
    """Rounds publishing 8 KiB (2 packets) of byte `k`, then sequence word k
    after it, with 20% loss and a responder placing packets out of order;
    returns how often the peer saw sequence word k over bytes < k."""
    peer.cmd("faults", faults={"reorder": True})
    lk = Link(peer, {"loss_permille": 200, "retry_count": 50, "seed": 9})
    try:
        peer.cmd("watch", data=8192)
        for k in range(1, rounds + 1):
            lk.src[:8192] = k  # taken (copied) by the NIC only after this: no WQE is outstanding
            lk.write(0, 0, 8192)
            if fenced:
                lk.q.post(w.sequence_word(lk.q.next_index, lk.qp.qpn, peer.addr + 8192, peer.rkey, k, signaled=True))
            else:
                lk.inline(8192, struct.pack("<Q", k), flags=w.CTRL_CQ_UPDATE)
            lk.q.ring()
            assert _ok(lk.cqes(1))
        region = peer.region()
        assert (region[:8192] == rounds).all() and int(region[8192:8200].view(np.uint64)[0]) == rounds
        return peer.cmd("stale")["stale"]
    finally:
        lk.close()


def test_fenced_publication_across_the_link(peer):
    assert _stale_publications(peer, fenced=True) == 0


def test_reordering_across_the_link_is_real_without_the_fence(peer):
    assert _stale_publications(peer, fenced=False) > 0


@pytest.mark.parametrize(
    "target, violation",
    [
        ({"rkey": 0x7FFF22}, Violation.BAD_RKEY),
        ({"dst_off": SIZE - 63}, Violation.REMOTE_BOUNDS),  # one byte past the end
        ({"raddr": "below"}, Violation.REMOTE_BOUNDS),  # one byte before the start
        ({"raddr": 2**64 - 32}, Violation.REMOTE_BOUNDS),  # wraps around
    ],
)
def test_remote_violation_is_naked(link, target, violation):
    raddr = link.peer.addr - 1 if target.get("raddr") == "below" else target.get("raddr")
    link.write(0, 0, 64, flags=w.CTRL_CQ_UPDATE)  # lands
    link.write(target.get("dst_off", 64), 0, 64, rkey=target.get("rkey"), raddr=raddr)  # refused
    link.write(128, 0, 64, flags=w.CTRL_CQ_UPDATE)  # flushed
    link.q.ring()
    cqes = link.cqes(3)
    assert [(c.wqe_counter, c.syndrome, c.vendor_syndrome) for c in cqes] == [
        (0, 0, 0),
        (1, 0x13, violation),
        (2, 0x05, Violation.FLUSHED),
    ]
    assert link.qp.state == QpState.ERR
    region = link.peer.region()  # guard bytes checked
    assert (region[:64] == link.src[:64]).all() and (region[64:] == 0x11).all()


def _assert_lost_link(lk: Link, first: int, posted: int) -> None:
    """Every WQE from `first` on completes: some in order, then retry
    exceeded, then flushed."""
    cqes = lk.cqes(posted - first)
    kinds = [(c.syndrome, c.vendor_syndrome) for c in cqes]
    assert [c.wqe_counter for c in cqes] == list(range(first, posted))
    first_error = next(i for i, k in enumerate(kinds) if k != (0, 0))
    assert kinds[first_error] == (0x15, Violation.RETRY_EXCEEDED)
    assert all(k == (0x05, Violation.FLUSHED) for k in kinds[first_error + 1 :])
    assert lk.qp.state == QpState.ERR


def test_link_down_is_retry_exceeded(link):
    link.write(0, 0, 64, flags=w.CTRL_CQ_UPDATE)
    link.q.ring()
    assert _ok(link.cqes(1))
    link.nic.set_faults(link_down=True, retry_count=3)
    for i in range(4):
        link.write(64 * i, 0, 64, flags=w.CTRL_CQ_UPDATE)
    link.q.ring()
    _assert_lost_link(link, 1, 5)


def test_peer_gone_mid_stream_is_retry_exceeded(link):
    """The peer's NIC is destroyed (its end of the connection closes) while
    WRITEs are in flight."""
    link.nic.set_faults(retry_count=3)
    for i in range(8):
        link.write(1024 * i, 0, 1024, flags=w.CTRL_CQ_UPDATE)
    link.q.ring()
    link.peer.reset()
    for i in range(8):
        link.write(1024 * i, 0, 1024, flags=w.CTRL_CQ_UPDATE)
    link.q.ring()
    _assert_lost_link(link, 0, 16)


def test_peer_process_killed_mid_stream_is_retry_exceeded():
    """The peer process dies (SIGKILL) while WRITEs are in flight: a process
    of its own, the module's stays up."""
    peer = Peer()
    lk = Link(peer, {"retry_count": 3})
    try:
        for i in range(8):
            lk.write(1024 * i, 0, 1024, flags=w.CTRL_CQ_UPDATE)
        lk.q.ring()
        peer.kill()
        for i in range(8):
            lk.write(1024 * i, 0, 1024, flags=w.CTRL_CQ_UPDATE)
        lk.q.ring()
        _assert_lost_link(lk, 0, 16)
    finally:
        lk.close()
        peer.kill()


def _hello(key: int) -> bytes:
    return FRAME.pack(MAGIC, VERSION, KIND_HELLO, 0, 0, 0, 0, key, 0, 0)


@pytest.mark.parametrize("opening", ["none", "wrong-key", "hello-with-payload"])
def test_a_connection_without_the_link_key_places_nothing(link, opening):
    """Another local user who found the port and guessed everything else (the
    QPNs, PSN 0, the rkey, the address): without the key its WRITE is never
    looked at, and the connection is closed."""
    peer = link.peer
    write = FRAME.pack(MAGIC, VERSION, KIND_WRITE, link.qp.qpn, peer.qpn, 0, peer.rkey, peer.addr, 8, 0) + b"\xee" * 8
    first = {"none": b"", "wrong-key": _hello(peer.key ^ 1),
             "hello-with-payload": FRAME.pack(MAGIC, VERSION, KIND_HELLO, 0, 0, 0, 0, peer.key, 8, 0) + bytes(8)}
    with socket.create_connection(("127.0.0.1", peer.port), timeout=WAIT_S) as s:
        s.sendall(first[opening] + write)
        assert _closed_by_peer(s)
    assert (peer.region() == 0x11).all()
    link.write(0, 0, 64, flags=w.CTRL_CQ_UPDATE)  # the NIC still serves its real peer
    link.q.ring()
    assert _ok(link.cqes(1))


def test_a_silent_connection_is_closed_after_the_hello_timeout(link):
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", link.peer.port), timeout=WAIT_S) as s:
        assert _closed_by_peer(s)
    assert 1.5 < time.monotonic() - started < WAIT_S  # kHelloTimeout: 2 s


def _closed_by_peer(s: socket.socket) -> bool:
    s.settimeout(WAIT_S)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"GET / HTTP/1.0\r\n\r\n" + bytes(64), id="garbage"),
        pytest.param(FRAME.pack(MAGIC, VERSION, KIND_WRITE, 1, 1, 0, 0, 0, 2**31, 0), id="oversized"),
        pytest.param(FRAME.pack(MAGIC, 2, KIND_WRITE, 1, 1, 0, 0, 0, 8, 0) + bytes(8), id="version"),
        pytest.param(FRAME.pack(MAGIC, VERSION, 2, 1, 1, 0, 0, 0, 0, 0), id="ack-to-a-responder"),
        pytest.param("unknown-qpn", id="unknown-qpn"),
    ],
)
def test_hostile_frame_closes_the_connection(link, frame):
    """Past the HELLO (the sender knows the key): frames that are not ours."""
    peer = link.peer
    if frame == "unknown-qpn":
        frame = FRAME.pack(MAGIC, VERSION, KIND_WRITE, link.qp.qpn, peer.qpn + 1000, 0, peer.rkey, peer.addr, 8, 0)
        frame += bytes(8)
    with socket.create_connection(("127.0.0.1", peer.port), timeout=WAIT_S) as s:
        s.sendall(_hello(peer.key) + frame)
        assert _closed_by_peer(s)
    assert (peer.region() == 0x11).all()  # nothing written, guards intact
    link.write(0, 0, 64, flags=w.CTRL_CQ_UPDATE)  # the NIC still works
    link.q.ring()
    assert _ok(link.cqes(1))
    assert (peer.region()[:64] == link.src[:64]).all()


def test_forged_frames_write_nothing(link):
    """Well-formed frames the QP must not take: from another QPN, or a PSN
    ahead of the expected one, or out of bounds (NAKed): dropped, nothing placed."""
    peer = link.peer
    frames = [
        FRAME.pack(MAGIC, VERSION, KIND_WRITE, link.qp.qpn + 1, peer.qpn, 0, peer.rkey, peer.addr, 8, 0),
        FRAME.pack(MAGIC, VERSION, KIND_WRITE, link.qp.qpn, peer.qpn, 5, peer.rkey, peer.addr, 8, 0),
        FRAME.pack(MAGIC, VERSION, KIND_WRITE, link.qp.qpn, peer.qpn, 0, peer.rkey, peer.addr + SIZE - 4, 8, 0),
    ]
    with socket.create_connection(("127.0.0.1", peer.port), timeout=WAIT_S) as s:
        s.sendall(_hello(peer.key))
        for f in frames:
            s.sendall(f + b"\xee" * 8)
        time.sleep(0.05)
    assert (peer.region() == 0x11).all()
