"""The `ibgda` transport on CPUs: messages posted as mlx5 WRITEs to the model
NIC (ffi/ibgda_writer.h), joined to the peer's NIC by TCP.

Against independent references: the expert rows computed in numpy
(_transport_worker.reference) and the embedded engine's greedy tokens. Also:
the traffic really goes through the NICs (a cut link fails the peer, a
reordering and delaying NIC does not change the results), a restarted peer
is reconnected, mismatched or foreign entries are refused, deployments name
their NIC, nothing is left in /dev/shm.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.checkpoint import load_config
from eaas_jax.control_plane.cluster import LocalCluster, RegistryCluster
from eaas_jax.control_plane.registry import EtcdRegistry, RegistryEntries, cards_prefix
from eaas_jax.control_plane.deployment import Deployment, DeploymentError
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.transport import custom_calls, ibgda, wire
from eaas_jax.transport.private_files import write_private_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _transport_worker import expert_compute, reference  # noqa: E402
from conftest import compiles_once_per_step_shape  # noqa: E402
from test_failover import PARAMS, REQUESTS, run_requests  # noqa: E402
from test_registry import ETCD, put_text, running_etcd  # noqa: E402
from shm_harness import CAP, GEO, HOSTED, LONG_US, SERVER_OF, WEIGHTS, random_tokens  # noqa: E402

if not os.path.isdir("/dev/shm"):
    pytest.skip("needs POSIX shared memory under /dev/shm", allow_module_level=True)

_count = iter(range(1_000_000))


@pytest.fixture
def name():
    """A fresh deployment name; its endpoints closed and files checked after."""
    deployment = f"ib{os.getpid()}-{next(_count)}"
    yield deployment
    with ibgda._OPEN_LOCK:
        mine = [ep for ep in ibgda._OPEN.values() if ep.deployment == deployment]
    for ep in mine:
        ep.close()
    left = glob.glob(f"/dev/shm/eaas-{deployment}-*")
    assert not left, f"left behind: {left}"


def open_all(name, count=3, **overrides):
    eps = [ibgda.IbgdaEndpoint(name, e, **dict(GEO, **overrides)) for e in range(count)]
    for server in eps[1:]:
        eps[0].connect(server.endpoint, timeout=10)
    return eps


def exchange(client, servers, hidden, expert_ids, gates, *, layer=0, micro_batch=0, timeout_us=LONG_US):
    """One dispatch -> poll/compute/reply on each server -> combine (eager)."""
    ids = jnp.array([s.endpoint for s in servers], jnp.int32)
    targets = jnp.asarray(SERVER_OF)[expert_ids]
    sent = custom_calls.dispatch(client, hidden, expert_ids, gates, targets, ids, layer=layer,
                                 micro_batch=micro_batch)
    after = sent
    for server in servers:
        r = custom_calls.poll(server, jnp.asarray(HOSTED[server.endpoint]), capacity=2 * CAP,
                              timeout_us=min(timeout_us, 2_000_000), after=after)
        y = expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer)
        after = custom_calls.reply(server, y, r.num_rows)
    out, status, _ = custom_calls.combine(client, sent, targets, ids, layer=layer, micro_batch=micro_batch,
                                          timeout_us=timeout_us, after=after)
    return np.asarray(out), np.asarray(status), np.asarray(sent)


def assert_serves(client, servers, seeds) -> None:
    """An exchange per seed: every server answers, the rows equal numpy's."""
    for seed in seeds:
        h, e, g = random_tokens(CAP, seed=seed)
        out, status, _ = exchange(client, servers, h, e, g)
        np.testing.assert_array_equal(status, [wire.STATUS_OK] * len(servers))
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Round trips through the model NICs
# --------------------------------------------------------------------------


