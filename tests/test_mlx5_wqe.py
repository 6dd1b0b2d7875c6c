"""The mlx5 WQE/CQE encoders of ffi/mlx5_wqe.h against rdma-core's own.

Three references, each over many random field sets:
  * rdma-core's C setters and structs (<infiniband/mlx5dv.h>, Debian
    libibverbs-dev): tests/mlx5_wqe_selftest.cc, compiled here, on rdma-core's
    layouts and on the header's own fallback declarations;
  * pyverbs' WQE segment classes and CQE accessor (Debian python3-pyverbs),
    through the library's C ABI (eaas_jax/transport/mlx5_wqe.py);
  * known answers written from the segment layouts, which need neither package.
With nvcc on the PATH the header is also compiled for the device.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import random
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from eaas_jax.transport import mlx5_wqe

ROOT = Path(__file__).resolve().parents[1]
#: Random field sets per comparison (the acceptance bar is 1,000).
CASES = 1000
#: Where Debian installs python3-pyverbs; the venv does not see it.
SYSTEM_DIST_PACKAGES = "/usr/lib/python3/dist-packages"

U16, U32, U64 = (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1


def _import_pyverbs():
    """pyverbs' mlx5 modules, or None. The system directory is on sys.path
    for this import only, and last, so it shadows none of the venv's packages."""
    added = SYSTEM_DIST_PACKAGES not in sys.path
    if added:
        sys.path.append(SYSTEM_DIST_PACKAGES)
    try:
        dv = importlib.import_module("pyverbs.providers.mlx5.mlx5dv")
        enums = importlib.import_module("pyverbs.providers.mlx5.mlx5_enums")
        return dv, enums
    except ImportError:
        return None
    finally:
        if added:
            sys.path.remove(SYSTEM_DIST_PACKAGES)


@pytest.fixture(scope="module")
def pyverbs():
    modules = _import_pyverbs()
    if modules is None:
        pytest.skip(
            "python3-pyverbs not installed (Debian: apt-get install python3-pyverbs), "
            f"or not importable by Python {sys.version_info.major}.{sys.version_info.minor}"
        )
    return modules


