"""etcd discovery with a real etcd server: servers started on their own register
under a lease, an engine given the registry finds them and matches the
embedded engine, and every key and segment is gone after shutdown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.engine import MEMBERSHIP_CHECK_S
from eaas_jax.runtime.registry import (EtcdRegistry, Heartbeat, RegistryError, clients_prefix, servers_prefix,
                                       spares_prefix)

from conftest import REPO, SHIPPED

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="needs Debian's etcd-server (.ci/run installs it)")

DEPLOYMENT = os.path.join(REPO, "configs", "deploy", "tiny-moe-2-servers.toml")
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
PROMPTS = ["def parse_args(argv):", "import sys\n"]
ENGINE_ARGS = dict(max_num_seqs=4, max_model_len=64, dtype="float32")


def generated(engine) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def expected():
    """The embedded engine's greedy tokens for PROMPTS: what every deployment must give."""
    with Engine(SHIPPED, **ENGINE_ARGS) as embedded:
        return generated(embedded)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    client, peer = _free_port(), _free_port()
    proc = subprocess.Popen(
        [ETCD, "--data-dir", str(tmp_path_factory.mktemp("etcd")),
         "--listen-client-urls", f"http://127.0.0.1:{client}",
         "--advertise-client-urls", f"http://127.0.0.1:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"etcd://127.0.0.1:{client}"
    registry = EtcdRegistry(url)
    deadline = time.monotonic() + 30
    while True:
        try:
            registry.get_prefix("probe/")
            break
        except RegistryError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("etcd did not start")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def serve_experts(deployment, name: str, etcd: str, shm_name: str, log_dir, *extra: str) -> subprocess.Popen:
    """`eaas-jax serve-experts` for server `name`, registering in `etcd`; its log in log_dir/<name>.log."""
    return subprocess.Popen(
        [sys.executable, "-m", "eaas_jax.cli", "serve-experts", "--model", SHIPPED, "--deployment",
         str(deployment), "--server", name, "--registry", etcd, "--shm-name", shm_name, *extra],
        stdout=subprocess.DEVNULL, stderr=open(log_dir / f"{name}.log", "wb"),
    )


def test_lease_expiry_removes_keys(etcd):
    registry = EtcdRegistry(etcd)
    lease = registry.grant_lease(1)  # never kept alive
    registry.put("eaas/t/servers/x", {"endpoint": 0}, lease=lease)
    assert registry.create("eaas/t/clients/0", {"pid": 1}, lease=lease)
    assert not registry.create("eaas/t/clients/0", {"pid": 2})  # slot taken
    assert set(registry.get_prefix("eaas/t/")) == {"eaas/t/servers/x", "eaas/t/clients/0"}
    deadline = time.monotonic() + 10
    while registry.get_prefix("eaas/t/") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.get_prefix("eaas/t/") == {}
    heartbeat = Heartbeat(registry, ttl_s=1)  # kept alive past its TTL
    registry.put("eaas/t/servers/y", {}, lease=heartbeat.lease)
    time.sleep(2.5)
    assert "eaas/t/servers/y" in registry.get_prefix("eaas/t/")
    heartbeat.stop()
    assert registry.get_prefix("eaas/t/") == {}


def test_unreachable_registry_is_a_clear_error():
    with pytest.raises(RegistryError, match="cannot reach etcd at etcd://127.0.0.1:1"):
        EtcdRegistry("etcd://127.0.0.1:1", timeout=1).get_prefix("x/")
    with pytest.raises(ValueError, match="etcd://HOST:PORT"):
        EtcdRegistry("http://localhost:2379")


def test_engine_discovers_servers_started_elsewhere(etcd, tmp_path, expected):
    shm_name = f"etcdtest-{os.getpid()}"
    servers = [
        serve_experts(DEPLOYMENT, name, etcd, shm_name, tmp_path) for name in ("experts-even", "experts-odd")
    ]
    registry = EtcdRegistry(etcd)
    try:
        with Engine(SHIPPED, deployment=DEPLOYMENT, registry=etcd, **ENGINE_ARGS) as engine:
            entries = registry.get_prefix(servers_prefix("tiny-moe"))
            assert {e["pid"] for e in entries.values()} == {p.pid for p in servers}
            assert len(registry.get_prefix(clients_prefix("tiny-moe"))) == 1  # our slot
            got = generated(engine)
        assert got == expected
        assert registry.get_prefix(clients_prefix("tiny-moe")) == {}  # slot released
    finally:
        for p in servers:
            p.terminate()
        codes = [p.wait(timeout=30) for p in servers]
    assert codes == [0, 0], [open(tmp_path / f"{n}.log").read()[-2000:] for n in ("experts-even", "experts-odd")]
    assert registry.get_prefix("eaas/tiny-moe/") == {}  # leases revoked on the way out
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{shm_name}-")]


def test_a_server_whose_lease_expires_leaves_the_engines_table(etcd, tmp_path, expected):
    """A server that stops heartbeating (here: frozen with SIGSTOP, as a hung
    host would be) loses its key when its lease expires; the engine then routes
    around it before sending it anything, and its replicas serve its experts."""
    from test_failover import REPLICATED

    deployment = tmp_path / "replicas.toml"
    deployment.write_text(REPLICATED)
    shm_name = f"etcdlease-{os.getpid()}"
    servers = {
        name: serve_experts(deployment, name, etcd, shm_name, tmp_path) for name in ("r0", "r1", "r2")
    }
    registry = EtcdRegistry(etcd)
    try:
        with Engine(SHIPPED, deployment=str(deployment), registry=etcd, **ENGINE_ARGS) as engine:
            assert generated(engine) == expected
            servers["r2"].send_signal(signal.SIGSTOP)
            key = servers_prefix("replicas") + "r2"
            deadline = time.monotonic() + 30
            while key in registry.get_prefix(servers_prefix("replicas")):
                assert time.monotonic() < deadline, "r2's lease did not expire"
                time.sleep(0.2)
            # The cluster's poller reads etcd within a second; the next step
            # boundary asks the cluster.
            time.sleep(1.0 + MEMBERSHIP_CHECK_S)
            assert generated(engine) == expected
            backend = engine.runner.experts
            assert not backend.is_live(2) and backend.is_live(0) and backend.is_live(1)
            assert backend.endpoint.stats()["timeouts"] == 0  # nothing was sent to r2
            assert engine.metrics.server_counters["marked_dead"].tolist() == [0, 0, 1]

            # etcd hangs: steps never wait for it. Until the poll gives up the
            # engine keeps the last table, then it is told etcd is unreachable.
            def hanging_get_prefix(prefix):
                time.sleep(2.0)
                raise RegistryError("etcd did not answer")

            engine.cluster.registry.get_prefix = hanging_get_prefix
            started = time.monotonic()
            assert engine.cluster.servers_up().keys() == {0, 1}
            assert time.monotonic() - started < 0.1
            time.sleep(4.5)  # a poll started and gave up
            started = time.monotonic()
            with pytest.raises(RegistryError, match="did not answer"):
                engine.cluster.servers_up()
            assert time.monotonic() - started < 0.1
            assert generated(engine) == expected
            assert backend.is_live(0) and backend.is_live(1)  # an outage is not a failure
    finally:
        servers["r2"].send_signal(signal.SIGCONT)
        for p in servers.values():
            p.terminate()
        for p in servers.values():
            p.wait(timeout=30)


def test_a_server_not_in_the_file_claims_a_spare_endpoint_and_joins_the_engines_table(etcd, tmp_path, expected):
    """`serve-experts --server NEW --experts ...` with a registry claims the
    deployment's spare endpoint under its lease and registers what it hosts;
    the engine adds it to its table as one more replica of those experts. A
    second one finds no spare endpoint left; on exit the claim goes."""
    from test_failover import JOINABLE

    deployment = tmp_path / "joinable.toml"
    deployment.write_text(JOINABLE)
    shm_name = f"etcdjoin-{os.getpid()}"

    def serve(name, *extra):
        return serve_experts(deployment, name, etcd, shm_name, tmp_path, *extra)

    servers = {name: serve(name) for name in ("r0", "r1")}
    registry = EtcdRegistry(etcd)
    try:
        with Engine(SHIPPED, deployment=str(deployment), registry=etcd, **ENGINE_ARGS) as engine:
            backend = engine.runner.experts
            assert generated(engine) == expected
            assert not backend.is_live(2) and engine.metrics.server_slots[2] == 0
            servers["extra"] = serve("extra", "--experts", "0-1,6-7")
            key = servers_prefix("replicas") + "extra"
            deadline = time.monotonic() + 120
            while key not in registry.get_prefix(servers_prefix("replicas")):
                assert servers["extra"].poll() is None, open(tmp_path / "extra.log").read()[-2000:]
                assert time.monotonic() < deadline, "the joining server did not register"
                time.sleep(0.2)
            claims = registry.get_prefix(spares_prefix("replicas"))
            assert claims[spares_prefix("replicas") + "2"]["server"] == "extra"
            time.sleep(1.0 + MEMBERSHIP_CHECK_S)  # the cluster's poll, then a step boundary
            assert generated(engine) == expected
            assert backend.is_live(2) and engine.metrics.server_slots[2] > 0
            assert sorted(set(np.argwhere(backend.table == 2)[:, 1])) == [0, 1, 6, 7]
            assert "expert server 'extra' (spare endpoint 2" in engine.cluster.describe_server(2)
            another = serve("another", "--experts", "0")
            assert another.wait(timeout=120) != 0
            assert "every spare endpoint" in open(tmp_path / "another.log").read()
    finally:
        for p in servers.values():
            p.terminate()
        codes = {name: p.wait(timeout=30) for name, p in servers.items()}
    assert codes == {"r0": 0, "r1": 0, "extra": 0}
    assert registry.get_prefix("eaas/replicas/") == {}  # registrations and the spare's claim went with the leases