def test_round_trips_equal_the_numpy_reference_on_both_channels(name):
    client, s1, s2 = open_all(name)
    assert client.ffi_targets.dispatch == "eaas_ibgda_dispatch"
    for it in range(3):
        for channel, tokens in ((0, CAP), (1, 5)):
            h, e, g = random_tokens(tokens, seed=10 * it + channel)
            out, status, sent = exchange(client, (s1, s2), h, e, g, layer=channel, micro_batch=channel)
            np.testing.assert_array_equal(status, [wire.STATUS_OK] * 2)
            assert sent.sum() >= tokens
            np.testing.assert_allclose(out, reference(WEIGHTS, channel, h, e, g), rtol=1e-5, atol=1e-5)
    c, a, b = client.stats(), s1.stats(), s2.stats()
    assert c["requests_sent"] == 12 and c["replies_accepted"] == 12
    assert a["requests_accepted"] + b["requests_accepted"] == 12
    for st in (c, a, b):
        assert all(v == 0 for n, v in st.items() if n.startswith("drop_") or n in ("timeouts", "torn_reads"))


def test_a_jitted_step_is_one_program_with_the_ibgda_targets(name):
    client, s1, s2 = open_all(name)
    h, e, g = random_tokens(CAP, seed=3)
    ids = jnp.array([1, 2], jnp.int32)

    @jax.jit
    def step(h, e, g):
        targets = jnp.asarray(SERVER_OF)[e]
        sent = client.dispatch(h, e, g, targets, ids, layer=1, micro_batch=0)
        after = sent
        for server in (s1, s2):
            r = server.poll(jnp.asarray(HOSTED[server.endpoint]), capacity=2 * CAP, timeout_us=LONG_US, after=after)
            after = server.reply(expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer), r.num_rows)
        return client.combine(sent, targets, ids, layer=1, micro_batch=0, timeout_us=LONG_US, after=after)[:2]

    hlo = step.lower(h, e, g).as_text()
    for target in ibgda.IBGDA_TARGETS:
        assert target in hlo
    assert "eaas_shm_" not in hlo
    for seed in range(3):
        h, e, g = random_tokens(CAP, seed=seed)
        out, status = step(h, e, g)
        np.testing.assert_array_equal(status, [wire.STATUS_OK] * 2)
        np.testing.assert_allclose(out, reference(WEIGHTS, 1, h, e, g), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# The NIC is really in the path: faults
# --------------------------------------------------------------------------


def test_a_reordering_delaying_lossy_nic_does_not_change_the_results(name):
    """Unfenced writes placed in any order, retransmissions: the fences before
    and after the payload keep the receiver's seqlock sound."""
    client, s1, s2 = open_all(name)
    for ep, seed in ((client, 1), (s1, 2), (s2, 3)):
        ep.set_nic_faults(reorder=True, latency_us=200, loss_permille=20, seed=seed)
    for it in range(6):
        h, e, g = random_tokens(CAP, seed=100 + it)
        out, status, _ = exchange(client, (s1, s2), h, e, g, micro_batch=it % 2)
        np.testing.assert_array_equal(status, [wire.STATUS_OK] * 2)
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    for ep in (client, s1, s2):
        st = ep.stats()
        assert all(v == 0 for n, v in st.items() if n.startswith("drop_")), st


def test_a_cut_link_fails_that_peer_only_and_is_reported_unavailable(name):
    client, s1, s2 = open_all(name)
    h, e, g = random_tokens(CAP, seed=7)
    client.set_nic_faults(link_down=True, retry_count=1)  # what the client sends is lost
    out, status, sent = exchange(client, (s1, s2), h, e, g, timeout_us=200_000)
    assert list(status) == [wire.STATUS_TIMEOUT] * 2  # nothing arrived anywhere
    deadline = time.monotonic() + 5
    while client.peer_state(1) != ibgda.PeerState.FAILED and time.monotonic() < deadline:
        time.sleep(0.01)
    # The retries ran out: error completions; the QPs are in error, and
    # messages to those peers are not even posted any more.
    assert client.peer_state(1) == client.peer_state(2) == ibgda.PeerState.FAILED
    client.set_nic_faults()  # the link back: a failed QP stays failed
    _, status, sent = exchange(client, (s1, s2), h, e, g, timeout_us=200_000)
    assert list(sent) == [-1, -1] and list(status) == [wire.STATUS_UNAVAILABLE] * 2
    assert client.stats()["peer_unavailable"] == 2


def test_one_failed_peer_leaves_the_others_serving(name):
    client, s1, s2 = open_all(name)
    s2.set_nic_faults(link_down=True, retry_count=1)  # s2's replies are lost
    h, e, g = random_tokens(CAP, seed=8)
    out, status, sent = exchange(client, (s1, s2), h, e, g, timeout_us=300_000)
    assert list(status) == [wire.STATUS_OK, wire.STATUS_TIMEOUT]
    mine = (SERVER_OF[e] == 1)
    expected = reference(WEIGHTS, 0, h, np.where(mine, e, 0), np.where(mine, g, 0))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------
# Peers come and go
# --------------------------------------------------------------------------


def test_a_restarted_peer_is_reconnected_and_served(name):
    client, s1, s2 = open_all(name)
    h, e, g = random_tokens(CAP, seed=9)
    assert list(exchange(client, (s1, s2), h, e, g)[1]) == [wire.STATUS_OK] * 2
    s2.close()
    s2 = ibgda.IbgdaEndpoint(name, 2, **GEO)  # a new incarnation: new NIC, new nonce
    client.connect(2, timeout=10)  # reconnected to it, both sides fresh
    assert client.peer_state(2) == ibgda.PeerState.READY
    assert_serves(client, (s1, s2), seeds=range(20, 20 + 3))


def test_an_entry_gone_for_a_moment_changes_nothing(name):
    """An etcd hiccup or a file briefly away: no side resets its QP alone
    (which would leave the other expecting the old packet numbers)."""
    client, s1, s2 = open_all(name)
    path = ibgda.directory_path(name, 1)
    os.rename(path, path + ".away")
    time.sleep(10 * ibgda._SCAN_S)
    os.rename(path + ".away", path)
    time.sleep(10 * ibgda._SCAN_S)
    assert_serves(client, (s1, s2), seeds=range(40, 40 + 3))


def test_a_flood_of_idle_connections_does_not_keep_a_peer_out(name):
    server = ibgda.IbgdaEndpoint(name, 1, **GEO)
    flood = [socket.create_connection(("127.0.0.1", server.card.port)) for _ in range(300)]
    try:
        time.sleep(0.05)
        client = ibgda.IbgdaEndpoint(name, 0, **GEO)
        client.connect(1, timeout=10)
        h, e, g = random_tokens(CAP, seed=50, experts=range(4))  # server 1's experts only
        out, status, _ = exchange(client, (server,), h, e, g, timeout_us=5_000_000)
        assert list(status) == [wire.STATUS_OK]
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    finally:
        for s in flood:
            s.close()


def test_endpoints_that_never_talk_never_connect(name):
    client, s1, s2 = open_all(name)
    assert client.peer_state(1) == client.peer_state(2) == ibgda.PeerState.READY
    assert s1.peer_state(0) == s2.peer_state(0) == ibgda.PeerState.READY  # connected back
    time.sleep(5 * ibgda._SCAN_S)
    assert s1.peer_state(2) == s2.peer_state(1) == ibgda.PeerState.IDLE


def test_a_peer_with_another_geometry_is_refused(name):
    client = ibgda.IbgdaEndpoint(name, 0, **GEO)
    ibgda.IbgdaEndpoint(name, 1, **dict(GEO, capacity=CAP + 1))
    with pytest.raises(ibgda.IbgdaPeerRefusedError, match="capacity"):
        client.connect(1, timeout=1)


def test_an_entry_that_is_not_a_private_file_is_refused(name):
    client = ibgda.IbgdaEndpoint(name, 0, **GEO)
    path = ibgda.directory_path(name, 1)
    write_private_file(path, b'{"nonce": "x"}')
    os.chmod(path, 0o644)  # readable by others: not ours to trust
    try:
        with pytest.raises(ibgda.IbgdaPeerRefusedError, match="refusing endpoint 1"):
            client.connect(1, timeout=1)
    finally:
        os.unlink(path)


def test_an_endpoint_open_elsewhere_is_in_use(name):
    ibgda.IbgdaEndpoint(name, 0, **GEO)
    with pytest.raises(ibgda.IbgdaEndpointInUseError, match="already open"):
        ibgda.IbgdaEndpoint(name, 0, **GEO)


def test_a_bad_listening_address_is_named(name):
    with pytest.raises(ibgda.IbgdaError, match="not an IPv4 address: nowhere"):
        ibgda.IbgdaEndpoint(name, 0, host="nowhere", **GEO)


# --------------------------------------------------------------------------
# Deployments and the engine
# --------------------------------------------------------------------------

DEPLOYMENT = """name = "{name}"
transport = "ibgda"
{nic}capacity = 64
[[servers]]
name = "low"
experts = ["0-3"]
[[servers]]
name = "high"
experts = ["4-7"]
"""


def _deployment(tmp_path, name, nic=""):
    path = tmp_path / f"{name}.toml"
    path.write_text(DEPLOYMENT.format(name=name, nic=nic))
    return str(path)


def test_deployments_name_their_nic(tmp_path):
    assert Deployment.load(_deployment(tmp_path, "a", 'nic = "model"\n')).nic == "model"
    with pytest.raises(DeploymentError, match="nic = 'mlx5' is not driven yet"):
        Deployment.load(_deployment(tmp_path, "b", 'nic = "mlx5"\n'))
    with pytest.raises(DeploymentError, match="nic must be one of"):
        Deployment.load(_deployment(tmp_path, "c", 'nic = "e1000"\n'))
    shm_with_nic = tmp_path / "d.toml"
    shm_with_nic.write_text(DEPLOYMENT.format(name="d", nic='nic = "model"\n').replace('"ibgda"', '"shm"'))
    with pytest.raises(DeploymentError, match="nic is for the ibgda transport"):
        Deployment.load(str(shm_with_nic))


PROMPTS = ["def parse_args(argv):", "import os\n", "x = 1", "for i in range(len(items)):\n        if"]
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
ENGINE_ARGS = dict(max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def embedded(tiny_checkpoint):
    """The embedded engine's greedy token ids for PROMPTS."""
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as engine:
        return [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_the_engine_over_ibgda_equals_the_embedded_engine(tiny_checkpoint, embedded, tmp_path):
    expected = embedded
    deployment = _deployment(tmp_path, f"ibeng{os.getpid()}")
    with LocalCluster(tiny_checkpoint, deployment, dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            with compiles_once_per_step_shape(engine):
                got = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
            assert isinstance(engine.pool.client_endpoint, ibgda.IbgdaEndpoint)
            stats = engine.pool.client_endpoint.stats()
        shm_name = cluster.shm_name
    assert got == expected
    assert stats["replies_accepted"] > 0 and stats["timeouts"] == 0
    assert not glob.glob(f"/dev/shm/eaas-{shm_name}-*")


# --------------------------------------------------------------------------
# Servers on a second "host": a network namespace joined by a veth pair
# --------------------------------------------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def second_host():
    """A network namespace joined to this one by a veth pair (created here,
    removed after): yields (namespace, this side's address, its address,
    this side's interface)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 to create a network namespace")
    tag = f"{os.getpid() % 100000}{next(_count)}"
    ns, near_if, far_if = f"eaas-ib{tag}", f"eib{tag}a", f"eib{tag}b"
    octet = _free_octet((os.getpid() + int(tag)) % 250 + 1)
    near, far = f"10.231.{octet}.1", f"10.231.{octet}.2"
    try:
        _ip("netns", "add", ns)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode().strip()}")
    try:
        _ip("link", "add", near_if, "type", "veth", "peer", "name", far_if)
        _ip("link", "set", far_if, "netns", ns)
        _ip("addr", "add", f"{near}/30", "dev", near_if)
        _ip("link", "set", near_if, "up")
        _ip("-n", ns, "addr", "add", f"{far}/30", "dev", far_if)
        _ip("-n", ns, "link", "set", far_if, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        yield ns, near, far, near_if, far_if
    finally:
        subprocess.run(["ip", "link", "del", near_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def _free_octet(first: int) -> int:
    """The first X from `first` on (1-250, wrapping) whose 10.231.X.0/30 no
    interface here has: a link another run left behind (killed before its
    cleanup) would otherwise take this one's traffic."""
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
    for step in range(250):
        octet = (first - 1 + step) % 250 + 1
        if f" 10.231.{octet}." not in used:
            return octet
    pytest.skip("every 10.231.X.0/30 test subnet is taken on this host")


def _in_namespace(ns: str, far: str, names: set[str]):
    """A LocalCluster launcher: servers in `names` run in `ns`, their NICs on `far`."""

    def launch(name, command, env):
        if name not in names:
            return command, env
        return ["ip", "netns", "exec", ns, *command], dict(env, EAAS_NIC_HOST=far)

    return launch


def _link_bytes(interface: str) -> int:
    return sum(int(open(f"/sys/class/net/{interface}/statistics/{d}_bytes").read()) for d in ("rx", "tx"))


def test_servers_in_another_network_namespace_serve_through_the_link(tiny_checkpoint, embedded, tmp_path,
                                                                   monkeypatch):
    expected = embedded
    with second_host() as (ns, near, far, near_if, _):
        monkeypatch.setenv("EAAS_NIC_HOST", near)  # the client's NIC, reachable from the namespace
        deployment = _deployment(tmp_path, f"ibns{os.getpid()}")
        with LocalCluster(tiny_checkpoint, deployment, dtype="float32",
                          launcher=_in_namespace(ns, far, {"low", "high"})) as cluster:
            for server in (0, 1):  # their cards name the namespace's address
                entry = ibgda.directory.read_entry(ibgda.directory_path(cluster.shm_name, server))
                assert entry["host"] == far
            before = _link_bytes(near_if)
            with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
                got = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
                stats = engine.pool.client_endpoint.stats()
            crossed = _link_bytes(near_if) - before
    assert got == expected
    # Every message crossed the veth pair: each is at least its 64-byte header.
    messages = stats["requests_sent"] + stats["replies_accepted"]
    assert stats["replies_accepted"] == stats["requests_sent"] > 0
    assert crossed >= 64 * messages


REPLICATED_FAR_NEAR = """name = "{name}"
transport = "ibgda"
timeout_ms = 2000
capacity = 64
[[servers]]
name = "far"
[[servers]]
name = "near"
"""


def test_cutting_the_link_mid_run_fails_over_to_the_replica_on_this_host(tiny_checkpoint, tmp_path, monkeypatch):
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as engine:
        reference = [o.outputs[0].token_ids for o in engine.generate(REQUESTS, PARAMS, use_tqdm=False)]
    with second_host() as (ns, near, far, _, far_if):
        monkeypatch.setenv("EAAS_NIC_HOST", near)
        path = tmp_path / "far-near.toml"
        path.write_text(REPLICATED_FAR_NEAR.format(name=f"ibcut{os.getpid()}"))
        with LocalCluster(tiny_checkpoint, str(path), dtype="float32",
                          launcher=_in_namespace(ns, far, {"far"})) as cluster:
            with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
                cut_at = []

                def cut(steps, finished):
                    if steps == 10:  # mid-run: requests in every stage
                        _ip("-n", ns, "link", "set", far_if, "down")
                        cut_at.append(finished)

                got = run_requests(engine, cut)
                backend = engine.runner.experts
                assert not backend.is_live(0) and backend.is_live(1)
                # One deadline, on the exchange the cut caught (the reply, or the
                # request itself, lost); later steps sent it nothing.
                assert engine.pool.client_endpoint.stats()["timeouts"] == 1
                assert cluster.process("far").poll() is None  # alive, only unreachable
    assert got == reference  # nothing lost, nothing changed
    assert 0 < cut_at[0] < len(REQUESTS)


@pytest.mark.skipif(ETCD is None, reason="needs Debian's etcd-server (.ci/run installs it)")
def test_servers_on_another_host_are_found_through_etcd(tiny_checkpoint, embedded, tmp_path, monkeypatch):
    """`serve-experts --registry --nic-host` in the namespace, etcd on this
    side's address: the cards travel through etcd, not through this host's
    files, and the engine's tokens equal the embedded engine's."""
    name = f"ibetcd{os.getpid()}"
    deployment = _deployment(tmp_path, name)
    with second_host() as (ns, near, far, _, _far_if), running_etcd(tmp_path / "etcd", host=near) as url:
        monkeypatch.setenv("EAAS_NIC_HOST", near)
        servers = [subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "eaas_jax.cli", "serve-experts", "--model",
             tiny_checkpoint, "--deployment", deployment, "--server", server, "--registry", url,
             "--nic-host", far, "--shm-name", name],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{server}.log", "wb"),
            env=dict(os.environ, JAX_PLATFORMS="cpu", EAAS_NIC_HOST="")) for server in ("low", "high")]
        try:
            cluster = RegistryCluster(url, deployment, config=load_config(tiny_checkpoint), wait_s=240)
            try:
                with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
                    got = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
                    cards = EtcdRegistry(url).get_prefix(cards_prefix(name))
                    files = glob.glob(f"/dev/shm/eaas-{name}-*.ibgda")
            finally:
                cluster.close()
        finally:
            for proc in servers:
                proc.terminate()
            for proc in servers:
                proc.wait(timeout=30)
    assert got == embedded
    hosts = {entry["endpoint"]: entry["host"] for entry in cards.values()}
    assert hosts[0] == hosts[1] == far and set(hosts.values()) == {far, near}  # the two servers and the client
    assert files == []  # no card went through this host's files


@pytest.mark.skipif(ETCD is None, reason="needs Debian's etcd-server (.ci/run installs it)")
def test_cards_in_etcd_that_are_not_an_endpoints_object_read_as_none(tmp_path, caplog):
    with running_etcd(tmp_path / "etcd") as url:
        registry = EtcdRegistry(url)
        lease = registry.grant_lease(5)
        mine = RegistryEntries(registry, "cards", 0, lease, refresh_s=0)
        mine.publish({"nonce": "a", "endpoint": 0})
        prefix = cards_prefix("cards")
        put_text(registry, prefix + "1", b"not json")
        registry.put(prefix + "2", [1, 2])  # JSON, not an object
        registry.put(prefix + "x", {"nonce": "b"})  # not an endpoint index
        registry.put(prefix + "3", {"nonce": "c", "endpoint": 3})
        peer = RegistryEntries(registry, "cards", 3, lease, refresh_s=0)
        for _ in range(2):  # warned once per value, not per read
            assert [peer.read(e) for e in (0, 1, 2, 3)] == [{"nonce": "a", "endpoint": 0}, None, None,
                                                            {"nonce": "c", "endpoint": 3}]
        assert len([r for r in caplog.records if "ignoring registry entry" in r.getMessage()]) == 3
        mine.remove()
        assert peer.read(0) is None
        registry.revoke_lease(lease)


@pytest.mark.skipif(ETCD is None, reason="needs Debian's etcd-server (.ci/run installs it)")
def test_a_closing_endpoint_leaves_its_successors_card_alone(tmp_path):
    with running_etcd(tmp_path / "etcd") as url:
        registry = EtcdRegistry(url)
        old_lease, new_lease = registry.grant_lease(5), registry.grant_lease(5)
        old = RegistryEntries(registry, "succ", 1, old_lease, refresh_s=0)
        old.publish({"nonce": "old"})
        new = RegistryEntries(registry, "succ", 1, new_lease, refresh_s=0)
        new.publish({"nonce": "new"})  # endpoint 1 restarted before the old one withdrew
        old.remove()
        assert new.read(1) == {"nonce": "new"}
        RegistryEntries(registry, "succ", 1, old_lease).remove()  # published nothing: removes nothing
        assert new.read(1) == {"nonce": "new"}
        new.remove()
        assert new.read(1) is None


@pytest.mark.parametrize("field, value", [("port", 0), ("port", 70000), ("qpn_base", True), ("link_key", -1),
                                          ("slots_addr", "0x1000"), ("host", 7)])
def test_a_card_with_a_field_out_of_range_is_refused(field, value):
    card = {"host": "127.0.0.1", "port": 4000, "qpn_base": 256, "inbox_rkey": 0x122, "slots_addr": 4096,
            "link_key": 99, "endpoint": 3}
    assert ibgda.Card.from_entry(card).port == 4000
    with pytest.raises(ibgda.IbgdaPeerRefusedError, match="endpoint 3"):
        ibgda.Card.from_entry({**card, field: value})
