"""The ``ibgda`` backend of the expert transport: messages go out as RDMA
WRITEs that the sender posts to a NIC itself (mlx5 work requests:
``ffi/mlx5_wqe.h``), with no verbs call and no CPU of the receiver involved.

What exists today (``nic = "model"``): every endpoint runs a software NIC
(``ffi/nic_model.h``) in its process, listening on an IPv4 address; two
endpoints' NICs are joined by a TCP link. Where the endpoint lives follows
where the process's JAX computations run (:func:`on_gpu`):

* CPU: the four custom calls are the ``shm`` backend's CPU handlers; for an
  ibgda endpoint they assemble each message in a staging slot and post it as
  WQEs on the peer's queue pair, ring the doorbell record and reclaim the
  send queue from CQEs (``ffi/ibgda_writer.h``), instead of storing into a
  mapping of the peer's inbox. The inbox is an shm inbox with the same slot
  layout, seqlock and validation (``ffi/wire_format.h``), registered with
  the NIC for remote writes.
* GPU: the custom calls are the ``cuda_ipc`` kernels; for an ibgda endpoint
  they copy each message into its staging slot and one GPU thread writes
  the WQEs into the send queue, the doorbell record and the doorbell, and
  polls the CQEs (``ffi/ibgda_post.cuh``). The NIC being a CPU program here,
  its queues, the staging area and the inbox are host memory mapped into
  the GPU (on an mlx5 NIC they would be GPU memory).

A CPU endpoint and a GPU one of the same geometry talk to each other.
Peers on other hosts find each other's cards in the registry (an
``entries`` store); on one host, in private files. Not yet: ``nic =
"mlx5"`` (pyverbs DevX setup).

Control path (this module):

* Directory entry (:mod:`~eaas_jax.transport.directory`):
  ``/dev/shm/eaas-<deployment>-<e>.ibgda`` holds the endpoint's *card*: the
  NIC's address and port, its random link key (a connection to the NIC that
  does not begin with it is closed: ``ffi/nic_link.h``; the entry is 0600,
  so only this uid learns it), the QPN base (its QP for endpoint p is
  ``qpn_base + p``), the inbox's rkey and address, and ``peers``: for each
  peer it connected its QP to, that peer's entry nonce.
* :meth:`IbgdaEndpoint.connect` (a client, for each server) connects this
  endpoint's QP for the peer to the peer's QP for it, lists the peer's nonce
  under ``peers`` and waits until the peer is *ready*: its entry lists this
  endpoint's nonce too, so both QPs of the pair are connected and a write in
  either direction finds its responder. Messages go only to ready peers
  (others count as unavailable, ``sent = -1``).
* A control thread (every :data:`_SCAN_S`) follows the other endpoints'
  entries: it connects back to a peer that connected to it (a server to its
  clients), reconnects a wanted peer's new incarnation (a new nonce),
  disconnects one whose entry vanished or changed, and republishes its own
  entry when ``peers`` changed. Endpoints that never talk (two servers, two
  clients) never connect.

A peer whose QP failed (an error completion: the link was cut, or it
refused a write) stays unreachable until it restarts (a new nonce): a QP is
never re-armed under a live peer, whose responder would take the new
requester's packets for duplicates of old ones (``ffi/ibgda_writer.h``).

:data:`BACKEND` is this module's entry in ``transport/backends.py``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import functools
import logging
import os
import threading
import time

from eaas_jax.transport import backends, cuda_ipc, directory, native, nic_model, shm, wire
from eaas_jax.transport.custom_calls import BoundCalls, FfiTargets, close_at_exit

__all__ = [
    "BACKEND",
    "IBGDA_TARGETS",
    "IbgdaEndpoint",
    "IbgdaError",
    "IbgdaPeerRefusedError",
    "PeerState",
    "directory_path",
    "on_gpu",
]

#: The XLA targets of this backend. On CPUs they are the shm backend's
#: handlers (registered under these names too: native.IBGDA_CPU_HANDLERS),
#: which post WQEs for an ibgda endpoint.
IBGDA_TARGETS = FfiTargets(
    native.IBGDA_DISPATCH_TARGET, native.IBGDA_COMBINE_TARGET, native.IBGDA_POLL_TARGET, native.IBGDA_REPLY_TARGET
)
#: The NICs a deployment may name, and whether this build drives them.
NICS = ("model", "mlx5")
log = logging.getLogger(__name__)

_DIRECTORY_FORMAT = "eaas-ibgda-1"
_ERRLEN = 1024
_SCAN_S = 0.01  # how often the control thread looks at the peers' entries
_HANDSHAKE_S = 2.0  # how long connect() waits for a peer with a card to connect back
_DEFAULT_HOST = "127.0.0.1"


class IbgdaError(RuntimeError):
    """An ibgda transport operation failed."""


class IbgdaEndpointInUseError(IbgdaError, FileExistsError):
    """The endpoint is already open, in this or another live process."""


class IbgdaPeerRefusedError(IbgdaError):
    """A peer's entry does not match this endpoint's geometry or deployment."""


class PeerState(enum.IntEnum):
    """A peer's QP as the sending side sees it (ffi/ibgda_writer.h)."""

    IDLE = 0
    CONNECTED = 1
    READY = 2
    FAILED = 3


