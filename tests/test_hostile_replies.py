"""Malformed replies written into a decoding client's inbox (a faulty or
hostile process of the deployment's uid, which can map the client's inbox)
are dropped and counted; they cost no exchange, no request and no output."""

from __future__ import annotations

import mmap
import os
import signal
import threading
import time

import numpy as np

from eaas_jax.engine import Engine
from eaas_jax.control_plane.cluster import LocalCluster
from eaas_jax.transport import shm, wire

from test_disaggregated import ENGINE_ARGS, token_ids
from test_failover import PARAMS, REQUESTS, run_requests

TWO_SERVERS = ('name = "hostile"\ntimeout_ms = 5000\ncapacity = 64\n'
               '[[servers]]\nname = "low"\nexperts = ["0-3"]\n'
               '[[servers]]\nname = "high"\nexperts = ["4-7"]\n')


def malformed_headers(deployment_id: int, sender: int, channel: int, num_tokens: int):
    """Reply headers that fail one check each (the first a bad checksum);
    `seq` is filled in at each write."""
    valid = dict(deployment_id=deployment_id, kind=wire.KIND_REPLY, sender=sender, layer=0, micro_batch=channel,
                 num_tokens=num_tokens, ticket=1)
    return [dict(valid, checksum=12345), dict(valid, kind=wire.KIND_REQUEST), dict(valid, sender=sender + 1),
            dict(valid, micro_batch=channel + 1), dict(valid, num_tokens=0), dict(valid, num_tokens=10**6),
            dict(valid, layer=99), dict(valid, hidden_dtype=77), dict(valid, deployment_id=deployment_id ^ 1)]


def wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Waits until every thread of `pid` is stopped (SIGSTOP takes effect
    asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        if all(state in "tT" for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.0005)


class ReplyForger:
    """Writes malformed reply headers into the client's inbox slots of one
    server at a time, while that server is stopped (SIGSTOP), and only over a
    reply the client no longer waits for: so a forged header never replaces
    a real reply (a process of our uid could, but that uid is the trust
    boundary); every one the client sees arrives while it waits, or before."""

    def __init__(self, cluster: LocalCluster, client):
        self.cluster, self.client = cluster, client
        self.inboxes = {endpoint: self._map(path) for endpoint, path in
                        ((client.endpoint, client.segment_path),
                         *((s, shm.segment_path(cluster.shm_name, s)) for s in range(len(cluster.deployment.servers))))}
        self.written = 0
        self.seq = 1 << 62  # above any real sender's (nanoseconds since 1970)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _map(self, path: str) -> mmap.mmap:
        fd = os.open(path, os.O_RDWR)
        try:
            return mmap.mmap(fd, self.client.layout.total_bytes)
        finally:
            os.close(fd)

    def _header(self, sender: int, channel: int) -> slice:
        """Where slot (sender, channel)'s message header is in an inbox."""
        index = sender * self.client.geometry.num_channels + channel
        off = self.client.layout.segment_header_bytes + index * self.client.layout.slot_bytes
        return slice(off, off + 64)

    def _forge(self, server: int) -> None:
        process = self.cluster.process(self.cluster.deployment.servers[server].name)
        process.send_signal(signal.SIGSTOP)
        try:
            wait_stopped(process.pid)
            client = self.client.endpoint
            for channel in range(self.client.geometry.num_channels):
                awaited = wire.unpack_header(self.inboxes[server][self._header(client, channel)])["ticket"]
                reply_at = self._header(server, channel)
                reply = wire.unpack_header(self.inboxes[client][reply_at])
                if reply["checksum_ok"] and reply["kind"] == wire.KIND_REPLY and reply["ticket"] == awaited:
                    continue  # the real reply, maybe not read yet
                headers = malformed_headers(self.client.geometry.deployment_id, server, channel, 4)
                self.seq += 2
                self.inboxes[client][reply_at] = wire.pack_header(seq=self.seq, **headers[self.written % len(headers)])
                self.written += 1
            time.sleep(0.005)  # a waiting combine looks at its slot at least every 200 us
        finally:
            process.send_signal(signal.SIGCONT)

    def _run(self) -> None:
        server = 0
        while not self.stop.is_set():
            self._forge(server)
            server = 1 - server
            time.sleep(0.002)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for inbox in self.inboxes.values():
            inbox.close()


def test_a_flood_of_malformed_replies_changes_no_output_and_fails_nothing(tiny_checkpoint, tmp_path):
    path = tmp_path / "hostile.toml"
    path.write_text(TWO_SERVERS)
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as embedded:
        reference = token_ids(embedded.generate(REQUESTS, PARAMS, use_tqdm=False))
    with LocalCluster(tiny_checkpoint, str(path), dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            assert token_ids(engine.generate(REQUESTS[:2], PARAMS, use_tqdm=False)) == reference[:2]  # compiled
            forger = ReplyForger(cluster, engine.runner.experts.endpoint)
            forger.thread.start()
            try:
                assert run_requests(engine, lambda steps, finished: None) == reference
            finally:
                forger.close()
            counters = engine.metrics.server_counters
            assert {name: int(c.sum()) for name, c in counters.items()} == dict.fromkeys(counters, 0)
            assert engine.metrics.failed_requests == 0
            stats = engine.runner.experts.endpoint.stats()
            dropped = sum(n for name, n in stats.items() if name.startswith("drop_"))
            # Many forged headers met a waiting combine (the rest were replaced
            # by the server's next reply before the client looked).
            print(f"{forger.written} forged replies written, {dropped} dropped by the client")
            assert dropped >= 10, (forger.written, stats)
            assert stats["timeouts"] == 0
            assert np.all([engine.runner.experts.is_live(s) for s in (0, 1)])
