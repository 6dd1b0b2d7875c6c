"""The four custom calls of the expert transport, for every backend.

An endpoint object (:class:`~eaas_jax.transport.shm.ShmEndpoint` on CPUs,
:class:`~eaas_jax.transport.cuda_ipc.CudaIpcEndpoint` on GPUs) names the XLA
FFI targets of its backend (``ffi_targets``) and its geometry; the calls
check their arguments against that geometry and emit the backend's custom
call. All four are side-effecting (XLA never drops or merges them); their
order is fixed by data dependencies: each takes the previous call's small
output as an ``after`` input.

* :func:`dispatch` (client): write each token once per target server.
* :func:`combine` (client): wait (one deadline) for every server's reply and
  sum the replies back per token.
* :func:`poll` (server): collect whatever requests have arrived from any
  client, layer and micro-batch, up to a capacity.
* :func:`reply` (server): send each accepted request's rows back.
"""

from __future__ import annotations

import atexit
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.transport import native

#: XLA compile options for every program holding these calls. On 2 x H200
#: (jaxlib 0.11.2) a W1 prefill step, whose chunks are static slices of a
#: micro-batch, ran the combine handler 2048 times for its 1024 combines and
#: failed. XLA's source points at its GPU dynamic-slice fusion
#: (DynamicSliceFusionRewriterV2): it copies an FFI call with a sliced operand
#: into a fusion and, for a call with two results, also leaves the original,
#: which as a side-effecting call is never removed as dead.
COMPILER_OPTIONS = {"xla_gpu_enable_dynamic_slice_fusion": False}


class FfiTargets(NamedTuple):
    """The XLA custom-call target names of one backend."""

    dispatch: str
    combine: str
    poll: str
    reply: str


class PollResult(NamedTuple):
    """What :func:`poll` returns (rows ``num_rows..C-1`` are padding)."""

    hidden: jax.Array  #: [C, d] in the dispatch dtype (padding: 0)
    scales: jax.Array  #: [C] float32: row r is hidden[r] * scales[r] (1 unless float8)
    expert_ids: jax.Array  #: [C, k] int32 (padding, and slots for other servers: -1)
    gates: jax.Array  #: [C, k] float32 (0 where expert_ids is -1)
    layer: jax.Array  #: [C] int32 (padding: -1)
    num_rows: jax.Array  #: [] int32


def close_at_exit(registry: dict, lock: threading.Lock) -> None:
    """Closes, at interpreter exit, the endpoints still in `registry` (a
    backend's open endpoints by index): compiled steps name endpoints by index
    only, so garbage collection never closes them."""

    def close_all() -> None:
        with lock:
            endpoints = list(registry.values())
        for ep in endpoints:
            try:
                ep.close()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass

    atexit.register(close_all)


class BoundCalls:
    """What every backend's endpoint class shares: the four calls bound to the
    endpoint, and ``with`` (which closes it)."""

    def dispatch(self, *args, **kwargs):
        return dispatch(self, *args, **kwargs)

    def combine(self, *args, **kwargs):
        return combine(self, *args, **kwargs)

    def poll(self, *args, **kwargs):
        return poll(self, *args, **kwargs)

    def reply(self, *args, **kwargs):
        return reply(self, *args, **kwargs)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve(endpoint):
    """(index, geometry, FfiTargets) of an endpoint object."""
    targets = getattr(endpoint, "ffi_targets", None)
    if not isinstance(targets, FfiTargets):
        raise TypeError(f"endpoint must be a transport endpoint, got {type(endpoint).__name__}")
    endpoint._check_open()
    return endpoint.endpoint, endpoint.geometry, targets


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
      endpoint: this client's endpoint.
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
    where = "transport.dispatch"
    ep, geo, calls = _resolve(endpoint)
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
        calls.dispatch,
        jax.ShapeDtypeStruct(servers.shape, jnp.int32),
        has_side_effect=True,
    )
    return call(
        hidden, scales, expert_ids, gates, targets, servers, _order(after),
        endpoint=np.int64(ep),
        layer=_static_int(where, "layer", layer, 0, geo.num_layers),
        micro_batch=_static_int(where, "micro_batch", micro_batch, 0, geo.num_channels),
    )


class Combined(NamedTuple):
    """What :func:`combine` returns."""

    out: jax.Array  #: [T, d] float32: per token, the sum of its servers' reply rows (zeros from failed ones)
    status: jax.Array  #: [S] int32 per-server status (``wire.STATUS_*``, meanings in ``wire.STATUSES``)
    #: [S] int32: microseconds from the call's start until each server's reply
    #: was taken (or the deadline passed); 0 where nothing was sent. The time
    #: this client waited on each server in this exchange.
    waited_us: jax.Array


def combine(endpoint, sent, targets, servers, *, layer: int, micro_batch: int,
            timeout_us: int, after=None) -> Combined:
    """Client: wait for the replies of the matching :func:`dispatch` and sum them.

    ``targets`` and ``servers`` must be the ones given to that dispatch (they
    define the per-server token order); ``sent`` is its output. Waits for every
    server with ``sent > 0`` until ONE deadline, ``timeout_us`` after the call
    starts; never longer. ``timeout_us`` (an int or an int32 scalar array) is
    an operand of the compiled call: a new value does not recompile.

    Returns:
      :class:`Combined` ``(out, status, waited_us)``.
    """
    where = "transport.combine"
    ep, geo, calls = _resolve(endpoint)
    targets = _check(where, "targets", targets, np.int32, (None, geo.top_k))
    servers = _check(where, "servers", servers, np.int32, (None,))
    sent = _check(where, "sent", sent, np.int32, (servers.shape[0],))
    native.register_targets()
    call = jax.ffi.ffi_call(
        calls.combine,
        (
            jax.ShapeDtypeStruct((targets.shape[0], geo.hidden_size), jnp.float32),
            jax.ShapeDtypeStruct(servers.shape, jnp.int32),
            jax.ShapeDtypeStruct(servers.shape, jnp.int32),
        ),
        has_side_effect=True,
    )
    if isinstance(timeout_us, (int, np.integer)):
        timeout_us = jnp.int32(_static_int(where, "timeout_us", timeout_us, 0, np.iinfo(np.int32).max))
    timeout_us = _check(where, "timeout_us", timeout_us, np.int32, ())
    return Combined(*call(
        sent, targets, servers, timeout_us, _order(after),
        endpoint=np.int64(ep),
        layer=_static_int(where, "layer", layer, 0, geo.num_layers),
        micro_batch=_static_int(where, "micro_batch", micro_batch, 0, geo.num_channels),
    ))


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
    where = "transport.poll"
    ep, geo, calls = _resolve(endpoint)
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
        calls.poll,
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
    where = "transport.reply"
    ep, geo, calls = _resolve(endpoint)
    out = _check(where, "out", out, np.float32, (None, geo.hidden_size))
    num_rows = _check(where, "num_rows", num_rows, np.int32, ())
    native.register_targets()
    call = jax.ffi.ffi_call(
        calls.reply,
        jax.ShapeDtypeStruct((), jnp.int32),
        has_side_effect=True,
    )
    return call(out, num_rows, endpoint=np.int64(ep))