def directory_path(deployment: str, endpoint: int) -> str:
    """The directory entry (the card) of an endpoint."""
    return f"/dev/shm/eaas-{deployment}-{int(endpoint)}.ibgda"


_i64, _u64, _buf = ctypes.c_int64, ctypes.c_uint64, ctypes.c_char_p
_SIGNATURES = {
    "eaas_ibgda_open": ([_buf, _u64] + [_i64] * 9 + [_buf, ctypes.POINTER(_u64), _buf, _i64], ctypes.c_int),
    "eaas_ibgda_connect": ([_i64, _i64, _buf, _u64, _u64, _u64, _u64, _u64, _buf, _i64], ctypes.c_int),
    "eaas_ibgda_peer": ([_i64, _i64, ctypes.c_int], ctypes.c_int),
}


@functools.cache
def _lib() -> ctypes.CDLL:
    return native.bind_functions(_SIGNATURES)


def on_gpu() -> bool:
    """Whether this process's ibgda endpoints live on its GPU: its JAX
    computations run there (so the compiled steps call the CUDA handlers) and
    the library was built with them."""
    import jax

    return jax.default_backend() == "gpu" and native.has_cuda_handlers()


class _CpuEndpoints:
    """Endpoints whose handlers run on CPUs: an shm inbox, sends posted by
    the shm handlers (ffi/shm_transport.cc)."""

    def open(self, deployment: str, deployment_id: int, endpoint: int, geometry: list[int], host: str,
             card, err) -> int:
        return _lib().eaas_ibgda_open(deployment.encode(), deployment_id, endpoint, *geometry, host.encode(), card,
                                      err, _ERRLEN)

    def connect(self, *args) -> int:
        return _lib().eaas_ibgda_connect(*args)

    def peer(self, endpoint: int, peer: int, op: int) -> int:
        return _lib().eaas_ibgda_peer(endpoint, peer, op)

    def geometry(self, endpoint: int, **_) -> wire.Geometry:
        return shm.endpoint_info(endpoint)[0]

    close = staticmethod(shm.close_endpoint)
    stats = staticmethod(shm.endpoint_stats)


