"""The transport package's structure: wire.py mirrors the C headers, the
backend registry, the backend protocol, and the layering of its modules."""

from __future__ import annotations

import ast
import os
import re
import struct
import uuid

import pytest

from eaas_jax.control_plane.deployment import Deployment, DeploymentError
from eaas_jax.transport import backends, wire
from eaas_jax.transport.cuda_ipc import CudaIpcEndpoint

from conftest import REPO, TINY_CONFIG

FFI = os.path.join(REPO, "ffi")
TRANSPORT = os.path.join(REPO, "eaas_jax", "transport")


def _read(name: str) -> str:
    with open(os.path.join(FFI, name)) as f:
        return f.read()


def _enum(source: str, enum: str, prefix: str) -> dict[str, int]:
    """{suffix of each enumerator: value} of `enum NAME : type { ... }` whose
    enumerators are `<prefix><Suffix> = <value>`."""
    body = re.search(r"enum %s\b[^{]*\{(.*?)\};" % enum, source, re.S)
    assert body, f"enum {enum} not found"
    values = dict(re.findall(r"\b%s(\w+)\s*=\s*(\d+)" % prefix, body.group(1)))
    assert values, f"no {prefix}* enumerator in enum {enum}"
    return {name: int(value) for name, value in values.items()}


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def test_status_table_equals_the_c_enum():
    c = {_snake(name): value for name, value in _enum(_read("transport_common.h"), "CombineStatus",
                                                      "kStatus").items()}
    assert {status.name: code for code, status in wire.STATUSES.items()} == c
    for name, value in c.items():
        assert getattr(wire, f"STATUS_{name.upper()}") == value, name


def test_statuses_that_mean_a_server_failed():
    # The exchange fails over, and the engine reports, exactly these.
    assert wire.FAILED_STATUSES == (wire.STATUS_TIMEOUT, wire.STATUS_BAD_REPLY, wire.STATUS_UNAVAILABLE)
    for status in wire.STATUSES.values():
        status.text.format(timeout_ms=10.0)  # every text takes the deadline (or ignores it)


def test_header_constants_equal_the_c_header():
    source = _read("wire_format.h")
    assert {f"KIND_{k.upper()}": v for k, v in _enum(source, "MessageKind", "kKind").items()} == {
        "KIND_REQUEST": wire.KIND_REQUEST, "KIND_REPLY": wire.KIND_REPLY}
    hidden = {f"HIDDEN_{k.upper()}": v for k, v in _enum(source, "HiddenDtype", "kHidden").items()}
    assert hidden == {name: getattr(wire, name) for name in ("HIDDEN_F32", "HIDDEN_BF16", "HIDDEN_F8E4M3")}
    assert sorted(wire.DISPATCH_DTYPES.values()) == sorted(hidden.values())

    def constant(name: str) -> int:
        m = re.search(r"\b%s\s*=\s*(\d+)u?;" % name, source)
        assert m, name
        return int(m.group(1))

    assert constant("kWireFormatVersion") == wire.WIRE_FORMAT_VERSION
    assert constant("kFnv1a32OffsetBasis") == wire.FNV1A32_OFFSET_BASIS
    assert constant("kFnv1a32Prime") == wire.FNV1A32_PRIME


def test_header_layout_equals_the_c_struct():
    body = re.search(r"struct MessageHeader \{(.*?)\};", _read("wire_format.h"), re.S).group(1)
    fields = re.findall(r"std::uint(\d+)_t\s+(\w+)(?:\[(\d+)\])?;", body)
    codes = {"64": "Q", "32": "I", "16": "H", "8": "B"}
    layout = "<" + "".join(f"{count}{codes[bits]}" if count else codes[bits] for bits, _, count in fields)
    assert layout == wire.HEADER.format
    assert tuple(name for _, name, _ in fields) == wire.HEADER_FIELDS
    assert fields[-1][1] == "checksum"
    assert struct.calcsize(layout[:-1]) == wire.CHECKSUM_OFFSET  # every byte before the checksum


def test_header_codec_round_trips_and_checks_the_checksum():
    header = wire.pack_header(seq=4, deployment_id=wire.default_deployment_id("t"), kind=wire.KIND_REPLY,
                              sender=1, layer=2, micro_batch=1, num_tokens=3)
    fields = wire.unpack_header(header)
    assert fields["checksum_ok"] and fields["ticket"] == 4 and fields["num_tokens"] == 3
    assert not wire.unpack_header(header[:40] + b"\x01" + header[41:])["checksum_ok"]


def test_registry_lists_the_backends_by_name():
    assert backends.names() == ("shm", "cuda_ipc", "ibgda")
    assert backends.DEFAULT in backends.names()
    for name in backends.names():
        backend = backends.get(name)
        assert backend.name == name
        assert isinstance(backend, backends.TransportBackend), name
    targets = {name: backends.get(name).ffi_targets for name in backends.names()}
    assert len(set(targets.values())) == len(targets)  # every backend's calls have names of their own


