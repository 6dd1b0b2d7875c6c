"""The CPU `shm` expert transport: round trips, multi-process, faults, deadlines."""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import mmap
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import hidden_codec, native, shm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _transport_worker import expert_compute, make_weights, reference  # noqa: E402
from conftest import XLA_COMPILATIONS  # noqa: E402

if not os.path.isdir("/dev/shm"):
    pytest.skip("needs POSIX shared memory under /dev/shm", allow_module_level=True)

# Every deployment name of this module starts with PREFIX: the leak check only
# looks at those (another test run may be going on next to this one).
PREFIX = f"t{os.getpid()}"
_names = itertools.count()

L, E, K, D, CAP = 2, 8, 2, 16, 12
GEO = dict(max_endpoints=4, num_channels=2, capacity=CAP, hidden_size=D, top_k=K,
           num_layers=L, num_experts=E)
WEIGHTS = make_weights(L, E, D, seed=0)
# Experts 0-3 live on endpoint 1, experts 4-7 on endpoint 2.
SERVER_OF = np.array([1, 1, 1, 1, 2, 2, 2, 2], np.int32)
HOSTED = {s: np.broadcast_to((SERVER_OF == s).astype(np.int32), (L, E)).copy() for s in (1, 2)}
LONG_US = 20_000_000  # a deadline that is never reached when the server answers


def _our_segments() -> list[str]:
    return sorted(glob.glob(f"/dev/shm/eaas-{PREFIX}*"))


@pytest.fixture(scope="module", autouse=True)
def no_segments_left_behind():
    yield
    left = _our_segments()
    for path in left:  # clean up, then fail
        os.unlink(path)
    assert not left, f"shm segments left behind: {left}"


@pytest.fixture(autouse=True)
def on_cpu():
    with jax.default_device(jax.devices("cpu")[0]):
        yield


@pytest.fixture
def deployment():
    """A fresh deployment name; closes its endpoints and removes its segments after."""
    name = f"{PREFIX}-{next(_names)}"
    yield name
    with shm._OPEN_LOCK:
        mine = [ep for ep in shm._OPEN.values() if ep.deployment == name]
    for ep in mine:
        ep.close()
    for path in glob.glob(f"/dev/shm/eaas-{name}-*"):
        os.unlink(path)


@pytest.fixture
def open_ep(deployment):
    """open_ep(e, **geometry overrides) -> ShmEndpoint, closed after the test."""
    with contextlib.ExitStack() as stack:

        def make(endpoint: int, **overrides) -> shm.ShmEndpoint:
            geo = dict(GEO, **overrides)
            return stack.enter_context(shm.ShmEndpoint(deployment, endpoint, **geo))

        yield make


def _tokens(t: int, seed: int, experts=None):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((t, D)).astype(np.float32)
    pool = np.arange(E) if experts is None else np.asarray(experts)
    expert_ids = np.stack([rng.choice(pool, K, replace=False) for _ in range(t)]).astype(np.int32)
    gates = rng.random((t, K)).astype(np.float32)
    return hidden, expert_ids, gates


def _serve_once(server, *, after=None, capacity=2 * CAP, **kw):
    """One server step (eager), finished when this returns: poll, compute, reply.
    Returns (poll result, token)."""
    r = shm.poll(server, HOSTED[server.endpoint], capacity=capacity, timeout_us=kw.pop(
        "timeout_us", 1_000_000), after=after, **kw)
    y = expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer)
    return jax.block_until_ready((r, shm.reply(server, y, r.num_rows)))


# --------------------------------------------------------------------------
# Round trips in one process
# --------------------------------------------------------------------------


