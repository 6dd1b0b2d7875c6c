"""Fuzzing the CPU `shm` transport: thousands of hostile messages to poll and
combine, and hostile C API calls. Whatever a receiver accepts satisfies every
invariant; the rest is counted under a drop reason. `.ci/sanitized_fuzz` runs
these on an ASan+UBSan build with EAAS_FUZZ_MESSAGES raised."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import native, shm, wire

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shm_harness import (  # noqa: E402, F401 (the fixtures are used by name)
    LONG_US, RawPeer, deployment, no_segments_left_behind, on_cpu, open_ep,
)

if not os.path.isdir("/dev/shm"):
    pytest.skip("needs POSIX shared memory under /dev/shm", allow_module_level=True)

#: Hostile messages (or C API calls) per fuzz test: a few thousand in the
#: normal run; .ci/sanitized_fuzz raises it for its ASan+UBSan build.
FUZZ_MESSAGES = int(os.environ.get("EAAS_FUZZ_MESSAGES", "5000"))

# Geometries with many slots, so that one poll or combine reads many messages.
POLL_FUZZ_GEO = dict(max_endpoints=64, num_channels=8, capacity=6, hidden_size=8, top_k=2, num_layers=3,
                     num_experts=16)
COMBINE_FUZZ_GEO = dict(POLL_FUZZ_GEO, max_endpoints=32, num_channels=2, capacity=32)

U32 = 2**32
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

#: MessageHeader (ffi/wire_format.h) as a NumPy record, to build many headers at once.
_HEADER_DTYPE = np.dtype([
    ("seq", "<u8"), ("deployment_id", "<u8"), ("ticket", "<u8"), ("kind", "<u2"), ("hidden_dtype", "<u2"),
    ("sender", "<u4"), ("layer", "<u4"), ("micro_batch", "<u4"), ("num_tokens", "<u4"),
    ("reserved", "<u4", (4,)), ("checksum", "<u4"),
])
assert _HEADER_DTYPE.itemsize == wire.HEADER.size


def _pack_headers(fields: dict) -> np.ndarray:
    """The headers of M messages, uint8 [M, 64] (wire.pack_header for arrays):
    `fields` holds M values per header field, and `checksum_xor`, what each
    checksum is XORed with (0 keeps it right)."""
    records = np.zeros(len(fields["seq"]), _HEADER_DTYPE)
    for name in _HEADER_DTYPE.names:
        if name in fields:
            records[name] = fields[name]
    raw = records.view(np.uint8).reshape(len(records), 64)
    records["checksum"] = native.header_checksum_reference(raw[:, :60]) ^ fields["checksum_xor"]
    return raw


def _pick(rng, m: int, *options, dtype=np.uint64) -> np.ndarray:
    """m values, each one of `options` (a value, or an array of m values) at random."""
    table = np.stack([np.broadcast_to(np.asarray(o).astype(dtype), (m,)) for o in options])
    return table[rng.integers(len(options), size=m), np.arange(m)]


def _other_than(rng, values: np.ndarray, modulus: int) -> np.ndarray:
    """Values in [0, modulus) that differ from `values`, at random."""
    return (values + rng.integers(1, modulus, len(values), dtype=np.uint64)) % np.uint64(modulus)


@dataclasses.dataclass(frozen=True)
class _Corruption:
    """One way for a hostile message to fail a check: field `field` takes one of
    `bad_values(rng, good_fields, m)`, and the receiver counts the message
    under `counter`. Receivers check in stages, lower first: a message failing
    checks of several stages is counted once, under one of its first stage's."""

    counter: str
    field: str
    bad_values: Callable
    stage: int = 0


def _header_corruptions(geo: wire.Geometry, kind: int, dtype_code: int) -> list[_Corruption]:
    """Every header check of wire_format.h failed, for messages of `kind` in
    `dtype_code`: wrong checksum, deployment, kind, sender, channel, dtype;
    num_tokens 0, over capacity or huge; layer out of range."""
    cap, num_layers = geo.capacity, geo.num_layers
    return [
        _Corruption("drop_checksum", "checksum_xor", lambda rng, f, m: rng.integers(1, U32, m, dtype=np.uint64)),
        _Corruption("drop_deployment", "deployment_id",
                    lambda rng, f, m: f["deployment_id"] ^ rng.integers(1, 2**64, m, dtype=np.uint64)),
        _Corruption("drop_kind", "kind",
                    lambda rng, f, m: _pick(rng, m, *(v for v in (0, 1, 2, 3, 2**16 - 1) if v != kind))),
        _Corruption("drop_sender", "sender", lambda rng, f, m: _other_than(rng, f["sender"], U32)),
        _Corruption("drop_channel", "micro_batch", lambda rng, f, m: _other_than(rng, f["micro_batch"], U32)),
        _Corruption("drop_num_tokens", "num_tokens", lambda rng, f, m: _pick(
            rng, m, 0, cap + 1, 2**31, U32 - 1, rng.integers(cap + 1, U32, m))),
        _Corruption("drop_layer", "layer", lambda rng, f, m: _pick(
            rng, m, num_layers, 2**31, U32 - 1, rng.integers(num_layers, U32, m))),
        _Corruption("drop_dtype", "hidden_dtype",
                    lambda rng, f, m: _pick(rng, m, *(v for v in (0, 1, 2, 3, 4, 2**16 - 1) if v != dtype_code))),
    ]