@pytest.mark.parametrize("name", ["carrier-pigeon", ["shm"], None])
def test_an_unknown_backend_is_refused_naming_the_known_ones(name):
    with pytest.raises(backends.UnknownTransportError, match=r"one of \['shm', 'cuda_ipc', 'ibgda'\]"):
        backends.get(name)


def test_the_protocol_check_sees_a_missing_member():
    class NoDescribe:  # a backend's members but one
        name, ffi_targets, one_process_per_gpu = "x", backends.get("shm").ffi_targets, False

        def open_endpoint(self, name, endpoint, geometry): ...
        def endpoint_paths(self, name, endpoint): ...
        def deployment_problems(self, deployment): ...

    assert not isinstance(NoDescribe(), backends.TransportBackend)
    NoDescribe.describe = lambda self, endpoint: {}
    assert isinstance(NoDescribe(), backends.TransportBackend)


def test_a_deployment_with_an_unknown_transport_names_the_known_ones(tmp_path):
    path = tmp_path / "deploy.toml"
    path.write_text("name = 't'\ntransport = 'carrier-pigeon'\n[[servers]]\nname='a'\n")
    with pytest.raises(DeploymentError, match=r"transport must be one of \['shm', 'cuda_ipc', 'ibgda'\], "
                                              r"got 'carrier-pigeon'"):
        Deployment.load(path)


def test_a_deployment_asks_its_backend():
    shm = Deployment.from_dict({"name": "t", "servers": [{"name": "a"}]})
    assert shm.transport == backends.DEFAULT and shm.backend is backends.get("shm")
    assert not shm.backend.one_process_per_gpu
    gpus = Deployment.from_dict({"name": "t", "transport": "cuda_ipc", "servers": [{"name": "a", "device": 0}]})
    assert gpus.backend.one_process_per_gpu
    assert gpus.endpoint_paths("t") == [f"/dev/shm/eaas-t-{e}.cuda-ipc" for e in range(gpus.max_endpoints)]
    assert backends.get("shm").deployment_problems(gpus) == [
        "servers[0]: device is for the cuda_ipc transport (this deployment uses 'shm')"]
    with pytest.raises(DeploymentError, match=r"<deployment>: servers\[0\]: device is for the cuda_ipc"):
        Deployment.from_dict({"name": "t", "servers": [{"name": "a", "device": 0}]})


@pytest.mark.parametrize("transport", ["shm", "ibgda"])
def test_a_cpu_endpoint_is_a_transport_endpoint(transport):
    d = Deployment.from_dict({"name": "t", "transport": transport, "servers": [{"name": "a"}]})
    name = f"t{os.getpid()}-{uuid.uuid4().hex[:8]}"
    paths = d.backend.endpoint_paths(name, 0)
    with d.open_endpoint(name, 0, TINY_CONFIG) as endpoint:
        assert isinstance(endpoint, backends.TransportEndpoint)
        assert endpoint.ffi_targets == d.backend.ffi_targets
        assert all(os.path.exists(path) and path in d.endpoint_paths(name) for path in paths)
        assert d.backend.describe(endpoint) == {"transport": transport}
    assert not any(os.path.exists(path) for path in paths)


def test_the_cuda_ipc_endpoint_has_the_endpoint_members():
    # It cannot be opened without a GPU: its class must carry what instances do not set.
    members = ("ffi_targets", "closed", "connect", "stats", "close")
    assert [m for m in members if not hasattr(CudaIpcEndpoint, m)] == []


def _transport_imports() -> dict[str, set[str]]:
    """Module of transport/ -> the transport modules it imports (anywhere in it)."""
    modules = {f[:-3] for f in os.listdir(TRANSPORT) if f.endswith(".py") and f != "__init__.py"}
    graph = {}
    for module in modules:
        with open(os.path.join(TRANSPORT, module + ".py")) as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "eaas_jax.transport":
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("eaas_jax.transport."):
                found.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                found.update(a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("eaas_jax.transport."))
        graph[module] = found & modules
    return graph


def test_transport_modules_import_each_other_without_a_cycle():
    graph = _transport_imports()
    assert graph["wire"] == set()  # the bottom: everything builds on it
    assert graph["native"] == {"wire"}
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join(path + (module,))}"
        if module not in done:
            for imported in graph[module]:
                visit(imported, path + (module,))
            done.add(module)

    for module in graph:
        visit(module, ())


def test_no_backend_is_named_outside_the_transport_package():
    """Code elsewhere asks the backend (the command line's help text may name them)."""
    named = re.compile(r"cuda_ipc|[\"']shm[\"']")
    found = []
    for root, _, files in os.walk(os.path.join(REPO, "eaas_jax")):
        if os.path.samefile(root, TRANSPORT):
            continue
        for f in files:
            path = os.path.join(root, f)
            if f.endswith(".py") and path != os.path.join(REPO, "eaas_jax", "cli.py"):
                with open(path) as source:
                    found += [f"{path}:{i}" for i, line in enumerate(source, 1) if named.search(line)]
    assert found == []