def test_round_trip_jit_two_servers_two_channels(open_ep):
    client, s1, s2 = open_ep(0), open_ep(1), open_ep(2)
    servers = jnp.array([1, 2], jnp.int32)
    server_of = jnp.asarray(SERVER_OF)

    @jax.jit
    def step(h0, e0, g0, h1, e1, g1):
        # Targets computed in-graph from the routing table.
        t0, t1 = server_of[e0], server_of[e1]
        sent0 = shm.dispatch(client, h0, e0, g0, t0, servers, layer=0, micro_batch=0)
        sent1 = shm.dispatch(client, h1, e1, g1, t1, servers, layer=1, micro_batch=1,
                             after=sent0)
        after, rows = sent1, []
        for srv in (s1, s2):  # each server batches both micro-batches in one poll
            r = shm.poll(srv, jnp.asarray(HOSTED[srv.endpoint]), capacity=2 * CAP,
                         timeout_us=LONG_US, after=after)
            y = expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer)
            after = shm.reply(srv, y, r.num_rows)
            rows.append(r.num_rows)
        out0, st0, _ = shm.combine(client, sent0, t0, servers, layer=0, micro_batch=0,
                                timeout_us=LONG_US, after=after)
        out1, st1, _ = shm.combine(client, sent1, t1, servers, layer=1, micro_batch=1,
                                timeout_us=LONG_US, after=st0)
        return out0, out1, st0, st1, sent0, sent1, jnp.stack(rows)

    for it in range(3):  # the same executable, state carried across calls
        h0, e0, g0 = _tokens(CAP, seed=10 * it)
        h1, e1, g1 = _tokens(7, seed=10 * it + 1)
        out0, out1, st0, st1, sent0, sent1, rows = step(h0, e0, g0, h1, e1, g1)
        np.testing.assert_array_equal(st0, [shm.STATUS_OK] * 2)
        np.testing.assert_array_equal(st1, [shm.STATUS_OK] * 2)
        for s_idx, s in enumerate((1, 2)):
            n0 = int((SERVER_OF[e0] == s).any(axis=1).sum())
            n1 = int((SERVER_OF[e1] == s).any(axis=1).sum())
            assert (int(sent0[s_idx]), int(sent1[s_idx])) == (n0, n1)
            assert int(rows[s_idx]) == n0 + n1
        np.testing.assert_allclose(out0, reference(WEIGHTS, 0, h0, e0, g0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out1, reference(WEIGHTS, 1, h1, e1, g1), rtol=1e-5, atol=1e-5)
    c, a, b = client.stats(), s1.stats(), s2.stats()
    assert c["requests_sent"] == 12 and c["replies_accepted"] == 12
    assert a["requests_accepted"] == 6 and b["requests_accepted"] == 6
    assert a["replies_sent"] == 6
    for st in (c, a, b):
        assert all(v == 0 for n, v in st.items() if n.startswith("drop_") or n == "timeouts")


def test_eager_partial_routing_and_unrouted(open_ep):
    client, server = open_ep(0), open_ep(1)
    hidden, expert_ids, gates = _tokens(9, seed=3, experts=range(4))
    targets = np.full((9, K), 1, np.int32)
    targets[::2, 1] = -1  # slot not routed (e.g. its server is dead)
    targets[1, 0] = 3  # not among `servers`: ignored and counted
    servers = np.array([-1, 1], np.int32)
    sent = shm.dispatch(client, hidden, expert_ids, gates, targets, servers, layer=1, micro_batch=0)
    np.testing.assert_array_equal(sent, [0, 9])
    _serve_once(server, after=sent)
    out, status, _ = shm.combine(client, sent, targets, servers, layer=1, micro_batch=0,
                              timeout_us=LONG_US)
    np.testing.assert_array_equal(status, [shm.STATUS_NOTHING_SENT, shm.STATUS_OK])
    expected = reference(WEIGHTS, 1, hidden, expert_ids, gates, served=targets == 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert client.stats()["unrouted_targets"] == 1


def test_poll_defers_what_does_not_fit(open_ep):
    """Two clients' messages, a poll with room for one: nothing is lost."""
    c0, server, c3 = open_ep(0), open_ep(1), open_ep(3)
    servers = np.array([1], np.int32)
    batches = {}
    for client, seed in ((c0, 1), (c3, 2)):
        h, e, g = _tokens(8, seed=seed, experts=range(4))
        t = np.ones((8, K), np.int32)
        batches[client.endpoint] = (h, e, g, t, shm.dispatch(client, h, e, g, t, servers,
                                                              layer=0, micro_batch=1))
    # capacity 12 rows: one 8-token message fits, the other stays in its slot.
    r1, _ = _serve_once(server, capacity=CAP)
    assert int(r1.num_rows) == 8
    assert server.stats()["deferred"] >= 1
    # max_messages=1 would also leave it; here it is the only one left.
    r2, _ = _serve_once(server, capacity=CAP, max_messages=1)
    assert int(r2.num_rows) == 8
    for client in (c0, c3):
        h, e, g, t, sent = batches[client.endpoint]
        out, status, _ = shm.combine(client, sent, t, servers, layer=0, micro_batch=1,
                                  timeout_us=LONG_US)
        assert int(status[0]) == shm.STATUS_OK
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    # Nothing more to collect: an empty poll returns after its timeout.
    t0 = time.monotonic()
    r3, tok = _serve_once(server, capacity=CAP, timeout_us=30_000)
    assert int(r3.num_rows) == 0 and int(tok) == 0
    assert 0.025 <= time.monotonic() - t0 < 2.0
    np.testing.assert_array_equal(r3.expert_ids, -1)
    np.testing.assert_array_equal(r3.layer, -1)


def test_threads_share_the_registry(open_ep):
    """Two client endpoints in two threads, a server looping in a third."""
    import threading

    server = open_ep(1)
    clients = [open_ep(0), open_ep(3)]
    servers = jnp.array([1], jnp.int32)
    stop = threading.Event()
    errors: list[BaseException] = []

    @jax.jit
    def serve(hosted):
        r = shm.poll(server, hosted, capacity=2 * CAP, timeout_us=5_000)
        y = expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer)
        return shm.reply(server, y, r.num_rows)

    def server_loop():
        try:
            hosted = jnp.ones((L, E), jnp.int32)
            while not stop.is_set():
                jax.block_until_ready(serve(hosted))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def client_loop(client, seed):
        try:
            @jax.jit
            def step(h, e, g):
                t = jnp.ones_like(e)
                sent = shm.dispatch(client, h, e, g, t, servers, layer=1, micro_batch=1)
                return shm.combine(client, sent, t, servers, layer=1, micro_batch=1,
                                   timeout_us=LONG_US)

            for it in range(8):
                h, e, g = _tokens(CAP - it, seed=seed + it)
                out, status, _ = step(h, e, g)
                assert int(status[0]) == shm.STATUS_OK
                np.testing.assert_allclose(out, reference(WEIGHTS, 1, h, e, g), rtol=1e-5,
                                           atol=1e-5)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client_loop, args=(c, 50 * i))
               for i, c in enumerate(clients)]
    srv = threading.Thread(target=server_loop)
    srv.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    srv.join(timeout=60)
    assert not errors, errors
    assert server.stats()["requests_accepted"] == 16