def _corrupt(rng, fields: dict, corruptions: list[_Corruption], rate: float, *, every: bool = False) -> np.ndarray:
    """Applies each corruption to each message at `rate` (at most one per
    field; with `every`, at least one per message), in place. Returns which
    corruptions each message got, bool [M, len(corruptions)]."""
    m = len(fields["seq"])
    hit = rng.random((m, len(corruptions))) < rate
    if every:
        clean = ~hit.any(axis=1)
        hit[clean, rng.integers(len(corruptions), size=clean.sum())] = True
    good = dict(fields)
    for i, c in enumerate(corruptions):
        for j in range(i):
            if corruptions[j].field == c.field:
                hit[:, i] &= ~hit[:, j]
        rows = hit[:, i].reshape(-1, *[1] * (np.ndim(good[c.field]) - 1))
        fields[c.field] = np.where(rows, c.bad_values(rng, good, m), fields[c.field])
    return hit


def _first_stage(hit: np.ndarray, corruptions: list[_Corruption]) -> np.ndarray:
    """Per message: the stage of the first check it fails, -1 where none."""
    stages = np.array([c.stage for c in corruptions])
    first = np.where(hit, stages, stages.max() + 1).min(axis=1)
    return np.where(hit.any(axis=1), first, -1)


def _check_counted(delta: dict, hit: np.ndarray, corruptions: list[_Corruption], counted: np.ndarray) -> None:
    """The receiver counted each message of `counted` once, under the counter of
    a corruption of its first failing stage (exactly that one where the stage
    broke one check only), and nothing else under a drop counter."""
    stages = np.array([c.stage for c in corruptions])
    first = _first_stage(hit, corruptions)
    candidates = hit & (stages == first[:, None]) & counted[:, None]
    names = sorted({c.counter for c in corruptions})
    by_counter = {n: candidates[:, [c.counter == n for c in corruptions]].any(axis=1) for n in names}
    certain = sum(by_counter.values()) == 1
    for n in names:
        lowest, highest = (by_counter[n] & certain).sum(), by_counter[n].sum()
        assert lowest <= delta[n] <= highest, (n, delta[n], lowest, highest)
    assert sum(delta[n] for n in names) == counted.sum(), (delta, counted.sum())
    assert not {n for n, v in delta.items() if n.startswith("drop_") and v} - set(names), delta


def _seq_not_new(rng, fields: dict, consumed: np.ndarray, slots: np.ndarray, rate: float) -> np.ndarray:
    """Gives messages, at `rate`, a seq that says nothing new: 0 (never
    written), odd (being written) or the one the receiver last consumed from
    that slot. Returns which (bool [M]): the receiver neither reads nor counts them."""
    m = len(slots)
    not_new = rng.random(m) < rate
    fields["seq"] = np.where(not_new, _pick(rng, m, 0, fields["seq"] - 1, consumed[slots]), fields["seq"])
    return not_new


def _stats_delta(before: dict, after: dict) -> dict:
    return {n: after[n] - before[n] for n in after}


def _hosted_at_random(rng, num_layers: int, num_experts: int) -> np.ndarray:
    """bool [L, E]: which experts a server hosts, at least one and not all per layer."""
    hosted = rng.random((num_layers, num_experts)) < 0.5
    hosted[:, 0], hosted[:, 1] = True, False
    return rng.permuted(hosted, axis=1)  # each layer's own order


def _experts_where(rng, mask: np.ndarray, layers: np.ndarray, shape: tuple) -> np.ndarray:
    """int32 [M, *shape]: random experts e with mask[layers[i], e], for message i."""
    allowed = mask[layers].reshape(len(layers), *[1] * len(shape), mask.shape[1])
    scores = np.where(allowed, rng.random((len(layers), *shape, mask.shape[1])), -1.0)
    return scores.argmax(axis=-1).astype(np.int32)


