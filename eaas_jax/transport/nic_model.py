"""The software NIC of ``ffi/nic_model.h``, driven from Python (ctypes).

A NIC model executes mlx5 send-queue WQEs (encoded with
:mod:`eaas_jax.transport.mlx5_wqe`) from queues in shared memory, validating
them as hardware does; the tests of the ``ibgda`` transport's host side use
it instead of a ConnectX. This module wraps its C ABI: NICs, registered
regions, QPs, and :class:`Queues`, the posting side of a QP (write WQEs, ring
the doorbell record, poll CQEs) over the NIC's own mapping of the queue
segment or, as another process would, one mapped by name.

Two NIC models, usually in two processes, can be joined by a TCP link (on
127.0.0.1, or between network namespaces): :meth:`NicModel.listen` on one, :meth:`QueuePair.connect_remote`
with its port and QPN on the other; WRITEs to that QP then travel as frames,
checked, acked and retransmitted as ``ffi/nic_model.h`` describes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import functools
import struct

import numpy as np

from eaas_jax.transport import mlx5_wqe, native

__all__ = [
    "ACCESS_LOCAL_WRITE",
    "ACCESS_REMOTE_READ",
    "ACCESS_REMOTE_WRITE",
    "SYNDROMES",
    "NicError",
    "NicModel",
    "QpState",
    "QueuePair",
    "Queues",
    "Region",
    "Violation",
    "connect",
    "set_faults",
]

#: ibverbs access flags (IBV_ACCESS_*).
ACCESS_LOCAL_WRITE = 1
ACCESS_REMOTE_WRITE = 2
ACCESS_REMOTE_READ = 4


class QpState(enum.IntEnum):
    """ibv_qp_state values."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    ERR = 6


class Violation(enum.IntEnum):
    """Why the model rejected a WQE: an error CQE's vendor syndrome
    (eaas::nic::Violation)."""

    NONE = 0
    QP_STATE = 1
    DOORBELL = 2
    WQE_INDEX = 3
    QPN = 4
    OPCODE = 5
    DS_ZERO = 6
    DS_TOO_LARGE = 7
    DS_MISMATCH = 8
    INLINE_TOO_LONG = 9
    BAD_LKEY = 10
    LOCAL_BOUNDS = 11
    PEER_GONE = 12
    BAD_RKEY = 13
    REMOTE_ACCESS = 14
    REMOTE_BOUNDS = 15
    NO_RECEIVE_QUEUE = 16
    RETRY_EXCEEDED = 17
    FLUSHED = 18


#: The PRM's CQE syndrome of each violation (MLX5_CQE_SYNDROME_*).
SYNDROMES = {
    Violation.QP_STATE: 0x02,
    Violation.DOORBELL: 0x02,
    Violation.WQE_INDEX: 0x02,
    Violation.QPN: 0x02,
    Violation.OPCODE: 0x02,
    Violation.DS_ZERO: 0x02,
    Violation.DS_TOO_LARGE: 0x02,
    Violation.DS_MISMATCH: 0x02,
    Violation.INLINE_TOO_LONG: 0x01,
    Violation.BAD_LKEY: 0x04,
    Violation.LOCAL_BOUNDS: 0x04,
    Violation.PEER_GONE: 0x15,
    Violation.BAD_RKEY: 0x13,
    Violation.REMOTE_ACCESS: 0x13,
    Violation.REMOTE_BOUNDS: 0x13,
    Violation.NO_RECEIVE_QUEUE: 0x16,
    Violation.RETRY_EXCEEDED: 0x15,
    Violation.FLUSHED: 0x05,
}


class NicError(RuntimeError):
    """A NIC model call failed (the message says why)."""


_i64, _u32, _u64, _int = ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
_p32, _p64, _buf = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64), ctypes.c_char_p
_SIGNATURES = {
    "eaas_nic_create": ([], _i64),
    "eaas_nic_destroy": ([_i64], _int),
    "eaas_nic_set_faults": ([_i64, _i64, _int, _u32, _int, _u32, _u64], _int),
    "eaas_nic_reg_mr": ([_i64, _u64, _u64, _u32, _p32, _p32, _buf, _i64], _int),
    "eaas_nic_create_qp": ([_i64, _u32, _u32, _p32, _buf, _i64], _int),
    "eaas_nic_modify_qp": ([_i64, _u32, _u32, _i64, _u32, _buf, _i64], _int),
    "eaas_nic_qp_state": ([_i64, _u32], _int),
    "eaas_nic_qp_queues": ([_i64, _u32, _p64, _buf, _i64], _int),
    "eaas_nic_map_queues": ([_buf, _p64, _buf, _i64], _int),
    "eaas_nic_unmap_queues": ([_u64, _u64], _int),
    "eaas_nic_progress": ([_i64, _i64], _i64),
    "eaas_nic_start": ([_i64, _i64], _int),
    "eaas_nic_listen": ([_i64, _buf, _p32, _p64, _buf, _i64], _int),
    "eaas_nic_connect_qp": ([_i64, _u32, _buf, _u32, _u32, _u64, _buf, _i64], _int),
}
_ERR_LEN = 512