class _GpuEndpoints:
    """Endpoints on this process's GPU: an inbox in host memory mapped into
    it, sends posted by the cuda_ipc kernels (ffi/ibgda_post.cuh)."""

    def __init__(self, device: int):
        self.device = device

    def open(self, deployment: str, deployment_id: int, endpoint: int, geometry: list[int], host: str,
             card, err) -> int:
        return cuda_ipc.library().eaas_ibgda_gpu_open(deployment_id, endpoint, self.device, *geometry,
                                                      host.encode(), card, err, _ERRLEN)

    def connect(self, *args) -> int:
        return cuda_ipc.library().eaas_ibgda_gpu_connect(*args)

    def peer(self, endpoint: int, peer: int, op: int) -> int:
        return cuda_ipc.library().eaas_ibgda_gpu_peer(endpoint, peer, op)

    def geometry(self, endpoint: int, **geometry) -> wire.Geometry:
        return wire.Geometry(**geometry)

    close = staticmethod(cuda_ipc.close_endpoint)
    stats = staticmethod(cuda_ipc.endpoint_stats)


@dataclasses.dataclass(frozen=True)
class Card:
    """What a peer needs to write into an endpoint's inbox."""

    host: str
    port: int
    qpn_base: int
    inbox_rkey: int
    slots_addr: int
    link_key: int  #: what a connection to its NIC must begin with (the entry is 0600: our uid only)

    @classmethod
    def from_entry(cls, entry: dict) -> "Card":
        """The card in a peer's entry.

        Raises:
          IbgdaPeerRefusedError: a field is missing or malformed.
        """
        try:
            card = cls(**{f.name: entry[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError):
            raise IbgdaPeerRefusedError(f"endpoint {entry.get('endpoint')}'s entry has no valid card") from None
        limits = ((card.port, 0xFFFF), (card.qpn_base, 0xFFFFFF), (card.inbox_rkey, 0xFFFFFFFF),
                  (card.slots_addr, 0xFFFFFFFFFFFFFFFF), (card.link_key, 0xFFFFFFFFFFFFFFFF))
        if not isinstance(card.host, str) or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= top for v, top in limits):
            raise IbgdaPeerRefusedError(f"endpoint {entry.get('endpoint')}'s entry has a malformed card")
        return card


_OPEN: dict[int, "IbgdaEndpoint"] = {}
_OPEN_LOCK = threading.Lock()
close_at_exit(_OPEN, _OPEN_LOCK)


class IbgdaEndpoint(BoundCalls):
    """One endpoint of a deployment: its inbox, its NIC and its QPs.

    Args: as :class:`~eaas_jax.transport.shm.ShmEndpoint`, plus
      host: the IPv4 address its NIC listens on (default: the
        ``EAAS_NIC_HOST`` environment variable, else 127.0.0.1).
      device: CUDA device ordinal to open it on (then its custom calls run
        as GPU kernels); default: the process's first GPU when
        :func:`on_gpu`, else the CPU.
      entries: where it publishes its card and finds its peers' (a
        :class:`~eaas_jax.transport.directory.EntryStore`; default: private
        files in /dev/shm, for peers on this host; the registry's
        ``RegistryEntries`` reaches other hosts).

    Raises:
      IbgdaEndpointInUseError: the endpoint is open here or in a live process.
      IbgdaError: anything else (bad name or geometry, no address to listen on).
    """

    ffi_targets = IBGDA_TARGETS

    def __init__(
        self,
        deployment: str,
        endpoint: int,
        *,
        max_endpoints: int,
        num_channels: int,
        capacity: int,
        hidden_size: int,
        top_k: int,
        num_layers: int,
        num_experts: int,
        deployment_id: int | None = None,
        dispatch_dtype: str = "float32",
        host: str | None = None,
        entries: directory.EntryStore | None = None,
        device: int | None = None,
    ):
        self.deployment, deployment_id = wire.endpoint_identity(deployment, deployment_id, dispatch_dtype)
        self.endpoint = int(endpoint)
        self.host = host or os.environ.get("EAAS_NIC_HOST") or _DEFAULT_HOST
        if device is None and on_gpu():
            device = 0
        self.device = device  #: the CUDA device it lives on; None: the CPU
        self._native = _CpuEndpoints() if device is None else _GpuEndpoints(int(device))
        if device is not None:
            cuda_ipc.library()  # fails (no CUDA build) before anything is claimed
        self._entries = entries or directory.FileEntries(
            lambda e: directory_path(self.deployment, e), self.endpoint, in_use=IbgdaEndpointInUseError,
            refused=IbgdaPeerRefusedError, what=f"endpoint {self.endpoint} of deployment {self.deployment!r}")
        self._entries.claim()
        card = (ctypes.c_uint64 * 6)()
        err = ctypes.create_string_buffer(_ERRLEN)
        geometry = dict(max_endpoints=int(max_endpoints), num_channels=int(num_channels), capacity=int(capacity),
                        hidden_size=int(hidden_size), top_k=int(top_k), num_layers=int(num_layers),
                        num_experts=int(num_experts))
        rc = self._native.open(self.deployment, deployment_id, self.endpoint,
                               [*geometry.values(), wire.DISPATCH_DTYPES[dispatch_dtype]], self.host, card, err)
        if rc != 0:
            self._entries.remove()  # our claim (a placeholder file); a registry's claim is not ours to remove
            msg = err.value.decode(errors="replace")
            raise (IbgdaEndpointInUseError if rc == -2 else IbgdaError)(msg)
        self._closed = False
        self.card = Card(self.host, *(int(v) for v in card[:5]))
        self._nic = int(card[5])
        self._lock = threading.Lock()  # the peers' bookkeeping and our entry (control thread vs connect, close)
        self._wanted: set[int] = set()  # peers connect() was asked for: followed across their restarts
        self._connected: dict[int, str] = {}  # peer -> nonce of the entry our QP is connected to
        self._warned: dict[int, str] = {}  # peer -> the last problem logged about it
        self._retry_at: dict[int, tuple[float, float]] = {}  # peer -> (next attempt, backoff) after a failure
        try:
            self.geometry = self._native.geometry(self.endpoint, **geometry, deployment_id=deployment_id,
                                                  dispatch_dtype=dispatch_dtype)
            self._entry = directory.new_entry(_DIRECTORY_FORMAT, self.endpoint, self.geometry,
                                              **dataclasses.asdict(self.card), peers={})
            self._entries.publish(self._entry)
        except BaseException:  # e.g. the registry cannot be reached: nothing stays open
            self._entries.remove()
            self._native.close(self.endpoint)
            raise
        with _OPEN_LOCK:
            _OPEN[self.endpoint] = self
        self._stop = threading.Event()
        self._control = threading.Thread(target=self._control_loop, name=f"eaas-ibgda-{self.endpoint}", daemon=True)
        self._control.start()

    # -- lifecycle --
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def nonce(self) -> str:
        return self._entry["nonce"]

    def close(self) -> None:
        """Stops the control thread, removes the entry, frees the NIC and the inbox (idempotent)."""
        with self._lock:  # a connect() in another thread publishes nothing after this
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        if threading.current_thread() is not self._control:
            self._control.join()
        with _OPEN_LOCK:
            if _OPEN.get(self.endpoint) is self:
                del _OPEN[self.endpoint]
        try:
            self._entries.remove()
        except Exception as e:  # noqa: BLE001 - an unreachable registry must not keep the inbox open
            log.warning("ibgda endpoint %d: withdrawing its card: %r", self.endpoint, e)
        self._native.close(self.endpoint)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        where = "CPU" if self.device is None else f"GPU {self.device}"
        return (f"IbgdaEndpoint({self.deployment!r}, {self.endpoint}, {self.host}:{self.card.port}, {where}, "
                f"{state})")

    def _check_open(self) -> None:
        if self._closed:
            raise IbgdaError(f"{self!r} is closed")

    # -- peers --
    def peer_state(self, peer: int) -> PeerState:
        """How this endpoint's QP for `peer` stands."""
        return PeerState(self._peer_op(peer, 0))

    def _peer_op(self, peer: int, op: int) -> int:
        state = self._native.peer(self.endpoint, int(peer), op)
        if state < 0:
            raise IbgdaError(f"{self!r} is not open")
        return state

    def _check_entry(self, peer: int, entry: dict) -> Card:
        if entry.get("format") != _DIRECTORY_FORMAT or entry.get("endpoint") != peer:
            raise IbgdaPeerRefusedError(f"the entry published for endpoint {peer} is not its ibgda card")
        theirs, ours = entry.get("geometry"), vars(self.geometry)
        if theirs != ours:
            diff = {k: (theirs.get(k) if isinstance(theirs, dict) else None, v) for k, v in ours.items()
                    if not isinstance(theirs, dict) or theirs.get(k) != v}
            raise IbgdaPeerRefusedError(
                f"refusing endpoint {peer}: geometry/identity mismatch (theirs, ours): {diff}")
        return Card.from_entry(entry)

    def _follow(self, peer: int) -> bool:
        """Brings this endpoint's QP for `peer` in line with `peer`'s entry
        (caller holds _lock): connects to a peer this endpoint wants
        (:meth:`connect`) or that has connected to it, reconnects when the
        peer is a new incarnation (a new nonce: its QP is new too), and marks
        it ready once both sides are connected. Returns whether our entry
        needs republishing.

        An entry that is gone for a while (an etcd hiccup, a process that
        died) changes nothing: resetting this side's QP alone would leave
        the peer's expecting the old packet numbers. Connecting again after
        a failure backs off (1 s, doubling to 30 s).

        Raises:
          IbgdaPeerRefusedError: its entry is not one to connect to.
          IbgdaError: connecting failed.
        """
        entry = self._entries.read(peer)
        if entry is None:
            return False
        if not isinstance(entry.get("nonce"), str):
            raise IbgdaPeerRefusedError(f"endpoint {peer}'s entry has no nonce")
        changed = False
        if peer in self._connected and entry["nonce"] != self._connected[peer]:
            self._peer_op(peer, 2)  # the incarnation we were connected to left
            del self._connected[peer]
            self._entry["peers"].pop(str(peer), None)
            changed = True
        peers = entry.get("peers")
        connected_to_us = isinstance(peers, dict) and peers.get(str(self.endpoint)) == self.nonce
        if peer not in self._connected and (peer in self._wanted or connected_to_us):
            retry_at, backoff = self._retry_at.get(peer, (0.0, 0.5))
            if time.monotonic() < retry_at:
                return changed
            card = self._check_entry(peer, entry)
            err = ctypes.create_string_buffer(_ERRLEN)
            if self._native.connect(self.endpoint, peer, card.host.encode(), card.port, card.qpn_base,
                                    card.inbox_rkey, card.slots_addr, card.link_key, err, _ERRLEN) != 0:
                backoff = min(2 * backoff, 30.0)
                self._retry_at[peer] = (time.monotonic() + backoff, backoff)
                raise IbgdaError(err.value.decode(errors="replace"))
            self._retry_at.pop(peer, None)
            self._connected[peer] = entry["nonce"]
            self._entry["peers"][str(peer)] = entry["nonce"]
            changed = True
        if peer in self._connected and connected_to_us:
            self._peer_op(peer, 1)  # both sides connected: ready (a no-op unless CONNECTED)
        return changed

    def connect(self, peer: int, timeout: float = 0.0) -> None:
        """Connects to `peer` now and waits until it is ready (it has
        connected back): up to `timeout` s for its card to appear, and once
        it is there up to :data:`_HANDSHAKE_S` more for it to connect back
        (a round of its control thread).

        Raises:
          IbgdaPeerRefusedError: its entry does not match (geometry,
            deployment id), or is not a private file of this user.
          IbgdaError: its QP failed, or its NIC cannot be reached.
          TimeoutError: it was not ready in time.
        """
        self._check_open()
        peer = int(peer)
        if not 0 <= peer < self.geometry.max_endpoints or peer == self.endpoint:
            raise ValueError(f"peer {peer} is not another endpoint in [0, {self.geometry.max_endpoints})")
        deadline = time.monotonic() + timeout
        handshake = False
        delay = 0.001
        while True:
            with self._lock:
                self._check_open()
                self._wanted.add(peer)
                if self._follow(peer):
                    self._entries.publish(self._entry)
                connected = peer in self._connected
            if connected and not handshake:  # its card is there: give it a round of its control thread
                handshake = True
                deadline = max(deadline, time.monotonic() + _HANDSHAKE_S)
            state = self.peer_state(peer)
            if state == PeerState.READY:
                return
            if state == PeerState.FAILED:
                raise IbgdaError(f"endpoint {peer} of deployment {self.deployment!r}: its QP failed")
            if time.monotonic() >= deadline:
                what = ("has not connected back" if connected else
                        "could not be reached (retrying)" if peer in self._retry_at else "has published no card")
                raise TimeoutError(f"peer {peer} of deployment {self.deployment!r} {what}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _scan(self) -> None:
        changed = False
        with self._lock:
            for peer in range(self.geometry.max_endpoints):
                if peer == self.endpoint:
                    continue
                try:
                    changed |= self._follow(peer)
                    self._warned.pop(peer, None)
                except IbgdaError as e:  # refused or unreachable: its messages are unavailable
                    if self._warned.get(peer) != str(e):  # once per problem, not every scan
                        self._warned[peer] = str(e)
                        log.warning("ibgda endpoint %d: %s", self.endpoint, e)
            if changed:
                self._entries.publish(self._entry)

    def _control_loop(self) -> None:
        while not self._stop.wait(_SCAN_S):
            try:
                self._scan()
            except Exception as e:  # noqa: BLE001 - keep serving; the handlers report what fails
                log.warning("ibgda endpoint %d: control thread: %r", self.endpoint, e)

    def set_nic_faults(self, **faults) -> None:
        """Fault injection on this endpoint's NIC (the model NIC's knobs:
        :func:`~eaas_jax.transport.nic_model.set_faults`); what it sends is
        delayed, reordered, lost or, with ``link_down``, never delivered."""
        self._check_open()
        nic_model.set_faults(self._nic, **faults)

    def stats(self) -> dict[str, int]:
        """Counters of this endpoint (the shm backend's names)."""
        self._check_open()
        return self._native.stats(self.endpoint)


class IbgdaBackend:
    """The ``ibgda`` transport backend (a ``backends.TransportBackend``)."""

    name = "ibgda"
    ffi_targets = IBGDA_TARGETS

    @property
    def one_process_per_gpu(self) -> bool:
        # Where this process runs JAX on a GPU, so do its servers (one GPU
        # each, as cuda_ipc's); elsewhere they are CPU processes.
        return on_gpu()

    def open_endpoint(self, name: str, endpoint: int, geometry: dict,
                      entries: directory.EntryStore | None = None) -> IbgdaEndpoint:
        return IbgdaEndpoint(name, endpoint, **geometry, entries=entries)

    def endpoint_paths(self, name: str, endpoint: int) -> tuple[str, ...]:
        return (shm.segment_path(name, endpoint), directory_path(name, endpoint))

    def describe(self, endpoint: IbgdaEndpoint) -> dict:
        return {"transport": self.name}  # peers find the card in its directory entry

    def deployment_problems(self, deployment) -> list[str]:
        problems = backends.foreign_options(deployment, self.name, takes=frozenset({"nic", "device"}))
        nic = deployment.nic or "model"
        if nic not in NICS:
            problems.append(f"nic must be one of {list(NICS)}, got {nic!r}")
        elif nic != "model":
            problems.append(f"nic = {nic!r} is not driven yet: only the software NIC (nic = \"model\") is; "
                            "the endpoints do not use the pyverbs DevX setup (transport/mlx5_devx.py) yet")
        return problems


BACKEND = IbgdaBackend()
