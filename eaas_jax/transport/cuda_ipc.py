"""The ``cuda_ipc`` backend of the expert transport: GPUs of one host.

Every process of a deployment (attention client or expert server) opens a
:class:`CudaIpcEndpoint` on its GPU: an inbox in device memory with the slot
layout and seqlock protocol of the ``shm`` backend (``ffi/wire_format.h``),
exported with a CUDA IPC handle. The custom calls are the same four
(:func:`~eaas_jax.transport.custom_calls.dispatch`, ``combine``, ``poll``,
``reply``) with CUDA handlers: GPU kernels store the rows straight into the
peer GPU's inbox over NVLink and publish them with system-scope release
stores; the waiting kernels spin on acquire loads against a ``%globaltimer``
deadline. No host code runs on the data path (see the top of
``ffi/cuda_ipc_transport.cu``).

Control path (host, this module):

* Directory: each endpoint publishes ``/dev/shm/eaas-<deployment>-<e>.cuda-ipc``,
  a small JSON file with its geometry, owner pid and start time, a random
  nonce and the IPC handle of its inbox (created exclusively, mode 0600,
  never through a symbolic link: :mod:`~eaas_jax.transport.private_files`).
  One left behind by a dead process of this user (pid and start time: a
  reused pid does not keep it) is replaced; one of another uid is never
  used nor removed. Entries are read only when they are regular files of
  this uid with mode 0600, and a peer imports an inbox only if the geometry
  and deployment id equal its own (else :class:`CudaIpcPeerRefusedError`).
* :meth:`CudaIpcEndpoint.connect` imports a peer now; a background thread
  imports peers the kernels asked for (a request from a client whose inbox is
  not imported yet stays in its slot until it is) and re-imports a peer whose
  directory entry changed (it restarted) or forgets one whose entry vanished.

:data:`BACKEND` is this module's entry in ``transport/backends.py``.

One process per GPU: two processes on one GPU are time-sliced by the driver,
and a kernel of one process spinning for the other's message makes every hop
cost a time slice (milliseconds). A process may not import its own inbox, so
client and server of one deployment are always separate processes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

import jax

from eaas_jax.transport import backends, directory, native, wire
from eaas_jax.transport.custom_calls import BoundCalls, FfiTargets, close_at_exit

__all__ = [
    "BACKEND",
    "CUDA_IPC_TARGETS",
    "CudaIpcEndpoint",
    "CudaIpcError",
    "CudaIpcPeerRefusedError",
    "available",
    "close_endpoint",
    "directory_path",
    "endpoint_stats",
    "library",
]

#: The XLA targets of this backend (CUDA handlers).
CUDA_IPC_TARGETS = FfiTargets(
    native.CUDA_IPC_DISPATCH_TARGET, native.CUDA_IPC_COMBINE_TARGET,
    native.CUDA_IPC_POLL_TARGET, native.CUDA_IPC_REPLY_TARGET,
)
log = logging.getLogger(__name__)

_DIRECTORY_FORMAT = "eaas-cuda-ipc-1"
_HANDLE_BYTES = 64  # cudaIpcMemHandle_t
_ERRLEN = 1024
_WANTED_POLL_S = 0.002  # how often the control thread looks at the kernels' requests
_RESCAN_S = 0.1  # how often it re-reads the imported peers' directory entries


class CudaIpcError(RuntimeError):
    """A cuda_ipc transport operation failed."""


class CudaIpcEndpointInUseError(CudaIpcError, FileExistsError):
    """The endpoint is already open, in this or another live process, or its
    directory entry's name is taken by a file this process does not trust."""


class CudaIpcPeerRefusedError(CudaIpcError):
    """A peer's inbox does not match this endpoint's geometry or deployment."""


def directory_path(deployment: str, endpoint: int) -> str:
    """The directory entry of an endpoint's inbox."""
    return f"/dev/shm/eaas-{deployment}-{int(endpoint)}.cuda-ipc"


