"""The pyverbs DevX setup of mlx5 queue pairs (transport/mlx5_devx.py), which
no machine here can run on hardware: the PRM command bytes against rdma-core's
own definitions (tests/mlx5_prm_structs.py of python3-pyverbs, run by
scapy), and the setup's calls with pyverbs replaced at its call boundary."""

from __future__ import annotations

import gzip
import os
import random
import types
from types import SimpleNamespace

import pytest

from eaas_jax.transport import mlx5_devx as dx

PRM_REFERENCE = "/usr/share/doc/rdma-core/tests/mlx5_prm_structs.py.gz"


@pytest.fixture(scope="module")
def prm():
    """rdma-core's scapy definitions of the PRM structs."""
    if not os.path.exists(PRM_REFERENCE):
        pytest.skip(f"needs rdma-core's PRM definitions ({PRM_REFERENCE}, Debian's python3-pyverbs)")
    pytest.importorskip("scapy", reason="needs scapy (the test extra) to run rdma-core's PRM definitions")
    module = types.ModuleType("mlx5_prm_structs")
    exec(compile(gzip.open(PRM_REFERENCE).read(), PRM_REFERENCE, "exec"), module.__dict__)
    return module


# Our field names where rdma-core's differ.
RENAMED = {"cq_umem_offset": "e_mtt_pointer_or_cq_umem_offset", "wq_umem_offset": "e_mtt_pointer_or_wq_umem_offset",
           "cqc": "sw_cqc", "qpc": "sw_qpc", "dei_cfi": "dei_cfi_reserved_from_prm_041"}


def random_fields(layout: dx.PrmStruct, rng: random.Random) -> dict:
    """Values for a random half of `layout`'s fields (nested ones too)."""
    out = {}
    for name, width in layout.fields:
        if not name or rng.random() < 0.5:
            continue
        out[name] = random_fields(width, rng) if isinstance(width, dx.PrmStruct) else rng.getrandbits(width)
    return out


