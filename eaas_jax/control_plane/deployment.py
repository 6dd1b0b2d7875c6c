"""Deployment files: which expert servers exist, what each hosts, and how they talk.

A deployment is a TOML file (see `configs/deploy/`):

    name = "tiny-moe"          # shm segment prefix / etcd key prefix
    transport = "<backend>"    # one of eaas_jax.transport.backends.names()
                               # (default: backends.DEFAULT); what each
                               # needs is at the top of its module
    nic = "model"              # ibgda only: the NIC its work requests go to
                               # ("model": the software NIC; "mlx5": not yet)
    capacity = 256             # tokens per mailbox message
    timeout_ms = 10000         # deadline of one exchange (combine)
    min_timeout_ms = 50        # optional: deadlines adapt to the step times
                               # a client sees, between this and timeout_ms
                               # (attention_client/deadlines.py); without it they are
                               # fixed at timeout_ms
    double_batching = true     # two micro-batches ping-pong in the client step
    max_clients = 2            # attention clients that may connect at once
    spare_endpoints = 0        # endpoints for servers not in this file that
                               # join at run time (`serve-experts --server NEW
                               # --layers ... --experts ...`,
                               # LocalCluster.add_server)
    dispatch_dtype = "float32" # of the tokens sent: float32, bfloat16 or
                               # float8_e4m3fn (a scale per token); replies
                               # are float32

    [[servers]]
    name = "experts-even"
    layers = "all"             # MoE layer indices, or "all"
    experts = [0, 2, 4, 6]     # expert indices, ranges like "0-3", or "all"
    device = 1                 # transports with one process per GPU only:
                               # the GPU (CUDA_VISIBLE_DEVICES value) a
                               # locally started server runs on
    standby = false            # true: a spare, not started with the deployment;
                               # clients admit it at a step boundary once it is
                               # up (LocalCluster.start_server, or registered)

A (layer, expert) hosted by several servers has replicas; the client spreads
its tokens over the live ones. Endpoint indices are fixed by the file:
server i is endpoint i, spare j is endpoint len(servers) + j, client slot c is
endpoint len(servers) + spare_endpoints + c. A server that joins on a spare
endpoint brings its own (layer, expert) list; clients add it to their routing
table as one more replica of each, so the table keeps room for one replica per
spare endpoint beyond the file's.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib

import numpy as np

from eaas_jax.model.config import ModelConfig
from eaas_jax.transport import backends
from eaas_jax.transport.wire import DISPATCH_DTYPES

# What a deployment, server or shared-memory name may be (a shm name becomes
# part of file names in /dev/shm, a server name of log lines).
NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")
_KEYS = {"name", "transport", "nic", "capacity", "timeout_ms", "min_timeout_ms", "double_batching", "max_clients",
         "spare_endpoints", "dispatch_dtype", "servers"}
_SERVER_KEYS = {"name", "layers", "experts", "device", "standby"}


class DeploymentError(ValueError):
    """A deployment file that is malformed or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    name: str
    layers: tuple[int, ...] | None  # None = every MoE layer
    experts: tuple[int, ...] | None  # None = every expert
    device: int | None = None  # one process per GPU: GPU of a locally started server
    standby: bool = False  # a spare: not started with the deployment

    def hosted(self, config: ModelConfig) -> list[tuple[int, int]]:
        layers = range(config.num_moe_layers) if self.layers is None else self.layers
        experts = range(config.num_experts) if self.experts is None else self.experts
        return [(l, e) for l in layers for e in experts]