_C_LOCK = threading.Lock()
_c_api: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _c_api
    with _C_LOCK:
        if _c_api is None:
            lib = native.load_library()
            if not native.has_cuda_handlers():
                raise CudaIpcError(
                    f"{native.library_path()} was built without CUDA (no CUDA compiler was found "
                    "when the package was installed); install it where nvcc is on PATH"
                )
            i64, u8p, c_char_p = ctypes.c_int64, ctypes.POINTER(ctypes.c_uint8), ctypes.c_char_p
            lib.eaas_cuda_ipc_device_count.argtypes = []
            lib.eaas_cuda_ipc_device_count.restype = ctypes.c_int
            lib.eaas_cuda_ipc_open.argtypes = [ctypes.c_uint64] + [i64] * 10 + [u8p, c_char_p, i64]
            lib.eaas_cuda_ipc_open.restype = ctypes.c_int
            lib.eaas_cuda_ipc_close.argtypes = [i64]
            lib.eaas_cuda_ipc_close.restype = ctypes.c_int
            lib.eaas_cuda_ipc_set_peer.argtypes = [i64, i64, u8p, c_char_p, i64]
            lib.eaas_cuda_ipc_set_peer.restype = ctypes.c_int
            lib.eaas_cuda_ipc_take_wanted.argtypes = [i64, ctypes.POINTER(ctypes.c_int32), i64]
            lib.eaas_cuda_ipc_take_wanted.restype = ctypes.c_int
            lib.eaas_cuda_ipc_stats.argtypes = [i64, ctypes.POINTER(ctypes.c_int64), i64]
            lib.eaas_cuda_ipc_stats.restype = ctypes.c_int
            # The ibgda backend's GPU endpoints (transport/ibgda.py) live here too.
            u64 = ctypes.c_uint64
            lib.eaas_ibgda_gpu_open.argtypes = ([u64] + [i64] * 10
                                                + [c_char_p, ctypes.POINTER(u64), c_char_p, i64])
            lib.eaas_ibgda_gpu_open.restype = ctypes.c_int
            lib.eaas_ibgda_gpu_connect.argtypes = [i64, i64, c_char_p] + [u64] * 5 + [c_char_p, i64]
            lib.eaas_ibgda_gpu_connect.restype = ctypes.c_int
            lib.eaas_ibgda_gpu_peer.argtypes = [i64, i64, ctypes.c_int]
            lib.eaas_ibgda_gpu_peer.restype = ctypes.c_int
            _c_api = lib
        return _c_api


def library() -> ctypes.CDLL:
    """The FFI library with the GPU endpoints' C functions bound (cuda_ipc's
    and the ibgda backend's GPU endpoints).

    Raises:
      CudaIpcError: it was built without CUDA.
    """
    return _lib()


def available() -> bool:
    """Whether this process can open cuda_ipc endpoints (CUDA build, a GPU, JAX on it)."""
    try:
        return (native.has_cuda_handlers() and _lib().eaas_cuda_ipc_device_count() > 0
                and any(d.platform == "gpu" for d in jax.devices()))
    except (native.NativeLibraryNotFoundError, CudaIpcError, RuntimeError):
        return False


def close_endpoint(endpoint: int) -> None:
    """Closes the GPU endpoint `endpoint` of this process (its kernels finish first)."""
    _lib().eaas_cuda_ipc_close(int(endpoint))


def endpoint_stats(endpoint: int) -> dict[str, int]:
    """The counters of this process's GPU endpoint `endpoint` (``native.counter_names()``).

    Raises:
      CudaIpcError: it is not open.
    """
    names = native.counter_names()
    out = (ctypes.c_int64 * len(names))()
    n = _lib().eaas_cuda_ipc_stats(int(endpoint), out, len(names))
    if n < 0:
        raise CudaIpcError(f"GPU endpoint {endpoint}: reading the counters failed (not open?)")
    return dict(zip(names, out[: min(n, len(names))]))


def _new_entry(endpoint: int, geometry: wire.Geometry, handle: bytes) -> dict:
    """The directory entry this process publishes for its inbox."""
    return directory.new_entry(_DIRECTORY_FORMAT, endpoint, geometry, handle=handle.hex())


def _claim_directory_entry(path: str, what: str) -> None:
    """Reserves the directory entry at `path` (:func:`directory.claim`).

    Raises:
      CudaIpcEndpointInUseError: it is taken.
    """
    directory.claim(path, what, CudaIpcEndpointInUseError)


def _peer_entry(deployment: str, peer: int) -> dict | None:
    """`peer`'s published directory entry; None while it has none.

    Raises:
      CudaIpcPeerRefusedError: the file under its name is not a private file of this user.
    """
    return directory.peer_entry(directory_path(deployment, peer), peer, CudaIpcPeerRefusedError)


_OPEN: dict[int, "CudaIpcEndpoint"] = {}
_OPEN_LOCK = threading.Lock()
close_at_exit(_OPEN, _OPEN_LOCK)