def reference_packet(prm, cls_name: str, values: dict):
    """rdma-core's packet `cls_name` with our `values` (converted to its field forms)."""
    nested = {"sw_cqc": "SwCqc", "sw_qpc": "SwQpc", "primary_address_path": "SwAds", "secondary_address_path": "SwAds"}
    kwargs = {}
    for name, value in values.items():
        name = RENAMED.get(name, name)
        if name in nested:
            value = reference_packet(prm, nested[name], value)
        elif name == "rgid_rip":
            value = [(value >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
        elif name == "rmac":
            value = ":".join(f"{b:02x}" for b in value.to_bytes(6, "big"))
        kwargs[name] = value
    return getattr(prm, cls_name)(**kwargs)


@pytest.mark.parametrize("ours, theirs", [(dx.CREATE_CQ_IN, "CreateCqIn"), (dx.CREATE_QP_IN, "CreateQpIn"),
                                          (dx.MODIFY_QP_IN, "ModifyQpIn")])
def test_command_bytes_equal_rdma_cores_for_random_fields(prm, ours, theirs):
    rng = random.Random(theirs)
    assert len(ours) == len(reference_packet(prm, theirs, {}))
    for _ in range(300):
        values = random_fields(ours, rng)
        values.setdefault("opcode", rng.getrandbits(16))  # rdma-core's default is its own command's
        packed = ours.pack(**values)
        assert packed == bytes(reference_packet(prm, theirs, values)), values
        decoded = ours.unpack(packed)
        assert all(decoded[k] == v for k, v in values.items() if not isinstance(v, dict))


def test_outputs_decode_as_rdma_cores(prm):
    out = bytes(prm.CreateQpOut(status=0, syndrome=0x12345678, qpn=0xABCDE))
    assert dx.CREATE_OUT.unpack(out) == {"status": 0, "syndrome": 0x12345678, "number": 0xABCDE}
    out = bytes(prm.ModifyQpOut(status=3, syndrome=7))
    assert dx.MODIFY_OUT.unpack(out) == {"status": 3, "syndrome": 7}


@pytest.mark.parametrize("values, match", [({"log_cq_size": 32}, "log_cq_size = 32 does not fit 5 bits"),
                                           ({"nonsense": 1}, r"has no fields \['nonsense'\]"),
                                           ({"c_eqn": -1}, "c_eqn = -1"), ({"c_eqn": True}, "c_eqn = True")])
def test_a_value_that_does_not_fit_is_refused(values, match):
    with pytest.raises(ValueError, match=match):
        dx.SW_CQC.pack(**values)


# --------------------------------------------------------------------------
# The setup against a fake pyverbs
# --------------------------------------------------------------------------


class FakeVerbs:
    """pyverbs at its call boundary: objects that record what they were given
    and answer like a device (`fail`: the command that answers an error)."""

    def __init__(self, fail: str | None = None):
        self.commands: list[tuple[str, bytes]] = []
        self.closed: list[str] = []
        self.fail = fail
        self.next_id = iter(range(0x10, 1 << 20))
        verbs = self

        class Closable:
            kind = "object"

            def close(self):
                verbs.closed.append(self.kind)

        class Ctx(Closable):
            kind = "context"

            def __init__(self, attr, name):
                self.attr, self.name = attr, name

            def devx_query_eqn(self, vector):
                return 9

            def query_gid(self, port, index):
                return SimpleNamespace(gid="fe80:0000:0000:0000:0202:c9ff:fe00:0001")

            def query_port(self, port):
                return SimpleNamespace(lid=0x42)

        class Umem(Closable):
            kind = "umem"

            def __init__(self, ctx, size, access, alignment=None, dmabuf_fd=None):
                self.size, self.dmabuf_fd = size, dmabuf_fd
                self.umem_id, self.umem_addr = next(verbs.next_id), 0x7F0000000000 + next(verbs.next_id) * 4096

        class Uar(Closable):
            kind = "uar"

            def __init__(self, ctx, flags):
                self.page_id, self.reg_addr = 77, 0x7E0000000800

        class DevxObj(Closable):
            def __init__(self, ctx, data, outlen):
                opcode = int.from_bytes(data[:2], "big")
                self.kind = {dx.CMD_CREATE_CQ: "cq", dx.CMD_CREATE_QP: "qp"}[opcode]
                verbs.commands.append((self.kind, bytes(data)))
                status = 5 if verbs.fail == self.kind else 0
                self.out_view = memoryview(dx.CREATE_OUT.pack(status=status, syndrome=0x1234 * (status > 0),
                                                              number=next(verbs.next_id)))

            def modify(self, data, outlen):
                name = {dx.CMD_RST2INIT_QP: "rst2init", dx.CMD_INIT2RTR_QP: "init2rtr",
                        dx.CMD_RTR2RTS_QP: "rtr2rts"}[int.from_bytes(data[:2], "big")]
                verbs.commands.append((name, bytes(data)))
                return dx.MODIFY_OUT.pack(status=2 if verbs.fail == name else 0, syndrome=0x99 if verbs.fail else 0)

        class Pd(Closable):
            kind = "pd"

            def __init__(self, ctx):
                pass

        class Mr(Closable):
            kind = "mr"

            def __init__(self, pd, length, access, address=None, dmabuf=None, offset=None):
                self.access, self.address, self.dmabuf = access, address, dmabuf
                self.lkey, self.rkey = 0x100, 0x200

        self.ns = SimpleNamespace(
            Mlx5Context=Ctx, Mlx5DVContextAttr=lambda flags: flags, Mlx5DevxObj=DevxObj, Mlx5UAR=Uar, Mlx5UMEM=Umem,
            Mlx5DvObj=lambda kind, pd: SimpleNamespace(dvpd=SimpleNamespace(pdn=0x5A)), PD=Pd, MR=Mr, DmaBufMR=Mr,
            DEVX=1, UAR_NC=1, OBJ_PD=4, LOCAL_WRITE=1, REMOTE_WRITE=2,
        )


def test_a_queue_pair_is_created_and_connected_with_the_prm_fields_it_needs():
    verbs = FakeVerbs()
    dev = dx.Mlx5Device("mlx5_0", port=1, gid_index=3, verbs=verbs.ns)
    assert dev.register(1 << 20, dmabuf_fd=11, remote_write=True) == (0x100, 0x200)
    qp = dev.create_qp(8, 8, queue_dmabuf_fds=(21, 22))
    (_, cq_cmd), (_, qp_cmd) = verbs.commands
    cq = dx.CREATE_CQ_IN.unpack(cq_cmd)
    assert cq["opcode"] == dx.CMD_CREATE_CQ and cq["cq_umem_valid"] == 1
    assert cq["cqc"]["log_cq_size"] == 8 and cq["cqc"]["uar_page"] == 77 and cq["cqc"]["c_eqn"] == 9
    assert cq["cqc"]["dbr_umem_valid"] == 1
    created = dx.CREATE_QP_IN.unpack(qp_cmd)
    qpc = created["qpc"]
    assert created["opcode"] == dx.CMD_CREATE_QP and created["wq_umem_valid"] == 1
    assert qpc["st"] == dx.QPC_ST_RC and qpc["pd"] == 0x5A and qpc["log_sq_size"] == 8
    assert qpc["rq_type"] == dx.QPC_RQ_TYPE_ZERO_SIZE and qpc["cqn_snd"] == qpc["cqn_rcv"] == qp.cqn
    assert qpc["uar_page"] == 77 and qpc["dbr_umem_valid"] == 1
    assert qp.doorbell_addr == 0x7E0000000800 and qp.sq_addr != qp.cq_addr

    peer = dx.PeerAddress(qpn=0x1234, psn=0xABCDE, gid=bytes(range(16)), lid=0x21, mac=bytes.fromhex("0a0b0c0d0e0f"))
    for ethernet in (False, True):
        verbs.commands.clear()
        dev.connect(qp, peer, ethernet=ethernet, retry_count=6, ack_timeout=15)
        assert [name for name, _ in verbs.commands] == ["rst2init", "init2rtr", "rtr2rts"]
        init, rtr, rts = (dx.MODIFY_QP_IN.unpack(cmd) for _, cmd in verbs.commands)
        assert all(c["qpn"] == qp.qpn for c in (init, rtr, rts))
        assert init["qpc"]["rwe"] == 1 and init["qpc"]["primary_address_path"]["vhca_port_num"] == 1
        path = rtr["qpc"]["primary_address_path"]
        assert rtr["qpc"]["remote_qpn"] == 0x1234 and rtr["qpc"]["next_rcv_psn"] == 0xABCDE
        if ethernet:
            assert path["rgid_rip"] == int.from_bytes(bytes(range(16)), "big") and path["rmac"] == 0x0A0B0C0D0E0F
            assert path["src_addr_index"] == 3 and path["rlid"] == 0
        else:
            assert path["rlid"] == 0x21 and path["rgid_rip"] == 0
        assert rts["qpc"]["next_send_psn"] == qp.psn and rts["qpc"]["retry_count"] == 6
        assert rts["qpc"]["primary_address_path"]["ack_timeout"] == 15
    address = dev.address(qp)
    assert address.qpn == qp.qpn and address.lid == 0x42 and address.gid[:2] == b"\xfe\x80"
    dev.close()
    # QP before the CQ, queues' memory after them, the PD and context last.
    assert verbs.closed.index("qp") < verbs.closed.index("cq") < verbs.closed.index("uar")
    assert verbs.closed[-2:] == ["pd", "context"] and verbs.closed.count("umem") == 4


@pytest.mark.parametrize("fail, match", [("cq", "CREATE_CQ failed: status 0x5, syndrome 0x1234"),
                                         ("qp", "CREATE_QP failed"), ("init2rtr", "INIT2RTR_QP failed")])
def test_a_failed_command_names_itself_and_its_syndrome(fail, match):
    dev = dx.Mlx5Device("mlx5_0", verbs=FakeVerbs(fail).ns)
    with pytest.raises(dx.Mlx5Error, match=match):
        qp = dev.create_qp(6, 6)
        dev.connect(qp, dx.PeerAddress(qpn=1, psn=2, gid=bytes(16), lid=3), ethernet=False)


def test_bad_arguments_are_refused_before_any_command():
    verbs = FakeVerbs()
    dev = dx.Mlx5Device("mlx5_0", verbs=verbs.ns)
    with pytest.raises(ValueError, match="log_sq_bbs <= 15"):
        dev.create_qp(16, 6)
    with pytest.raises(ValueError, match="exactly one of address and dmabuf_fd"):
        dev.register(4096)
    qp = dev.create_qp(6, 6)
    with pytest.raises(ValueError, match="6-byte MAC"):
        dev.connect(qp, dx.PeerAddress(qpn=1, psn=2, gid=bytes(16)), ethernet=True)
    assert [name for name, _ in verbs.commands] == ["cq", "qp"]


def test_without_pyverbs_the_module_imports_and_says_why():
    why = dx.unavailable()
    try:
        import pyverbs  # noqa: F401
    except ImportError:
        assert why is not None and "python3-pyverbs" in why
    else:
        assert why is None