def test_waiting_does_not_spin(open_ep):
    """Idle waits sleep (bounded spin, then backoff): little CPU while waiting."""
    server = open_ep(1)
    idle = jax.jit(lambda h: shm.poll(server, h, capacity=CAP, timeout_us=300_000))
    hosted = jnp.ones((L, E), jnp.int32)
    jax.block_until_ready(idle(hosted))  # compile
    wall0, cpu0 = time.monotonic(), time.process_time()
    r = jax.block_until_ready(idle(hosted))
    wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    print(f"idle poll: {wall * 1e3:.0f} ms wall, {cpu * 1e3:.0f} ms CPU")
    assert int(r.num_rows) == 0 and wall >= 0.3
    assert cpu < 0.5 * wall


# --------------------------------------------------------------------------
# Multi-process
# --------------------------------------------------------------------------


def test_multiprocess_server(open_ep, deployment):
    rounds = 4
    cfg = dict(deployment=deployment, endpoint=1, geometry=GEO, seed=0,
               hosted=np.ones((L, E), np.int32).tolist(), poll_capacity=2 * CAP,
               messages=2 * rounds, deadline_s=60)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_transport_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, worker, json.dumps(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = open_ep(0)
        client.connect(1, timeout=60)
        # The server process owns endpoint 1: a second owner is refused.
        with pytest.raises(shm.ShmEndpointInUseError, match=r"pid %d" % proc.pid):
            shm.ShmEndpoint(deployment, 1, **GEO)
        servers = jnp.array([1], jnp.int32)

        @jax.jit
        def step(h0, e0, g0, h1, e1, g1):
            t0, t1 = jnp.ones_like(e0), jnp.ones_like(e1)
            sent0 = shm.dispatch(client, h0, e0, g0, t0, servers, layer=1, micro_batch=0)
            sent1 = shm.dispatch(client, h1, e1, g1, t1, servers, layer=0, micro_batch=1,
                                 after=sent0)
            out0, st0, _ = shm.combine(client, sent0, t0, servers, layer=1, micro_batch=0,
                                    timeout_us=30_000_000, after=sent1)
            out1, st1, _ = shm.combine(client, sent1, t1, servers, layer=0, micro_batch=1,
                                    timeout_us=30_000_000, after=st0)
            return out0, out1, st0, st1

        for it in range(rounds):
            h0, e0, g0 = _tokens(CAP, seed=100 + it)
            h1, e1, g1 = _tokens(5, seed=200 + it)
            out0, out1, st0, st1 = step(h0, e0, g0, h1, e1, g1)
            if int(st0[0]) != shm.STATUS_OK or int(st1[0]) != shm.STATUS_OK:
                proc.kill()
                _, stderr = proc.communicate()
                pytest.fail(f"round {it}: status {st0} {st1}, client {client.stats()}, "
                            f"server stderr:\n{stderr[-3000:]}")
            np.testing.assert_allclose(out0, reference(WEIGHTS, 1, h0, e0, g0), rtol=1e-5,
                                       atol=1e-5)
            np.testing.assert_allclose(out1, reference(WEIGHTS, 0, h1, e1, g1), rtol=1e-5,
                                       atol=1e-5)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr[-3000:]
        server_stats = json.loads(stdout.split("server stats", 1)[1])
        assert server_stats["requests_accepted"] == 2 * rounds
        assert server_stats["replies_sent"] == 2 * rounds
        assert client.stats()["replies_accepted"] == 2 * rounds
        # The server closed its endpoint: its inbox is gone.
        assert not os.path.exists(shm.segment_path(deployment, 1))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_stale_segment_of_dead_owner_is_reclaimed(deployment):
    """A process killed without closing leaves its inbox; the next open takes it over."""
    code = (
        "import ctypes, os, sys\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "i64 = ctypes.c_int64\n"
        "lib.eaas_shm_open.argtypes = [ctypes.c_char_p, ctypes.c_uint64] + [i64] * 9 + "
        "[ctypes.c_char_p, i64]\n"
        "err = ctypes.create_string_buffer(256)\n"
        f"rc = lib.eaas_shm_open(b'{deployment}', 7, 2, 4, 2, {CAP}, {D}, {K}, {L}, {E}, 1, err, 256)\n"
        "assert rc == 0, err.value\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(native.library_path())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert os.path.exists(shm.segment_path(deployment, 2))
    with shm.ShmEndpoint(deployment, 2, **GEO) as ep:
        assert os.stat(ep.segment_path).st_uid == os.getuid()
    assert not os.path.exists(shm.segment_path(deployment, 2))


# --------------------------------------------------------------------------
# Fault injection: raw bytes written into the server's inbox
# --------------------------------------------------------------------------


class _RawPeer:
    """Writes raw messages into slot (sender, channel) of an endpoint's inbox."""

    def __init__(self, target: shm.ShmEndpoint):
        self.target = target
        self.layout = target.layout
        fd = os.open(target.segment_path, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, self.layout.total_bytes)
        finally:
            os.close(fd)
        self.seq = 1000

    def slot_offset(self, sender: int, channel: int) -> int:
        index = sender * self.target.geometry.num_channels + channel
        return self.layout.segment_header_bytes + index * self.layout.slot_bytes

    def read_header(self, sender: int, channel: int) -> dict:
        off = self.slot_offset(sender, channel)
        return shm.unpack_header(self.mem[off:off + 64])

    def write(self, slot_sender: int, slot_channel: int, /, *, header: bytes | None = None,
              hidden=None, expert_ids=None, gates=None, **fields) -> None:
        """Payload first, header (with its seq) last, like a real sender. `fields`
        override the header fields (defaults: a valid request from the slot's owner)."""
        off, lay = self.slot_offset(slot_sender, slot_channel), self.layout
        for arr, at in ((hidden, lay.hidden_offset), (expert_ids, lay.expert_ids_offset),
                        (gates, lay.gates_offset)):
            if arr is not None:
                data = np.ascontiguousarray(arr).tobytes()
                self.mem[off + at:off + at + len(data)] = data
        if header is None:
            self.seq += 2
            f = dict(seq=self.seq, deployment_id=self.target.geometry.deployment_id,
                     kind=shm.KIND_REQUEST, sender=slot_sender, layer=0,
                     micro_batch=slot_channel,
                     num_tokens=2)
            f.update(fields)
            header = shm.pack_header(**f)
        self.mem[off:off + 64] = header

    def close(self):
        self.mem.close()


def _drops(stats):
    return {n: v for n, v in stats.items() if n.startswith("drop_") and v}


def test_fault_injection(open_ep):
    client, server = open_ep(0), open_ep(1)
    raw = _RawPeer(server)
    try:
        good_ids = np.array([[0, 1], [2, -1]], np.int32)
        payload = dict(hidden=np.ones((2, D), np.float32), expert_ids=good_ids,
                       gates=np.full((2, K), 0.5, np.float32))

        def poll_rows() -> int:
            return int(_serve_once(server, timeout_us=0)[0].num_rows)

        # A well-formed raw request from "endpoint 3" is accepted: the Python
        # header encoder agrees with the C++ one. Its reply has no inbox to go to.
        raw.write(3, 0, **payload)
        assert poll_rows() == 2
        assert server.stats()["peer_unavailable"] == 1

        bad_header = bytearray(shm.pack_header(
            seq=raw.seq + 2, deployment_id=server.geometry.deployment_id, kind=shm.KIND_REQUEST,
            sender=3, layer=0, micro_batch=0, num_tokens=2))
        bad_header[33] ^= 0x40  # corrupt the layer, keep the old checksum
        garbage = np.random.default_rng(0).integers(0, 256, 64, dtype=np.uint8).tobytes()
        cases = [
            ("drop_num_tokens", dict(num_tokens=CAP + 1)),
            ("drop_num_tokens", dict(num_tokens=2**32 - 1)),
            ("drop_num_tokens", dict(num_tokens=0)),
            ("drop_expert", dict(expert_ids=np.array([[0, 5], [1, 2]], np.int32))),  # not hosted
            ("drop_expert", dict(expert_ids=np.array([[0, 99], [1, 2]], np.int32))),
            ("drop_expert", dict(expert_ids=np.array([[0, 1], [-7, 2]], np.int32))),
            ("drop_deployment", dict(deployment_id=server.geometry.deployment_id ^ 1)),
            ("drop_checksum", dict(header=bytes(bad_header))),
            ("drop_checksum", dict(header=(raw.seq + 10).to_bytes(8, "little") + garbage[8:])),
            ("drop_kind", dict(kind=shm.KIND_REPLY)),
            ("drop_kind", dict(kind=77)),
            ("drop_layer", dict(layer=L)),
            ("drop_layer", dict(layer=2**31)),
            ("drop_sender", dict(sender=0)),  # spoofing the client's identity
            ("drop_channel", dict(micro_batch=1)),
            ("drop_dtype", dict(hidden_dtype=2)),
        ]
        for reason, change in cases:
            before = server.stats()
            fields = dict(payload)
            if "expert_ids" in change:
                fields["expert_ids"] = change.pop("expert_ids")
            raw.write(3, 0, **fields, **change)
            assert poll_rows() == 0, reason
            after = server.stats()
            assert after[reason] == before[reason] + 1, (reason, change, _drops(after))
            others = {n: v - before[n] for n, v in after.items() if v != before[n]}
            assert set(others) == {reason}, (reason, others)
            raw.write(3, 0, **payload)  # the slot stays usable: a good message goes through
            assert poll_rows() == 2

        # Header written after the checksum was computed (seq advanced alone):
        # checksum covers seq, so a replayed header with a new seq is refused.
        hdr = bytearray(shm.pack_header(seq=raw.seq + 2, deployment_id=server.geometry.deployment_id,
                                        kind=shm.KIND_REQUEST, sender=3, layer=0, micro_batch=0,
                                        num_tokens=2))
        hdr[0:8] = (raw.seq + 4).to_bytes(8, "little")
        raw.seq += 4
        raw.write(3, 0, header=bytes(hdr))
        assert poll_rows() == 0

        # An odd seq (being written) is ignored, not counted, until published.
        before = server.stats()
        raw.seq += 1
        raw.write(3, 1, header=shm.pack_header(
            seq=raw.seq, deployment_id=server.geometry.deployment_id, kind=shm.KIND_REQUEST,
            sender=3, layer=0, micro_batch=1, num_tokens=2))
        assert poll_rows() == 0
        assert server.stats() == before
        raw.seq += 1

        # Garbage in every slot: dropped and counted, nothing read out of bounds.
        rng = np.random.default_rng(1)
        for sender in range(4):
            for ch in range(2):
                if sender == 0:
                    continue  # keep the real client's slots
                blob = rng.integers(0, 256, raw.layout.slot_bytes, dtype=np.uint8).tobytes()
                off = raw.slot_offset(sender, ch)
                raw.mem[off:off + len(blob)] = blob
        assert poll_rows() == 0

        # ... and the real client is still served correctly.
        servers = np.array([1], np.int32)
        h, e, g = _tokens(CAP, seed=5, experts=range(4))
        t = np.ones((CAP, K), np.int32)
        sent = jax.block_until_ready(
            shm.dispatch(client, h, e, g, t, servers, layer=1, micro_batch=0))
        # The header the C++ dispatch wrote decodes with the Python layout.
        hdr = raw.read_header(0, 0)
        assert hdr["checksum_ok"] and hdr["seq"] % 2 == 0 and hdr["ticket"] == hdr["seq"]
        assert (hdr["kind"], hdr["sender"], hdr["layer"], hdr["micro_batch"],
                hdr["num_tokens"], hdr["hidden_dtype"]) == (shm.KIND_REQUEST, 0, 1, 0, CAP, 1)
        r, _ = _serve_once(server, after=sent)
        assert int(r.num_rows) == CAP
        out, status, _ = shm.combine(client, sent, t, servers, layer=1, micro_batch=0,
                                  timeout_us=LONG_US)
        assert int(status[0]) == shm.STATUS_OK
        np.testing.assert_allclose(out, reference(WEIGHTS, 1, h, e, g), rtol=1e-5, atol=1e-5)
    finally:
        raw.close()


def test_fuzzed_messages_never_yield_invalid_rows(open_ep):
    """Random, correctly checksummed headers and payloads from a hostile peer:
    whatever poll accepts satisfies every invariant; the rest is counted."""
    server = open_ep(1)
    raw = _RawPeer(server)
    rng = np.random.default_rng(1234)
    did = server.geometry.deployment_id
    try:
        accepted = dropped = 0
        for i in range(60):
            def pick(good, *bad):
                return good if rng.random() < 0.7 else int(rng.choice(bad))
            fields = dict(
                seq=2 * (i + 1), deployment_id=pick(did, did ^ 1, 0),
                kind=pick(shm.KIND_REQUEST, shm.KIND_REPLY, 0, 65535),
                sender=pick(2, 0, 3, 2**32 - 1), layer=pick(int(rng.integers(L)), L, 2**32 - 1),
                micro_batch=pick(1, 0, 7), hidden_dtype=pick(shm.HIDDEN_F32, 0, 2),
                num_tokens=pick(int(rng.integers(1, CAP + 1)), 0, CAP + 1, 2**31, 2**32 - 1),
                ticket=int(rng.integers(2**63)))
            ids = rng.integers(-1, 4, (CAP, K)).astype(np.int32)
            if rng.random() < 0.3:
                ids[rng.integers(CAP), rng.integers(K)] = rng.choice([-2, 4, 7, 8, 2**31 - 1])
            raw.write(2, 1, header=shm.pack_header(**fields),
                      hidden=rng.standard_normal((CAP, D)).astype(np.float32),
                      expert_ids=ids, gates=rng.random((CAP, K)).astype(np.float32))
            r, _ = _serve_once(server, timeout_us=0)
            n = int(r.num_rows)
            if n:
                accepted += 1
                assert n == fields["num_tokens"] <= CAP
                e, lay = np.asarray(r.expert_ids), np.asarray(r.layer)
                assert ((e[:n] == -1) | ((e[:n] >= 0) & (e[:n] < 4))).all()
                np.testing.assert_array_equal(lay[:n], fields["layer"])
                assert (e[n:] == -1).all() and (lay[n:] == -1).all()
            else:
                dropped += 1
        stats = server.stats()
        assert stats["requests_accepted"] == accepted
        assert sum(v for k, v in stats.items() if k.startswith("drop_")) == dropped
        assert accepted > 5 and dropped > 20
    finally:
        raw.close()


def test_bad_replies_are_refused(open_ep):
    """The client validates replies too: wrong size -> status bad reply, forged
    reply for another ticket -> skipped as stale."""
    client, server = open_ep(0), open_ep(1)
    raw, server_raw = _RawPeer(client), _RawPeer(server)
    try:
        servers = np.array([1], np.int32)
        h, e, g = _tokens(4, seed=6, experts=range(4))
        t = np.ones((4, K), np.int32)
        combine = jax.jit(lambda sent: shm.combine(client, sent, t, servers, layer=0,
                                                   micro_batch=0, timeout_us=100_000))
        did = client.geometry.deployment_id
        # 1. A reply with the right ticket but 3 rows instead of 4.
        sent = jax.block_until_ready(
            shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0))
        ticket = server_raw.read_header(0, 0)["ticket"]
        raw.write(1, 0, hidden=np.ones((3, D), np.float32), header=shm.pack_header(
            seq=10, deployment_id=did, kind=shm.KIND_REPLY, sender=1, layer=0, micro_batch=0,
            num_tokens=3, ticket=ticket))
        out, status, _ = combine(sent)
        assert int(status[0]) == shm.STATUS_BAD_REPLY
        np.testing.assert_array_equal(out, 0)
        assert client.stats()["drop_reply_size"] == 1
        # 2. A reply for an older ticket: skipped, then the real one is used.
        sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
        raw.write(1, 0, hidden=np.full((4, D), 9, np.float32), header=shm.pack_header(
            seq=12, deployment_id=did, kind=shm.KIND_REPLY, sender=1, layer=0, micro_batch=0,
            num_tokens=4, ticket=ticket))
        out, status, _ = combine(sent)  # only the stale one is there: timeout
        assert int(status[0]) == shm.STATUS_TIMEOUT
        assert client.stats()["stale_replies"] == 1
        np.testing.assert_array_equal(out, 0)
    finally:
        raw.close()
        server_raw.close()


# --------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------


def test_combine_timeout_is_bounded_and_stale_reply_skipped(open_ep):
    client, s1, s2 = open_ep(0), open_ep(1), open_ep(2)
    servers = np.array([1, 2], np.int32)
    timeout_s = 0.2
    h, e, g = _tokens(CAP, seed=7)
    t = SERVER_OF[e]

    def combine(sent, timeout_us):
        return shm.combine(client, sent, t, servers, layer=0, micro_batch=0,
                           timeout_us=timeout_us)

    # The deadline is an operand: the three deadlines below run one program.
    compiled_before = XLA_COMPILATIONS["jit(combine)"]
    combine_jit = jax.jit(combine)
    jax.block_until_ready(combine_jit(np.zeros(2, np.int32), np.int32(timeout_s * 1e6)))  # compile

    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    _serve_once(s2, after=sent)  # server 2 answers, server 1 never does
    t0 = time.monotonic()
    out, status, waited_us = jax.block_until_ready(combine_jit(sent, np.int32(timeout_s * 1e6)))
    elapsed = time.monotonic() - t0
    print(f"combine with one silent server returned after {elapsed * 1e3:.1f} ms "
          f"(deadline {timeout_s * 1e3:.0f} ms)")
    assert timeout_s <= elapsed < timeout_s + 0.15
    np.testing.assert_array_equal(status, [shm.STATUS_TIMEOUT, shm.STATUS_OK])
    # The wait on each server: the whole deadline on the silent one, next to nothing on
    # the one whose reply was already there.
    assert timeout_s * 1e6 <= waited_us[0] <= elapsed * 1e6 and 0 <= waited_us[1] < 20_000
    expected = reference(WEIGHTS, 0, h, e, g, served=t == 2)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    only_s1 = ~(t == 2).any(axis=1)
    assert only_s1.any()
    np.testing.assert_array_equal(np.asarray(out)[only_s1], 0)
    assert client.stats()["timeouts"] == 1

    # Server 1 answers late; the client has moved on to its next request: the
    # late reply (old ticket) is skipped, never mixed into the new result.
    _serve_once(s1, timeout_us=0)
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    _serve_once(s2, after=sent)
    t0 = time.monotonic()
    out, status, _ = jax.block_until_ready(combine_jit(sent, np.int32(50_000)))
    assert time.monotonic() - t0 < timeout_s  # the new, shorter deadline held
    np.testing.assert_array_equal(status, [shm.STATUS_TIMEOUT, shm.STATUS_OK])
    assert client.stats()["stale_replies"] == 1
    # Next time server 1 keeps up: everything is back.
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    _serve_once(s1, after=sent)
    _serve_once(s2, after=sent)
    out, status, _ = combine_jit(sent, np.int32(LONG_US))
    np.testing.assert_array_equal(status, [shm.STATUS_OK, shm.STATUS_OK])
    np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    assert XLA_COMPILATIONS["jit(combine)"] - compiled_before == 1


# --------------------------------------------------------------------------
# Segments, peers, argument checks
# --------------------------------------------------------------------------


def test_segment_is_private_and_exclusive(open_ep, deployment):
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        ep = open_ep(1)
    finally:
        os.umask(old_umask)
    st = os.stat(ep.segment_path)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_size == ep.layout.total_bytes
    with pytest.raises(shm.ShmEndpointInUseError, match="already open"):
        shm.ShmEndpoint(deployment, 1, **GEO)
    ep.close()
    assert not os.path.exists(ep.segment_path)
    ep.close()  # idempotent
    with shm.ShmEndpoint(deployment, 1, **GEO):  # reusable once closed
        pass
    with pytest.raises(shm.ShmError, match="deployment name"):
        shm.ShmEndpoint("bad/name", 0, **GEO)
    with pytest.raises(shm.ShmError, match="max_endpoints"):
        shm.ShmEndpoint(deployment, 4, **GEO)


def test_peer_geometry_mismatch_is_refused(open_ep):
    client = open_ep(0)
    open_ep(1, capacity=CAP + 4)  # a different geometry
    open_ep(2, deployment_id=12345)  # same name, another deployment id
    with pytest.raises(shm.ShmPeerRefusedError, match="capacity 16 != ours 12"):
        client.connect(1)
    with pytest.raises(shm.ShmPeerRefusedError, match="deployment_id"):
        client.connect(2)
    with pytest.raises(TimeoutError, match="peer 3"):
        client.connect(3, timeout=0.05)  # no such inbox
    # Sending to them: nothing written, sent = -1, combine does not wait.
    h, e, g = _tokens(4, seed=8)
    servers = np.array([1, 2, 3], np.int32)
    t = np.array([1, 2, 3], np.int32)[np.arange(4 * K).reshape(4, K) % 3]
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    np.testing.assert_array_equal(sent, [-1, -1, -1])
    out, status, waited_us = shm.combine(client, sent, t, servers, layer=0, micro_batch=0,
                                         timeout_us=LONG_US)
    np.testing.assert_array_equal(status, [shm.STATUS_UNAVAILABLE] * 3)
    np.testing.assert_array_equal(waited_us, [0, 0, 0])
    stats = client.stats()
    assert stats["peer_refused"] == 2 and stats["peer_unavailable"] == 1


def test_argument_checks(open_ep):
    client = open_ep(0)
    h, e, g = _tokens(4, seed=9)
    t = np.ones((4, K), np.int32)
    s = np.array([1], np.int32)
    with pytest.raises(TypeError, match="hidden must be an array of dtype float32, got float64"):
        shm.dispatch(client, h.astype(np.float64), e, g, t, s, layer=0, micro_batch=0)
    with pytest.raises(TypeError, match="expert_ids must be an array of dtype int32"):
        shm.dispatch(client, h, e.astype(np.int64), g, t, s, layer=0, micro_batch=0)
    with pytest.raises(ValueError, match=r"gates must have shape \[4, 2\]"):
        shm.dispatch(client, h, e, g[:, :1], t, s, layer=0, micro_batch=0)
    with pytest.raises(ValueError, match=r"hidden must have shape \[\*, 16\]"):
        shm.dispatch(client, h[:, :8], e, g, t, s, layer=0, micro_batch=0)
    big = _tokens(CAP + 1, seed=9)
    with pytest.raises(ValueError, match="exceed the mailbox capacity"):
        shm.dispatch(client, *big, np.ones((CAP + 1, K), np.int32), s, layer=0, micro_batch=0)
    with pytest.raises(ValueError, match="micro_batch=2"):
        shm.dispatch(client, h, e, g, t, s, layer=0, micro_batch=2)
    with pytest.raises(ValueError, match="layer=2"):
        shm.dispatch(client, h, e, g, t, s, layer=L, micro_batch=0)
    with pytest.raises(ValueError, match="below the mailbox capacity"):
        shm.poll(client, np.ones((L, E), np.int32), capacity=CAP - 1, timeout_us=0)
    with pytest.raises(ValueError, match=r"hosted must have shape \[2, 8\]"):
        shm.poll(client, np.ones((L, E + 1), np.int32), capacity=CAP, timeout_us=0)
    with pytest.raises(shm.ShmError, match="not open"):
        shm.combine(3, np.zeros(1, np.int32), t, s, layer=0, micro_batch=0, timeout_us=0)
    # The handler checks too (bypassing the Python checks): duplicate servers.
    with pytest.raises(Exception, match="appears twice"):
        jax.block_until_ready(shm.dispatch(client, h, e, g, t, np.array([1, 1], np.int32),
                                           layer=0, micro_batch=0))
    # ... and the capacity rule: more tokens than a mailbox holds is an error.
    raw_dispatch = jax.ffi.ffi_call(native.SHM_DISPATCH_TARGET,
                                    jax.ShapeDtypeStruct((1,), jnp.int32), has_side_effect=True)
    hidden, *rest = (jnp.asarray(a) for a in big)
    scales = jnp.ones((CAP + 1,), jnp.float32)
    with pytest.raises(Exception, match="exceed the mailbox capacity"):
        jax.block_until_ready(raw_dispatch(
            hidden, scales, *rest, jnp.ones((CAP + 1, K), jnp.int32), jnp.asarray(s),
            jnp.zeros((), jnp.int32), endpoint=np.int64(0), layer=np.int64(0),
            micro_batch=np.int64(0)))
    # ... and the dtype rule: hidden rows in another dtype than the deployment's.
    with pytest.raises(Exception, match="the deployment's dispatch dtype"):
        jax.block_until_ready(raw_dispatch(
            jnp.asarray(h, jnp.bfloat16), jnp.ones((h.shape[0],), jnp.float32), jnp.asarray(e),
            jnp.asarray(g), jnp.asarray(t), jnp.asarray(s), jnp.zeros((), jnp.int32),
            endpoint=np.int64(0), layer=np.int64(0), micro_batch=np.int64(0)))
    with pytest.raises(TypeError, match="hidden must be an array of dtype float32, got bfloat16"):
        shm.dispatch(client, jnp.asarray(h, jnp.bfloat16), e, g, t, s, layer=0, micro_batch=0)
    # combine without a matching dispatch is a caller error, not a hang.
    with pytest.raises(Exception, match="no matching dispatch"):
        jax.block_until_ready(shm.combine(client, np.array([4], np.int32), t, s, layer=0,
                                          micro_batch=1, timeout_us=LONG_US))
    client.close()
    with pytest.raises(shm.ShmError, match="closed"):
        shm.dispatch(client, h, e, g, t, s, layer=0, micro_batch=0)


# --------------------------------------------------------------------------
# Dispatch dtypes
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_narrow_dispatch_dtypes_arrive_bit_exact_with_their_scales(open_ep, dtype):
    client, server = open_ep(0, dispatch_dtype=dtype), open_ep(1, dispatch_dtype=dtype)
    assert client.geometry.dispatch_dtype == dtype
    hidden, ids, gates = _tokens(CAP, seed=21, experts=range(4))
    hidden[3] = 0.0  # an all-zero row stays zero (scale 1, not 0/0)
    payload, scales = hidden_codec.encode(jnp.asarray(hidden), dtype)
    targets = SERVER_OF[ids]
    servers = np.array([1], np.int32)
    sent = shm.dispatch(client, payload, ids, gates, targets, servers, layer=1, micro_batch=0, scales=scales)
    r = shm.poll(server, HOSTED[1], capacity=CAP, timeout_us=1_000_000, after=sent)
    assert r.hidden.dtype == jnp.dtype(dtype) and int(r.num_rows) == CAP
    np.testing.assert_array_equal(np.asarray(r.hidden).view(np.uint8), np.asarray(payload).view(np.uint8))
    expected_scales = np.asarray(scales) if dtype == "float8_e4m3fn" else np.ones(CAP, np.float32)
    np.testing.assert_array_equal(np.asarray(r.scales), expected_scales)
    decoded = np.asarray(hidden_codec.decode(r.hidden, r.scales, jnp.float32))
    # bf16: 8 mantissa bits; e4m3: 3, relative to the row's largest value.
    tolerance = 2.0**-8 if dtype == "bfloat16" else 2.0**-4
    row_max = np.abs(hidden).max(axis=1, keepdims=True)
    assert (np.abs(decoded - hidden) <= tolerance * np.maximum(row_max, 1e-30)).all()
    assert (decoded[3] == 0).all()
    y = expert_compute(WEIGHTS, hidden_codec.decode(r.hidden, r.scales, jnp.float32), r.expert_ids, r.gates, r.layer)
    token = shm.reply(server, y, r.num_rows)
    out, status, _ = shm.combine(client, sent, targets, servers, layer=1, micro_batch=0,
                              timeout_us=LONG_US, after=token)
    assert np.asarray(status).tolist() == [shm.STATUS_OK]
    reference = expert_compute(WEIGHTS, decoded, ids, gates, np.ones(CAP, np.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=1e-5, atol=1e-6)


def test_endpoints_of_different_dispatch_dtypes_refuse_each_other(open_ep):
    client = open_ep(0, dispatch_dtype="bfloat16")
    open_ep(1)  # float32
    with pytest.raises(shm.ShmPeerRefusedError, match="hidden_dtype 1 != ours 2"):
        client.connect(1)
    with pytest.raises(ValueError, match="dispatch_dtype must be one of"):
        open_ep(2, dispatch_dtype="float16")


def test_a_request_in_another_dtype_than_the_deployments_is_dropped(open_ep):
    """A peer writing float32 rows into a bfloat16 deployment's inbox (a
    hostile or misconfigured sender, bypassing the geometry check)."""
    server = open_ep(1, dispatch_dtype="bfloat16")
    hidden, ids, gates = _tokens(2, seed=22, experts=range(4))
    header = shm.pack_header(seq=2, deployment_id=server.geometry.deployment_id, ticket=2,
                             kind=shm.KIND_REQUEST, sender=0, layer=0, micro_batch=0, num_tokens=2,
                             hidden_dtype=shm.HIDDEN_F32)
    with open(server.segment_path, "r+b") as f:
        f.seek(server.layout.segment_header_bytes)  # slot (sender 0, channel 0)
        f.write(header)
    r = shm.poll(server, HOSTED[1], capacity=CAP, timeout_us=0)
    assert int(r.num_rows) == 0
    assert server.stats()["drop_dtype"] == 1
