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

Four XLA FFI custom calls (CPU, usable inside ``jax.jit``, side-effecting so
XLA never drops or merges them; their order is fixed by data dependencies: each
takes the previous call's small output as an ``after`` input):

* :func:`dispatch` (client): write each token once per target server.
* :func:`combine` (client): wait (one deadline) for every server's reply and
  sum the replies back per token.
* :func:`poll` (server): collect whatever requests have arrived from any
  client, layer and micro-batch, up to a capacity.
* :func:`reply` (server): send each accepted request's rows back.

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
  :data:`STATUS_UNAVAILABLE` for it without waiting.
* ``targets`` entries that are neither -1 nor one of ``servers`` are ignored
  (counted as ``unrouted_targets``).
* poll returns as soon as one sweep over the inbox found at least one valid
  message; requests that do not fit (``capacity`` rows / ``max_messages``)
  stay in their slot for the next poll, which starts with them.
* A second :func:`poll` before :func:`reply` discards the first poll's
  requests (their clients time out; counted as ``unreplied``).
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import os
import struct
import threading
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.transport import native

__all__ = [
    "COUNTER_NAMES",
    "HEADER",
    "KIND_REPLY",
    "KIND_REQUEST",
    "DISPATCH_DTYPES",
    "HIDDEN_BF16",
    "HIDDEN_F32",
    "HIDDEN_F8E4M3",
    "PollResult",
    "STATUS_BAD_REPLY",
    "STATUS_NOTHING_SENT",
    "STATUS_OK",
    "STATUS_TIMEOUT",
    "STATUS_UNAVAILABLE",
    "ShmEndpoint",
    "ShmEndpointInUseError",
    "ShmError",
    "ShmGeometry",
    "ShmPeerRefusedError",
    "combine",
    "default_deployment_id",
    "dispatch",
    "message_checksum",
    "pack_header",
    "poll",
    "reply",
    "segment_name",
    "segment_path",
    "unpack_header",
]

# --- wire format (must match ffi/wire_format.h) ------------------------------

#: MessageHeader: seq, deployment_id, ticket (u64); kind, hidden_dtype (u16);
#: sender, layer, micro_batch, num_tokens, reserved[4], checksum (u32).
HEADER = struct.Struct("<QQQHHIIII4II")
assert HEADER.size == 64
_HEADER_FIELDS = (
    "seq", "deployment_id", "ticket", "kind", "hidden_dtype", "sender", "layer",
    "micro_batch", "num_tokens", "reserved", "checksum",
)
KIND_REQUEST = 1
KIND_REPLY = 2
HIDDEN_F32 = 1
HIDDEN_BF16 = 2
HIDDEN_F8E4M3 = 3
#: dtype of dispatched hidden states -> MessageHeader.hidden_dtype code
DISPATCH_DTYPES = {"float32": HIDDEN_F32, "bfloat16": HIDDEN_BF16, "float8_e4m3fn": HIDDEN_F8E4M3}

#: combine status codes, per server.
STATUS_OK = 0  #: reply received and summed in
STATUS_TIMEOUT = 1  #: no reply by the deadline (its tokens' rows are zero)
STATUS_BAD_REPLY = 2  #: a reply came but failed validation (rows are zero)
STATUS_NOTHING_SENT = 3  #: no token for this server (or servers[s] == -1)
STATUS_UNAVAILABLE = 4  #: dispatch could not reach the server (sent == -1)

_ERRLEN = 1024


class ShmError(RuntimeError):
    """An shm transport operation failed."""


class ShmEndpointInUseError(ShmError, FileExistsError):
    """The endpoint is already open, in this or another live process."""


class ShmPeerRefusedError(ShmError):
    """A peer's inbox does not match this endpoint's geometry or deployment."""


@dataclasses.dataclass(frozen=True)
class ShmGeometry:
    """What every endpoint of a deployment must agree on."""

    max_endpoints: int
    num_channels: int
    capacity: int
    hidden_size: int
    top_k: int
    num_layers: int
    num_experts: int
    deployment_id: int
    dispatch_dtype: str = "float32"  #: of the hidden states in requests


@dataclasses.dataclass(frozen=True)
class _Layout:
    segment_header_bytes: int
    slot_bytes: int
    total_bytes: int
    hidden_offset: int
    expert_ids_offset: int
    gates_offset: int
    scales_offset: int


def default_deployment_id(deployment: str) -> int:
    """64-bit FNV-1a of the deployment name: the id when none is given."""
    h = 0xCBF29CE484222325
    for b in deployment.encode():
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def segment_name(deployment: str, endpoint: int) -> str:
    """POSIX shm name of an endpoint's inbox."""
    return f"/eaas-{deployment}-{int(endpoint)}"


def segment_path(deployment: str, endpoint: int) -> str:
    """Where the inbox appears in the file system (Linux)."""
    return "/dev/shm" + segment_name(deployment, endpoint)


def message_checksum(header: bytes) -> int:
    """FNV-1a 32 of the first 60 header bytes (the checksum field excluded)."""
    row = np.frombuffer(bytes(header[:60]), dtype=np.uint8)[None, :]
    return int(native.header_checksum_reference(row)[0])


def pack_header(
    *,
    seq: int,
    deployment_id: int,
    kind: int,
    sender: int,
    layer: int,
    micro_batch: int,
    num_tokens: int,
    ticket: int | None = None,
    hidden_dtype: int = HIDDEN_F32,
    reserved: tuple[int, int, int, int] = (0, 0, 0, 0),
    checksum: int | None = None,
) -> bytes:
    """A 64-byte message header (checksum computed unless given): for tools and tests."""
    ticket = seq if ticket is None else ticket
    fields = (seq, deployment_id, ticket, kind, hidden_dtype, sender, layer,
              micro_batch, num_tokens, *reserved)
    body = HEADER.pack(*fields, 0)
    if checksum is None:
        checksum = message_checksum(body)
    return HEADER.pack(*fields, checksum)


def unpack_header(data: bytes) -> dict[str, Any]:
    """Fields of a 64-byte message header, plus ``checksum_ok``."""
    values = HEADER.unpack(bytes(data[:64]))
    out = dict(zip(_HEADER_FIELDS[:9], values[:9]))
    out["reserved"] = tuple(values[9:13])
    out["checksum"] = values[13]
    out["checksum_ok"] = message_checksum(data) == values[13]
    return out


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
            lib.eaas_shm_stat_names.argtypes = []
            lib.eaas_shm_stat_names.restype = ctypes.c_char_p
            lib.eaas_shm_connect.argtypes = [i64, i64, c_char_p, i64]
            lib.eaas_shm_connect.restype = ctypes.c_int
            _c_api = lib
        return _c_api


def _counter_names() -> tuple[str, ...]:
    return tuple(_lib().eaas_shm_stat_names().decode().split(","))


def __getattr__(name: str):  # COUNTER_NAMES is read from the library lazily
    if name == "COUNTER_NAMES":
        return _counter_names()
    raise AttributeError(name)


def _info(endpoint: int) -> tuple[ShmGeometry, _Layout]:
    out = (ctypes.c_int64 * 16)()
    n = _lib().eaas_shm_info(int(endpoint), out, 16)
    if n < 0:
        raise ShmError(
            f"shm endpoint {endpoint} is not open in this process; open it with "
            "ShmEndpoint(...) first (its geometry gives the output shapes)"
        )
    v = list(out[:n])
    dtype_names = {code: name for name, code in DISPATCH_DTYPES.items()}
    geo = ShmGeometry(
        max_endpoints=v[0], num_channels=v[1], capacity=v[2], hidden_size=v[3],
        top_k=v[4], num_layers=v[5], num_experts=v[6],
        deployment_id=v[7] & 0xFFFFFFFFFFFFFFFF, dispatch_dtype=dtype_names[v[8]],
    )
    layout = _Layout(*v[9:16])
    return geo, layout


_OPEN: dict[int, "ShmEndpoint"] = {}
_OPEN_LOCK = threading.Lock()


@atexit.register
def _close_all() -> None:
    with _OPEN_LOCK:
        endpoints = list(_OPEN.values())
    for ep in endpoints:
        try:
            ep.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class ShmEndpoint:
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
        ``DISPATCH_DTYPES``; float8 rows travel with a float32 scale each).

    Raises:
      ShmEndpointInUseError: the endpoint is already open (here or in a live
        process). ShmError: any other failure (bad name or geometry, no memory).
    """

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
        if dispatch_dtype not in DISPATCH_DTYPES:
            raise ValueError(f"dispatch_dtype must be one of {sorted(DISPATCH_DTYPES)}, got {dispatch_dtype!r}")
        self.deployment = str(deployment)
        self.endpoint = int(endpoint)
        if deployment_id is None:
            deployment_id = default_deployment_id(self.deployment)
        err = ctypes.create_string_buffer(_ERRLEN)
        rc = _lib().eaas_shm_open(
            self.deployment.encode(), int(deployment_id) & 0xFFFFFFFFFFFFFFFF,
            self.endpoint, int(max_endpoints), int(num_channels), int(capacity),
            int(hidden_size), int(top_k), int(num_layers), int(num_experts),
            DISPATCH_DTYPES[dispatch_dtype], err, _ERRLEN,
        )
        if rc != 0:
            msg = err.value.decode(errors="replace")
            raise (ShmEndpointInUseError if rc == -2 else ShmError)(msg)
        self._closed = False
        self.geometry, self.layout = _info(self.endpoint)
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
        _lib().eaas_shm_close(self.endpoint)

    def __enter__(self) -> "ShmEndpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        names = _counter_names()
        out = (ctypes.c_int64 * len(names))()
        n = _lib().eaas_shm_stats(self.endpoint, out, len(names))
        if n < 0:
            raise ShmError(f"{self!r} is not open")
        return dict(zip(names, out[: min(n, len(names))]))

    # -- the custom calls, bound to this endpoint --
    def dispatch(self, *args, **kwargs):
        return dispatch(self, *args, **kwargs)

    def combine(self, *args, **kwargs):
        return combine(self, *args, **kwargs)

    def poll(self, *args, **kwargs):
        return poll(self, *args, **kwargs)

    def reply(self, *args, **kwargs):
        return reply(self, *args, **kwargs)


# --- the custom calls ----------------------------------------------------------


class PollResult(NamedTuple):
    """What :func:`poll` returns (rows ``num_rows..C-1`` are padding)."""

    hidden: jax.Array  #: [C, d] in the dispatch dtype (padding: 0)
    scales: jax.Array  #: [C] float32: row r is hidden[r] * scales[r] (1 unless float8)
    expert_ids: jax.Array  #: [C, k] int32 (padding, and slots for other servers: -1)
    gates: jax.Array  #: [C, k] float32 (0 where expert_ids is -1)
    layer: jax.Array  #: [C] int32 (padding: -1)
    num_rows: jax.Array  #: [] int32


def _resolve(endpoint) -> tuple[int, ShmGeometry]:
    if isinstance(endpoint, ShmEndpoint):
        endpoint._check_open()
        return endpoint.endpoint, endpoint.geometry
    if isinstance(endpoint, (int, np.integer)) and not isinstance(endpoint, bool):
        return int(endpoint), _info(int(endpoint))[0]
    raise TypeError(f"endpoint must be an ShmEndpoint or an int, got {type(endpoint).__name__}")


def _check(where: str, name: str, x, dtype, shape: tuple) -> jax.Array:
    """Checks dtype and shape (None = any size) of an array argument."""
    got = getattr(x, "dtype", None)
    if got is None or np.dtype(got) != np.dtype(dtype):
        raise TypeError(
            f"{where}: {name} must be an array of dtype {np.dtype(dtype).name}, got "
            f"{np.dtype(got).name if got is not None else type(x).__name__}"
        )
    xs = tuple(x.shape)
    if len(xs) != len(shape) or any(w is not None and w != s for w, s in zip(shape, xs)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{where}: {name} must have shape {want}, got {list(xs)}")
    return jnp.asarray(x)


def _order(after) -> jax.Array:
    if after is None:
        return jnp.zeros((), jnp.int32)
    if not hasattr(after, "shape") or not hasattr(after, "dtype"):
        raise TypeError(f"after must be an array (an ordering token), got {type(after).__name__}")
    return jnp.asarray(after)


def _static_int(where: str, name: str, value, lo: int, hi: int) -> np.int64:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{where}: {name} must be a static Python int, got {type(value).__name__}")
    if not lo <= int(value) < hi:
        raise ValueError(f"{where}: {name}={int(value)} is not in [{lo}, {hi})")
    return np.int64(value)


def dispatch(endpoint, hidden, expert_ids, gates, targets, servers, *, layer: int,
             micro_batch: int, scales=None, after=None) -> jax.Array:
    """Client: send each token once to every server one of its top-k slots targets.

    Args:
      endpoint: this client's :class:`ShmEndpoint` (or its index, open here).
      hidden: ``[T, d]`` in the endpoint's dispatch dtype, ``T <= capacity``
        (`eaas_jax.transport.hidden_codec.encode` makes it from float rows).
      scales: ``float32[T]``, the float8 rows' scales (ignored otherwise).
      expert_ids: ``int32[T, k]`` routed experts (-1: none).
      gates: ``float32[T, k]`` their gate weights.
      targets: ``int32[T, k]`` endpoint index serving each (token, slot), -1 = none
        (computed in-graph from the routing table and liveness mask).
      servers: ``int32[S]`` endpoint index of each server, -1 = unused entry;
        no endpoint twice.
      layer, micro_batch: static ints (``micro_batch`` picks the mailbox channel).
      after: any array this call must run after (ordering token).

    Returns:
      ``int32[S]`` sent: tokens sent to server ``s`` (0: no message, -1: server
      unreachable). Server ``s`` receives its tokens in increasing token order,
      with the expert ids of slots not targeting it replaced by -1 (gate 0).
    """
    where = "shm.dispatch"
    ep, geo = _resolve(endpoint)
    hidden = _check(where, "hidden", hidden, jnp.dtype(geo.dispatch_dtype), (None, geo.hidden_size))
    t = hidden.shape[0]
    scales = jnp.ones((t,), jnp.float32) if scales is None else _check(where, "scales", scales, np.float32, (t,))
    expert_ids = _check(where, "expert_ids", expert_ids, np.int32, (t, geo.top_k))
    gates = _check(where, "gates", gates, np.float32, (t, geo.top_k))
    targets = _check(where, "targets", targets, np.int32, (t, geo.top_k))
    servers = _check(where, "servers", servers, np.int32, (None,))
    if t > geo.capacity:
        raise ValueError(
            f"{where}: {t} tokens exceed the mailbox capacity {geo.capacity}; open the "
            "endpoints with capacity >= the tokens of one micro-batch"
        )
    native.register_targets()
    call = jax.ffi.ffi_call(
        native.SHM_DISPATCH_TARGET,
        jax.ShapeDtypeStruct(servers.shape, jnp.int32),
        has_side_effect=True,
    )
    return call(
        hidden, scales, expert_ids, gates, targets, servers, _order(after),
        endpoint=np.int64(ep),
        layer=_static_int(where, "layer", layer, 0, geo.num_layers),
        micro_batch=_static_int(where, "micro_batch", micro_batch, 0, geo.num_channels),
    )


def combine(endpoint, sent, targets, servers, *, layer: int, micro_batch: int,
            timeout_us: int, after=None) -> tuple[jax.Array, jax.Array]:
    """Client: wait for the replies of the matching :func:`dispatch` and sum them.

    ``targets`` and ``servers`` must be the ones given to that dispatch (they
    define the per-server token order); ``sent`` is its output. Waits for every
    server with ``sent > 0`` until ONE deadline, ``timeout_us`` after the call
    starts; never longer.

    Returns:
      ``(out, status)``: ``float32[T, d]`` the sum over servers of their reply
      rows scattered back to the tokens (a server that failed contributes zeros),
      and ``int32[S]`` per-server status (``STATUS_*``).
    """
    where = "shm.combine"
    ep, geo = _resolve(endpoint)
    targets = _check(where, "targets", targets, np.int32, (None, geo.top_k))
    servers = _check(where, "servers", servers, np.int32, (None,))
    sent = _check(where, "sent", sent, np.int32, (servers.shape[0],))
    native.register_targets()
    call = jax.ffi.ffi_call(
        native.SHM_COMBINE_TARGET,
        (
            jax.ShapeDtypeStruct((targets.shape[0], geo.hidden_size), jnp.float32),
            jax.ShapeDtypeStruct(servers.shape, jnp.int32),
        ),
        has_side_effect=True,
    )
    out, status = call(
        sent, targets, servers, _order(after),
        endpoint=np.int64(ep),
        layer=_static_int(where, "layer", layer, 0, geo.num_layers),
        micro_batch=_static_int(where, "micro_batch", micro_batch, 0, geo.num_channels),
        timeout_us=_static_int(where, "timeout_us", timeout_us, 0, 1 << 40),
    )
    return out, status


def poll(endpoint, hosted, *, capacity: int, max_messages: int | None = None,
         timeout_us: int, after=None) -> PollResult:
    """Server: collect the requests that have arrived (any client, layer, channel).

    Waits up to ``timeout_us`` for at least one valid message, then returns
    whatever one sweep over the inbox found (possibly nothing: ``num_rows`` 0).
    Invalid messages are dropped and counted (:meth:`ShmEndpoint.stats`).

    Args:
      hosted: ``int32[num_layers, num_experts]``, nonzero where this server hosts
        (layer, expert); a request naming any other expert is dropped.
      capacity: rows ``C`` of the outputs, ``>=`` the mailbox capacity.
      max_messages: most messages to accept (default: no limit but rows).
        Messages over either limit stay for the next poll.
      after: any array this call must run after.

    Returns:
      :class:`PollResult`. Accepted messages occupy rows ``[0, num_rows)``, each
      message's tokens contiguous; :func:`reply` needs the results in the same rows.
    """
    where = "shm.poll"
    ep, geo = _resolve(endpoint)
    hosted = _check(where, "hosted", hosted, np.int32, (geo.num_layers, geo.num_experts))
    c = int(_static_int(where, "capacity", capacity, 1, 1 << 31))
    if c < geo.capacity:
        raise ValueError(
            f"{where}: capacity {c} is below the mailbox capacity {geo.capacity}: "
            "a full message would never fit"
        )
    if max_messages is None:
        max_messages = c
    native.register_targets()
    d, k = geo.hidden_size, geo.top_k
    call = jax.ffi.ffi_call(
        native.SHM_POLL_TARGET,
        (
            jax.ShapeDtypeStruct((c, d), jnp.dtype(geo.dispatch_dtype)),
            jax.ShapeDtypeStruct((c,), jnp.float32),
            jax.ShapeDtypeStruct((c, k), jnp.int32),
            jax.ShapeDtypeStruct((c, k), jnp.float32),
            jax.ShapeDtypeStruct((c,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32),
        ),
        has_side_effect=True,
    )
    return PollResult(*call(
        hosted, _order(after),
        endpoint=np.int64(ep),
        max_messages=_static_int(where, "max_messages", max_messages, 1, 1 << 31),
        timeout_us=_static_int(where, "timeout_us", timeout_us, 0, 1 << 40),
    ))


def reply(endpoint, out, num_rows) -> jax.Array:
    """Server: answer every request the last :func:`poll` accepted.

    Args:
      out: ``float32[C, d]``, row ``r`` = the result for poll row ``r`` (the
        gate-weighted sum over the row's experts); same ``C`` as the poll.
      num_rows: the poll's ``num_rows`` (also orders this call after it).

    Returns:
      ``int32[]``: the number of replies sent (an ordering token).
    """
    where = "shm.reply"
    ep, geo = _resolve(endpoint)
    out = _check(where, "out", out, np.float32, (None, geo.hidden_size))
    num_rows = _check(where, "num_rows", num_rows, np.int32, ())
    native.register_targets()
    call = jax.ffi.ffi_call(
        native.SHM_REPLY_TARGET,
        jax.ShapeDtypeStruct((), jnp.int32),
        has_side_effect=True,
    )
    return call(out, num_rows, endpoint=np.int64(ep))