@dataclasses.dataclass(frozen=True)
class Deployment:
    name: str
    servers: tuple[ServerSpec, ...]
    transport: str = backends.DEFAULT
    nic: str | None = None
    capacity: int = 256
    timeout_ms: int = 10_000
    min_timeout_ms: int | None = None
    double_batching: bool = True
    max_clients: int = 2
    spare_endpoints: int = 0
    dispatch_dtype: str = "float32"
    source: str = "<deployment>"

    # ------------------------------------------------------------- loading

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Deployment":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise DeploymentError(f"deployment file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise DeploymentError(f"{path}: not valid TOML ({e})") from None
        return cls.from_dict(raw, source=path)

    @classmethod
    def of(cls, deployment: "Deployment | str | os.PathLike") -> "Deployment":
        """`deployment` if it is one (loaded and checked once, by whoever
        loaded it), else the file it names, loaded."""
        return deployment if isinstance(deployment, Deployment) else cls.load(deployment)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "<deployment>") -> "Deployment":
        def fail(msg):
            raise DeploymentError(f"{source}: {msg}")

        def check_table(table: dict, known: set, where: str) -> str:
            """Rejects unknown keys; returns the table's valid `name`."""
            unknown = sorted(set(table) - known)
            if unknown:
                fail(f"{where}unknown keys {unknown} (known: {sorted(known)})")
            name = table.get("name")
            if not isinstance(name, str) or not NAME.fullmatch(name):
                fail(f"{where}name must be 1-40 characters of [A-Za-z0-9_-], got {name!r}")
            return name

        name = check_table(raw, _KEYS, "")
        transport = raw.get("transport", backends.DEFAULT)
        try:
            backend = backends.get(transport)
        except backends.UnknownTransportError as e:
            fail(str(e))
        nic = raw.get("nic")
        if nic is not None and not isinstance(nic, str):
            fail(f"nic must be a string, got {nic!r}")
        ints = {}
        for key, default, lo in (("capacity", 256, 1), ("timeout_ms", 10_000, 1), ("max_clients", 2, 1),
                                 ("spare_endpoints", 0, 0)):
            value = raw.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                fail(f"{key} must be an integer >= {lo}, got {value!r}")
            ints[key] = value
        min_timeout_ms = raw.get("min_timeout_ms")
        if min_timeout_ms is not None and (not isinstance(min_timeout_ms, int) or isinstance(min_timeout_ms, bool)
                                           or not 1 <= min_timeout_ms <= ints["timeout_ms"]):
            fail(f"min_timeout_ms must be an integer in [1, timeout_ms={ints['timeout_ms']}], got {min_timeout_ms!r}")
        double_batching = raw.get("double_batching", True)
        if not isinstance(double_batching, bool):
            fail(f"double_batching must be true or false, got {double_batching!r}")
        dispatch_dtype = raw.get("dispatch_dtype", "float32")
        if dispatch_dtype not in DISPATCH_DTYPES:
            fail(f"dispatch_dtype must be one of {sorted(DISPATCH_DTYPES)}, got {dispatch_dtype!r}")
        servers_raw = raw.get("servers")
        if not isinstance(servers_raw, list) or not servers_raw:
            fail("needs at least one [[servers]] table")
        servers, seen = [], set()
        for i, s in enumerate(servers_raw):
            where = f"servers[{i}]"
            if not isinstance(s, dict):
                fail(f"{where} must be a table")
            sname = check_table(s, _SERVER_KEYS, f"{where}: ")
            if sname in seen:
                fail(f"{where}: server name {sname!r} is used twice")
            seen.add(sname)
            device = s.get("device")
            if device is not None and (not isinstance(device, int) or isinstance(device, bool) or device < 0):
                fail(f"{where}: device must be a GPU index >= 0, got {device!r}")
            standby = s.get("standby", False)
            if not isinstance(standby, bool):
                fail(f"{where}: standby must be true or false, got {standby!r}")
            servers.append(ServerSpec(
                sname,
                _index_set(s.get("layers", "all"), f"{source}: {where}.layers"),
                _index_set(s.get("experts", "all"), f"{source}: {where}.experts"),
                device,
                standby,
            ))
        deployment = cls(name=name, servers=tuple(servers), transport=transport, nic=nic, min_timeout_ms=min_timeout_ms,
                         double_batching=double_batching, dispatch_dtype=dispatch_dtype, source=source, **ints)
        for problem in backend.deployment_problems(deployment):
            fail(problem)
        return deployment

    # ------------------------------------------------------------- checks

    def check(self, config: ModelConfig) -> None:
        """Raises DeploymentError unless every server's experts exist in the
        model and every (MoE layer, expert) is hosted by a server started with
        the deployment (not only by standby ones)."""
        if not config.num_moe_layers:
            raise DeploymentError(f"{self.source}: the model has no MoE layer to serve")
        for s in self.servers:
            self.check_server(s, config)
        table = self.routing_table(config)
        started = np.isin(table, self.started_servers)
        missing = np.argwhere(~started.any(-1))
        if len(missing):
            l, e = missing[0]
            only_standby = (table[l, e] >= 0).any()
            raise DeploymentError(
                f"{self.source}: no server {'but a standby one ' if only_standby else ''}hosts MoE layer {l}, "
                f"expert {e} ({len(missing)} (layer, expert) pairs are unhosted at start)"
            )

    def check_server(self, server: ServerSpec, config: ModelConfig) -> None:
        """Raises DeploymentError unless the experts `server` names exist in the model."""
        for what, values, limit in (("layers", server.layers, config.num_moe_layers),
                                    ("experts", server.experts, config.num_experts)):
            bad = [v for v in values or () if v >= limit]
            if bad:
                raise DeploymentError(
                    f"{self.source}: server {server.name!r} names {what} {bad}, but the model "
                    f"has {limit} MoE {what} (0-{limit - 1})"
                )

    # ------------------------------------------------------------- derived

    @property
    def backend(self) -> backends.TransportBackend:
        return backends.get(self.transport)

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    @property
    def num_server_endpoints(self) -> int:
        """Endpoints for servers: the file's, then the spare ones."""
        return self.num_servers + self.spare_endpoints

    @property
    def spare_range(self) -> range:
        return range(self.num_servers, self.num_server_endpoints)

    @property
    def max_endpoints(self) -> int:
        return self.num_server_endpoints + self.max_clients

    def joining_server(self, name: str, layers, experts) -> ServerSpec:
        """The spec of a server not in the file that joins on a spare endpoint;
        layers / experts as in the file ("all", or a list of indices and
        ranges)."""
        where = f"{self.source}: joining server {name!r}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise DeploymentError(f"{where}: name must be 1-40 characters of [A-Za-z0-9_-]")
        if any(s.name == name for s in self.servers):
            raise DeploymentError(f"{where}: the file already has a server of that name")
        if not self.spare_endpoints:
            raise DeploymentError(f"{where}: the deployment has no spare endpoint (set spare_endpoints)")
        return ServerSpec(name, _index_set(layers, f"{where}: layers"), _index_set(experts, f"{where}: experts"))

    def server_endpoint(self, name: str) -> int:
        for i, s in enumerate(self.servers):
            if s.name == name:
                return i
        raise DeploymentError(
            f"{self.source}: no server named {name!r} (servers: {[s.name for s in self.servers]})"
        )

    def client_endpoint(self, slot: int) -> int:
        if not 0 <= slot < self.max_clients:
            raise DeploymentError(f"client slot {slot} is outside max_clients={self.max_clients}")
        return self.num_server_endpoints + slot

    @property
    def started_servers(self) -> tuple[int, ...]:
        """Endpoints of the servers started with the deployment (not standby)."""
        return tuple(i for i, s in enumerate(self.servers) if not s.standby)

    def routing_table(self, config: ModelConfig) -> np.ndarray:
        """[num_moe_layers, num_experts, replicas] int32: the endpoints hosting
        each (layer, expert), in file order, -1 padded; replicas is the file's
        most plus spare_endpoints (room for servers that join)."""
        hosts: dict[tuple[int, int], list[int]] = {}
        for endpoint, s in enumerate(self.servers):
            for pair in s.hosted(config):
                hosts.setdefault(pair, []).append(endpoint)
        replicas = max((len(v) for v in hosts.values()), default=1) + self.spare_endpoints
        table = np.full((config.num_moe_layers, config.num_experts, replicas), -1, np.int32)
        for (l, e), endpoints in hosts.items():
            if l < config.num_moe_layers and e < config.num_experts:
                table[l, e, : len(endpoints)] = endpoints
        return table

    def replicas_on_one_gpu(self, config: ModelConfig, gpu_of) -> dict[str, list[tuple[int, int]]]:
        """The (layer, expert) pairs the file gives two or more replicas, all
        on one GPU, by that GPU (`gpu_of(endpoint)` names a server's): one
        fault of that GPU loses every replica, and under MPS so can one
        killed server (bench/RESULTS.md, 2026-11-30)."""
        table = self.routing_table(config)
        gpu = {int(endpoint): gpu_of(int(endpoint)) for endpoint in np.unique(table[table >= 0])}  # once a server
        shared: dict[str, list[tuple[int, int]]] = {}
        for layer, expert in np.ndindex(*table.shape[:2]):
            endpoints = table[layer, expert][table[layer, expert] >= 0]
            gpus = {gpu[int(endpoint)] for endpoint in endpoints}
            if len(endpoints) > 1 and len(gpus) == 1:
                shared.setdefault(gpus.pop(), []).append((layer, expert))
        return shared

    def geometry(self, config: ModelConfig) -> dict:
        """The mailbox geometry every endpoint of this deployment opens with."""
        return dict(
            max_endpoints=self.max_endpoints,
            num_channels=2 if self.double_batching else 1,
            capacity=self.capacity,
            hidden_size=config.hidden_size,
            top_k=config.num_experts_per_tok,
            num_layers=config.num_moe_layers,
            num_experts=config.num_experts,
            dispatch_dtype=self.dispatch_dtype,
        )

    def open_endpoint(self, shm_name: str, endpoint: int, config: ModelConfig,
                      entries=None) -> backends.TransportEndpoint:
        """Opens endpoint `endpoint` of this deployment with its transport
        (`entries`: the registry's, where peers on other hosts are found;
        ``TransportBackend.open_endpoint``)."""
        return self.backend.open_endpoint(shm_name, endpoint, self.geometry(config), entries)

    def endpoint_paths(self, shm_name: str) -> list[str]:
        """Where this deployment's endpoints appear in the file system (for
        cleaning up after processes that were killed)."""
        return [path for e in range(self.max_endpoints) for path in self.backend.endpoint_paths(shm_name, e)]


def _index_set(value, where: str) -> tuple[int, ...] | None:
    """"all" -> None; [0, "2-4", 7] -> (0, 2, 3, 4, 7)."""
    if value == "all":
        return None
    if not isinstance(value, list) or not value:
        raise DeploymentError(f"{where} must be \"all\" or a non-empty list, got {value!r}")
    out: set[int] = set()
    for v in value:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            out.add(v)
        elif isinstance(v, str) and re.fullmatch(r"\d+-\d+", v):
            lo, hi = map(int, v.split("-"))
            if lo > hi:
                raise DeploymentError(f"{where}: empty range {v!r}")
            out.update(range(lo, hi + 1))
        else:
            raise DeploymentError(f"{where}: {v!r} is not an index >= 0 or a range like \"0-3\"")
    return tuple(sorted(out))