def _cxx() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def _have_mlx5dv_header(cxx: str) -> bool:
    probe = subprocess.run(
        [cxx, "-x", "c++", "-E", "-o", os.devnull, "-"],
        input="#include <infiniband/mlx5dv.h>\n",
        capture_output=True,
        text=True,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cxx_with_rdma_core() -> str:
    cxx = _cxx()
    if cxx is None:
        pytest.skip("no C++ compiler (c++ or $CXX) to build tests/mlx5_wqe_selftest.cc")
    if not _have_mlx5dv_header(cxx):
        pytest.skip("libibverbs-dev not installed (infiniband/mlx5dv.h: rdma-core's encoders)")
    return cxx


# --- (a) C++: against rdma-core's setters --------------------------------------


@pytest.mark.parametrize("layouts", ["rdma-core", "own"])
def test_selftest_matches_rdma_core_setters(cxx_with_rdma_core, tmp_path, layouts):
    """Every segment, WQE, doorbell and CQE decode of the header, for 2,000
    seeds, byte for byte against mlx5dv_set_ctrl_seg / mlx5dv_set_data_seg /
    rdma-core's structs; "own" builds the header on its fallback declarations
    (a machine without libibverbs-dev) and checks them too."""
    exe = tmp_path / "mlx5_wqe_selftest"
    flags = ["-DEAAS_MLX5_OWN_LAYOUTS"] if layouts == "own" else []
    subprocess.run(
        [cxx_with_rdma_core, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", *flags,
         f"-I{ROOT / 'ffi'}", str(ROOT / "tests" / "mlx5_wqe_selftest.cc"), "-o", str(exe)],
        check=True,
    )
    run = subprocess.run([str(exe), str(2 * CASES)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"{2 * CASES} seeds equal (layouts: {layouts})" in run.stdout


@pytest.mark.parametrize("layouts", ["rdma-core", "own"])
def test_header_compiles_for_the_device(tmp_path, layouts):
    """The same writers in a CUDA kernel (tests/mlx5_wqe_device.cu) to PTX,
    with the doorbell's three system-scope fences."""
    nvcc = shutil.which(os.environ.get("CUDACXX", "nvcc"))
    if nvcc is None:
        pytest.skip("no CUDA compiler (nvcc or $CUDACXX) to compile ffi/mlx5_wqe.h for the device")
    ptx = tmp_path / "mlx5_wqe_device.ptx"
    flags = ["-DEAAS_MLX5_OWN_LAYOUTS"] if layouts == "own" else []
    subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_90", "-ptx", "-Werror", "all-warnings", *flags, f"-I{ROOT / 'ffi'}",
         str(ROOT / "tests" / "mlx5_wqe_device.cu"), "-o", str(ptx)],
        check=True,
    )
    text = ptx.read_text()
    assert text.count("membar.sys") + text.count("fence.sc.sys") == 3


def test_library_built_with_rdma_core_when_installed(cxx_with_rdma_core):
    # Else the ibgda backend would report itself unavailable on this machine.
    assert mlx5_wqe.have_rdma_core()


# --- (b) Python: against pyverbs' WQE segment classes ---------------------------


def _pyverbs_bytes(dv, segments) -> bytes:
    """The bytes pyverbs lays out for `segments` (a Wqe copies them in order)."""
    wqe = dv.Wqe(segments)
    size = sum(segment.sizeof() for segment in segments)
    return ctypes.string_at(wqe.address, size)


def _pyverbs_ctrl(dv, wqe_index, opcode, opmod, qpn, fm_ce_se, ds, signature, imm):
    segment = dv.WqeCtrlSeg(wqe_index, opcode, opmod, qpn, fm_ce_se, ds, signature)
    segment.imm = imm  # pyverbs' setter stores it big-endian (htobe32)
    return segment


def test_constants_match_pyverbs(pyverbs):
    _, enums = pyverbs
    for name in ("OPCODE_RDMA_WRITE", "OPCODE_RDMA_WRITE_IMM", "CQE_REQ", "CQE_RESP_WR_IMM",
                 "CQE_REQ_ERR", "CQE_RESP_ERR", "CQE_INVALID"):
        assert getattr(mlx5_wqe, name) == getattr(enums, "MLX5_" + name), name
    assert mlx5_wqe.CTRL_SOLICITED == enums.MLX5_WQE_CTRL_SOLICITED
    assert mlx5_wqe.CTRL_CQ_UPDATE == enums.MLX5_WQE_CTRL_CQ_UPDATE
    assert mlx5_wqe.CTRL_FENCE == enums.MLX5_WQE_CTRL_FENCE


def test_ctrl_segments_match_pyverbs(pyverbs):
    dv, _ = pyverbs
    rng = random.Random(1)
    for _ in range(CASES):
        f = dict(wqe_index=rng.randint(0, U16), opcode=rng.randint(0, 255), opmod=rng.randint(0, 255),
                 qpn=rng.randint(0, (1 << 24) - 1), fm_ce_se=rng.randint(0, 255), ds=rng.randint(0, 255),
                 signature=rng.randint(0, 255), imm=rng.randint(0, U32))
        want = _pyverbs_bytes(dv, [_pyverbs_ctrl(dv, **f)])
        got = mlx5_wqe.ctrl_seg(f["wqe_index"], f["opcode"], f["qpn"], f["ds"], opmod=f["opmod"],
                                fm_ce_se=f["fm_ce_se"], signature=f["signature"], imm=f["imm"])
        assert got == want, f


def test_data_segments_match_pyverbs(pyverbs):
    dv, _ = pyverbs
    rng = random.Random(2)
    for _ in range(CASES):
        size, lkey, addr = rng.randint(0, U32), rng.randint(0, U32), rng.randint(0, U64)
        assert mlx5_wqe.data_seg(size, lkey, addr) == _pyverbs_bytes(dv, [dv.WqeDataSeg(size, lkey, addr)])


def test_raddr_segments_match_layout():
    # pyverbs has no remote-address segment class: compare with mlx5dv.h's
    # layout (__be64 raddr, __be32 rkey, reserved); the C++ selftest compares
    # with rdma-core's struct itself.
    rng = random.Random(3)
    for _ in range(CASES):
        raddr, rkey = rng.randint(0, U64), rng.randint(0, U32)
        assert mlx5_wqe.raddr_seg(raddr, rkey) == struct.pack(">QII", raddr, rkey, 0)


def test_rdma_write_wqes_match_pyverbs(pyverbs):
    """Whole WRITE / WRITE-with-immediate WQEs: pyverbs' ctrl and data
    segments around the remote-address segment."""
    dv, _ = pyverbs
    rng = random.Random(4)
    for i in range(CASES):
        idx, qpn, fm = rng.randint(0, U16), rng.randint(0, (1 << 24) - 1), rng.randint(0, 255)
        raddr, rkey, laddr = rng.randint(0, U64), rng.randint(0, U32), rng.randint(0, U64)
        lkey, size, imm = rng.randint(0, U32), rng.randint(0, U32), rng.randint(0, U32)
        with_imm = i % 2 == 1
        opcode = mlx5_wqe.OPCODE_RDMA_WRITE_IMM if with_imm else mlx5_wqe.OPCODE_RDMA_WRITE
        ctrl = _pyverbs_ctrl(dv, idx, opcode, 0, qpn, fm, 3, 0, imm if with_imm else 0)
        want = (_pyverbs_bytes(dv, [ctrl]) + struct.pack(">QII", raddr, rkey, 0)
                + _pyverbs_bytes(dv, [dv.WqeDataSeg(size, lkey, laddr)]))
        got = mlx5_wqe.rdma_write(idx, qpn, raddr, rkey, laddr, lkey, size, fm_ce_se=fm,
                                  imm=imm if with_imm else None)
        assert got == want, i


def test_inline_and_sequence_word_wqes_match_pyverbs(pyverbs):
    """Inline WRITEs (any size up to one basic block) and the fenced
    sequence-word publication: pyverbs' ctrl segment, then raddr and the
    inline segment as mlx5dv.h lays them out."""
    dv, _ = pyverbs
    rng = random.Random(5)
    for i in range(CASES):
        idx, qpn = rng.randint(0, U16), rng.randint(0, (1 << 24) - 1)
        raddr, rkey = rng.randint(0, U64), rng.randint(0, U32)
        if i % 2:
            seq, signaled = rng.randint(0, U64), rng.random() < 0.5
            data, fm = seq.to_bytes(8, "little"), mlx5_wqe.CTRL_FENCE | (mlx5_wqe.CTRL_CQ_UPDATE if signaled else 0)
            got = mlx5_wqe.sequence_word(idx, qpn, raddr, rkey, seq, signaled=signaled)
        else:
            data, fm = rng.randbytes(rng.randint(0, mlx5_wqe.MAX_INLINE_BYTES)), rng.randint(0, 255)
            got = mlx5_wqe.inline_write(idx, qpn, raddr, rkey, data, fm_ce_se=fm)
        inline = struct.pack(">I", 0x80000000 | len(data)) + data
        inline += bytes(-len(inline) % 16)
        ctrl = _pyverbs_ctrl(dv, idx, mlx5_wqe.OPCODE_RDMA_WRITE, 0, qpn, fm, 2 + len(inline) // 16, 0, 0)
        assert got == _pyverbs_bytes(dv, [ctrl]) + struct.pack(">QII", raddr, rkey, 0) + inline, i


# --- (c) CQE decoding ---------------------------------------------------------------


def _cqe(op_own, *, wqe_counter=0, qpn=0, byte_cnt=0, imm=0, syndrome=0, vendor_syndrome=0, fill=0) -> bytes:
    """A CQE per struct mlx5_cqe64 / mlx5_err_cqe: imm_inval_pkey at 36,
    byte_cnt at 44, vendor syndrome at 54, syndrome at 55, (opcode|)qpn at 56,
    wqe_counter at 60, op_own at 63; other bytes `fill`."""
    b = bytearray([fill]) * 64
    struct.pack_into(">I", b, 36, imm)
    struct.pack_into(">I", b, 44, byte_cnt)
    b[54], b[55] = vendor_syndrome, syndrome
    struct.pack_into(">IH", b, 56, qpn, wqe_counter)
    b[63] = op_own
    return bytes(b)


def test_decode_success_cqes():
    req = mlx5_wqe.decode_cqe(_cqe(mlx5_wqe.CQE_REQ << 4 | 1, wqe_counter=0x1234, qpn=0xABCDEF, fill=0xEE))
    assert (req.opcode, req.owner, req.wqe_counter, req.qpn) == (mlx5_wqe.CQE_REQ, 1, 0x1234, 0xABCDEF)
    assert not req.is_error and req.syndrome == 0 and req.vendor_syndrome == 0
    resp = mlx5_wqe.decode_cqe(
        _cqe(mlx5_wqe.CQE_RESP_WR_IMM << 4, wqe_counter=0xFFFF, qpn=0xFF000042, byte_cnt=4096, imm=0xDEADBEEF)
    )
    assert resp == mlx5_wqe.Cqe(opcode=mlx5_wqe.CQE_RESP_WR_IMM, owner=0, wqe_counter=0xFFFF, byte_cnt=4096,
                                qpn=0x42, imm=0xDEADBEEF, syndrome=0, vendor_syndrome=0)


@pytest.mark.parametrize("opcode", [mlx5_wqe.CQE_REQ_ERR, mlx5_wqe.CQE_RESP_ERR])
def test_decode_error_cqes(opcode):
    # Syndrome 0x13: MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR (a bad rkey or bounds).
    err = mlx5_wqe.decode_cqe(
        _cqe(opcode << 4 | 1, wqe_counter=7, qpn=(0x08 << 24) | 0x1234, syndrome=0x13, vendor_syndrome=0x88,
             byte_cnt=999, imm=5)
    )
    assert err.is_error
    assert (err.opcode, err.owner, err.wqe_counter, err.qpn) == (opcode, 1, 7, 0x1234)
    assert (err.syndrome, err.vendor_syndrome, err.byte_cnt, err.imm) == (0x13, 0x88, 0, 0)


def test_decode_cqes_match_pyverbs(pyverbs):
    """Random CQE bytes: opcode, owner, wqe_counter, byte_cnt as pyverbs'
    Mlx5Cqe64 reads them (rdma-core's mlx5dv_get_cqe_* and be*toh)."""
    dv, _ = pyverbs
    rng = random.Random(6)
    opcodes = [mlx5_wqe.CQE_REQ, mlx5_wqe.CQE_RESP_WR_IMM, mlx5_wqe.CQE_REQ_ERR, mlx5_wqe.CQE_RESP_ERR]
    for i in range(CASES):
        raw = bytearray(rng.randbytes(64))
        raw[63] = (rng.choice(opcodes) << 4) | (raw[63] & 0x0F)
        buf = ctypes.create_string_buffer(bytes(raw), 64)
        ref = dv.Mlx5Cqe64(ctypes.addressof(buf))
        got = mlx5_wqe.decode_cqe(bytes(raw))
        assert (got.opcode, got.owner, got.wqe_counter) == (ref.opcode, ref.owner, ref.wqe_counter), i
        error = ref.opcode in (mlx5_wqe.CQE_REQ_ERR, mlx5_wqe.CQE_RESP_ERR)
        assert got.byte_cnt == (0 if error else ref.byte_cnt), i
        assert (got.syndrome, got.vendor_syndrome) == ((raw[55], raw[54]) if error else (0, 0)), i


# --- known answers (no rdma-core needed) -----------------------------------------


def test_segments_known_answers():
    ctrl = mlx5_wqe.ctrl_seg(0x1234, mlx5_wqe.OPCODE_RDMA_WRITE_IMM, 0xABCDEF, 3, opmod=0x5A,
                             fm_ce_se=mlx5_wqe.CTRL_FENCE | mlx5_wqe.CTRL_CQ_UPDATE, signature=0x77,
                             imm=0x01020304)
    # opmod | wqe index | opcode, qpn | ds, signature, reserved, fm_ce_se, imm
    assert ctrl == bytes.fromhex("5a123409 abcdef03 77000088 01020304")
    assert mlx5_wqe.raddr_seg(0x0102030405060708, 0xA0B0C0D0) == bytes.fromhex(
        "0102030405060708 a0b0c0d0 00000000")
    assert mlx5_wqe.data_seg(0x1000, 0x11223344, 0x7F0000001000) == bytes.fromhex(
        "00001000 11223344 00007f0000001000")
    assert mlx5_wqe.inline_seg(b"abc") == bytes.fromhex("80000003") + b"abc" + bytes(9)
    assert len(mlx5_wqe.inline_seg(bytes(12))) == 16 and len(mlx5_wqe.inline_seg(bytes(13))) == 32


def test_sequence_word_known_answer():
    wqe = mlx5_wqe.sequence_word(5, 0x42, 0x1000, 0x99, 0x0102030405060708, signaled=True)
    assert wqe == (bytes.fromhex("00000508 00004203 00000088 00000000")  # WRITE, ds 3, fence | CQ update
                   + bytes.fromhex("0000000000001000 00000099 00000000")
                   + bytes.fromhex("80000008") + bytes.fromhex("0807060504030201") + bytes(4))
    assert mlx5_wqe.sequence_word(5, 0x42, 0x1000, 0x99, 0, signaled=False)[11] == mlx5_wqe.CTRL_FENCE


def test_inline_limits():
    assert len(mlx5_wqe.inline_write(0, 1, 0, 0, bytes(mlx5_wqe.MAX_INLINE_BYTES))) == 64  # one basic block
    with pytest.raises(ValueError, match="at most 28"):
        mlx5_wqe.inline_write(0, 1, 0, 0, bytes(mlx5_wqe.MAX_INLINE_BYTES + 1))
    with pytest.raises(ValueError, match="at most 60"):
        mlx5_wqe.inline_seg(bytes(61))
    with pytest.raises(ValueError, match="64 bytes"):
        mlx5_wqe.decode_cqe(bytes(63))
