"""The CPU ``shm`` backend of the expert transport.

Every process of a deployment (attention client or expert server) opens an
:class:`ShmEndpoint`: an endpoint index ``e`` in ``[0, max_endpoints)`` and ONE
inbox, the POSIX shared-memory segment ``/eaas-<deployment>-<e>``
(``/dev/shm/eaas-<deployment>-<e>`` on Linux), created exclusively with mode
0600 and unlinked when the endpoint closes. The inbox holds
``max_endpoints x num_channels`` mailbox slots; slot ``(sender, channel)`` is
written one-sidedly, and only, by ``sender`` (``channel`` = micro-batch index).
A slot is a 64-byte message header followed by fixed-capacity payload arrays
(hidden ``[capacity, d]`` in the deployment's dispatch dtype, float32,
bfloat16 or float8_e4m3fn; expert ids ``[capacity, k]`` int32; gates
``[capacity, k]`` float32; a float32 scale per float8 row). Requests go into
the server's inbox, replies (the ``[n, d]`` float32 partial sums) into the
client's. The wire format, seqlock
publication protocol and validation rules are documented at the top of
``ffi/wire_format.h``; the segment layout and process-wide state at the top of
``ffi/shm_transport.cc``.

Every endpoint of a deployment must use the same geometry (``max_endpoints``,
``num_channels``, ``capacity``, ``hidden_size``, ``top_k``, ``num_layers``,
``num_experts``, ``dispatch_dtype``) and deployment id; a peer whose inbox
differs is refused.

The four custom calls (:func:`dispatch`, :func:`combine`, :func:`poll`,
:func:`reply`; CPU handlers here) are those of every backend, defined in
``transport/custom_calls.py``; the ones here also take an endpoint's index.
The message header and status codes are in ``transport/wire.py``;
:data:`BACKEND` is this module's entry in ``transport/backends.py``.

The handlers look the endpoint up by index in a process-wide registry, so the
endpoint must be open (in this process) when a compiled function runs, and when
it is traced for :func:`combine`/:func:`poll` given an ``int`` endpoint (its
geometry gives the output shapes). A process may host several endpoints (e.g.
a client and a server in tests). Endpoints are not closed by garbage
collection (a compiled step refers to them by index only): close them
explicitly or use ``with``; whatever is still open is closed at interpreter
exit. A segment left behind by a crashed process is reclaimed by the next open
of its endpoint.

Behaviour choices:

* Capacity: a micro-batch may not have more tokens than the mailbox
  ``capacity`` (checked when tracing and by the handler), so a message never
  overflows its slot and no token is ever dropped.
* A server that cannot be reached when dispatching (no inbox yet, closed, or
  refused) gets no message: ``sent = -1``, and combine reports
  ``wire.STATUS_UNAVAILABLE`` for it without waiting.
* ``targets`` entries that are neither -1 nor one of ``servers`` are ignored
  (counted as ``unrouted_targets``).
* poll returns as soon as one sweep over the inbox found at least one valid
  message; requests that do not fit (``capacity`` rows / ``max_messages``)
  stay in their slot for the next poll, which starts with them.
* A second :func:`poll` before :func:`reply` discards the first poll's
  requests (their clients time out; counted as ``unreplied``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import threading
import time

import numpy as np

from eaas_jax.transport import backends, custom_calls, native, wire
from eaas_jax.transport.custom_calls import BoundCalls, FfiTargets, close_at_exit

__all__ = [
    "BACKEND",
    "SHM_TARGETS",
    "ShmEndpoint",
    "ShmEndpointInUseError",
    "ShmError",
    "ShmPeerRefusedError",
    "combine",
    "dispatch",
    "poll",
    "reply",
    "segment_name",
    "segment_path",
]

#: The XLA targets of this backend (CPU handlers).
SHM_TARGETS = FfiTargets(
    native.SHM_DISPATCH_TARGET, native.SHM_COMBINE_TARGET, native.SHM_POLL_TARGET, native.SHM_REPLY_TARGET
)

#: Byte offsets of the segment header fields (ffi/shm_transport.cc, SegmentHeader)
#: that tools and tests read: `closed` (u32, set when the owner closed the
#: segment or a new owner reclaimed it), the owner's pid (i64) and process
#: start time (u64, field 22 of /proc/<pid>/stat; 0 unknown).
SEGMENT_OWNER_ENDPOINT_OFFSET = 20
SEGMENT_CLOSED_OFFSET = 52
SEGMENT_OWNER_PID_OFFSET = 80
SEGMENT_OWNER_START_TIME_OFFSET = 96

_ERRLEN = 1024


class ShmError(RuntimeError):
    """An shm transport operation failed."""


class ShmEndpointInUseError(ShmError, FileExistsError):
    """The endpoint is already open, in this or another live process."""


class ShmPeerRefusedError(ShmError):
    """A peer's inbox does not match this endpoint's geometry or deployment."""


@dataclasses.dataclass(frozen=True)
class _Layout:
    segment_header_bytes: int
    slot_bytes: int
    total_bytes: int
    hidden_offset: int
    expert_ids_offset: int
    gates_offset: int
    scales_offset: int


def segment_name(deployment: str, endpoint: int) -> str:
    """POSIX shm name of an endpoint's inbox."""
    return f"/eaas-{deployment}-{int(endpoint)}"