def _requests(rng, geo: wire.Geometry, hosted: np.ndarray, seqs: np.ndarray) -> dict:
    """Valid requests from every slot's owner, one per slot of an inbox of
    `geo`, as fields (header and payload). Every hidden row starts with its
    message index x capacity + row (uint32), so that polled rows name their
    origin; the rest of its bytes are random. Rows past num_tokens hold garbage."""
    m, cap, k = len(seqs), geo.capacity, geo.top_k
    row_bytes = geo.hidden_size * np.dtype(geo.dispatch_dtype).itemsize
    slots = np.arange(m)
    layers = rng.integers(geo.num_layers, size=m)
    num_tokens = rng.integers(1, cap + 1, m)
    past_end = (np.arange(cap) >= num_tokens[:, None])[..., None]
    hidden = rng.integers(0, 256, (m, cap, row_bytes), dtype=np.uint8)
    hidden[..., :4] = np.arange(m * cap, dtype="<u4").reshape(m, cap, 1).view(np.uint8)
    expert_ids = _experts_where(rng, hosted, layers, (cap, k))
    expert_ids[rng.random(expert_ids.shape) < 0.25] = -1
    garbage_ids = rng.integers(I32_MIN, I32_MAX, expert_ids.shape, dtype=np.int32, endpoint=True)
    dtype_code = wire.DISPATCH_DTYPES[geo.dispatch_dtype]
    return dict(
        seq=seqs, deployment_id=np.full(m, geo.deployment_id, np.uint64),
        ticket=rng.integers(0, 2**64, m, np.uint64),
        kind=np.full(m, wire.KIND_REQUEST, np.uint64), hidden_dtype=np.full(m, dtype_code, np.uint64),
        sender=(slots // geo.num_channels).astype(np.uint64), layer=layers.astype(np.uint64),
        micro_batch=(slots % geo.num_channels).astype(np.uint64), num_tokens=num_tokens.astype(np.uint64),
        checksum_xor=np.zeros(m, np.uint64), hidden=hidden,
        expert_ids=np.where(past_end, garbage_ids, expert_ids),
        gates=np.where(past_end, rng.standard_normal((m, cap, k)) * 1e30,
                       rng.random((m, cap, k))).astype(np.float32),
        scales=rng.uniform(1e-3, 10, (m, cap)).astype(np.float32),
    )


def _expert_corruption(geo: wire.Geometry, hosted: np.ndarray) -> _Corruption:
    """One expert id of a used row that is neither -1 nor hosted for the
    message's layer: not hosted here, >= num_experts, negative, INT32 extremes."""
    cap, k, num_experts = geo.capacity, geo.top_k, geo.num_experts

    def bad_values(rng, f, m):
        layers = np.minimum(f["layer"], geo.num_layers - 1).astype(np.intp)
        rows = (rng.random(m) * np.clip(f["num_tokens"], 1, cap)).astype(np.intp)
        bad = _pick(rng, m, _experts_where(rng, ~hosted, layers, ()), num_experts, I32_MAX, -2, I32_MIN,
                    rng.integers(num_experts, I32_MAX, m), rng.integers(I32_MIN, -1, m), dtype=np.int32)
        ids = f["expert_ids"].copy()
        ids[np.arange(m), rows, rng.integers(k, size=m)] = bad
        return ids

    return _Corruption("drop_expert", "expert_ids", bad_values, stage=1)


def _check_rows_valid(r, hosted: np.ndarray) -> None:
    """Every row `r` (a PollResult) took holds only -1 or hosted experts of its
    layer (gates of -1 zeroed); the padding rows after them hold nothing."""
    n = int(r.num_rows)
    e, gates, layer = np.asarray(r.expert_ids), np.asarray(r.gates), np.asarray(r.layer)
    assert ((layer[:n] >= 0) & (layer[:n] < hosted.shape[0])).all()
    used = e[:n]
    assert ((used == -1) | ((used >= 0) & hosted[layer[:n, None], np.clip(used, 0, hosted.shape[1] - 1)])).all()
    assert not gates[:n][used == -1].any()
    assert (e[n:] == -1).all() and (layer[n:] == -1).all() and not gates[n:].any()


def _check_polled(r, fields: dict, accepted: np.ndarray, hosted: np.ndarray, cap: int) -> None:
    """`r` (a PollResult) holds exactly the rows of the `accepted` messages,
    each message's rows together and in order, byte for byte (gates of -1
    experts zeroed); the padding rows after them hold nothing."""
    _check_rows_valid(r, hosted)
    n = int(r.num_rows)
    hidden = np.asarray(r.hidden).view(np.uint8)
    expert_ids, gates = np.asarray(r.expert_ids), np.asarray(r.gates)
    scales, layer = np.asarray(r.scales), np.asarray(r.layer)
    origin = hidden[:n, :4].copy().view("<u4")[:, 0]
    msg, row = origin // cap, origin % cap
    expected = [i * cap + np.arange(fields["num_tokens"][i], dtype=np.uint32) for i in np.flatnonzero(accepted)]
    np.testing.assert_array_equal(np.sort(origin), np.sort(np.concatenate([np.zeros(0, np.uint32), *expected])))
    continues = row != 0  # a message's next row comes right after the previous one
    assert (origin[1:][continues[1:]] == origin[:-1][continues[1:]] + 1).all() and not continues[:1].any()
    np.testing.assert_array_equal(hidden[:n], fields["hidden"][msg, row])
    np.testing.assert_array_equal(expert_ids[:n], fields["expert_ids"][msg, row])
    np.testing.assert_array_equal(layer[:n], fields["layer"][msg])
    np.testing.assert_array_equal(gates[:n], np.where(expert_ids[:n] == -1, 0, fields["gates"][msg, row]))
    float8 = r.hidden.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(scales[:n], fields["scales"][msg, row] if float8 else 1)
    assert not hidden[n:].any() and (scales[n:] == 1).all()


@pytest.mark.fuzz
@pytest.mark.parametrize("dtype", sorted(wire.DISPATCH_DTYPES))
def test_fuzzed_requests_never_yield_invalid_rows(open_ep, dtype):
    """Hostile requests in every slot of a 64 x 8 inbox, polled at once (jitted
    poll and reply): every header check failed alone or with others, expert
    ids not hosted or out of range, seqs that say nothing new, garbage past
    num_tokens. Poll takes exactly the valid messages, byte for byte; counts
    every other one it reads under the counter of a check it fails; and
    replies to each message it took (or counts its sender unavailable)."""
    server = open_ep(0, **POLL_FUZZ_GEO, dispatch_dtype=dtype)
    geo, raw = server.geometry, RawPeer(server)
    rng = np.random.default_rng(wire.DISPATCH_DTYPES[dtype])
    hosted = _hosted_at_random(rng, geo.num_layers, geo.num_experts)
    corruptions = _header_corruptions(geo, wire.KIND_REQUEST, wire.DISPATCH_DTYPES[dtype])
    corruptions.append(_expert_corruption(geo, hosted))
    slots = np.arange(len(raw.slots))
    rows = len(slots) * geo.capacity  # every slot's message fits: nothing is deferred

    @jax.jit
    def serve(hosted):
        r = shm.poll(server, hosted, capacity=rows, timeout_us=0)
        return r, shm.reply(server, jnp.zeros((rows, geo.hidden_size), jnp.float32), r.num_rows)

    consumed = np.zeros(len(slots), np.uint64)
    written = 0
    try:
        while written < FUZZ_MESSAGES:
            fields = _requests(rng, geo, hosted, seqs=2 * (written + slots + 1).astype(np.uint64))
            hit = _corrupt(rng, fields, corruptions, rate=0.1)
            not_new = _seq_not_new(rng, fields, consumed, slots, rate=0.1)
            raw.publish(slots, _pack_headers(fields), hidden=fields["hidden"], expert_ids=fields["expert_ids"],
                        gates=fields["gates"], scales=fields["scales"])
            written += len(slots)
            before = server.stats()
            r, _ = jax.block_until_ready(serve(hosted.astype(np.int32)))
            delta = _stats_delta(before, server.stats())
            read = ~not_new
            consumed[read] = fields["seq"][read]
            accepted = read & ~hit.any(axis=1)
            _check_polled(r, fields, accepted, hosted, geo.capacity)
            _check_counted(delta, hit, corruptions, counted=read & hit.any(axis=1))
            assert delta["requests_accepted"] == accepted.sum()
            assert delta["replies_sent"] + delta["peer_unavailable"] == accepted.sum()
            assert delta["torn_reads"] == delta["deferred"] == 0
        stats = server.stats()  # every path was taken
        assert stats["requests_accepted"] and all(stats[c.counter] for c in corruptions), stats
    finally:
        raw.close()


@pytest.mark.fuzz
def test_requests_rewritten_while_polled_never_yield_invalid_rows(open_ep):
    """A hostile peer rewriting every slot while polls copy them: expert ids
    switched to experts not hosted after the message was published, headers
    of new messages written before their payload. Poll validates its own copy,
    never shared memory again: whatever it takes holds hosted experts only."""
    server = open_ep(0, **POLL_FUZZ_GEO)
    geo, raw = server.geometry, RawPeer(server)
    rng = np.random.default_rng(5)
    hosted = _hosted_at_random(rng, geo.num_layers, geo.num_experts)
    slots = np.arange(len(raw.slots))
    rows = len(slots) * geo.capacity
    ids_at = slice(raw.layout.expert_ids_offset, raw.layout.expert_ids_offset + geo.capacity * geo.top_k * 4)
    serve = jax.jit(lambda hosted: shm.poll(server, hosted, capacity=rows, timeout_us=1_000))
    rounds = -(-FUZZ_MESSAGES // len(slots))
    polled, polls = threading.Condition(), [0]
    finished, errors = threading.Event(), []

    def rewrite():
        try:
            for i in range(rounds):
                fields = _requests(rng, geo, hosted, seqs=(4 * (i * len(slots) + slots) + 2).astype(np.uint64))
                unhosted = _experts_where(rng, ~hosted, fields["layer"].astype(np.intp), (geo.capacity, geo.top_k))
                raw.publish(slots, _pack_headers(fields), hidden=fields["hidden"], expert_ids=fields["expert_ids"],
                            gates=fields["gates"])
                raw.slots[slots, ids_at] = unhosted.reshape(len(slots), -1).view(np.uint8)
                fields["seq"] = fields["seq"] + 2
                raw.slots[slots, :64] = _pack_headers(fields)
                raw.slots[slots, ids_at] = fields["expert_ids"].reshape(len(slots), -1).view(np.uint8)
                with polled:  # until a poll begun after these writes has read every slot's last message
                    after = polls[0] + 2
                    assert polled.wait_for(lambda: polls[0] >= after or finished.is_set(), timeout=30), "no poll"
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            finished.set()

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        while not finished.is_set():
            _check_rows_valid(jax.block_until_ready(serve(hosted.astype(np.int32))), hosted)
            with polled:
                polls[0] += 1
                polled.notify_all()
    finally:
        with polled:  # a failed check stops the writer too
            finished.set()
            polled.notify_all()
        writer.join()
        raw.close()
    assert not errors, errors
    stats = server.stats()  # each round's last messages were all read: taken, or dropped for their experts
    assert stats["requests_accepted"] + stats["drop_expert"] >= rounds * len(slots), stats
    assert not {n for n, v in stats.items() if n.startswith("drop_") and v} - {"drop_expert"}, stats


class _ReplyFuzzer:
    """A client (endpoint 0) that dispatches to 31 servers, which never answer,
    and a hostile peer writing the replies into the client's inbox instead."""

    LAYER = 1  # the layer combine waits for

    def __init__(self, open_ep, rng):
        self.rng = rng
        self.client = open_ep(0, **COMBINE_FUZZ_GEO)
        self.servers = [open_ep(s, **COMBINE_FUZZ_GEO) for s in range(1, COMBINE_FUZZ_GEO["max_endpoints"])]
        self.geo = self.client.geometry
        self.server_ids = np.array([s.endpoint for s in self.servers], np.int32)
        self.raw = RawPeer(self.client)
        self.server_raws = [RawPeer(s) for s in self.servers]
        self.consumed = np.zeros(len(self.raw.slots), np.uint64)
        self.next_seq = 2
        self.tickets = np.zeros(len(self.servers), np.uint64)
        self.previous_tickets = self.tickets
        cap, layer = self.geo.capacity, self.LAYER
        others = [v for v in range(self.geo.num_layers) if v != layer]
        self.corruptions = _header_corruptions(self.geo, wire.KIND_REPLY, wire.HIDDEN_F32) + [
            _Corruption("stale_replies", "ticket", lambda rng, f, m: _pick(
                rng, m, f["ticket"] ^ rng.integers(1, 2**64, m, dtype=np.uint64), self.previous_tickets), stage=1),
            _Corruption("drop_layer", "layer", lambda rng, f, m: _pick(rng, m, *others), stage=2),
            _Corruption("drop_reply_size", "num_tokens", lambda rng, f, m: _other_than(
                rng, f["num_tokens"] - 1, cap) + 1, stage=2),
        ]
        servers = jnp.asarray(self.server_ids)

        @functools.partial(jax.jit, static_argnames="micro_batch")
        def send(hidden, expert_ids, gates, targets, micro_batch):
            return shm.dispatch(self.client, hidden, expert_ids, gates, targets, servers, layer=layer,
                                micro_batch=micro_batch)

        @functools.partial(jax.jit, static_argnames="micro_batch")
        def collect(sent, targets, timeout_us, micro_batch):
            return shm.combine(self.client, sent, targets, servers, layer=layer, micro_batch=micro_batch,
                               timeout_us=timeout_us)

        self.send, self.collect = send, collect

    def close(self):
        for raw in [self.raw, *self.server_raws]:
            raw.close()

    def dispatch(self, micro_batch: int):
        """A request to every server: (sent, targets, the rows of the replies to send)."""
        rng, geo, t = self.rng, self.geo, self.geo.capacity
        spread = np.concatenate([self.server_ids, rng.choice(self.server_ids, t * geo.top_k - len(self.server_ids))])
        targets = rng.permutation(spread).reshape(t, geo.top_k)
        hidden = rng.standard_normal((t, geo.hidden_size)).astype(np.float32)
        expert_ids = rng.integers(0, geo.num_experts, (t, geo.top_k), dtype=np.int32)
        sent = np.asarray(self.send(hidden, expert_ids, rng.random((t, geo.top_k), np.float32), targets,
                                    micro_batch=micro_batch))
        assert (sent > 0).all()
        self.previous_tickets = self.tickets
        self.tickets = np.array([r.slots[r.slot_index(0, micro_batch), :64].view(_HEADER_DTYPE)["ticket"][0]
                                 for r in self.server_raws])
        # Multiples of 1/16, small: sums are exact in any order of arrival.
        rows = (rng.integers(-1024, 1024, (len(sent), t, geo.hidden_size)) / 16).astype(np.float32)
        return sent, targets, rows

    def replies(self, sent, rows, micro_batch: int) -> dict:
        """Valid replies to the last dispatch, one per server, as fields."""
        m = len(self.servers)
        seqs = (self.next_seq + 2 * np.arange(m)).astype(np.uint64)
        self.next_seq += 2 * m
        return dict(seq=seqs, deployment_id=np.full(m, self.geo.deployment_id, np.uint64), ticket=self.tickets,
                    kind=np.full(m, wire.KIND_REPLY, np.uint64), hidden_dtype=np.full(m, wire.HIDDEN_F32, np.uint64),
                    sender=self.server_ids.astype(np.uint64), layer=np.full(m, self.LAYER, np.uint64),
                    micro_batch=np.full(m, micro_batch, np.uint64), num_tokens=sent.astype(np.uint64),
                    checksum_xor=np.zeros(m, np.uint64), hidden=rows)

    def publish(self, fields: dict, valid: np.ndarray, read: np.ndarray, micro_batch: int) -> None:
        """Writes the replies: the `valid` ones with their rows, the others with
        garbage (NaN, inf...); the client will consume the `read` ones."""
        slots = self.server_ids * self.geo.num_channels + micro_batch
        garbage = self.rng.integers(0, 2**32, fields["hidden"].shape, dtype=np.uint32).view(np.float32)
        hidden = np.where(valid[:, None, None], fields["hidden"], garbage)
        self.raw.publish(slots, _pack_headers(fields), hidden=hidden)
        self.consumed[slots[read]] = fields["seq"][read]

    def expected_output(self, targets, rows, sent, answered: np.ndarray) -> np.ndarray:
        out = np.zeros((self.geo.capacity, self.geo.hidden_size), np.float32)
        for i in np.flatnonzero(answered):
            tokens = np.flatnonzero((targets == self.server_ids[i]).any(axis=1))
            assert len(tokens) == sent[i]
            out[tokens] += rows[i, :len(tokens)]
        return out

    def counted(self) -> int:
        """Replies the client counted as dropped or stale so far."""
        stats = self.client.stats()
        return sum(v for n, v in stats.items() if n.startswith("drop_") or n == "stale_replies")


# combine's status for a reply that first fails a check of stage 0 (header),
# 1 (stale ticket) or 2 (not what was awaited), or none (-1).
_STATUS_OF_FIRST_STAGE = {-1: wire.STATUS_OK, 0: wire.STATUS_BAD_REPLY, 1: wire.STATUS_TIMEOUT, 2: wire.STATUS_BAD_REPLY}


def _fuzz_combine_at_its_deadline(fuzzer: _ReplyFuzzer, micro_batch: int) -> int:
    """One hostile reply per server, written before a combine that reads each
    once (deadline 0). Returns the number of replies written."""
    sent, targets, rows = fuzzer.dispatch(micro_batch)
    fields = fuzzer.replies(sent, rows, micro_batch)
    hit = _corrupt(fuzzer.rng, fields, fuzzer.corruptions, rate=0.08)
    slots = fuzzer.server_ids * fuzzer.geo.num_channels + micro_batch
    not_new = _seq_not_new(fuzzer.rng, fields, fuzzer.consumed, slots, rate=0.1)
    fuzzer.publish(fields, valid=~hit.any(axis=1) & ~not_new, read=~not_new, micro_batch=micro_batch)
    before = fuzzer.client.stats()
    out, status, _ = fuzzer.collect(sent, targets, np.int32(0), micro_batch=micro_batch)
    delta = _stats_delta(before, fuzzer.client.stats())
    first = np.where(not_new, 1, _first_stage(hit, fuzzer.corruptions))  # unread: TIMEOUT, as if stale
    expected = np.vectorize(_STATUS_OF_FIRST_STAGE.get)(first)
    np.testing.assert_array_equal(status, expected)
    answered = expected == wire.STATUS_OK
    np.testing.assert_array_equal(out, fuzzer.expected_output(targets, rows, sent, answered))
    _check_counted(delta, hit, fuzzer.corruptions, counted=~not_new & hit.any(axis=1))
    assert delta["replies_accepted"] == answered.sum() and delta["timeouts"] == (~answered).sum()
    return len(slots)


def _fuzz_combine_while_it_waits(fuzzer: _ReplyFuzzer, micro_batch: int, batches: int) -> int:
    """While a combine waits, `batches` rounds of broken or stale replies, one
    per server (each round read and counted before the next), then the valid
    replies: all taken, exactly. Returns the number of replies written."""
    sent, targets, rows = fuzzer.dispatch(micro_batch)
    result = {}
    waiter = threading.Thread(target=lambda: result.update(combined=jax.block_until_ready(fuzzer.collect(
        sent, targets, np.int32(LONG_US), micro_batch=micro_batch))))
    waiter.start()
    written = 0
    try:
        for _ in range(batches):
            fields = fuzzer.replies(sent, rows, micro_batch)
            hit = _corrupt(fuzzer.rng, fields, fuzzer.corruptions, rate=0.08, every=True)
            before, counted_before = fuzzer.client.stats(), fuzzer.counted()
            fuzzer.publish(fields, valid=np.zeros(len(hit), bool), read=np.ones(len(hit), bool),
                           micro_batch=micro_batch)
            written += len(hit)
            deadline = time.monotonic() + 30
            while fuzzer.counted() < counted_before + len(hit):  # the waiting combine has read them all
                assert time.monotonic() < deadline and waiter.is_alive(), (fuzzer.client.stats(), result)
                time.sleep(0.0002)
            _check_counted(_stats_delta(before, fuzzer.client.stats()), hit, fuzzer.corruptions,
                           counted=np.ones(len(hit), bool))
        fields = fuzzer.replies(sent, rows, micro_batch)
        fuzzer.publish(fields, valid=np.ones(len(sent), bool), read=np.ones(len(sent), bool),
                       micro_batch=micro_batch)
        written += len(sent)
    finally:
        waiter.join(timeout=60)
    out, status, _ = result["combined"]
    np.testing.assert_array_equal(status, wire.STATUS_OK)
    np.testing.assert_array_equal(out, fuzzer.expected_output(targets, rows, sent, np.ones(len(sent), bool)))
    return written


@pytest.mark.fuzz
def test_fuzzed_replies_never_reach_the_output(open_ep):
    """Hostile replies in the slots of 31 servers a (jitted) combine waits for:
    every header check failed alone or with others, stale tickets, replies for
    another layer or of another size, seqs that say nothing new. Read at the
    deadline, one per server: a valid reply is taken, exactly; a broken one
    makes BAD_REPLY, a stale or unread one TIMEOUT. Read while combine waits,
    several per server: each is dropped and counted, and the valid replies
    that come last are all taken, exactly. Nothing else reaches the output."""
    fuzzer = _ReplyFuzzer(open_ep, np.random.default_rng(7))
    written = 0
    try:
        while written < FUZZ_MESSAGES:
            for micro_batch in range(fuzzer.geo.num_channels):
                written += _fuzz_combine_at_its_deadline(fuzzer, micro_batch)
                written += _fuzz_combine_while_it_waits(fuzzer, micro_batch, batches=3)
        stats = fuzzer.client.stats()  # every path was taken
        assert stats["replies_accepted"] and stats["timeouts"], stats
        assert all(stats[c.counter] for c in fuzzer.corruptions), stats
    finally:
        fuzzer.close()


def _open_arguments(rng, name: bytes, count: int) -> list[dict]:
    """Argument sets for eaas_shm_open: first every pair of extremes for the
    two factors of the slot count, then `count` more; each argument valid at
    random (then small) or not (0, negative, INT64 extremes, unsafe names,
    unknown dtypes, endpoints out of range). Each set says whether all are valid."""
    valid_highs = dict(max_endpoints=4, num_channels=2, capacity=8, d=16, k=4, num_layers=4, num_experts=8)
    extremes = [I64_MIN, -1, 0, 2, I64_MAX]
    pairs = np.array([(a, b) for a in extremes for b in extremes], np.int64)
    m = len(pairs) + count

    def valid_or(values, *hostile):
        return np.where(rng.random(m) < 0.85, values, _pick(rng, m, *hostile, dtype=np.int64))

    args = {f: valid_or(rng.integers(1, high + 1, m), I64_MIN, -1, 0, I64_MAX, rng.integers(2**31, I64_MAX, m),
                        rng.integers(I64_MIN, 0, m))
            for f, high in valid_highs.items()}
    args["max_endpoints"][:len(pairs)], args["num_channels"][:len(pairs)] = pairs.T
    args["endpoint"] = valid_or(rng.integers(0, 2**62, m) % np.maximum(args["max_endpoints"], 1),
                                -1, I64_MIN, I64_MAX, args["max_endpoints"])
    args["hidden_dtype"] = valid_or(rng.integers(1, 4, m), 0, 4, -1, I64_MIN, I64_MAX, 2**16 + 1)
    bad_names = [b"", b"x" * 41, b"a/b", b"..", b"a b", "\u00e9".encode(), None]
    bad_name = valid_or(np.full(m, -1), *range(len(bad_names)))
    bad_name[:len(pairs)] = -1  # the pairs reach the geometry checks
    args["deployment_id"] = rng.integers(0, 2**64, m, dtype=np.uint64)
    args["errlen"] = rng.choice([0, 1, 2, 7, 64, 1024], m)
    args["err_buffer"] = rng.random(m) < 0.9
    args["valid"] = (np.all([(args[f] >= 1) & (args[f] <= high) for f, high in valid_highs.items()], axis=0)
                     & (bad_name < 0) & (args["hidden_dtype"] >= 1) & (args["hidden_dtype"] <= 3)
                     & (args["endpoint"] >= 0) & (args["endpoint"] < args["max_endpoints"]))
    args["name"] = [name if i < 0 else bad_names[i] for i in bad_name]
    columns = {f: v if isinstance(v, list) else v.tolist() for f, v in args.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@pytest.mark.fuzz
def test_fuzzed_c_api_arguments_are_refused_cleanly(deployment):
    """eaas_shm_open with hostile arguments (geometry values from INT64_MIN to
    INT64_MAX, unsafe names, endpoints, dtypes; short or no error buffers):
    it opens exactly when every argument is valid and refuses with a message
    that fits the buffer otherwise. The open endpoint's other calls take
    hostile peers and buffer lengths. (The sanitized build aborts on any
    overflow or out-of-bounds access; unfixed, `max_endpoints *
    num_channels` overflowed in a refusal's message.)"""
    lib = shm._lib()
    num_counters = len(native.counter_names())
    rng = np.random.default_rng(11)
    opened = 0
    for args in _open_arguments(rng, deployment.encode(), FUZZ_MESSAGES):
        err = ctypes.create_string_buffer(max(args["errlen"], 1)) if args["err_buffer"] else None
        rc = lib.eaas_shm_open(args["name"], args["deployment_id"], args["endpoint"], args["max_endpoints"],
                               args["num_channels"], args["capacity"], args["d"], args["k"], args["num_layers"],
                               args["num_experts"], args["hidden_dtype"], err, args["errlen"])
        if not args["valid"]:
            assert rc == -1, args
            if err is not None and args["errlen"] >= 2:
                assert err.raw.index(b"\0") < args["errlen"] and err.value, args
            continue
        assert rc == 0, (args, err.value if err is not None else None)
        endpoint = args["endpoint"]
        for peer in (-1, I64_MIN, I64_MAX, args["max_endpoints"]):
            assert lib.eaas_shm_connect(endpoint, peer, err, args["errlen"]) == 2
        for n in (I64_MIN, -1, 0, 1, num_counters + 5):
            out = (ctypes.c_int64 * max(n, 1))()
            assert lib.eaas_shm_stats(endpoint, out, n) == num_counters
            assert lib.eaas_shm_info(endpoint, out, n) == 16
        assert lib.eaas_shm_close(endpoint) == 0
        assert lib.eaas_shm_close(endpoint) == -1
        assert lib.eaas_shm_stats(endpoint, out, 1) == -1
        opened += 1
    assert opened

