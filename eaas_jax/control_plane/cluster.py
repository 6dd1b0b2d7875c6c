"""Where an engine's expert servers come from.

* `LocalCluster`: the engine starts one `eaas-jax serve-experts` process per
  server of a deployment file on this host, waits until each says "ready",
  and on `close()` stops them and removes every shared-memory segment of the
  deployment, whatever state they were left in, and the servers' log
  directory (unless asked to keep it). Several engines of one process can
  share it (each claims a client slot). Its servers die with the process that
  started them, even while still starting up: each watches its stdin, a pipe
  whose only writer is this process.
* `RegistryCluster`: servers started elsewhere registered themselves in etcd;
  the engine waits for every server the deployment names, and claims a client
  slot there (a key under its own lease, so a crashed client frees its slot).

Both give the engine: the `deployment`, the shm name of the segments, client
slots, which servers are up (`servers_up`), the servers that joined on spare
endpoints and what they host (`joined_servers`), and `describe_server(endpoint)`
for error messages.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import os
import reprlib
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from typing import NamedTuple

import jax

from eaas_jax.checkpoint.directory import load_config
from eaas_jax.model.config import ModelConfig
from eaas_jax.control_plane.deployment import NAME, Deployment, DeploymentError, ServerSpec
from eaas_jax.control_plane.registry import (
    EtcdRegistry,
    Heartbeat,
    RegistryEntries,
    RegistryError,
    ServerRegistrations,
    clients_prefix,
    spares_prefix,
    wait_for_servers,
)
from eaas_jax.transport import backends
from eaas_jax.transport.wire import default_deployment_id

log = logging.getLogger(__name__)


def _local_gpu_count() -> int:
    return len(jax.devices("gpu")) if jax.default_backend() == "gpu" else 1


class ExpertServerStartError(RuntimeError):
    """An expert server process could not be started."""


def _index_text(values: tuple[int, ...] | None) -> str:
    """A ServerSpec's layers / experts as `serve-experts` takes them."""
    return "all" if values is None else ",".join(map(str, values))


def _is_index(value) -> bool:
    """Whether a JSON value is a non-negative integer (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0



def _hosted_pairs(value, config: ModelConfig | None) -> tuple[tuple[int, int], ...]:
    """A registry entry's hosted list as (MoE layer, expert) pairs; ValueError
    saying what is wrong unless it is a non-empty list of [layer, expert]
    (inside the model when its `config` is given)."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"hosted {reprlib.repr(value)} is not a non-empty list of [layer, expert] pairs")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2 and all(map(_is_index, pair))):
            raise ValueError(f"hosted pair {reprlib.repr(pair)} is not [layer, expert]")
        layer, expert = pair
        if config is not None and not (layer < config.num_moe_layers and expert < config.num_experts):
            raise ValueError(f"hosted (layer {layer}, expert {expert}) is outside the model's "
                             f"{config.num_moe_layers} MoE layers x {config.num_experts} experts")
        pairs.append((layer, expert))
    return tuple(pairs)


class JoinedServer(NamedTuple):
    """A server that is not in the deployment file, up on a spare endpoint."""

    name: str
    hosted: tuple[tuple[int, int], ...]  # its (MoE layer, expert) pairs


class _Slots:
    """Client slots of one process, handed out and returned thread-safely."""

    def __init__(self, count: int):
        self._free = list(range(count))
        self._lock = threading.Lock()

    def claim(self) -> int:
        with self._lock:
            if not self._free:
                raise DeploymentError("every client slot of the deployment is taken (raise max_clients)")
            return self._free.pop(0)

    def release(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)
            self._free.sort()


