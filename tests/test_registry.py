"""etcd discovery with a real etcd server: servers started on their own register
under a lease, an engine given the registry finds them and matches the
embedded engine, and every key and segment is gone after shutdown. etcd with
a user and password, etcd over TLS with client certificates, and registry
entries written by someone hostile."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from eaas_jax.checkpoint.directory import load_config
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.control_plane.server_pool import MEMBERSHIP_CHECK_S
from eaas_jax.control_plane.cluster import RegistryCluster
from eaas_jax.control_plane.deployment import Deployment, DeploymentError
from eaas_jax.control_plane.registry import (ENV_CA_FILE, ENV_CERT_FILE, ENV_KEY_FILE, ENV_PASSWORD,
                                       ENV_PASSWORD_FILE, ENV_USER, EtcdRegistry, Heartbeat, RegistryError,
                                       clients_prefix, servers_prefix, spares_prefix)
from eaas_jax.transport.wire import default_deployment_id

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


class TlsFiles(NamedTuple):
    ca: str
    server_cert: str  # for 127.0.0.1
    server_key: str
    client_cert: str
    client_key: str


def make_certificates(directory) -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it
    signed (openssl, EC keys: fast). The server's may also act as a client:
    etcd's JSON gateway connects to etcd itself with it."""
    def openssl(*args):
        subprocess.run(["openssl", *map(str, args)], cwd=directory, check=True, capture_output=True)

    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=eaas-test-ca", "-days", 1)
    extensions = {"server": ["subjectAltName=IP:127.0.0.1", "extendedKeyUsage=serverAuth,clientAuth"],
                  "client": ["extendedKeyUsage=clientAuth"]}
    for who, lines in extensions.items():
        lines += ["basicConstraints=CA:FALSE", "authorityKeyIdentifier=keyid"]
        (directory / f"{who}.ext").write_text("\n".join(lines) + "\n")
        openssl("req", *new_key, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=eaas-test-{who}")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.crt", "-days", 1, "-extfile", f"{who}.ext")
    return TlsFiles(*(str(directory / name) for name in
                      ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))