@functools.cache
def _lib() -> ctypes.CDLL:
    return native.bind_functions(_SIGNATURES)


def _call(name: str, *args) -> None:
    err = ctypes.create_string_buffer(_ERR_LEN)
    if getattr(_lib(), name)(*args, err, _ERR_LEN) != 0:
        raise NicError(err.value.decode(errors="replace"))


def _view(addr: int, size: int) -> np.ndarray:
    """A uint8 array over `size` bytes of native memory at `addr`."""
    return np.ctypeslib.as_array((ctypes.c_uint8 * size).from_address(addr))


def set_faults(
    handle: int,
    *,
    latency_us: int = 0,
    reorder: bool = False,
    loss_permille: int = 0,
    link_down: bool = False,
    retry_count: int = 7,
    seed: int = 1,
) -> None:
    """Sets the fault injection of the NIC `handle` (``ffi/nic_model.h``,
    "Ordering and faults"): every knob at once, the defaults meaning none."""
    if _lib().eaas_nic_set_faults(handle, latency_us, int(reorder), loss_permille, int(link_down), retry_count, seed):
        raise NicError("bad fault settings")


@dataclasses.dataclass(frozen=True)
class Region:
    addr: int
    length: int
    lkey: int
    rkey: int


class Queues:
    """The posting side of one QP over a mapping of its queue segment: the
    producer's WQE counter and the consumer's CQE counter live here, as they
    would in the transport."""

    def __init__(self, info: ctypes.Array, *, owned_mapping: bool):
        self.base, dbrec, sq, cq, self.total_bytes, self.qpn, self.log_sq_bbs, self.log_cq_entries = info
        self.sq = _view(sq, 64 << self.log_sq_bbs)
        self.cq = _view(cq, 64 << self.log_cq_entries)
        self.dbrec = _view(dbrec, 8)
        self.producer = 0  # WQEs posted (the next WQE index, mod 2^16)
        self.consumer = 0  # CQEs consumed
        self._owned_mapping = owned_mapping

    @classmethod
    def map(cls, segment_name: str) -> Queues:
        """Maps a QP's queue segment by name (as another process would)."""
        info = (ctypes.c_uint64 * 8)()
        _call("eaas_nic_map_queues", segment_name.encode(), info)
        return cls(info, owned_mapping=True)

    def close(self) -> None:
        if self._owned_mapping:
            self.sq = self.cq = self.dbrec = None
            _lib().eaas_nic_unmap_queues(self.base, self.total_bytes)
            self._owned_mapping = False

    @property
    def next_index(self) -> int:
        return self.producer & 0xFFFF

    def post(self, wqe: bytes) -> int:
        """Writes a one-BB WQE at the producer's slot (zero-padded to 64
        bytes) without ringing; returns the WQE index it took."""
        if len(wqe) > 64:
            raise ValueError("a WQE of the model is one 64-byte basic block")
        slot = (self.producer & ((1 << self.log_sq_bbs) - 1)) * 64
        self.sq[slot : slot + 64] = np.frombuffer(wqe.ljust(64, b"\0"), np.uint8)
        index = self.next_index
        self.producer += 1
        return index

    def ring(self, producer: int | None = None) -> None:
        """Doorbell record = `producer` (default: WQEs posted), big-endian."""
        value = (self.producer if producer is None else producer) & 0xFFFF
        self.dbrec[4:8] = np.frombuffer(struct.pack(">I", value), np.uint8)

    def poll(self) -> list[mlx5_wqe.Cqe]:
        """Every CQE the NIC has written since the last poll, in order."""
        out = []
        size = 1 << self.log_cq_entries
        while True:
            slot = (self.consumer & (size - 1)) * 64
            op_own = int(self.cq[slot + 63])
            lap_parity = (self.consumer >> self.log_cq_entries) & 1
            if (op_own >> 4) == mlx5_wqe.CQE_INVALID or (op_own & 1) != lap_parity:
                return out
            out.append(mlx5_wqe.decode_cqe(self.cq[slot : slot + 64].tobytes()))
            self.consumer += 1


