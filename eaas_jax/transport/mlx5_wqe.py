"""mlx5 work-queue entries and completions, encoded by the native library.

The ``ibgda`` transport writes mlx5 send-queue WQEs and reads CQEs itself
(``ffi/mlx5_wqe.h``, on the GPU in the CUDA kernels, on the host in the CPU
handler). This module calls the host encoders of that header through ctypes,
so Python (the setup path, the tests) gets exactly the bytes the transport
writes, instead of a second encoder that could disagree with it. Multi-byte
fields are big-endian, as the NIC reads them; arguments are host integers.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools

from eaas_jax.transport import native

__all__ = [
    "CQE_INVALID",
    "CQE_REQ",
    "CQE_REQ_ERR",
    "CQE_RESP_ERR",
    "CQE_RESP_WR_IMM",
    "CTRL_CQ_UPDATE",
    "CTRL_FENCE",
    "CTRL_SOLICITED",
    "MAX_INLINE_BYTES",
    "OPCODE_RDMA_WRITE",
    "OPCODE_RDMA_WRITE_IMM",
    "Cqe",
    "ctrl_seg",
    "data_seg",
    "decode_cqe",
    "have_rdma_core",
    "inline_seg",
    "inline_write",
    "raddr_seg",
    "rdma_write",
    "sequence_word",
]

# rdma-core's <infiniband/mlx5dv.h> values (the tests compare them with pyverbs').
OPCODE_RDMA_WRITE = 0x08
OPCODE_RDMA_WRITE_IMM = 0x09
#: Control segment fm_ce_se bits.
CTRL_SOLICITED = 1 << 1
CTRL_CQ_UPDATE = 2 << 2
CTRL_FENCE = 4 << 5
#: CQE opcodes (op_own >> 4).
CQE_REQ = 0
CQE_RESP_WR_IMM = 1
CQE_REQ_ERR = 13
CQE_RESP_ERR = 14
CQE_INVALID = 15
#: Largest payload of an inline WRITE (one 64-byte basic block: kMaxInlineBytes).
MAX_INLINE_BYTES = 28
#: Largest inline data segment the encoder builds on its own (one basic block).
_MAX_INLINE_SEG_BYTES = 60


class _CCqe(ctypes.Structure):
    """eaas::mlx5::Cqe (its layout is static_asserted in ffi/mlx5_wqe.cc)."""

    _fields_ = [
        ("opcode", ctypes.c_uint8),
        ("owner", ctypes.c_uint8),
        ("wqe_counter", ctypes.c_uint16),
        ("byte_cnt", ctypes.c_uint32),
        ("qpn", ctypes.c_uint32),
        ("imm", ctypes.c_uint32),
        ("syndrome", ctypes.c_uint8),
        ("vendor_syndrome", ctypes.c_uint8),
    ]


@dataclasses.dataclass(frozen=True)
class Cqe:
    """A decoded 64-byte CQE. ``syndrome``/``vendor_syndrome`` are those of an
    error CQE (0 otherwise); ``byte_cnt`` and ``imm`` are 0 in error CQEs."""

    opcode: int
    owner: int
    wqe_counter: int
    byte_cnt: int
    qpn: int
    imm: int
    syndrome: int
    vendor_syndrome: int

    @property
    def is_error(self) -> bool:
        return self.opcode in (CQE_REQ_ERR, CQE_RESP_ERR)


_u8, _u16, _u32, _u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
_buf = ctypes.c_char_p
_SIGNATURES = {
    "eaas_mlx5_have_rdma_core": ([], ctypes.c_int),
    "eaas_mlx5_encode_ctrl": ([_buf, _u16, _u8, _u8, _u32, _u8, _u8, _u8, _u32], None),
    "eaas_mlx5_encode_raddr": ([_buf, _u64, _u32], None),
    "eaas_mlx5_encode_data": ([_buf, _u32, _u32, _u64], None),
    "eaas_mlx5_encode_inline": ([_buf, _buf, _u32], ctypes.c_int),
    "eaas_mlx5_encode_rdma_write": (
        [_buf, _u8, _u16, _u32, _u8, _u64, _u32, _u64, _u32, _u32, _u32],
        ctypes.c_int,
    ),
    "eaas_mlx5_encode_inline_write": ([_buf, _u16, _u32, _u8, _u64, _u32, _buf, _u32], ctypes.c_int),
    "eaas_mlx5_encode_sequence_word": ([_buf, _u16, _u32, _u64, _u32, _u64, ctypes.c_int], ctypes.c_int),
    "eaas_mlx5_decode_cqe": ([_buf, ctypes.POINTER(_CCqe)], None),
}


@functools.cache
def _lib() -> ctypes.CDLL:
    return native.bind_functions(_SIGNATURES)


def have_rdma_core() -> bool:
    """Whether the library was built against rdma-core's mlx5dv.h (Debian
    libibverbs-dev); without it the ``ibgda`` backend is unavailable."""
    return bool(_lib().eaas_mlx5_have_rdma_core())


def ctrl_seg(
    wqe_index: int,
    opcode: int,
    qpn: int,
    ds: int,
    *,
    opmod: int = 0,
    fm_ce_se: int = 0,
    signature: int = 0,
    imm: int = 0,
) -> bytes:
    """The 16-byte control segment (``imm`` in host order)."""
    out = ctypes.create_string_buffer(16)
    _lib().eaas_mlx5_encode_ctrl(out, wqe_index, opcode, opmod, qpn, fm_ce_se, ds, signature, imm)
    return out.raw


def raddr_seg(raddr: int, rkey: int) -> bytes:
    """The 16-byte remote-address segment."""
    out = ctypes.create_string_buffer(16)
    _lib().eaas_mlx5_encode_raddr(out, raddr, rkey)
    return out.raw


def data_seg(byte_count: int, lkey: int, addr: int) -> bytes:
    """The 16-byte data (gather) segment."""
    out = ctypes.create_string_buffer(16)
    _lib().eaas_mlx5_encode_data(out, byte_count, lkey, addr)
    return out.raw


def inline_seg(data: bytes) -> bytes:
    """An inline data segment: flagged byte count, ``data``, zeros to 16 bytes."""
    if len(data) > _MAX_INLINE_SEG_BYTES:
        raise ValueError(f"inline data of {len(data)} bytes: at most {_MAX_INLINE_SEG_BYTES}")
    out = ctypes.create_string_buffer(64)
    size = _lib().eaas_mlx5_encode_inline(out, data, len(data))
    return out.raw[:size]


def rdma_write(
    wqe_index: int,
    qpn: int,
    raddr: int,
    rkey: int,
    laddr: int,
    lkey: int,
    size: int,
    *,
    fm_ce_se: int = 0,
    imm: int | None = None,
) -> bytes:
    """An RDMA WRITE WQE (ctrl, raddr, data: 48 bytes); with ``imm`` an RDMA
    WRITE with immediate."""
    opcode = OPCODE_RDMA_WRITE if imm is None else OPCODE_RDMA_WRITE_IMM
    out = ctypes.create_string_buffer(64)
    ds = _lib().eaas_mlx5_encode_rdma_write(
        out, opcode, wqe_index, qpn, fm_ce_se, raddr, rkey, laddr, lkey, size, imm or 0
    )
    return out.raw[: ds * 16]


def inline_write(
    wqe_index: int, qpn: int, raddr: int, rkey: int, data: bytes, *, fm_ce_se: int = 0
) -> bytes:
    """An RDMA WRITE WQE carrying ``data`` (at most MAX_INLINE_BYTES) inline."""
    if len(data) > MAX_INLINE_BYTES:
        raise ValueError(f"inline WRITE of {len(data)} bytes: at most {MAX_INLINE_BYTES}")
    out = ctypes.create_string_buffer(64)
    ds = _lib().eaas_mlx5_encode_inline_write(out, wqe_index, qpn, fm_ce_se, raddr, rkey, data, len(data))
    return out.raw[: ds * 16]


def sequence_word(wqe_index: int, qpn: int, raddr: int, rkey: int, seq: int, *, signaled: bool) -> bytes:
    """The WQE publishing a slot's sequence word after its payload: a fenced
    inline WRITE of ``seq`` (8 bytes, little-endian as in the wire format)."""
    out = ctypes.create_string_buffer(64)
    ds = _lib().eaas_mlx5_encode_sequence_word(out, wqe_index, qpn, raddr, rkey, seq, int(signaled))
    return out.raw[: ds * 16]


def decode_cqe(cqe: bytes) -> Cqe:
    """Decodes a 64-byte CQE (``struct mlx5_cqe64``)."""
    if len(cqe) != 64:
        raise ValueError(f"a CQE is 64 bytes, got {len(cqe)}")
    out = _CCqe()
    _lib().eaas_mlx5_decode_cqe(cqe, ctypes.byref(out))
    return Cqe(**{name: getattr(out, name) for name, _ in _CCqe._fields_})