@contextlib.contextmanager
def running_etcd(data_dir, *flags: str, tls: TlsFiles | None = None, host: str = "127.0.0.1"):
    """An etcd on `host` (loopback, or a test's veth address; HTTPS requiring
    client certificates with `tls`); yields its registry URL."""
    client, peer = _free_port(), _free_port()
    scheme = "http" if tls is None else "https"
    tls_flags = [] if tls is None else ["--client-cert-auth", "--trusted-ca-file", tls.ca,
                                         "--cert-file", tls.server_cert, "--key-file", tls.server_key]
    proc = subprocess.Popen(
        [ETCD, "--data-dir", str(data_dir),
         "--listen-client-urls", f"{scheme}://{host}:{client}",
         "--advertise-client-urls", f"{scheme}://{host}:{client}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}", *tls_flags, *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"etcd://{host}:{client}" if tls is None else f"etcds://{host}:{client}"
    registry = EtcdRegistry(url) if tls is None else EtcdRegistry(url, ca_file=tls.ca, cert_file=tls.client_cert,
                                                                   key_file=tls.client_key)
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
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    with running_etcd(tmp_path_factory.mktemp("etcd")) as url:
        yield url


def serve_experts(deployment, name: str, etcd: str, shm_name: str, log_dir, *extra: str,
                  env: dict | None = None) -> subprocess.Popen:
    """`eaas-jax serve-experts` for server `name`, registering in `etcd`; its log in log_dir/<name>.log."""
    return subprocess.Popen(
        [sys.executable, "-m", "eaas_jax.cli", "serve-experts", "--model", SHIPPED, "--deployment",
         str(deployment), "--server", name, "--registry", etcd, "--shm-name", shm_name, *extra],
        stdout=subprocess.DEVNULL, stderr=open(log_dir / f"{name}.log", "wb"), env=env,
    )


def registration(shm_name: str, endpoint: int, **changes) -> dict:
    """A valid registry entry of a server on `endpoint`, with `changes`."""
    entry = {"endpoint": endpoint, "shm_name": shm_name, "transport": "shm", "pid": 4242, "host": "elsewhere",
             "hosted": [[0, 1]], "deployment_id": default_deployment_id(shm_name)}
    return entry | changes


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


# ---------------------------------------------------------------- etcd with a user and password

USER, PASSWORD = "eaas-test", "not-on-any-command-line"
TOKEN_TTL_S = 2  # etcd drops a simple token unused this long (--auth-token-ttl)


def etcd_gateway(url: str, path: str, body: dict) -> dict:
    """One request to etcd's JSON gateway, without credentials (to set auth up)."""
    request = urllib.request.Request(url.replace("etcd://", "http://") + "/v3" + path,
                                     data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def enable_auth(url: str) -> None:
    """What `etcdctl user add / role add / role grant-permission --prefix /
    user grant-role / auth enable` do: root, and USER with read and write
    access to the keys under eaas/ only."""
    def b64(text):
        return base64.b64encode(text.encode()).decode()

    for path, body in [
        ("/auth/role/add", {"name": "root"}),
        ("/auth/user/add", {"name": "root", "password": "root-password"}),
        ("/auth/user/grant", {"user": "root", "role": "root"}),
        ("/auth/role/add", {"name": "eaas"}),
        ("/auth/role/grant", {"name": "eaas", "perm": {"permType": "READWRITE", "key": b64("eaas/"),
                                                         "range_end": b64("eaas0")}}),
        ("/auth/user/add", {"name": USER, "password": PASSWORD}),
        ("/auth/user/grant", {"user": USER, "role": "eaas"}),
        ("/auth/enable", {}),
    ]:
        etcd_gateway(url, path, body)


@pytest.fixture(scope="module")
def etcd_with_auth(tmp_path_factory):
    with running_etcd(tmp_path_factory.mktemp("etcd-auth"), "--auth-token-ttl", str(TOKEN_TTL_S)) as url:
        enable_auth(url)
        yield url


class AuthenticatedDeployment(NamedTuple):
    url: str
    deployment: str
    shm_name: str
    servers: dict  # name -> Popen
    engine: Engine
    log_dir: Path


@pytest.fixture(scope="module")
def authenticated(etcd_with_auth, tmp_path_factory):
    """The servers of tiny-moe-2-servers.toml (with a spare endpoint) and an
    engine, all given the user and password through the environment only: the
    servers the password file, the engine the password."""
    log_dir = tmp_path_factory.mktemp("auth-servers")
    password_file = log_dir / "etcd-password"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)
    deployment = log_dir / "tiny-moe-spare.toml"
    deployment.write_text("spare_endpoints = 1\n" + open(DEPLOYMENT).read())
    shm_name = f"etcdauth-{os.getpid()}"
    env = dict(os.environ, **{ENV_USER: USER, ENV_PASSWORD_FILE: str(password_file)})
    servers = {name: serve_experts(deployment, name, etcd_with_auth, shm_name, log_dir, env=env)
               for name in ("experts-even", "experts-odd")}
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(ENV_USER, USER)
            mp.setenv(ENV_PASSWORD, PASSWORD)
            engine = Engine(SHIPPED, deployment=str(deployment), registry=etcd_with_auth, **ENGINE_ARGS)
        with engine:
            yield AuthenticatedDeployment(etcd_with_auth, str(deployment), shm_name, servers, engine, log_dir)
    finally:
        for p in servers.values():
            if p.poll() is None:
                p.terminate()
        for p in servers.values():
            p.wait(timeout=30)


def test_engine_finds_servers_in_etcd_with_authentication(authenticated, expected):
    registry = EtcdRegistry(authenticated.url, user=USER, password=PASSWORD)
    entries = registry.get_prefix(servers_prefix("tiny-moe"))
    assert {e["pid"] for e in entries.values()} == {p.pid for p in authenticated.servers.values()}
    assert {e["deployment_id"] for e in entries.values()} == {default_deployment_id(authenticated.shm_name)}
    assert len(registry.get_prefix(clients_prefix("tiny-moe"))) == 1  # the engine's slot
    assert generated(authenticated.engine) == expected


def test_an_expired_token_is_renewed(etcd_with_auth):
    registry = EtcdRegistry(etcd_with_auth, user=USER, password=PASSWORD)
    registry.put("eaas/t-token/x", {"a": 1})
    time.sleep(TOKEN_TTL_S + 1.5)  # unused that long, etcd drops the token
    assert registry.get_prefix("eaas/t-token/") == {"eaas/t-token/x": {"a": 1}}
    registry.delete("eaas/t-token/x")


def test_wrong_or_missing_credentials_are_clear_errors(etcd_with_auth, monkeypatch):
    for user, password in ((USER, "wrong-password"), ("nobody", PASSWORD)):
        with pytest.raises(RegistryError, match=f"refused user '{user}': wrong password or no such user") as e:
            EtcdRegistry(etcd_with_auth, user=user, password=password).get_prefix("eaas/")
        assert password not in str(e.value)
    with pytest.raises(RegistryError, match=f"requires authentication but no user was given: set {ENV_USER}"):
        EtcdRegistry(etcd_with_auth).get_prefix("eaas/")
    with pytest.raises(RegistryError, match=f"refused /kv/range to user '{USER}': permission denied"):
        EtcdRegistry(etcd_with_auth, user=USER, password=PASSWORD).get_prefix("elsewhere/")
    monkeypatch.setenv(ENV_USER, USER)
    with pytest.raises(RegistryError, match="needs both a user .* only the user was given"):
        EtcdRegistry(etcd_with_auth)
    monkeypatch.setenv(ENV_PASSWORD_FILE, "/nonexistent/etcd-password")
    with pytest.raises(RegistryError, match="cannot read the etcd password file /nonexistent/etcd-password"):
        EtcdRegistry(etcd_with_auth)


def put_text(registry: EtcdRegistry, key: str, value: bytes) -> None:
    """Writes `value` as it is (`put` writes only JSON)."""
    registry._call("/kv/put", {"key": base64.b64encode(key.encode()).decode(),
                               "value": base64.b64encode(value).decode()})


def test_hostile_registry_entries_are_ignored(authenticated, expected, caplog):
    """Entries of servers not in the file, each wrong in one way, are each
    warned of once and never used; the engine keeps serving with its servers."""
    caplog.set_level(logging.WARNING, logger="eaas_jax.control_plane.registry")
    caplog.set_level(logging.WARNING, logger="eaas_jax.control_plane.cluster")
    shm_name = authenticated.shm_name
    hostile = {
        "endpoint-a-string": registration(shm_name, "2"),
        "endpoint-out-of-range": registration(shm_name, 9),
        "endpoint-of-a-listed-server": registration(shm_name, 0),
        "unknown-transport": registration(shm_name, 2, transport="carrier-pigeon"),
        "other-transport": registration(shm_name, 2, transport="cuda_ipc"),
        "wrong-deployment-id": registration(shm_name, 2, deployment_id=default_deployment_id(shm_name) ^ 1),
        "other-shm-name": registration("elsewhere", 2),
        "shm-name-a-path": registration("../../dev/shm/x", 2),
        "hosted-outside-the-model": registration(shm_name, 2, hosted=[[0, 1], [3, 0]]),  # 3 MoE layers
        "hosted-empty": registration(shm_name, 2, hosted=[]),
        "hosted-not-pairs": registration(shm_name, 2, hosted=[[0, 1, 2]]),
        "pid-negative": registration(shm_name, 2, pid=-1),
        "pid-a-bool": registration(shm_name, 2, pid=True),
        "host-a-number": registration(shm_name, 2, host=5),
        "a\nforged log line": registration(shm_name, 2),
    }
    garbage = {"not-json": b"{oops", "not-an-object": b"[1, 2]", "nested-too-deep": b"[" * 100_000,
               "not-utf8": b"\xff\xfe"}
    registry = EtcdRegistry(authenticated.url, user=USER, password=PASSWORD)
    prefix = servers_prefix("tiny-moe")
    engine, cluster = authenticated.engine, authenticated.engine.cluster
    # Valid in itself, but on a spare endpoint it never claimed (no claim key).
    squatter = registration(shm_name, 2, hosted=[[0, 1], [1, 2]])
    try:
        for name, entry in hostile.items():
            registry.put(prefix + name, entry)
        for name, value in garbage.items():
            put_text(registry, prefix + name, value)
        registry.put(prefix + "squatter", squatter)
        time.sleep(2.5 + MEMBERSHIP_CHECK_S)  # the cluster polls twice or more, then a step boundary
        assert generated(engine) == expected
        assert cluster._poller.is_alive()
        assert cluster.servers_up().keys() == {0, 1} and cluster.joined_servers() == {}
        assert not engine.runner.experts.is_live(2)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        for name in [*hostile, *garbage]:
            assert len([w for w in warnings if w.startswith(f"ignoring registry entry {prefix + name!r}:")]) == 1, name
        assert "(layer 3, expert 0) is outside the model's 3 MoE layers x 8 experts" in "\n".join(warnings)
        assert "transport 'carrier-pigeon' is not one of ['shm', 'cuda_ipc', 'ibgda']" in "\n".join(warnings)
        assert "not-json': its value is not JSON" in "\n".join(warnings)
        assert not any("\nforged" in w for w in warnings)
        unclaimed = [r.getMessage() for r in caplog.records if "'squatter'" in r.getMessage()]
        assert unclaimed == ["ignoring registry entry of server 'squatter': spare endpoint 2 is claimed by nobody"]
    finally:
        registry.delete(prefix + "squatter")
        for name in [*hostile, *garbage]:
            registry.delete(prefix + name)


# A client process of the authenticated deployment: prints its endpoint, then
# the greedy token ids of PROMPTS, one batch per line.
CLIENT = """
import json, sys
from eaas_jax.engine import Engine, SamplingParams
model, deployment, registry, batches = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
engine = Engine(model, deployment=deployment, registry=registry, max_num_seqs=4, max_model_len=64, dtype="float32")
print(json.dumps({"endpoint": engine.runner.experts.endpoint.endpoint}), flush=True)
params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
for _ in range(batches):
    outputs = engine.generate(%r, params, use_tqdm=False)
    print(json.dumps([o.outputs[0].token_ids for o in outputs]), flush=True)
engine.shutdown()
""" % (PROMPTS,)


def test_a_client_killed_and_restarted_on_its_endpoint_gets_replies_again(authenticated, expected, tmp_path):
    """A client process killed mid-run (SIGKILL: its inbox stays, its servers
    keep mapping it) and started again on the same endpoint: its new inbox
    reclaims the old one, and the servers must send their replies there."""
    env = dict(os.environ, **{ENV_USER: USER, ENV_PASSWORD: PASSWORD})

    def client(name: str, batches: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", CLIENT, SHIPPED, authenticated.deployment, authenticated.url,
                                 str(batches)], stdout=subprocess.PIPE, stderr=open(tmp_path / f"{name}.log", "wb"),
                                text=True, env=env)

    def read_line(proc: subprocess.Popen, name: str):
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=30)
            pytest.fail(f"the {name} client exited ({proc.returncode}): {(tmp_path / f'{name}.log').read_text()[-3000:]}")
        return json.loads(line)

    first = client("first", 1000)
    try:
        endpoint = read_line(first, "first")["endpoint"]
        for _ in range(2):
            assert read_line(first, "first") == expected
    finally:
        first.kill()
        first.wait()
    assert os.path.exists(f"/dev/shm/eaas-{authenticated.shm_name}-{endpoint}")  # left behind
    # Its slot frees when its lease expires; the next client then gets it back.
    registry = EtcdRegistry(authenticated.url, user=USER, password=PASSWORD)
    slot_key = clients_prefix("tiny-moe") + str(endpoint - Deployment.load(authenticated.deployment).num_server_endpoints)
    deadline = time.monotonic() + 30
    while slot_key in registry.get_prefix(clients_prefix("tiny-moe")):
        assert time.monotonic() < deadline, "the killed client's lease did not expire"
        time.sleep(0.2)
    second = client("second", 3)
    try:
        assert read_line(second, "second")["endpoint"] == endpoint
        for _ in range(3):
            assert read_line(second, "second") == expected
        assert second.wait(timeout=60) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert generated(authenticated.engine) == expected  # the other client was never disturbed


