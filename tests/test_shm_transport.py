"""The CPU `shm` expert transport: round trips, multi-process, segments and
restarts, faults, deadlines (fuzzing: test_shm_fuzz.py)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import hidden_codec, native, shm, wire

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _transport_worker import expert_compute, reference  # noqa: E402
from conftest import XLA_COMPILATIONS  # noqa: E402
from shm_harness import (  # noqa: E402, F401 (the fixtures are used by name)
    CAP, D, E, GEO, HOSTED, K, L, LONG_US, SERVER_OF, WEIGHTS, RawPeer, deployment, drops,
    no_segments_left_behind, on_cpu, open_ep, random_tokens, serve_once,
)

if not os.path.isdir("/dev/shm"):
    pytest.skip("needs POSIX shared memory under /dev/shm", allow_module_level=True)

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
        h0, e0, g0 = random_tokens(CAP, seed=10 * it)
        h1, e1, g1 = random_tokens(7, seed=10 * it + 1)
        out0, out1, st0, st1, sent0, sent1, rows = step(h0, e0, g0, h1, e1, g1)
        np.testing.assert_array_equal(st0, [wire.STATUS_OK] * 2)
        np.testing.assert_array_equal(st1, [wire.STATUS_OK] * 2)
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
    hidden, expert_ids, gates = random_tokens(9, seed=3, experts=range(4))
    targets = np.full((9, K), 1, np.int32)
    targets[::2, 1] = -1  # slot not routed (e.g. its server is dead)
    targets[1, 0] = 3  # not among `servers`: ignored and counted
    servers = np.array([-1, 1], np.int32)
    sent = shm.dispatch(client, hidden, expert_ids, gates, targets, servers, layer=1, micro_batch=0)
    np.testing.assert_array_equal(sent, [0, 9])
    serve_once(server, after=sent)
    out, status, _ = shm.combine(client, sent, targets, servers, layer=1, micro_batch=0,
                              timeout_us=LONG_US)
    np.testing.assert_array_equal(status, [wire.STATUS_NOTHING_SENT, wire.STATUS_OK])
    expected = reference(WEIGHTS, 1, hidden, expert_ids, gates, served=targets == 1)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert client.stats()["unrouted_targets"] == 1


def test_poll_defers_what_does_not_fit(open_ep):
    """Two clients' messages, a poll with room for one: nothing is lost."""
    c0, server, c3 = open_ep(0), open_ep(1), open_ep(3)
    servers = np.array([1], np.int32)
    batches = {}
    for client, seed in ((c0, 1), (c3, 2)):
        h, e, g = random_tokens(8, seed=seed, experts=range(4))
        t = np.ones((8, K), np.int32)
        batches[client.endpoint] = (h, e, g, t, shm.dispatch(client, h, e, g, t, servers,
                                                              layer=0, micro_batch=1))
    # capacity 12 rows: one 8-token message fits, the other stays in its slot.
    r1, _ = serve_once(server, capacity=CAP)
    assert int(r1.num_rows) == 8
    assert server.stats()["deferred"] >= 1
    # max_messages=1 would also leave it; here it is the only one left.
    r2, _ = serve_once(server, capacity=CAP, max_messages=1)
    assert int(r2.num_rows) == 8
    for client in (c0, c3):
        h, e, g, t, sent = batches[client.endpoint]
        out, status, _ = shm.combine(client, sent, t, servers, layer=0, micro_batch=1,
                                  timeout_us=LONG_US)
        assert int(status[0]) == wire.STATUS_OK
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    # Nothing more to collect: an empty poll returns after its timeout.
    t0 = time.monotonic()
    r3, tok = serve_once(server, capacity=CAP, timeout_us=30_000)
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
                h, e, g = random_tokens(CAP - it, seed=seed + it)
                out, status, _ = step(h, e, g)
                assert int(status[0]) == wire.STATUS_OK
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
            h0, e0, g0 = random_tokens(CAP, seed=100 + it)
            h1, e1, g1 = random_tokens(5, seed=200 + it)
            out0, out1, st0, st1 = step(h0, e0, g0, h1, e1, g1)
            if int(st0[0]) != wire.STATUS_OK or int(st1[0]) != wire.STATUS_OK:
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


