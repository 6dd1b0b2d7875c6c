"""What the shm transport's tests share: a tiny geometry and toy experts,
deployments whose segments are removed (and checked for leaks) after each
module, and a raw peer that writes any bytes into an inbox."""

from __future__ import annotations

import contextlib
import glob
import itertools
import mmap
import os

import jax
import numpy as np
import pytest

from eaas_jax.transport import shm, wire

from _transport_worker import expert_compute, make_weights

# Every deployment name of these tests starts with PREFIX: the leak check only
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


def our_segments() -> list[str]:
    return sorted(glob.glob(f"/dev/shm/eaas-{PREFIX}*"))


@pytest.fixture(scope="module", autouse=True)
def no_segments_left_behind():
    yield
    left = our_segments()
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


def random_tokens(t: int, seed: int, experts=None):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((t, D)).astype(np.float32)
    pool = np.arange(E) if experts is None else np.asarray(experts)
    expert_ids = np.stack([rng.choice(pool, K, replace=False) for _ in range(t)]).astype(np.int32)
    gates = rng.random((t, K)).astype(np.float32)
    return hidden, expert_ids, gates


def serve_once(server, *, after=None, capacity=2 * CAP, **kw):
    """One server step (eager), finished when this returns: poll, compute, reply.
    Returns (poll result, token)."""
    r = shm.poll(server, HOSTED[server.endpoint], capacity=capacity, timeout_us=kw.pop(
        "timeout_us", 1_000_000), after=after, **kw)
    y = expert_compute(WEIGHTS, r.hidden, r.expert_ids, r.gates, r.layer)
    return jax.block_until_ready((r, shm.reply(server, y, r.num_rows)))


class RawPeer:
    """Writes raw messages into the slots of an endpoint's inbox, as a (hostile)
    peer would: any bytes, but published like a real sender (the seqlock of
    ffi/wire_format.h), so that a receiver reading the slot at the same time
    never copies a half-written message."""

    def __init__(self, target: shm.ShmEndpoint):
        self.target = target
        self.layout = target.layout
        fd = os.open(target.segment_path, os.O_RDWR)
        try:
            self.mem = mmap.mmap(fd, self.layout.total_bytes)
        finally:
            os.close(fd)
        num_slots = target.geometry.max_endpoints * target.geometry.num_channels
        # Row i: the bytes of slot index i (sender i // num_channels, channel i % num_channels).
        self.slots = np.frombuffer(self.mem, np.uint8, count=num_slots * self.layout.slot_bytes,
                                   offset=self.layout.segment_header_bytes).reshape(num_slots, -1)
        self.seq = 1000

    def slot_index(self, sender: int, channel: int) -> int:
        return sender * self.target.geometry.num_channels + channel

    def read_header(self, sender: int, channel: int) -> dict:
        return wire.unpack_header(self.slots[self.slot_index(sender, channel), :64].tobytes())

    def publish(self, slots, headers, *, hidden=None, expert_ids=None, gates=None, scales=None) -> None:
        """Message i into slot index slots[i]: `headers` uint8 [M, 64]; each
        payload array [M, ...] (any dtype, written as its bytes) fills the start
        of its area. The seq is made odd ("being written") first and published
        last, every slot at once."""
        slots = np.asarray(slots)
        headers = np.asarray(headers, np.uint8).reshape(len(slots), 64)
        lay = self.layout
        self.slots[slots, 0] = headers[:, 0] | 1
        self.slots[slots, 1:8] = headers[:, 1:8]
        for arr, at in ((hidden, lay.hidden_offset), (expert_ids, lay.expert_ids_offset),
                        (gates, lay.gates_offset), (scales, lay.scales_offset)):
            if arr is not None:
                data = np.ascontiguousarray(arr).view(np.uint8).reshape(len(slots), -1)
                self.slots[slots, at:at + data.shape[1]] = data
        self.slots[slots, 8:64] = headers[:, 8:]
        self.slots[slots, 0] = headers[:, 0]

    def write(self, slot_sender: int, slot_channel: int, /, *, header: bytes | None = None,
              hidden=None, expert_ids=None, gates=None, **fields) -> None:
        """One message into slot (slot_sender, slot_channel). `fields` override
        the header fields (defaults: a valid request from the slot's owner)."""
        if header is None:
            self.seq += 2
            f = dict(seq=self.seq, deployment_id=self.target.geometry.deployment_id,
                     kind=wire.KIND_REQUEST, sender=slot_sender, layer=0,
                     micro_batch=slot_channel,
                     num_tokens=2)
            f.update(fields)
            header = wire.pack_header(**f)
        payload = {name: None if arr is None else np.asarray(arr)[None]
                   for name, arr in dict(hidden=hidden, expert_ids=expert_ids, gates=gates).items()}
        self.publish([self.slot_index(slot_sender, slot_channel)], np.frombuffer(header, np.uint8), **payload)

    def close(self):
        del self.slots  # the mapping cannot close while an array views it
        self.mem.close()


def drops(stats):
    return {n: v for n, v in stats.items() if n.startswith("drop_") and v}