def _close_pipes(proc: subprocess.Popen) -> None:
    """Closes our ends of a server's stdin (telling a live one to stop) and stdout."""
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _reap(proc: subprocess.Popen, timeout: float) -> int:
    """Waits for a terminated process, SIGKILLing it after `timeout` s; its exit code."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


#: Set to 1 to keep a LocalCluster's server logs after it closes (the default
#: of its `keep_logs`).
KEEP_LOGS_ENV_VAR = "EAAS_JAX_KEEP_SERVER_LOGS"


class LocalCluster:
    """Expert-server processes of `deployment` (a file, or a `Deployment`
    loaded from one: the servers load that file) for `model_path`, on this host.

    Args:
      startup_timeout: seconds each server may take to load, compile and answer.
      dtype: the experts' dtype name ('float32' or 'bfloat16').
      keep_logs: keep the servers' log directory (`log_dir`, private to this
        cluster) when it closes; default: whether $EAAS_JAX_KEEP_SERVER_LOGS
        is 1. Either way, the end of the log of a server that failed is
        logged as a warning on close.
      launcher: how a server process is started: called with the server's
        name, its command line and its environment, returns the command line
        and environment to run (e.g. under ``numactl``, or in a network
        namespace with ``ip netns exec``); default: as they are.
    """

    def __init__(self, model_path: str, deployment: Deployment | str, *, dtype: str = "float32",
                 startup_timeout: float = 300.0, keep_logs: bool | None = None,
                 launcher: Callable[[str, list[str], dict[str, str]], tuple[list[str], dict[str, str]]] | None = None):
        self.deployment = Deployment.of(deployment)
        if not os.path.isfile(self.deployment.source):  # the servers load the file themselves
            raise DeploymentError(f"a LocalCluster starts its servers from a deployment file, but this deployment "
                                  f"was not loaded from one (source {self.deployment.source!r})")
        # A unique name per cluster: two clusters on one host never share segments.
        self.shm_name = f"{self.deployment.name[:24]}-{uuid.uuid4().hex[:12]}"
        self.log_dir = tempfile.mkdtemp(prefix=f"eaas-{self.shm_name}-")  # mode 0700
        self.keep_logs = os.environ.get(KEEP_LOGS_ENV_VAR) == "1" if keep_logs is None else keep_logs
        self._slots = _Slots(self.deployment.max_clients)
        self._spawn_args = (model_path, self.deployment.source, dtype)  # servers load the file themselves
        self._launcher = launcher
        self._config = load_config(model_path)
        # Per server endpoint (the file's, then the spare ones): its latest
        # process, None while never started (standby, unused spare).
        self._procs: list[subprocess.Popen | None] = [None] * self.deployment.num_server_endpoints
        # Per endpoint: the process id of its server once it said "ready".
        # Only those count as up: a server still starting would miss its
        # first exchanges.
        self._ready: dict[int, int] = {}
        self._joined: dict[int, ServerSpec] = {}  # spare endpoint -> the server added there last
        self._closed = False
        atexit.register(self.close)
        if self.deployment.backend.one_process_per_gpu:
            self._warn_of_replicas_on_one_gpu()
        try:
            started = [self.deployment.servers[i].name for i in self.deployment.started_servers]
            for name in started:
                endpoint = self.deployment.server_endpoint(name)
                self._procs[endpoint] = self._spawn(endpoint)
            for name in started:
                self._wait_ready(self.deployment.server_endpoint(name), startup_timeout)
        except BaseException:
            self.close()
            raise
        log.info("started %d expert servers (%s); logs in %s", len(started), self.shm_name, self.log_dir)

    def _log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    def _spawn(self, endpoint: int) -> subprocess.Popen:
        model_path, deployment_path, dtype = self._spawn_args
        spec = self._spec(endpoint)
        command = [
            sys.executable, "-m", "eaas_jax.cli", "--verbose", "serve-experts",
            "--model", os.fspath(model_path), "--deployment", os.fspath(deployment_path),
            "--server", spec.name, "--shm-name", self.shm_name, "--dtype", dtype, "--exit-with-parent",
        ]
        if endpoint in self.deployment.spare_range:
            command += ["--endpoint", str(endpoint), "--layers", _index_text(spec.layers),
                        "--experts", _index_text(spec.experts)]
        if self.deployment.backend.one_process_per_gpu:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=self._gpu_of(endpoint))
            env.pop("JAX_PLATFORMS", None)
        else:
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        if self._launcher is not None:
            command, env = self._launcher(spec.name, command, env)
        # stdin: a pipe only this process writes to; it closes when this
        # process dies, however it dies, and the server then exits
        # (--exit-with-parent), even before it is ready.
        with open(self._log_path(spec.name), "ab") as log_file:  # a restarted server appends
            return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file,
                                    stdin=subprocess.PIPE, env=env)

    def _gpu_of(self, endpoint: int) -> str:
        """The GPU of the server on `endpoint` (one per process):
        its `device`, else the GPU after the client's (0), round robin over
        what this host has."""
        device = self._spec(endpoint).device
        if device is not None:
            return str(device)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(_local_gpu_count())]
        return gpus[(endpoint + 1) % len(gpus)]

    def _warn_of_replicas_on_one_gpu(self) -> None:
        for gpu, pairs in self.deployment.replicas_on_one_gpu(self._config, self._gpu_of).items():
            layer, expert = pairs[0]
            log.warning("%s: %d (MoE layer, expert) pairs, e.g. (layer %d, expert %d), have every replica on "
                        "GPU %s: a fault of that GPU loses them all (under MPS, so can one killed server); "
                        "place replicas on different GPUs", self.deployment.source, len(pairs), layer, expert, gpu)

    def _log_tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(self._log_path(name), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _wait_ready(self, endpoint: int, timeout: float) -> None:
        """Waits for the "ready" line of the server on `endpoint`; from then on
        it counts as up (`servers_up`)."""
        name, proc = self._spec(endpoint).name, self._procs[endpoint]
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ExpertServerStartError(
                        f"expert server {name!r} was not ready within {timeout:.0f} s; its log "
                        f"({self._log_path(name)}) ends:\n{self._log_tail(name)}"
                    )
                if sel.select(timeout=min(left, 0.5)):
                    line = proc.stdout.readline()
                    if line.strip() == b"ready":
                        self._ready[endpoint] = proc.pid
                        return
                    if not line:  # stdout closed: the process is gone
                        proc.wait(timeout=10)
                        raise ExpertServerStartError(
                            f"expert server {name!r} exited with code {proc.returncode} while "
                            f"starting; its log ends:\n{self._log_tail(name)}"
                        )

    # -------------------------------------------------------------- engine API

    def claim_client(self) -> int:
        return self.deployment.client_endpoint(self._slots.claim())

    def endpoint_entries(self, endpoint: int) -> None:
        return None  # every endpoint is on this host: the transport's own directory

    def release_client(self, endpoint: int) -> None:
        self._slots.release(endpoint - self.deployment.num_server_endpoints)

    def _spec(self, endpoint: int) -> ServerSpec:
        if endpoint in self.deployment.spare_range:
            return self._joined[endpoint]
        return self.deployment.servers[endpoint]

    def endpoint_of(self, name: str) -> int:
        """The endpoint of server `name`: the file's, or the spare one it was added on."""
        for endpoint, spec in self._joined.items():
            if spec.name == name:
                return endpoint
        return self.deployment.server_endpoint(name)

    def process(self, name: str) -> subprocess.Popen | None:
        """Server `name`'s latest process; None if it was never started."""
        return self._procs[self.endpoint_of(name)]

    def _running(self) -> dict[int, int]:
        """Endpoint -> process id of every server whose process is running (ready or not)."""
        return {endpoint: proc.pid for endpoint, proc in enumerate(self._procs)
                if proc is not None and proc.poll() is None}

    def servers_up(self) -> dict[int, int]:
        """Endpoint -> process id of every server whose process is running and
        said it is ready (a restarted server is up under a new id once ready)."""
        return {endpoint: pid for endpoint, pid in self._running().items() if self._ready.get(endpoint) == pid}

    def joined_servers(self) -> dict[int, JoinedServer]:
        """Spare endpoint -> the server added there, of those running."""
        running = self._running()
        return {endpoint: JoinedServer(spec.name, tuple(spec.hosted(self._config)))
                for endpoint, spec in self._joined.items() if endpoint in running}

    def start_server(self, name: str, timeout: float = 300.0) -> None:
        """Starts server `name` (a standby one, or one that exited) and waits
        until it serves; engines admit it at their next step boundary."""
        proc = self.process(name)
        if proc is not None and proc.poll() is None:
            raise ValueError(f"expert server {name!r} is already running (process {proc.pid})")
        if proc is not None:
            _close_pipes(proc)
        endpoint = self.endpoint_of(name)
        self._procs[endpoint] = proc = self._spawn(endpoint)
        self._wait_ready(endpoint, timeout)
        log.info("started expert server %r (process %d)", name, proc.pid)

    def add_server(self, name: str, *, layers="all", experts="all", device: int | None = None,
                   timeout: float = 300.0) -> int:
        """Starts a server that is not in the deployment file, hosting `layers`
        x `experts` (the file's syntax: "all", or a list of indices and ranges
        like "0-3"), on the first spare endpoint whose server is not running;
        waits until it serves and returns the endpoint. Engines add it to
        their routing tables at their next step boundary."""
        spec = self.deployment.joining_server(name, layers, experts)
        self.deployment.check_server(spec, self._config)
        if device is not None:
            spec = dataclasses.replace(spec, device=device)
        running = self._running()
        if any(s.name == name and e in running for e, s in self._joined.items()):
            raise ValueError(f"expert server {name!r} is already running")
        free = [e for e in self.deployment.spare_range if e not in running]
        if not free:
            raise DeploymentError(f"every spare endpoint of deployment {self.deployment.name!r} "
                                  f"({self.deployment.spare_endpoints}) has a running server")
        endpoint = free[0]
        if self._procs[endpoint] is not None:
            _close_pipes(self._procs[endpoint])
        self._joined[endpoint] = spec
        self._procs[endpoint] = proc = self._spawn(endpoint)
        self._wait_ready(endpoint, timeout)
        log.info("added expert server %r on spare endpoint %d (process %d)", name, endpoint, proc.pid)
        return endpoint

    def stop_server(self, name: str, timeout: float = 10.0) -> int | None:
        """Stops one server (SIGTERM: it finishes its round and closes its
        mailbox; SIGKILL after `timeout` s); returns its exit code (None if it
        never ran)."""
        proc = self.process(name)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
        return _reap(proc, timeout)

    def describe_server(self, endpoint: int) -> str:
        if endpoint in self.deployment.spare_range and endpoint not in self._joined:
            return f"spare endpoint {endpoint} (no server added there)"
        spec = self._spec(endpoint)
        proc = self._procs[endpoint]
        if proc is None:
            state = "not started (standby)"
        elif proc.poll() is None:
            state = f"process {proc.pid} still running"
        elif proc.returncode < 0:
            state = f"process {proc.pid} was killed by {signal.Signals(-proc.returncode).name}"
        else:
            state = f"process {proc.pid} exited with code {proc.returncode}"
        return f"expert server {spec.name!r} (endpoint {endpoint}; {state}; log {self._log_path(spec.name)})"

    def close(self) -> None:
        """Stops every server (SIGTERM, then SIGKILL after 10 s), unlinks
        every segment of the deployment and removes the log directory unless
        `keep_logs` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        procs = [p for p in self._procs if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            _reap(proc, 10.0)
            _close_pipes(proc)
        # Servers that were killed could not unlink their inboxes.
        for path in self.deployment.endpoint_paths(self.shm_name):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._report_failed_servers()
        if self.keep_logs:
            log.info("expert server logs kept in %s", self.log_dir)
        else:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def _report_failed_servers(self) -> None:
        """Logs the end of the log of every server whose latest process did
        not exit as asked (its log may be removed next)."""
        for endpoint, proc in enumerate(self._procs):
            if proc is not None and proc.returncode not in (0, -signal.SIGTERM):
                name = self._spec(endpoint).name
                log.warning("%s; its log ends:\n%s", self.describe_server(endpoint), self._log_tail(name))

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RegistryCluster:
    """The expert servers of `deployment` (a file or a `Deployment`) as registered in etcd at `registry`
    (`etcd://HOST:PORT`, `etcds://HOST:PORT`, or an `EtcdRegistry` set up with
    credentials).

    Which servers are up is read from etcd by a background thread every
    `membership_poll_s`: engines ask at step boundaries, and a slow or
    unreachable etcd must not stall a step (a request waits up to the
    registry client's 5 s timeout). Every server entry is checked before use
    (`_entry_problem`; the hosted experts against the model when its `config`
    is given): an invalid one is ignored with a warning, as if that server had
    not registered. `wait_s`: how long to wait for the deployment's servers to
    register, and for a free client slot."""

    def __init__(self, registry: str | EtcdRegistry, deployment: Deployment | str, *,
                 config: ModelConfig | None = None, wait_s: float = 60.0, lease_ttl_s: int = 5,
                 membership_poll_s: float = 1.0):
        self.deployment = Deployment.of(deployment)
        self.registry = registry if isinstance(registry, EtcdRegistry) else EtcdRegistry(registry)
        self._config = config
        self._listed = {s.name for s in self.deployment.servers}
        self.shm_name: str | None = None  # the started servers' one, once they registered
        self._registrations = ServerRegistrations(self.registry, self.deployment.name, self._entry_problem)
        self._unclaimed_warned: set[tuple] = set()
        started = [self.deployment.servers[i].name for i in self.deployment.started_servers]
        self.entries = wait_for_servers(self._registrations, started, wait_s)
        shm_names = {self.entries[name]["shm_name"] for name in started}
        if len(shm_names) != 1:
            raise RegistryError(f"servers of {self.deployment.name!r} disagree on the shm name: {shm_names}")
        self.shm_name = shm_names.pop()
        self._wait_s = wait_s
        self._lease_ttl_s = lease_ttl_s
        self._heartbeats: dict[int, Heartbeat] = {}
        # (servers up, joined servers, None) or (None, None, the RegistryError)
        # of the latest poll; replaced whole, so readers need no lock.
        self._membership = self._poll_servers_up()
        self._closed = threading.Event()
        self._poller = threading.Thread(target=self._follow_registry, args=(membership_poll_s,),
                                        name="eaas-registry-membership", daemon=True)
        self._poller.start()

    def _entry_problem(self, name: str, entry) -> str | None:
        """What is wrong with server `name`'s registry entry, None if nothing.
        Anyone allowed to write the registry wrote it, so every field is
        checked: a bad endpoint, transport or hosted list would send tokens
        to the wrong mailbox or index past the routing table."""
        if not NAME.fullmatch(name):
            return "the server name is not 1-40 characters of A-Z, a-z, 0-9, _ and -"
        if not isinstance(entry, dict):
            return f"its value {reprlib.repr(entry)} is not a JSON object"
        problems = [self._endpoint_problem(name, entry.get("endpoint")),
                    self._shm_name_problem(entry.get("shm_name"), entry.get("deployment_id"))]
        transport = entry.get("transport")
        if transport not in backends.names():
            problems.append(f"transport {reprlib.repr(transport)} is not one of {list(backends.names())}")
        elif transport != self.deployment.transport:
            problems.append(f"transport {transport!r} is not the deployment's {self.deployment.transport!r}")
        pid = entry.get("pid")
        if not _is_index(pid) or pid == 0:
            problems.append(f"pid {reprlib.repr(pid)} is not a positive integer")
        if not isinstance(entry.get("host"), str):
            problems.append(f"host {reprlib.repr(entry.get('host'))} is not a string")
        try:
            _hosted_pairs(entry.get("hosted"), self._config)
        except ValueError as e:
            problems.append(str(e))
        return "; ".join(p for p in problems if p) or None

    def _endpoint_problem(self, name: str, endpoint) -> str | None:
        """A listed server must be on the file's endpoint, any other on a spare one."""
        if name in self._listed:
            want = self.deployment.server_endpoint(name)
            if _is_index(endpoint) and endpoint == want:
                return None
            return f"endpoint {reprlib.repr(endpoint)} is not {want}, where {self.deployment.source} puts it"
        if _is_index(endpoint) and endpoint in self.deployment.spare_range:
            return None
        return (f"endpoint {reprlib.repr(endpoint)} of a server not in {self.deployment.source} is not one of "
                f"its spare endpoints {list(self.deployment.spare_range)}")

    def _shm_name_problem(self, shm_name, deployment_id) -> str | None:
        """The shm name must be a valid one (the started servers' once known),
        and the deployment id the one of that name."""
        if not (isinstance(shm_name, str) and NAME.fullmatch(shm_name)):
            return f"shm_name {reprlib.repr(shm_name)} is not 1-40 characters of A-Z, a-z, 0-9, _ and -"
        if self.shm_name is not None and shm_name != self.shm_name:
            return f"shm_name {shm_name!r} is not the deployment's {self.shm_name!r}"
        if not (_is_index(deployment_id) and deployment_id == default_deployment_id(shm_name)):
            return f"deployment_id {reprlib.repr(deployment_id)} is not the id of shm name {shm_name!r}"
        return None

    def endpoint_entries(self, endpoint: int) -> RegistryEntries:
        """Where client endpoint `endpoint` (claimed) publishes its transport
        entry and finds the servers' (under its slot's lease)."""
        return RegistryEntries(self.registry, self.deployment.name, endpoint, self._heartbeats[endpoint].lease)

    def claim_client(self) -> int:
        """Claims the first free client slot (a key under a lease of this
        client's own) and returns its endpoint. When every slot is taken it
        waits for one, up to `wait_s`: a crashed client's slot lives until its
        lease expires, and a client restarted at once must get one back."""
        heartbeat = Heartbeat(self.registry, self._lease_ttl_s)
        try:
            slot = self._claim_slot(heartbeat.lease)
        except BaseException:
            heartbeat.stop()
            raise
        endpoint = self.deployment.client_endpoint(slot)
        self._heartbeats[endpoint] = heartbeat
        return endpoint

    def _claim_slot(self, lease: int) -> int:
        """The first client slot this client could claim under `lease`, waiting up to `wait_s` for one."""
        prefix = clients_prefix(self.deployment.name)
        value = {"pid": os.getpid(), "host": socket.gethostname()}
        deadline = time.monotonic() + self._wait_s
        waiting = False
        while True:
            for slot in range(self.deployment.max_clients):
                if self.registry.create(f"{prefix}{slot}", value, lease=lease):
                    return slot
            if time.monotonic() >= deadline:
                raise DeploymentError(
                    f"every client slot ({self.deployment.max_clients}) of deployment {self.deployment.name!r} "
                    f"is taken in {self.registry.url}, and none freed within {self._wait_s:.0f} s (raise "
                    "max_clients, or stop a client)"
                )
            if not waiting:
                log.warning("waiting for a free client slot of deployment %r in %s (all %d are taken; a crashed "
                            "client's slot frees when its lease expires) ...", self.deployment.name,
                            self.registry.url, self.deployment.max_clients)
                waiting = True
            time.sleep(0.5)  # etcd itself looks for expired leases every 0.5 s

    def release_client(self, endpoint: int) -> None:
        heartbeat = self._heartbeats.pop(endpoint, None)
        if heartbeat is not None:
            heartbeat.stop()  # revoking the lease deletes the slot's key

    def servers_up(self) -> dict[int, tuple]:
        """Endpoint -> (host, pid) of the deployment's servers registered as of
        the latest poll (at most `membership_poll_s` old; never waits for etcd):
        etcd deletes a server's key when its lease expires (the process died,
        hung or lost the registry for the lease's TTL), and a restarted server
        registers under a new pid. Raises RegistryError when the latest poll
        could not reach etcd."""
        up, _, error = self._membership
        if error is not None:
            raise RegistryError(str(error))
        return up

    def joined_servers(self) -> dict[int, JoinedServer]:
        """Spare endpoint -> the server not in the file registered there, as
        of the latest poll (raises RegistryError like `servers_up`)."""
        _, joined, error = self._membership
        if error is not None:
            raise RegistryError(str(error))
        return joined

    def _poll_servers_up(self):
        try:
            entries = self._registrations.read()  # the valid ones
            claims = self.registry.get_prefix(spares_prefix(self.deployment.name))
        except RegistryError as e:
            return None, None, e
        up, joined, unclaimed = {}, {}, set()
        for name, entry in entries.items():
            endpoint = entry["endpoint"]
            if name not in self._listed:
                claimant = claims.get(spares_prefix(self.deployment.name) + str(endpoint), {})
                if not isinstance(claimant, dict) or claimant.get("server") != name:
                    unclaimed.add(self._warn_unclaimed(name, endpoint, claimant))
                    continue
                joined[endpoint] = JoinedServer(name, _hosted_pairs(entry["hosted"], self._config))
            up[endpoint] = (entry["host"], entry["pid"])
        self._unclaimed_warned = unclaimed  # warned of again if it comes back after it was gone
        return up, joined, None

    def _warn_unclaimed(self, name: str, endpoint: int, claimant) -> tuple:
        """Warns (once while it lasts) of a joining server's entry on a spare
        endpoint that another server, or none, claimed: a server joins only on
        the endpoint it claimed (`serve-experts` claims one atomically under
        its lease), so two entries never share one. Returns its key."""
        key = (name, endpoint, repr(claimant))
        if key not in self._unclaimed_warned:
            log.warning("ignoring registry entry of server %r: spare endpoint %d is claimed by %s", name, endpoint,
                        reprlib.repr(claimant.get("server")) if isinstance(claimant, dict) and claimant else "nobody")
        return key

    def _follow_registry(self, poll_s: float) -> None:
        while not self._closed.wait(poll_s):
            self._membership = self._poll_servers_up()

    def endpoint_of(self, name: str) -> int:
        """The endpoint of server `name`: the file's, or the spare one it registered on."""
        _, joined, _ = self._membership
        for endpoint, server in (joined or {}).items():
            if server.name == name:
                return endpoint
        return self.deployment.server_endpoint(name)

    def stop_server(self, name: str) -> None:
        """Servers found in the registry were started elsewhere: whoever
        started them stops them (once drained)."""

    def describe_server(self, endpoint: int) -> str:
        if endpoint in self.deployment.spare_range:
            _, joined, _ = self._membership
            if not joined or endpoint not in joined:
                return f"spare endpoint {endpoint} (no server registered there as of the last poll)"
            return f"expert server {joined[endpoint].name!r} (spare endpoint {endpoint}, in {self.registry.url})"
        # From the last poll, as everything else here: this names a server
        # that failed a step, and must not make that step wait for etcd.
        spec = self.deployment.servers[endpoint]
        up, _, error = self._membership
        if error is not None:
            state = f"registry unreachable at the last poll: {error}"
        elif endpoint in up:
            state = "still registered as of the last poll"
        else:
            state = "no longer registered as of the last poll (its lease expired)"
        return f"expert server {spec.name!r} (endpoint {endpoint}; {state} in {self.registry.url})"

    def close(self) -> None:
        self._closed.set()
        for endpoint in list(self._heartbeats):
            self.release_client(endpoint)
