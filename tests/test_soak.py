"""A bounded chaos soak: an engine keeps serving while its expert servers
are killed, restarted, drained, joined by a new one and drained again. Every
request must complete equal to the embedded engine, and after every fault
redundancy must come back: each (MoE layer, expert) on two live replicas again
within RESTORE_BOUND_S of its replacement saying it is ready."""

from __future__ import annotations

import threading
import time

import numpy as np

from eaas_jax.engine import Engine
from eaas_jax.control_plane.server_pool import MEMBERSHIP_CHECK_S
from eaas_jax.control_plane.cluster import LocalCluster

from test_disaggregated import ENGINE_ARGS
from test_failover import PARAMS, REPLICATED, REQUESTS

# Every expert on two of r0, r1, r2 (fixed deadlines, as the shipped
# deployment files), and a spare endpoint for a server that joins.
DEPLOYMENT = "spare_endpoints = 1\n" + REPLICATED
SOAK_S = 60.0
# From a replacement's "ready" to every expert on two live replicas: the
# engine's next membership check, and the steps it is waiting for then.
RESTORE_BOUND_S = MEMBERSHIP_CHECK_S + 4.0


def live_replicas(engine) -> np.ndarray:
    """[layers, experts] how many live servers hold each (MoE layer, expert)."""
    backend = engine.runner.experts
    table = backend.table
    live = np.array([backend.is_live(s) for s in range(engine.cluster.deployment.num_server_endpoints)])
    return ((table >= 0) & live[np.maximum(table, 0)]).sum(axis=-1)


class Chaos:
    """Faults, one at a time, each once the previous one healed. An action
    does its harm and returns what brings a replacement up (run in a thread,
    as an operator's tooling would) and when the fault counts as healed."""

    def __init__(self, engine, cluster: LocalCluster):
        self.engine, self.cluster = engine, cluster
        self.actions = [self.kill("r0"), self.drain("r1"), self.join, self.kill("r2"), self.drain("r0"),
                        self.kill("r1"), self.join, self.kill("r0")]
        self.records: list[dict] = []  # per fault: what, and its fault / ready / restored times
        self._replacement: threading.Thread | None = None
        self._healed = None
        self._joined = 0

    def redundant(self) -> bool:
        return bool((live_replicas(self.engine) >= 2).all())

    def kill(self, name):
        def kill():
            victim = self.cluster.process(name)
            victim.kill()
            victim.wait()
            return lambda: self.cluster.start_server(name), self.redundant
        kill.__name__ = f"kill {name}"
        return kill

    def drain(self, name):
        def drain():
            self.engine.drain_server(name)
            return lambda: self.cluster.start_server(name), self.redundant
        drain.__name__ = f"drain {name}"
        return drain

    def join(self):
        """A server not in the file joins (a third replica of every expert);
        healed once the engine routes to it, then it is drained again."""
        name = f"extra-{self._joined}"
        self._joined += 1

        def admitted() -> bool:
            endpoint = self.cluster.endpoint_of(name)
            if not self.engine.runner.experts.is_live(endpoint):
                return False
            self.engine.drain_server(name)
            return True

        return lambda: self.cluster.add_server(name, experts="all"), admitted

    @property
    def healing(self) -> bool:
        return bool(self.records) and "restored" not in self.records[-1]

    def after_step(self, now: float, start_more: bool) -> None:
        """Follows the fault under way, or starts the next one."""
        if self.healing:
            record = self.records[-1]
            if "ready" not in record and not self._replacement.is_alive():
                record["ready"] = now
            if "ready" in record and self._healed():
                record["restored"] = now
        elif start_more and self.actions:
            action = self.actions.pop(0)
            self.records.append({"what": action.__name__, "fault": now})
            replace, self._healed = action()
            self._replacement = threading.Thread(target=replace, daemon=True)
            self._replacement.start()


def test_a_minute_of_kills_restarts_joins_and_drains_loses_nothing_and_restores_redundancy(tiny_checkpoint,
                                                                                            tmp_path):
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as embedded:
        reference = [o.outputs[0].token_ids for o in embedded.generate(REQUESTS, PARAMS, use_tqdm=False)]
    path = tmp_path / "soak.toml"
    path.write_text(DEPLOYMENT)
    with LocalCluster(tiny_checkpoint, str(path), dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            chaos = Chaos(engine, cluster)
            expected, done, mismatched = {}, 0, []
            start = time.monotonic()
            while True:
                soaking = time.monotonic() - start < SOAK_S
                if not (soaking or chaos.healing or engine.has_unfinished_requests()):
                    break
                assert time.monotonic() - start < SOAK_S + 300, f"a fault never healed: {chaos.records}"
                if (soaking or chaos.healing) and len(expected) - done < 16:
                    for _ in range(8):
                        i = len(expected)
                        expected[engine.add_request(REQUESTS[i % len(REQUESTS)], PARAMS)] = reference[i % len(REQUESTS)]
                for out in engine.step():
                    if out.finished:
                        done += 1
                        assert out.error is None, out.error
                        if out.outputs[0].token_ids != expected[out.request_id]:
                            mismatched.append(out.request_id)
                chaos.after_step(time.monotonic(), start_more=soaking)
            records = chaos.records
            print("\n".join(f"{r['what']}: replacement ready {r['ready'] - r['fault']:.1f} s after the fault, "
                            f"redundancy back {r['restored'] - r['ready']:.2f} s after that" for r in records))
            assert done == len(expected) > 100 and not mismatched, (done, len(expected), mismatched[:5])
            assert engine.metrics.failed_requests == 0
            # Faults of every kind, each healed within the bound once its replacement was ready.
            kinds = {r["what"].split()[0] for r in records}
            assert kinds == {"kill", "drain", "join"} and len(records) >= 4, records
            for record in records:
                assert record["restored"] - record["ready"] <= RESTORE_BOUND_S, record
            assert chaos.redundant()
