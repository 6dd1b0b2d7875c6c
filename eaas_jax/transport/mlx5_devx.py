"""Queue pairs on a real ConnectX NIC for the ``ibgda`` transport, set up
through pyverbs DevX (``nic = "mlx5"``). NEVER RUN ON HARDWARE: no machine
this project has met has an RDMA NIC. The commands' bytes are checked against
rdma-core's own PRM definitions (tests/test_mlx5_devx.py) and the call
sequence with pyverbs mocked at its call boundary; nothing more.

What a GPU-initiated sender needs of the NIC, per (endpoint, peer) pair:

1. the device opened for DevX (``Mlx5Context`` with
   ``MLX5DV_CONTEXT_FLAGS_DEVX``) and a protection domain;
2. the inbox registered for remote writes and the staging area for local
   reads (:meth:`Mlx5Device.register`; GPU memory as a dma-buf fd that CUDA
   exports, ``cuMemGetHandleForAddressRange``);
3. the queues in memory the GPU can write: one user-memory registration
   (umem) each for the CQ, the CQ's doorbell record, the send queue and its
   doorbell record, GPU memory through a dma-buf fd where given, and a
   non-cached UAR whose doorbell register the C++ side maps into the GPU
   (``cudaHostRegister`` with ``cudaHostRegisterIoMemory``);
4. CREATE_CQ and CREATE_QP as DevX objects: an RC QP with a send queue only
   (a zero-size receive queue: the transport never receives a SEND);
5. RST2INIT (remote write allowed), INIT2RTR (the peer's QPN, PSN and
   address), RTR2RTS (retries, ack timeout, our PSN).

The PRM command layouts are packed here (:class:`PrmStruct`; no scapy at run
time). pyverbs is imported on first use, never with this module: a machine
without it imports this fine and learns why not from :func:`unavailable`.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

__all__ = [
    "CREATE_CQ_IN",
    "CREATE_QP_IN",
    "MODIFY_QP_IN",
    "Mlx5Device",
    "Mlx5Error",
    "PeerAddress",
    "PrmStruct",
    "QueuePairSetup",
    "unavailable",
]


class Mlx5Error(RuntimeError):
    """A DevX command failed, or the device cannot be used (the message says why)."""


# --- PRM structures --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PrmStruct:
    """A PRM command or context layout: fields most significant bit first,
    big-endian, as the PRM draws them. A field is (name, bits) or (name,
    PrmStruct); a name of "" is reserved (always 0)."""

    name: str
    fields: tuple[tuple[str, int | PrmStruct], ...]

    @property
    def bits(self) -> int:
        return sum(w.bits if isinstance(w, PrmStruct) else w for _, w in self.fields)

    def __len__(self) -> int:
        return self.bits // 8

    def pack(self, **values) -> bytes:
        """The struct's bytes with `values` set (others 0; a nested struct's
        value is a dict of its fields).

        Raises:
          ValueError: an unknown field, or a value that does not fit.
        """
        known = {name for name, _ in self.fields if name}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{self.name} has no fields {unknown}")
        acc = 0
        for name, width in self.fields:
            if isinstance(width, PrmStruct):
                value = int.from_bytes(width.pack(**values.get(name, {})), "big")
                bits = width.bits
            else:
                value, bits = values.get(name, 0) if name else 0, width
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << bits:
                    raise ValueError(f"{self.name}.{name} = {value!r} does not fit {bits} bits")
            acc = (acc << bits) | value
        return acc.to_bytes(len(self), "big")

    def unpack(self, data: bytes) -> dict:
        """The named fields of `data` (at least len(self) bytes)."""
        acc, left, out = int.from_bytes(bytes(data[: len(self)]), "big"), self.bits, {}
        for name, width in self.fields:
            bits = width.bits if isinstance(width, PrmStruct) else width
            left -= bits
            value = (acc >> left) & ((1 << bits) - 1)
            if name:
                out[name] = width.unpack(value.to_bytes(bits // 8, "big")) if isinstance(width, PrmStruct) else value
        return out


def _r(bits: int) -> tuple[str, int]:
    return ("", bits)


# Completion queue context (PRM "cqc").
SW_CQC = PrmStruct("cqc", (
    ("status", 4), ("as_notify", 1), ("initiator_src_dct", 1), ("dbr_umem_valid", 1), _r(1), ("cqe_sz", 3),
    ("cc", 1), _r(1), ("scqe_break_moderation_en", 1), ("oi", 1), ("cq_period_mode", 2),
    ("cqe_compression_en", 1), ("mini_cqe_res_format", 2), ("st", 4), _r(8),
    ("dbr_umem_id", 32),
    _r(20), ("page_offset", 6), _r(6),
    _r(3), ("log_cq_size", 5), ("uar_page", 24),
    _r(4), ("cq_period", 12), ("cq_max_count", 16),
    _r(24), ("c_eqn", 8),
    _r(3), ("log_page_size", 5), _r(24),
    _r(32),
    _r(8), ("last_notified_index", 24),
    _r(8), ("last_solicit_index", 24),
    _r(8), ("consumer_counter", 24),
    _r(8), ("producer_counter", 24),
    ("local_partition_id", 12), ("process_id", 20),
    _r(16), ("thread_id", 16),
    ("db_record_addr_63_32", 32),
    ("db_record_addr_31_3", 29), _r(3),
))

CREATE_CQ_IN = PrmStruct("create_cq_in", (
    ("opcode", 16), ("uid", 16), _r(16), ("op_mod", 16), _r(8), ("cqn", 24), _r(32),
    ("cqc", SW_CQC),
    ("cq_umem_offset", 64), ("cq_umem_id", 32), ("cq_umem_valid", 1), _r(31), _r(176 * 8),
))

# Address path (PRM "ads"): where the peer is.
SW_ADS = PrmStruct("ads", (
    ("fl", 1), ("free_ar", 1), _r(14), ("pkey_index", 16),
    _r(8), ("grh", 1), ("mlid", 7), ("rlid", 16),
    ("ack_timeout", 5), _r(3), ("src_addr_index", 8), ("log_rtm", 4), ("stat_rate", 4), ("hop_limit", 8),
    _r(4), ("tclass", 8), ("flow_label", 20),
    ("rgid_rip", 128),
    _r(4), ("f_dscp", 1), ("f_ecn", 1), _r(1), ("f_eth_prio", 1), ("ecn", 2), ("dscp", 6), ("udp_sport", 16),
    ("dei_cfi", 1), ("eth_prio", 3), ("sl", 4), ("vhca_port_num", 8), ("rmac", 48),
))

# Queue pair context (PRM "qpc").
SW_QPC = PrmStruct("qpc", (
    ("state", 4), ("lag_tx_port_affinity", 4), ("st", 8), _r(3), ("pm_state", 2), _r(1),
    ("req_e2e_credit_mode", 2), ("offload_type", 4), ("end_padding_mode", 2), _r(2),
    ("wq_signature", 1), ("block_lb_mc", 1), ("atomic_like_write_en", 1), ("latency_sensitive", 1),
    ("dual_write", 1), ("drain_sigerr", 1), ("multi_path", 1), _r(1), ("pd", 24),
    ("mtu", 3), ("log_msg_max", 5), _r(1), ("log_rq_size", 4), ("log_rq_stride", 3), ("no_sq", 1),
    ("log_sq_size", 4), _r(1), ("retry_mode", 2), ("ts_format", 2), ("data_in_order", 1), ("rlkey", 1),
    ("ulp_stateless_offload_mode", 4),
    ("counter_set_id", 8), ("uar_page", 24),
    _r(3), ("full_handshake", 1), ("cnak_reverse_sl", 4), ("user_index", 24),
    _r(3), ("log_page_size", 5), ("remote_qpn", 24),
    ("primary_address_path", SW_ADS),
    ("secondary_address_path", SW_ADS),
    ("log_ack_req_freq", 4), _r(4), ("log_sra_max", 3), ("extended_rnr_retry_valid", 1), _r(1),
    ("retry_count", 3), ("rnr_retry", 3), ("extended_retry_count_valid", 1), ("fre", 1), ("cur_rnr_retry", 3),
    ("cur_retry_count", 3), ("extended_log_rnr_retry", 5),
    ("extended_cur_rnr_retry", 16), ("packet_pacing_rate_limit_index", 16),
    _r(8), ("next_send_psn", 24),
    _r(8), ("cqn_snd", 24),
    _r(8), ("deth_sqpn", 24),
    _r(8), ("extended_retry_count", 8), _r(8), ("extended_cur_retry_count", 8),
    _r(8), ("last_acked_psn", 24),
    _r(8), ("ssn", 24),
    _r(8), ("log_rra_max", 3), _r(1), ("atomic_mode", 4), ("rre", 1), ("rwe", 1), ("rae", 1), _r(1),
    ("page_offset", 6), _r(3), ("cd_slave_receive", 1), ("cd_slave_send", 1), ("cd_master", 1),
    _r(3), ("min_rnr_nak", 5), ("next_rcv_psn", 24),
    _r(8), ("xrcd", 24),
    _r(8), ("cqn_rcv", 24),
    ("dbr_addr", 64),
    ("q_key", 32),
    _r(5), ("rq_type", 3), ("srqn_rmpn_xrqn", 24),
    _r(8), ("rmsn", 24),
    ("hw_sq_wqebb_counter", 16), ("sw_sq_wqebb_counter", 16),
    ("hw_rq_counter", 32),
    ("sw_rq_counter", 32),
    _r(8), ("roce_adp_retrans_rtt", 24),
    _r(15), ("cgs", 1), ("cs_req", 8), ("cs_res", 8),
    ("dc_access_key", 64),
    ("rdma_active", 1), ("comm_est", 1), ("suspended", 1), ("dbr_umem_valid", 1), _r(4), ("send_msg_psn", 24),
    _r(8), ("rcv_msg_psn", 24),
    ("rdma_va", 64),
    ("rdma_key", 32),
    ("dbr_umem_id", 32),
))

CREATE_QP_IN = PrmStruct("create_qp_in", (
    ("opcode", 16), ("uid", 16), _r(16), ("op_mod", 16), _r(8), ("input_qpn", 24),
    _r(1), ("cmd_on_behalf", 1), _r(14), ("vhca_id", 16), ("opt_param_mask", 32), _r(32),
    ("qpc", SW_QPC),
    ("wq_umem_offset", 64), ("wq_umem_id", 32), ("wq_umem_valid", 1), _r(31),
))

MODIFY_QP_IN = PrmStruct("modify_qp_in", (
    ("opcode", 16), ("uid", 16), ("vhca_tunnel_id", 16), ("op_mod", 16), _r(8), ("qpn", 24), _r(32),
    ("opt_param_mask", 32), ("ece", 32),
    ("qpc", SW_QPC),
    _r(128),
))

# The outputs: status and syndrome, then the new object's number.
CREATE_OUT = PrmStruct("create_out", (("status", 8), _r(24), ("syndrome", 32), _r(8), ("number", 24), _r(32)))
MODIFY_OUT = PrmStruct("modify_out", (("status", 8), _r(24), ("syndrome", 32), _r(64)))

# Command opcodes and constants (PRM).
CMD_CREATE_CQ, CMD_CREATE_QP = 0x400, 0x500
CMD_RST2INIT_QP, CMD_INIT2RTR_QP, CMD_RTR2RTS_QP = 0x502, 0x503, 0x504
QPC_ST_RC = 0x0
QPC_PM_STATE_MIGRATED = 0x3
QPC_RQ_TYPE_ZERO_SIZE = 0x3
CQE_SIZE = 64
IB_MTU_4096 = 5


# --- setup -------------------------------------------------------------------------


def _pyverbs() -> SimpleNamespace:
    """The pyverbs pieces this module calls (the verbs boundary tests mock)."""
    from pyverbs import enums
    from pyverbs.mr import DmaBufMR, MR
    from pyverbs.pd import PD
    from pyverbs.providers.mlx5 import mlx5_enums
    from pyverbs.providers.mlx5.mlx5dv import (
        Mlx5Context,
        Mlx5DevxObj,
        Mlx5DVContextAttr,
        Mlx5UAR,
        Mlx5UMEM,
    )
    from pyverbs.providers.mlx5.mlx5dv_objects import Mlx5DvObj

    return SimpleNamespace(
        Mlx5Context=Mlx5Context, Mlx5DVContextAttr=Mlx5DVContextAttr, Mlx5DevxObj=Mlx5DevxObj, Mlx5UAR=Mlx5UAR,
        Mlx5UMEM=Mlx5UMEM, Mlx5DvObj=Mlx5DvObj, PD=PD, MR=MR, DmaBufMR=DmaBufMR,
        DEVX=mlx5_enums.MLX5DV_CONTEXT_FLAGS_DEVX, UAR_NC=mlx5_enums._MLX5DV_UAR_ALLOC_TYPE_NC,
        OBJ_PD=mlx5_enums.MLX5DV_OBJ_PD, LOCAL_WRITE=enums.IBV_ACCESS_LOCAL_WRITE,
        REMOTE_WRITE=enums.IBV_ACCESS_REMOTE_WRITE,
    )


def unavailable() -> str | None:
    """Why this process cannot set up mlx5 queue pairs (None: it can try)."""
    try:
        _pyverbs()
    except ImportError as e:
        return (f"pyverbs is not importable ({e}): install Debian's python3-pyverbs and give the venv "
                "--system-site-packages")
    return None


@dataclasses.dataclass(frozen=True)
class PeerAddress:
    """What a peer needs to connect its QP to one of ours (through the registry)."""

    qpn: int
    psn: int
    gid: bytes  #: 16 bytes
    lid: int = 0  #: InfiniBand
    mac: bytes = b""  #: RoCE: 6 bytes


@dataclasses.dataclass(frozen=True)
class QueuePairSetup:
    """One RC QP and its CQ, where the posting side (GPU kernel) finds them."""

    qpn: int
    cqn: int
    psn: int
    log_sq_bbs: int
    log_cq_entries: int
    sq_addr: int
    sq_dbrec_addr: int  #: 2 big-endian u32: receive, send (MLX5_RCV_DBR, MLX5_SND_DBR)
    cq_addr: int
    cq_dbrec_addr: int
    doorbell_addr: int  #: the UAR's doorbell (BlueFlame) register


def _check(command: str, out: bytes, layout: PrmStruct) -> dict:
    fields = layout.unpack(out)
    if fields["status"]:
        raise Mlx5Error(f"DevX {command} failed: status {fields['status']:#x}, syndrome {fields['syndrome']:#x}")
    return fields


class Mlx5Device:
    """One mlx5 device opened for DevX, its PD, and the objects made on it.

    Args:
      name: the RDMA device (``ibv_devices``), e.g. ``mlx5_0``.
      port: its port; gid_index: the GID of that port the QPs use.
      verbs: the pyverbs boundary (tests pass a fake; default: pyverbs).
    """

    def __init__(self, name: str, *, port: int = 1, gid_index: int = 0, verbs: SimpleNamespace | None = None):
        self.v = verbs or _pyverbs()
        self.port, self.gid_index = port, gid_index
        try:
            self.ctx = self.v.Mlx5Context(self.v.Mlx5DVContextAttr(self.v.DEVX), name)
        except Exception as e:  # noqa: BLE001 - pyverbs raises its own error types
            raise Mlx5Error(f"cannot open {name} for DevX: {e}") from e
        self.pd = self.v.PD(self.ctx)
        self.pdn = self.v.Mlx5DvObj(self.v.OBJ_PD, pd=self.pd).dvpd.pdn
        self._objects: list = []  # destroyed in reverse order of creation
        self._qps: dict = {}  # QPN -> its DevX object

    def register(self, length: int, *, address: int | None = None, dmabuf_fd: int | None = None,
                 remote_write: bool = False) -> tuple[int, int]:
        """Registers `length` bytes at `address` (host memory) or of the
        dma-buf `dmabuf_fd` (GPU memory); returns (lkey, rkey)."""
        access = self.v.LOCAL_WRITE | (self.v.REMOTE_WRITE if remote_write else 0)
        if (address is None) == (dmabuf_fd is None):
            raise ValueError("register needs exactly one of address and dmabuf_fd")
        if dmabuf_fd is not None:
            mr = self.v.DmaBufMR(self.pd, length, access, dmabuf=dmabuf_fd, offset=0)
        else:
            mr = self.v.MR(self.pd, length, access, address=address)
        self._objects.append(mr)
        return mr.lkey, mr.rkey

    def _umem(self, size: int, dmabuf_fd: int | None):
        umem = (self.v.Mlx5UMEM(self.ctx, size=size, alignment=4096, access=self.v.LOCAL_WRITE)
                if dmabuf_fd is None else
                self.v.Mlx5UMEM(self.ctx, size=size, access=self.v.LOCAL_WRITE, dmabuf_fd=dmabuf_fd))
        self._objects.append(umem)
        return umem

    def create_qp(self, log_sq_bbs: int, log_cq_entries: int, *,
                  queue_dmabuf_fds: tuple[int, int] | None = None) -> QueuePairSetup:
        """An RC QP (send queue only, 2^log_sq_bbs BBs) and its CQ (2^log_cq_entries
        CQEs); `queue_dmabuf_fds`: dma-buf fds of GPU memory for the CQ and the
        send queue (default: host memory the driver allocates)."""
        if not 0 <= log_sq_bbs <= 15 or not 0 <= log_cq_entries <= 22:
            raise ValueError("queue sizes: log_sq_bbs <= 15, log_cq_entries <= 22")
        cq_fd, sq_fd = queue_dmabuf_fds or (None, None)
        uar = self.v.Mlx5UAR(self.ctx, self.v.UAR_NC)
        self._objects.append(uar)
        eqn = self.ctx.devx_query_eqn(0)
        cq_buf = self._umem(max(4096, CQE_SIZE << log_cq_entries), cq_fd)
        cq_dbr = self._umem(64, None)
        cq = self.v.Mlx5DevxObj(self.ctx, CREATE_CQ_IN.pack(
            opcode=CMD_CREATE_CQ, cq_umem_id=cq_buf.umem_id, cq_umem_valid=1,
            cqc=dict(log_cq_size=log_cq_entries, uar_page=uar.page_id, c_eqn=eqn, dbr_umem_valid=1,
                     dbr_umem_id=cq_dbr.umem_id)), len(CREATE_OUT))
        self._objects.append(cq)
        cqn = _check("CREATE_CQ", bytes(cq.out_view), CREATE_OUT)["number"]
        sq_buf = self._umem(max(4096, 64 << log_sq_bbs), sq_fd)
        sq_dbr = self._umem(64, None)
        qp = self.v.Mlx5DevxObj(self.ctx, CREATE_QP_IN.pack(
            opcode=CMD_CREATE_QP, wq_umem_id=sq_buf.umem_id, wq_umem_valid=1,
            qpc=dict(st=QPC_ST_RC, pm_state=QPC_PM_STATE_MIGRATED, pd=self.pdn, uar_page=uar.page_id,
                     log_sq_size=log_sq_bbs, rq_type=QPC_RQ_TYPE_ZERO_SIZE, cqn_snd=cqn, cqn_rcv=cqn,
                     dbr_umem_valid=1, dbr_umem_id=sq_dbr.umem_id, ts_format=1)), len(CREATE_OUT))
        self._objects.append(qp)
        qpn = _check("CREATE_QP", bytes(qp.out_view), CREATE_OUT)["number"]
        self._qps[qpn] = qp
        return QueuePairSetup(qpn=qpn, cqn=cqn, psn=random.getrandbits(24), log_sq_bbs=log_sq_bbs,
                              log_cq_entries=log_cq_entries, sq_addr=sq_buf.umem_addr,
                              sq_dbrec_addr=sq_dbr.umem_addr, cq_addr=cq_buf.umem_addr,
                              cq_dbrec_addr=cq_dbr.umem_addr, doorbell_addr=uar.reg_addr)

    def address(self, qp: QueuePairSetup) -> PeerAddress:
        """What the peer needs to connect to `qp` (published through the registry)."""
        gid = bytes.fromhex(self.ctx.query_gid(self.port, self.gid_index).gid.replace(":", ""))
        port = self.ctx.query_port(self.port)
        return PeerAddress(qpn=qp.qpn, psn=qp.psn, gid=gid, lid=port.lid)

    def connect(self, qp: QueuePairSetup, peer: PeerAddress, *, ethernet: bool, retry_count: int = 7,
                ack_timeout: int = 14) -> None:
        """RST2INIT, INIT2RTR and RTR2RTS of `qp` towards `peer` (its QPN, PSN,
        GID and, over InfiniBand, LID; over Ethernet (RoCE), MAC)."""
        if len(peer.gid) != 16 or (ethernet and len(peer.mac) != 6):
            raise ValueError("a peer address needs a 16-byte GID and, over Ethernet, a 6-byte MAC")
        obj = self._qps[qp.qpn]
        path = dict(vhca_port_num=self.port)
        # InfiniBand: the peer's LID. RoCE: its GID, MAC, our GID's index, a
        # TTL and a UDP source port (what the kernel would resolve for verbs).
        remote = (dict(rgid_rip=int.from_bytes(peer.gid, "big"), rmac=int.from_bytes(peer.mac, "big"),
                       src_addr_index=self.gid_index, hop_limit=64, udp_sport=0xC000)
                  if ethernet else dict(rlid=peer.lid))
        steps = (
            ("RST2INIT_QP", CMD_RST2INIT_QP, dict(rwe=1, primary_address_path=path)),
            ("INIT2RTR_QP", CMD_INIT2RTR_QP, dict(
                mtu=IB_MTU_4096, log_msg_max=30, remote_qpn=peer.qpn, next_rcv_psn=peer.psn, min_rnr_nak=12,
                primary_address_path=dict(path, **remote))),
            ("RTR2RTS_QP", CMD_RTR2RTS_QP, dict(
                retry_count=retry_count, rnr_retry=7, next_send_psn=qp.psn,
                primary_address_path=dict(path, ack_timeout=ack_timeout))),
        )
        for name, opcode, qpc in steps:
            out = obj.modify(MODIFY_QP_IN.pack(opcode=opcode, qpn=qp.qpn, qpc=qpc), len(MODIFY_OUT))
            _check(name, bytes(out), MODIFY_OUT)

    def close(self) -> None:
        """Destroys what this device made (QPs before CQs before memory), then the PD and context."""
        while self._objects:
            self._objects.pop().close()
        self.pd.close()
        self.ctx.close()