class CudaIpcEndpoint(BoundCalls):
    """One endpoint of a deployment and its inbox in GPU memory.

    Args: as :class:`~eaas_jax.transport.shm.ShmEndpoint`, plus
      device: CUDA device ordinal of this process that holds the inbox; the
        compiled steps that use the endpoint must run on it.

    Raises:
      CudaIpcEndpointInUseError: the endpoint is open here or in a live process.
      CudaIpcError: anything else (no CUDA build or GPU, bad geometry, no memory).
    """

    ffi_targets = CUDA_IPC_TARGETS

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
        device: int = 0,
    ):
        self.deployment, deployment_id = wire.endpoint_identity(deployment, deployment_id, dispatch_dtype)
        self.endpoint = int(endpoint)
        self.device = int(device)
        self.geometry = wire.Geometry(
            max_endpoints=int(max_endpoints), num_channels=int(num_channels), capacity=int(capacity),
            hidden_size=int(hidden_size), top_k=int(top_k), num_layers=int(num_layers),
            num_experts=int(num_experts), deployment_id=deployment_id,
            dispatch_dtype=dispatch_dtype,
        )
        self.path = directory_path(self.deployment, self.endpoint)
        lib = _lib()  # fails (no CUDA build) before anything is claimed
        _claim_directory_entry(self.path, f"endpoint {self.endpoint} of deployment {self.deployment!r}")
        handle = (ctypes.c_uint8 * _HANDLE_BYTES)()
        err = ctypes.create_string_buffer(_ERRLEN)
        g = self.geometry
        rc = lib.eaas_cuda_ipc_open(
            g.deployment_id, self.endpoint, self.device, g.max_endpoints, g.num_channels, g.capacity,
            g.hidden_size, g.top_k, g.num_layers, g.num_experts, wire.DISPATCH_DTYPES[dispatch_dtype],
            handle, err, _ERRLEN,
        )
        if rc != 0:
            os.unlink(self.path)
            msg = err.value.decode(errors="replace")
            raise (CudaIpcEndpointInUseError if rc == -2 else CudaIpcError)(msg)
        self._closed = False
        self._lock = threading.Lock()  # imports (control thread vs connect)
        self._imported: dict[int, str] = {}  # peer -> nonce of the entry imported
        # Atomic: readers see the placeholder or the entry.
        directory.publish(self.path, _new_entry(self.endpoint, self.geometry, bytes(handle)))
        with _OPEN_LOCK:
            _OPEN[self.endpoint] = self
        self._stop = threading.Event()
        self._control = threading.Thread(target=self._control_loop, name=f"eaas-cuda-ipc-{self.endpoint}",
                                         daemon=True)
        self._control.start()

    # -- lifecycle --
    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stops the control thread, frees the inbox, removes the entry (idempotent)."""
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
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        close_endpoint(self.endpoint)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"CudaIpcEndpoint({self.deployment!r}, {self.endpoint}, device {self.device}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise CudaIpcError(f"{self!r} is closed")

    # -- peers --
    def _import(self, peer: int, entry: dict) -> None:
        """Imports `peer`'s inbox from its directory entry (caller holds _lock)."""
        if entry.get("format") != _DIRECTORY_FORMAT or entry.get("endpoint") != peer:
            raise CudaIpcPeerRefusedError(f"{directory_path(self.deployment, peer)} is not a cuda_ipc entry of "
                                          f"endpoint {peer}")
        theirs, ours = entry.get("geometry"), vars(self.geometry)
        if theirs != ours:
            diff = {k: (theirs.get(k) if isinstance(theirs, dict) else None, v) for k, v in ours.items()
                    if not isinstance(theirs, dict) or theirs.get(k) != v}
            raise CudaIpcPeerRefusedError(
                f"refusing the inbox of endpoint {peer}: geometry/identity mismatch (theirs, ours): {diff}"
            )
        if entry.get("pid") == os.getpid():
            raise CudaIpcError(f"endpoint {peer} is in this process: cuda_ipc peers must be other processes")
        handle = bytes.fromhex(entry["handle"])
        if len(handle) != _HANDLE_BYTES:
            raise CudaIpcPeerRefusedError(f"endpoint {peer}'s entry has a malformed IPC handle")
        err = ctypes.create_string_buffer(_ERRLEN)
        buf = (ctypes.c_uint8 * _HANDLE_BYTES).from_buffer_copy(handle)
        if _lib().eaas_cuda_ipc_set_peer(self.endpoint, peer, buf, err, _ERRLEN) != 0:
            raise CudaIpcError(err.value.decode(errors="replace"))
        self._imported[peer] = entry["nonce"]

    def _forget(self, peer: int) -> None:
        err = ctypes.create_string_buffer(_ERRLEN)
        _lib().eaas_cuda_ipc_set_peer(self.endpoint, peer, None, err, _ERRLEN)
        self._imported.pop(peer, None)

    def connect(self, peer: int, timeout: float = 0.0) -> None:
        """Imports ``peer``'s inbox now (waiting up to ``timeout`` s for it to appear).

        Raises:
          CudaIpcPeerRefusedError: its geometry or deployment id differs, or
            the file under its entry's name is not a private file of this user.
          TimeoutError: it did not appear in time.
        """
        self._check_open()
        if not 0 <= int(peer) < self.geometry.max_endpoints or int(peer) == self.endpoint:
            raise ValueError(f"peer {peer} is not another endpoint in [0, {self.geometry.max_endpoints})")
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            entry = _peer_entry(self.deployment, int(peer))
            if entry is not None:
                with self._lock:
                    if self._imported.get(int(peer)) != entry["nonce"]:
                        self._import(int(peer), entry)
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"peer {peer} of deployment {self.deployment!r}: "
                                   f"{directory_path(self.deployment, peer)} does not exist")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _refresh(self, rescan: bool) -> None:
        """Imports the peers the kernels asked for; on `rescan`, follows every
        imported peer's entry (re-import when it changed, forget when gone)."""
        n = self.geometry.max_endpoints
        wanted = (ctypes.c_int32 * n)()
        if _lib().eaas_cuda_ipc_take_wanted(self.endpoint, wanted, n) < 0:
            return
        with self._lock:
            peers = {p for p in range(n) if wanted[p]} | (set(self._imported) if rescan else set())
            for peer in sorted(peers):
                try:
                    entry = _peer_entry(self.deployment, peer)
                except CudaIpcPeerRefusedError as e:  # not the peer's entry: it is unavailable
                    log.warning("cuda_ipc endpoint %d: %s", self.endpoint, e)
                    entry = None
                if entry is None:
                    if peer in self._imported:
                        self._forget(peer)
                elif self._imported.get(peer) != entry["nonce"]:
                    try:
                        self._import(peer, entry)
                    except CudaIpcError as e:  # refused peers stay unimported: their messages wait
                        if wanted[peer]:
                            log.warning("cuda_ipc endpoint %d: %s", self.endpoint, e)

    def _control_loop(self) -> None:
        last_scan = 0.0
        while not self._stop.wait(_WANTED_POLL_S):
            now = time.monotonic()
            try:
                self._refresh(rescan=now - last_scan >= _RESCAN_S)
            except Exception as e:  # noqa: BLE001 - keep serving; the kernels report what fails
                log.warning("cuda_ipc endpoint %d: control thread: %r", self.endpoint, e)
            if now - last_scan >= _RESCAN_S:
                last_scan = now

    def stats(self) -> dict[str, int]:
        """Counters of this endpoint (same names as the shm backend's)."""
        self._check_open()
        return endpoint_stats(self.endpoint)


class CudaIpcBackend:
    """The ``cuda_ipc`` transport backend (a ``backends.TransportBackend``)."""

    name = "cuda_ipc"
    ffi_targets = CUDA_IPC_TARGETS
    one_process_per_gpu = True  # see the top of this module

    def open_endpoint(self, name: str, endpoint: int, geometry: dict, entries=None) -> CudaIpcEndpoint:
        # On the process's first GPU; its peers are on this host (IPC handles):
        # found in this host's directory.
        return CudaIpcEndpoint(name, endpoint, **geometry)

    def endpoint_paths(self, name: str, endpoint: int) -> tuple[str, ...]:
        return (directory_path(name, endpoint),)

    def describe(self, endpoint: CudaIpcEndpoint) -> dict:
        return {"transport": self.name}  # peers find the inbox's handle in its directory entry

    def deployment_problems(self, deployment) -> list[str]:
        # Any server may name its GPU; whether it has one shows when it starts.
        return backends.foreign_options(deployment, self.name, takes=frozenset({"device"}))


BACKEND = CudaIpcBackend()