def segment_path(deployment: str, endpoint: int) -> str:
    """Where the inbox appears in the file system (Linux)."""
    return "/dev/shm" + segment_name(deployment, endpoint)


# --- the C API (ctypes) ------------------------------------------------------

_C_LOCK = threading.Lock()
_c_api: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _c_api
    with _C_LOCK:
        if _c_api is None:
            lib = native.load_library()
            i64, p_i64, c_char_p = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), ctypes.c_char_p
            lib.eaas_shm_open.argtypes = [c_char_p, ctypes.c_uint64] + [i64] * 9 + [c_char_p, i64]
            lib.eaas_shm_open.restype = ctypes.c_int
            lib.eaas_shm_close.argtypes = [i64]
            lib.eaas_shm_close.restype = ctypes.c_int
            lib.eaas_shm_stats.argtypes = [i64, p_i64, i64]
            lib.eaas_shm_stats.restype = ctypes.c_int
            lib.eaas_shm_info.argtypes = [i64, p_i64, i64]
            lib.eaas_shm_info.restype = ctypes.c_int
            lib.eaas_shm_connect.argtypes = [i64, i64, c_char_p, i64]
            lib.eaas_shm_connect.restype = ctypes.c_int
            _c_api = lib
        return _c_api


def endpoint_info(endpoint: int) -> tuple[wire.Geometry, _Layout]:
    """Geometry and slot layout of the endpoint with index `endpoint` open in
    this process (shm or ibgda: both have an shm inbox)."""
    out = (ctypes.c_int64 * 16)()
    n = _lib().eaas_shm_info(int(endpoint), out, 16)
    if n < 0:
        raise ShmError(f"shm endpoint {endpoint} is not open in this process")
    v = list(out[:n])
    dtype_names = {code: name for name, code in wire.DISPATCH_DTYPES.items()}
    geo = wire.Geometry(
        max_endpoints=v[0], num_channels=v[1], capacity=v[2], hidden_size=v[3],
        top_k=v[4], num_layers=v[5], num_experts=v[6],
        deployment_id=v[7] & 0xFFFFFFFFFFFFFFFF, dispatch_dtype=dtype_names[v[8]],
    )
    layout = _Layout(*v[9:16])
    return geo, layout


def endpoint_stats(endpoint: int) -> dict[str, int]:
    """The counters of the endpoint with index `endpoint` open in this process."""
    names = native.counter_names()
    out = (ctypes.c_int64 * len(names))()
    n = _lib().eaas_shm_stats(int(endpoint), out, len(names))
    if n < 0:
        raise ShmError(f"endpoint {endpoint} is not open in this process")
    return dict(zip(names, out[: min(n, len(names))]))


def close_endpoint(endpoint: int) -> None:
    """Closes the endpoint with index `endpoint` open in this process: marks
    its inbox closed and unlinks it (no-op if it is not open)."""
    _lib().eaas_shm_close(int(endpoint))


_OPEN: dict[int, "ShmEndpoint"] = {}
_OPEN_LOCK = threading.Lock()
close_at_exit(_OPEN, _OPEN_LOCK)


def _by_index(call):
    """`call` (one of the four custom calls), also taking the index of an shm
    endpoint open in this process instead of the endpoint: the form that
    predates the other backends."""

    @functools.wraps(call)
    def wrapper(endpoint, *args, **kwargs):
        if isinstance(endpoint, (int, np.integer)) and not isinstance(endpoint, bool):
            with _OPEN_LOCK:
                found = _OPEN.get(int(endpoint))
            if found is None:
                raise ShmError(
                    f"shm endpoint {endpoint} is not open in this process; open it with "
                    "ShmEndpoint(...) first (its geometry gives the output shapes)"
                )
            endpoint = found
        return call(endpoint, *args, **kwargs)

    return wrapper