def test_engine_and_servers_leave_nothing_behind(authenticated):
    """(Ends the authenticated deployment: last of its tests.)"""
    registry = EtcdRegistry(authenticated.url, user=USER, password=PASSWORD)
    authenticated.engine.shutdown()
    assert registry.get_prefix(clients_prefix("tiny-moe")) == {}  # slot released
    for p in authenticated.servers.values():
        p.terminate()
    codes = [p.wait(timeout=30) for p in authenticated.servers.values()]
    logs = [(authenticated.log_dir / f"{name}.log").read_text()[-2000:] for name in authenticated.servers]
    assert codes == [0, 0], logs
    assert registry.get_prefix("eaas/tiny-moe/") == {}  # leases revoked on the way out
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{authenticated.shm_name}-")]
    assert not any(PASSWORD in log for log in logs)


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
            def hanging_get_prefix_text(prefix):
                time.sleep(2.0)
                raise RegistryError("etcd did not answer")

            engine.cluster.registry.get_prefix_text = hanging_get_prefix_text
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


# ---------------------------------------------------------------- etcd over TLS with client certificates

@pytest.fixture(scope="module")
def etcd_with_tls(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make certificates")
    tls = make_certificates(tmp_path_factory.mktemp("tls"))
    with running_etcd(tmp_path_factory.mktemp("etcd-tls"), tls=tls) as url:
        yield url, tls


def test_registry_over_tls_with_a_client_certificate(etcd_with_tls, tmp_path, monkeypatch):
    url, tls = etcd_with_tls
    registry = EtcdRegistry(url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.client_key)
    lease = registry.grant_lease(5)
    registry.put("eaas/t-tls/x", {"a": 1}, lease=lease)
    assert registry.create("eaas/t-tls/y", {"b": 2}, lease=lease)
    assert not registry.create("eaas/t-tls/y", {"b": 3})
    assert registry.keep_alive(lease)
    monkeypatch.setenv(ENV_CA_FILE, tls.ca)  # the same files through the environment
    monkeypatch.setenv(ENV_CERT_FILE, tls.client_cert)
    monkeypatch.setenv(ENV_KEY_FILE, tls.client_key)
    assert EtcdRegistry(url).get_prefix("eaas/t-tls/") == {"eaas/t-tls/x": {"a": 1}, "eaas/t-tls/y": {"b": 2}}
    registry.revoke_lease(lease)
    assert registry.get_prefix("eaas/t-tls/") == {}

    with pytest.raises(RegistryError, match="is plain HTTP: use etcds://"):
        EtcdRegistry(url.replace("etcds://", "etcd://"))
    monkeypatch.delenv(ENV_CERT_FILE)
    monkeypatch.delenv(ENV_KEY_FILE)
    with pytest.raises(RegistryError, match=rf"TLS handshake with etcd at {url} failed .*; no client certificate "
                                            rf"was given \({ENV_CERT_FILE}, {ENV_KEY_FILE}\): does etcd require one"):
        EtcdRegistry(url).get_prefix("eaas/")
    monkeypatch.delenv(ENV_CA_FILE)
    with pytest.raises(RegistryError, match="presented a certificate that does not verify against the system's CAs"):
        EtcdRegistry(url, cert_file=tls.client_cert, key_file=tls.client_key).get_prefix("eaas/")
    missing = str(tmp_path / "missing.crt")
    with pytest.raises(RegistryError, match=f"etcd client certificate file {missing} does not exist"):
        EtcdRegistry(url, ca_file=tls.ca, cert_file=missing, key_file=tls.client_key)
    with pytest.raises(RegistryError, match=f"cannot load the etcd client certificate {tls.client_cert} with key "
                                            f"{tls.server_key}"):
        EtcdRegistry(url, ca_file=tls.ca, cert_file=tls.client_cert, key_file=tls.server_key)


# ---------------------------------------------------------------- registrations and client slots

ONE_CLIENT = 'name = "slots"\nmax_clients = 1\n[[servers]]\nname = "s0"\nexperts = ["0-7"]\n'


@pytest.fixture
def one_client_deployment(etcd, tmp_path):
    """A deployment with one server, s0, and one client slot; s0's entry is
    the test's to write (no server process is needed to claim slots)."""
    path = tmp_path / "slots.toml"
    path.write_text(ONE_CLIENT)
    registry = EtcdRegistry(etcd)
    yield str(path), registry
    for prefix in (servers_prefix("slots"), clients_prefix("slots")):
        for key in registry.get_prefix(prefix):
            registry.delete(key)


def test_a_server_whose_entry_is_invalid_counts_as_not_registered(etcd, one_client_deployment):
    path, registry = one_client_deployment
    registry.put(servers_prefix("slots") + "s0", registration("slots", 1))  # the file puts s0 at 0
    with pytest.raises(RegistryError, match=r"expert servers \['s0'\] of deployment 'slots' did not register .*"
                                            r"'s0' ignored: endpoint 1 is not 0, where"):
        RegistryCluster(etcd, path, config=load_config(SHIPPED), wait_s=0.5)


def test_claim_client_waits_for_a_slot_to_free(etcd, one_client_deployment, caplog):
    """A crashed client's slot is taken until its lease expires; a client
    started meanwhile waits for it (saying so once) instead of failing."""
    path, registry = one_client_deployment
    registry.put(servers_prefix("slots") + "s0", registration("slots", 0))
    crashed = registry.grant_lease(1)  # nobody keeps it alive
    assert registry.create(clients_prefix("slots") + "0", {"pid": 1}, lease=crashed)
    config = load_config(SHIPPED)
    clusters = [RegistryCluster(etcd, path, config=config, wait_s=wait_s) for wait_s in (15, 1, 15)]
    try:
        started = time.monotonic()
        endpoint = clusters[0].claim_client()
        assert endpoint == clusters[0].deployment.client_endpoint(0)
        assert time.monotonic() - started > 0.5  # it did wait
        waits = [r for r in caplog.records if "waiting for a free client slot" in r.getMessage()]
        assert len(waits) == 1
        with pytest.raises(DeploymentError, match=r"every client slot \(1\) of deployment 'slots' is taken .* "
                                                  r"none freed within 1 s"):
            clusters[1].claim_client()
        threading.Timer(0.5, clusters[0].release_client, [endpoint]).start()  # revokes its lease
        assert clusters[2].claim_client() == endpoint
    finally:
        for cluster in clusters:
            cluster.close()