class QueuePair:
    def __init__(self, nic: NicModel, qpn: int):
        self.nic, self.qpn = nic, qpn
        info = (ctypes.c_uint64 * 8)()
        name = ctypes.create_string_buffer(256)
        if _lib().eaas_nic_qp_queues(nic.handle, qpn, info, name, 256) != 0:
            raise NicError(f"no QP {qpn}")
        self.segment_name = name.value.decode()
        self.queues = Queues(info, owned_mapping=False)

    @property
    def state(self) -> QpState:
        return QpState(_lib().eaas_nic_qp_state(self.nic.handle, self.qpn))

    def modify(self, state: QpState, peer: QueuePair | None = None) -> None:
        peer_nic, peer_qpn = (peer.nic.handle, peer.qpn) if peer is not None else (-1, 0)
        _call("eaas_nic_modify_qp", self.nic.handle, self.qpn, int(state), peer_nic, peer_qpn)

    def connect_remote(self, peer_qpn: int, host: str = "127.0.0.1", port: int = 0, key: int = 0) -> None:
        """RESET -> INIT -> RTR -> RTS with QP `peer_qpn` of the NIC model
        listening on host:port with link key `key` (:meth:`NicModel.listen`;
        another process's NIC, usually), over a TCP link; port 0: only
        receive that QP's WRITEs, send none."""
        self.modify(QpState.INIT)
        _call("eaas_nic_connect_qp", self.nic.handle, self.qpn, host.encode(), port, peer_qpn, key)
        self.modify(QpState.RTS)


def connect(a: QueuePair, b: QueuePair) -> None:
    """RESET -> INIT -> RTR -> RTS for both, each the other's peer."""
    for x, y in ((a, b), (b, a)):
        x.modify(QpState.INIT)
        x.modify(QpState.RTR, y)
        x.modify(QpState.RTS)


class NicModel:
    """One software NIC (one protection domain). Close it (or use ``with``)
    to stop its thread and unlink its queue segments."""

    def __init__(self):
        self.handle = _lib().eaas_nic_create()

    def __enter__(self) -> NicModel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.handle is not None:
            _lib().eaas_nic_destroy(self.handle)
            self.handle = None

    def set_faults(self, **faults) -> None:
        """The NIC's fault injection (:func:`set_faults`)."""
        set_faults(self.handle, **faults)

    def register(self, buf: np.ndarray, access: int = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE) -> Region:
        """Registers the memory of a contiguous array (kept alive by the caller)."""
        if not buf.flags.c_contiguous:
            raise ValueError("a region must be contiguous")
        lkey, rkey = ctypes.c_uint32(), ctypes.c_uint32()
        _call("eaas_nic_reg_mr", self.handle, buf.ctypes.data, buf.nbytes, access, lkey, rkey)
        return Region(buf.ctypes.data, buf.nbytes, lkey.value, rkey.value)

    def create_qp(self, log_sq_bbs: int = 4, log_cq_entries: int = 4) -> QueuePair:
        qpn = ctypes.c_uint32()
        _call("eaas_nic_create_qp", self.handle, log_sq_bbs, log_cq_entries, qpn)
        return QueuePair(self, qpn.value)

    def listen(self, host: str = "127.0.0.1") -> tuple[int, int]:
        """Listens on the IPv4 address `host` for other NIC models' links;
        returns the (ephemeral) port and the link key a connection must
        begin with (give it only to who may write into this NIC's regions)."""
        port, key = ctypes.c_uint32(), ctypes.c_uint64()
        _call("eaas_nic_listen", self.handle, host.encode(), port, key)
        return port.value, key.value

    def progress(self, max_chunks: int = -1) -> int:
        """Takes new WQEs, places up to `max_chunks` chunks (-1: all due),
        writes due CQEs; returns the work done (0: nothing to do)."""
        return _lib().eaas_nic_progress(self.handle, max_chunks)

    def start(self, interval_us: int = 100) -> None:
        """Runs progress on a thread of the NIC every `interval_us`."""
        if _lib().eaas_nic_start(self.handle, interval_us):
            raise NicError("cannot start the progress thread")