def _open_in_child(deployment: str, endpoint: int) -> subprocess.Popen:
    """A process that opens `endpoint` (through the C API, no JAX) and waits to
    be killed: an owner that dies without closing its inbox."""
    code = (
        "import ctypes, sys, time\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "i64 = ctypes.c_int64\n"
        "lib.eaas_shm_open.argtypes = [ctypes.c_char_p, ctypes.c_uint64] + [i64] * 9 + "
        "[ctypes.c_char_p, i64]\n"
        "err = ctypes.create_string_buffer(256)\n"
        f"rc = lib.eaas_shm_open(b'{deployment}', {wire.default_deployment_id(deployment)}, {endpoint}, "
        f"4, 2, {CAP}, {D}, {K}, {L}, {E}, 1, err, 256)\n"
        "assert rc == 0, err.value\n"
        "print('open', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(native.library_path())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "open":
        proc.kill()
        pytest.fail(f"the child could not open endpoint {endpoint}: {proc.communicate()[1][-2000:]}")
    return proc


def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate()
    assert proc.returncode == -9


def _exchange(client, server) -> np.ndarray:
    """One request from `client` to `server` (endpoint 1) answered; the combine's status."""
    h, e, g = random_tokens(4, seed=31, experts=range(4))
    t = np.ones((4, K), np.int32)
    servers = np.array([1], np.int32)
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    serve_once(server, after=sent)
    out, status, _ = shm.combine(client, sent, t, servers, layer=0, micro_batch=0, timeout_us=2_000_000)
    if int(status[0]) == wire.STATUS_OK:
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
    return np.asarray(status)


def _segment_u64(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return int.from_bytes(f.read(8), "little")


def test_stale_segment_of_dead_owner_is_reclaimed(deployment):
    """A process killed without closing leaves its inbox; the next open takes it over."""
    _kill(_open_in_child(deployment, 2))
    assert os.path.exists(shm.segment_path(deployment, 2))
    with shm.ShmEndpoint(deployment, 2, **GEO) as ep:
        assert os.stat(ep.segment_path).st_uid == os.getuid()
    assert not os.path.exists(shm.segment_path(deployment, 2))


def test_restarted_client_gets_replies_at_its_new_inbox(open_ep, deployment):
    """A client killed and restarted on its endpoint: the server, which still
    maps the dead client's inbox, must send its replies to the new one. The
    new owner marks the reclaimed segment closed, which tells every peer."""
    server = open_ep(1)
    first = _open_in_child(deployment, 0)
    server.connect(0)  # the server maps the first client's inbox, as a reply would
    fd = os.open(shm.segment_path(deployment, 0), os.O_RDONLY)
    old_inbox = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    os.close(fd)
    try:
        _kill(first)
        client = open_ep(0)  # the restart: reclaims the stale inbox
        closed = int.from_bytes(old_inbox[shm.SEGMENT_CLOSED_OFFSET:shm.SEGMENT_CLOSED_OFFSET + 4], "little")
        assert closed == 1, "the reclaimed segment was not marked closed"
    finally:
        old_inbox.close()
    assert _exchange(client, server).tolist() == [wire.STATUS_OK]


def test_a_peer_follows_its_name_to_a_new_file(open_ep, deployment):
    """The backstop: a dead client's inbox removed by someone else (so never
    marked closed) and a new one created under the name; the server finds it."""
    server = open_ep(1)
    first = _open_in_child(deployment, 0)
    server.connect(0)
    _kill(first)
    os.unlink(shm.segment_path(deployment, 0))  # cleaned up by a tool, not reclaimed
    time.sleep(0.15)  # past the sender's recheck interval (100 ms)
    client = open_ep(0)
    assert _exchange(client, server).tolist() == [wire.STATUS_OK]


def test_a_reused_pid_does_not_keep_a_stale_segment(deployment):
    """The owner recorded in a segment is its pid and start time: a later
    process given the same pid is not the owner, so the segment is reclaimed."""
    child = _open_in_child(deployment, 2)
    path = shm.segment_path(deployment, 2)
    assert _segment_u64(path, shm.SEGMENT_OWNER_PID_OFFSET) == child.pid
    recorded_start = _segment_u64(path, shm.SEGMENT_OWNER_START_TIME_OFFSET)
    assert recorded_start > 0
    _kill(child)
    # Play pid reuse: the segment now names a live process (this one) with the
    # dead owner's start time.
    with open(path, "r+b") as f:
        f.seek(shm.SEGMENT_OWNER_PID_OFFSET)
        f.write(os.getpid().to_bytes(8, "little"))
    with shm.ShmEndpoint(deployment, 2, **GEO) as ep:
        assert _segment_u64(ep.segment_path, shm.SEGMENT_OWNER_PID_OFFSET) == os.getpid()
        assert _segment_u64(ep.segment_path, shm.SEGMENT_OWNER_START_TIME_OFFSET) != recorded_start


def test_segments_of_another_user_are_refused(open_ep, deployment, other_user):
    """Another local user creates a server's inbox name first, with a perfect
    header: we must neither send it tokens nor adopt it."""
    client = open_ep(0)
    template = open_ep(3)  # a real inbox, copied as endpoint 1's
    header = bytearray(open(template.segment_path, "rb").read(template.layout.segment_header_bytes))
    header[shm.SEGMENT_OWNER_ENDPOINT_OFFSET:shm.SEGMENT_OWNER_ENDPOINT_OFFSET + 4] = (1).to_bytes(4, "little")
    path = shm.segment_path(deployment, 1)
    made = other_user.run(
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)\n"
        "os.fchmod(fd, 0o666)\n"
        "os.ftruncate(fd, int(sys.argv[2]))\n"
        "os.pwrite(fd, bytes.fromhex(sys.argv[3]), 0)\n",
        path, template.layout.total_bytes, bytes(header).hex())
    assert made.returncode == 0, made.stderr
    assert os.stat(path).st_uid == other_user.uid
    with pytest.raises(shm.ShmPeerRefusedError, match=f"owner uid {other_user.uid}.*owned by another user"):
        client.connect(1)
    h, e, g = random_tokens(4, seed=32, experts=range(4))
    t = np.ones((4, K), np.int32)
    sent = shm.dispatch(client, h, e, g, t, np.array([1], np.int32), layer=0, micro_batch=0)
    assert np.asarray(sent).tolist() == [-1]
    assert client.stats()["peer_refused"] >= 1
    with open(path, "rb") as f:
        f.seek(template.layout.segment_header_bytes)
        assert not any(f.read()), "tokens were written into another user's segment"
    with pytest.raises(shm.ShmEndpointInUseError, match="owned by another user.*left alone"):
        shm.ShmEndpoint(deployment, 1, **GEO)
    assert os.stat(path).st_uid == other_user.uid


def test_a_segment_of_another_mode_or_size_is_refused(open_ep):
    client, server = open_ep(0), open_ep(1)
    os.chmod(server.segment_path, 0o644)
    with pytest.raises(shm.ShmPeerRefusedError, match="mode 0644.*mode is not 0600"):
        client.connect(1)
    os.chmod(server.segment_path, 0o600)
    os.truncate(server.segment_path, server.layout.total_bytes + 4096)
    with pytest.raises(shm.ShmPeerRefusedError, match=f"segment size {server.layout.total_bytes + 4096} != ours "
                                                      f"{server.layout.total_bytes}"):
        client.connect(1)
    os.truncate(server.segment_path, server.layout.total_bytes)
    client.connect(1)


# --------------------------------------------------------------------------
# Fault injection: raw bytes written into the server's inbox
# --------------------------------------------------------------------------


def test_fault_injection(open_ep):
    client, server = open_ep(0), open_ep(1)
    raw = RawPeer(server)
    try:
        good_ids = np.array([[0, 1], [2, -1]], np.int32)
        payload = dict(hidden=np.ones((2, D), np.float32), expert_ids=good_ids,
                       gates=np.full((2, K), 0.5, np.float32))

        def poll_rows() -> int:
            return int(serve_once(server, timeout_us=0)[0].num_rows)

        # A well-formed raw request from "endpoint 3" is accepted: the Python
        # header encoder agrees with the C++ one. Its reply has no inbox to go to.
        raw.write(3, 0, **payload)
        assert poll_rows() == 2
        assert server.stats()["peer_unavailable"] == 1

        bad_header = bytearray(wire.pack_header(
            seq=raw.seq + 2, deployment_id=server.geometry.deployment_id, kind=wire.KIND_REQUEST,
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
            ("drop_kind", dict(kind=wire.KIND_REPLY)),
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
            assert after[reason] == before[reason] + 1, (reason, change, drops(after))
            others = {n: v - before[n] for n, v in after.items() if v != before[n]}
            assert set(others) == {reason}, (reason, others)
            raw.write(3, 0, **payload)  # the slot stays usable: a good message goes through
            assert poll_rows() == 2

        # Header written after the checksum was computed (seq advanced alone):
        # checksum covers seq, so a replayed header with a new seq is refused.
        hdr = bytearray(wire.pack_header(seq=raw.seq + 2, deployment_id=server.geometry.deployment_id,
                                        kind=wire.KIND_REQUEST, sender=3, layer=0, micro_batch=0,
                                        num_tokens=2))
        hdr[0:8] = (raw.seq + 4).to_bytes(8, "little")
        raw.seq += 4
        raw.write(3, 0, header=bytes(hdr))
        assert poll_rows() == 0

        # An odd seq (being written) is ignored, not counted, until published.
        before = server.stats()
        raw.seq += 1
        raw.write(3, 1, header=wire.pack_header(
            seq=raw.seq, deployment_id=server.geometry.deployment_id, kind=wire.KIND_REQUEST,
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
                raw.slots[raw.slot_index(sender, ch)] = rng.integers(0, 256, raw.layout.slot_bytes, dtype=np.uint8)
        assert poll_rows() == 0

        # ... and the real client is still served correctly.
        servers = np.array([1], np.int32)
        h, e, g = random_tokens(CAP, seed=5, experts=range(4))
        t = np.ones((CAP, K), np.int32)
        sent = jax.block_until_ready(
            shm.dispatch(client, h, e, g, t, servers, layer=1, micro_batch=0))
        # The header the C++ dispatch wrote decodes with the Python layout.
        hdr = raw.read_header(0, 0)
        assert hdr["checksum_ok"] and hdr["seq"] % 2 == 0 and hdr["ticket"] == hdr["seq"]
        assert (hdr["kind"], hdr["sender"], hdr["layer"], hdr["micro_batch"],
                hdr["num_tokens"], hdr["hidden_dtype"]) == (wire.KIND_REQUEST, 0, 1, 0, CAP, 1)
        r, _ = serve_once(server, after=sent)
        assert int(r.num_rows) == CAP
        out, status, _ = shm.combine(client, sent, t, servers, layer=1, micro_batch=0,
                                  timeout_us=LONG_US)
        assert int(status[0]) == wire.STATUS_OK
        np.testing.assert_allclose(out, reference(WEIGHTS, 1, h, e, g), rtol=1e-5, atol=1e-5)
    finally:
        raw.close()


def test_bad_replies_are_refused(open_ep):
    """The client validates replies too: wrong size -> status bad reply, forged
    reply for another ticket -> skipped as stale."""
    client, server = open_ep(0), open_ep(1)
    raw, server_raw = RawPeer(client), RawPeer(server)
    try:
        servers = np.array([1], np.int32)
        h, e, g = random_tokens(4, seed=6, experts=range(4))
        t = np.ones((4, K), np.int32)
        combine = jax.jit(lambda sent: shm.combine(client, sent, t, servers, layer=0,
                                                   micro_batch=0, timeout_us=100_000))
        did = client.geometry.deployment_id
        # 1. A reply with the right ticket but 3 rows instead of 4.
        sent = jax.block_until_ready(
            shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0))
        ticket = server_raw.read_header(0, 0)["ticket"]
        raw.write(1, 0, hidden=np.ones((3, D), np.float32), header=wire.pack_header(
            seq=10, deployment_id=did, kind=wire.KIND_REPLY, sender=1, layer=0, micro_batch=0,
            num_tokens=3, ticket=ticket))
        out, status, _ = combine(sent)  # only the bad one comes: waits out the deadline
        assert int(status[0]) == wire.STATUS_BAD_REPLY
        np.testing.assert_array_equal(out, 0)
        assert client.stats()["drop_reply_size"] == 1
        # 2. A reply for an older ticket: skipped, then the real one is used.
        sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
        raw.write(1, 0, hidden=np.full((4, D), 9, np.float32), header=wire.pack_header(
            seq=12, deployment_id=did, kind=wire.KIND_REPLY, sender=1, layer=0, micro_batch=0,
            num_tokens=4, ticket=ticket))
        out, status, _ = combine(sent)  # only the stale one is there: timeout
        assert int(status[0]) == wire.STATUS_TIMEOUT
        assert client.stats()["stale_replies"] == 1
        np.testing.assert_array_equal(out, 0)
    finally:
        raw.close()
        server_raw.close()


def test_a_malformed_reply_costs_only_itself(open_ep):
    """Malformed replies in a server's slot while the client waits (forged
    with the right ticket, or garbage) are dropped and counted; the server's
    real reply, arriving after them, is still taken."""
    client, server = open_ep(0), open_ep(1)
    raw, server_raw = RawPeer(client), RawPeer(server)
    try:
        servers = np.array([1], np.int32)
        h, e, g = random_tokens(4, seed=33, experts=range(4))
        t = np.ones((4, K), np.int32)
        sent = jax.block_until_ready(shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0))
        ticket = server_raw.read_header(0, 0)["ticket"]
        did = client.geometry.deployment_id
        result = {}

        def wait_for_reply():
            result["combined"] = jax.block_until_ready(shm.combine(
                client, sent, t, servers, layer=0, micro_batch=0, timeout_us=LONG_US))

        waiter = threading.Thread(target=wait_for_reply)
        waiter.start()
        malformed = [
            ("drop_reply_size", dict(num_tokens=3, ticket=ticket)),
            ("drop_layer", dict(num_tokens=4, ticket=ticket, layer=1)),
            ("drop_checksum", dict(num_tokens=4, ticket=ticket, checksum=12345)),
        ]
        for seq, (counter, fields) in enumerate(malformed, start=1):
            raw.write(1, 0, hidden=np.full((4, D), 7, np.float32), header=wire.pack_header(
                seq=2 * seq, deployment_id=did, kind=wire.KIND_REPLY, sender=1, micro_batch=0,
                **dict(dict(layer=0), **fields)))
            deadline = time.monotonic() + 30
            while client.stats()[counter] < 1:  # the waiting combine has read (and dropped) it
                assert time.monotonic() < deadline and waiter.is_alive(), (counter, client.stats(), result)
                time.sleep(0.001)
        serve_once(server)
        waiter.join(timeout=30)
        out, status, _ = result["combined"]
        assert int(status[0]) == wire.STATUS_OK
        np.testing.assert_allclose(out, reference(WEIGHTS, 0, h, e, g), rtol=1e-5, atol=1e-5)
        assert client.stats()["replies_accepted"] == 1
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
    h, e, g = random_tokens(CAP, seed=7)
    t = SERVER_OF[e]

    def combine(sent, timeout_us):
        return shm.combine(client, sent, t, servers, layer=0, micro_batch=0,
                           timeout_us=timeout_us)

    # The deadline is an operand: the three deadlines below run one program.
    compiled_before = XLA_COMPILATIONS["jit(combine)"]
    combine_jit = jax.jit(combine)
    jax.block_until_ready(combine_jit(np.zeros(2, np.int32), np.int32(timeout_s * 1e6)))  # compile

    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    serve_once(s2, after=sent)  # server 2 answers, server 1 never does
    t0 = time.monotonic()
    out, status, waited_us = jax.block_until_ready(combine_jit(sent, np.int32(timeout_s * 1e6)))
    elapsed = time.monotonic() - t0
    print(f"combine with one silent server returned after {elapsed * 1e3:.1f} ms "
          f"(deadline {timeout_s * 1e3:.0f} ms)")
    assert timeout_s <= elapsed < timeout_s + 0.15
    np.testing.assert_array_equal(status, [wire.STATUS_TIMEOUT, wire.STATUS_OK])
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
    serve_once(s1, timeout_us=0)
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    serve_once(s2, after=sent)
    t0 = time.monotonic()
    out, status, _ = jax.block_until_ready(combine_jit(sent, np.int32(50_000)))
    assert time.monotonic() - t0 < timeout_s  # the new, shorter deadline held
    np.testing.assert_array_equal(status, [wire.STATUS_TIMEOUT, wire.STATUS_OK])
    assert client.stats()["stale_replies"] == 1
    # Next time server 1 keeps up: everything is back.
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    serve_once(s1, after=sent)
    serve_once(s2, after=sent)
    out, status, _ = combine_jit(sent, np.int32(LONG_US))
    np.testing.assert_array_equal(status, [wire.STATUS_OK, wire.STATUS_OK])
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
    h, e, g = random_tokens(4, seed=8)
    servers = np.array([1, 2, 3], np.int32)
    t = np.array([1, 2, 3], np.int32)[np.arange(4 * K).reshape(4, K) % 3]
    sent = shm.dispatch(client, h, e, g, t, servers, layer=0, micro_batch=0)
    np.testing.assert_array_equal(sent, [-1, -1, -1])
    out, status, waited_us = shm.combine(client, sent, t, servers, layer=0, micro_batch=0,
                                         timeout_us=LONG_US)
    np.testing.assert_array_equal(status, [wire.STATUS_UNAVAILABLE] * 3)
    np.testing.assert_array_equal(waited_us, [0, 0, 0])
    stats = client.stats()
    assert stats["peer_refused"] == 2 and stats["peer_unavailable"] == 1


def test_argument_checks(open_ep):
    client = open_ep(0)
    h, e, g = random_tokens(4, seed=9)
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
    big = random_tokens(CAP + 1, seed=9)
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
    hidden, ids, gates = random_tokens(CAP, seed=21, experts=range(4))
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
    assert np.asarray(status).tolist() == [wire.STATUS_OK]
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
    hidden, ids, gates = random_tokens(2, seed=22, experts=range(4))
    header = wire.pack_header(seq=2, deployment_id=server.geometry.deployment_id, ticket=2,
                             kind=wire.KIND_REQUEST, sender=0, layer=0, micro_batch=0, num_tokens=2,
                             hidden_dtype=wire.HIDDEN_F32)
    with open(server.segment_path, "r+b") as f:
        f.seek(server.layout.segment_header_bytes)  # slot (sender 0, channel 0)
        f.write(header)
    r = shm.poll(server, HOSTED[1], capacity=CAP, timeout_us=0)
    assert int(r.num_rows) == 0
    assert server.stats()["drop_dtype"] == 1