dispatch, combine, poll, reply = map(
    _by_index, (custom_calls.dispatch, custom_calls.combine, custom_calls.poll, custom_calls.reply))


class ShmEndpoint(BoundCalls):
    """One endpoint of a deployment and its shared-memory inbox.

    Args:
      deployment: short name, ``[A-Za-z0-9_-]{1,40}``; part of the shm names.
      endpoint: this process's index in ``[0, max_endpoints)``.
      max_endpoints, num_channels, capacity, hidden_size, top_k, num_layers,
      num_experts: the deployment's geometry (identical on every endpoint).
        ``capacity`` = most tokens per message (>= tokens per micro-batch).
      deployment_id: 64-bit id checked in every message; defaults to a hash of
        ``deployment``.
      dispatch_dtype: dtype of the hidden states clients send (a key of
        ``wire.DISPATCH_DTYPES``; float8 rows travel with a float32 scale each).

    Raises:
      ShmEndpointInUseError: the endpoint is already open (here or in a live
        process). ShmError: any other failure (bad name or geometry, no memory).
    """

    ffi_targets = SHM_TARGETS

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
    ):
        self.deployment, deployment_id = wire.endpoint_identity(deployment, deployment_id, dispatch_dtype)
        self.endpoint = int(endpoint)
        err = ctypes.create_string_buffer(_ERRLEN)
        rc = _lib().eaas_shm_open(
            self.deployment.encode(), deployment_id,
            self.endpoint, int(max_endpoints), int(num_channels), int(capacity),
            int(hidden_size), int(top_k), int(num_layers), int(num_experts),
            wire.DISPATCH_DTYPES[dispatch_dtype], err, _ERRLEN,
        )
        if rc != 0:
            msg = err.value.decode(errors="replace")
            raise (ShmEndpointInUseError if rc == -2 else ShmError)(msg)
        self._closed = False
        self.geometry, self.layout = endpoint_info(self.endpoint)
        with _OPEN_LOCK:
            _OPEN[self.endpoint] = self

    # -- lifecycle --
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment_name(self) -> str:
        return segment_name(self.deployment, self.endpoint)

    @property
    def segment_path(self) -> str:
        return segment_path(self.deployment, self.endpoint)

    def close(self) -> None:
        """Unlink the inbox and forget the endpoint (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with _OPEN_LOCK:
            if _OPEN.get(self.endpoint) is self:
                del _OPEN[self.endpoint]
        close_endpoint(self.endpoint)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"ShmEndpoint({self.deployment!r}, {self.endpoint}, {state})"

    def _check_open(self) -> None:
        if self._closed:
            raise ShmError(f"{self!r} is closed")

    # -- peers / counters --
    def connect(self, peer: int, timeout: float = 0.0) -> None:
        """Map ``peer``'s inbox now (sends do it lazily) and check it matches.

        Waits up to ``timeout`` seconds for the peer to create its inbox.

        Raises:
          ShmPeerRefusedError: its geometry or deployment id differs.
          TimeoutError: it did not appear in time.
        """
        self._check_open()
        deadline = time.monotonic() + timeout
        err = ctypes.create_string_buffer(_ERRLEN)
        delay = 0.001
        while True:
            rc = _lib().eaas_shm_connect(self.endpoint, int(peer), err, _ERRLEN)
            if rc == 0:
                return
            msg = err.value.decode(errors="replace")
            if rc == 2:
                raise ShmPeerRefusedError(msg)
            if rc < 0:
                raise ShmError(msg)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"peer {peer} of deployment {self.deployment!r}: {msg}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stats(self) -> dict[str, int]:
        """Counters of this endpoint (messages sent/accepted, drops per reason...)."""
        self._check_open()
        return endpoint_stats(self.endpoint)


class ShmBackend:
    """The ``shm`` transport backend (a ``backends.TransportBackend``)."""

    name = "shm"
    ffi_targets = SHM_TARGETS
    one_process_per_gpu = False  # CPU processes

    def open_endpoint(self, name: str, endpoint: int, geometry: dict, entries=None) -> ShmEndpoint:
        return ShmEndpoint(name, endpoint, **geometry)  # peers are on this host: found by name

    def endpoint_paths(self, name: str, endpoint: int) -> tuple[str, ...]:
        return (segment_path(name, endpoint),)

    def describe(self, endpoint: ShmEndpoint) -> dict:
        return {"transport": self.name}  # peers find the inbox by name

    def deployment_problems(self, deployment) -> list[str]:
        return backends.foreign_options(deployment, self.name)


BACKEND = ShmBackend()
