"""Applies a `ScalingPolicy` to the expert servers of a running engine.

`ClusterScaler.observe(latency_ms)` feeds the policy one latency observation
(what the caller measures; `observe_engine()` takes a quantile of the engine's
recent step times) and carries out its decision on the engine's `LocalCluster`:

* add: start the first server of the deployment that is not running (a
  `standby = true` spare, or one drained earlier); when every one runs and the
  deployment has a free spare endpoint, start a server that is not in the file
  there, hosting the experts with the most tokens so far (as many as a file
  server hosts on average: one more replica of the hot ones), taken from
  those of a lagging server when there is one (the clients' recent waits on
  it, `ServingMetrics.recent_server_wait`, at least LAGGARD_RATIO times the
  median of the other live servers'): the queue is there. The engine admits
  it at its next step boundary;
* drain: drain the running server the clients sent the fewest token-expert
  slots in recent steps (`ServingMetrics.recent_server_slots`: the least
  traffic to move to replicas; ties go to the server this scaler started
  last, then to the last running one) through `Engine.drain_server`, which
  refuses when an expert would lose its last live replica: then the next
  one, and the scaler holds when every one refuses.

Servers are added and removed one at a time; the step never recompiles.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np

from eaas_jax.control_plane.autoscaler import ScalingPolicy
from eaas_jax.control_plane.cluster import LocalCluster

log = logging.getLogger(__name__)

# A live server whose recent wait (90th percentile) is this many times the
# median of the other live servers' is the one a new replica should relieve.
LAGGARD_RATIO = 2.0


class ClusterScaler:
    def __init__(self, engine, policy: ScalingPolicy, *, clock: Callable[[], float] = time.monotonic):
        cluster = engine.cluster
        if not isinstance(cluster, LocalCluster):
            raise TypeError("ClusterScaler needs an engine whose expert servers it can start: one over a "
                            f"LocalCluster, not {type(cluster).__name__}")
        self.engine, self.cluster, self.policy, self._clock = engine, cluster, policy, clock
        self._started: list[str] = []  # by this scaler, latest last
        self._joined_count = 0  # servers not in the file this scaler added, for their names
        self._last_change = -math.inf

    def running(self) -> list[str]:
        """Names of the servers whose process is running: the file's in its
        order, then those added on spare endpoints."""
        up = self.cluster.servers_up()
        listed = [s.name for i, s in enumerate(self.cluster.deployment.servers) if i in up]
        return listed + [server.name for _, server in sorted(self.cluster.joined_servers().items())]

    def _start_one(self, running: list[str]) -> str | None:
        """Starts a server (see the module doc); its name, None if there is no room."""
        idle = [s.name for s in self.cluster.deployment.servers if s.name not in running]
        if idle:
            self.cluster.start_server(idle[0])
            return idle[0]
        deployment = self.cluster.deployment
        if len(self.cluster.joined_servers()) >= deployment.spare_endpoints:
            return None
        config = self.engine.config
        share = math.ceil(sum(len(s.hosted(config)) for s in deployment.servers)
                          / (len(deployment.servers) * config.num_moe_layers))
        hottest = self._experts_to_replicate(share)
        name = f"hot-{self._joined_count}"
        self._joined_count += 1
        self.cluster.add_server(name, experts=hottest)
        return name

    def _experts_to_replicate(self, count: int) -> list[int]:
        """The `count` experts with the most tokens so far, those of a lagging
        server first (`_laggard`), in index order."""
        per_expert = self.engine.metrics.expert_tokens.sum(axis=0)
        by_tokens = np.argsort(-per_expert, kind="stable").tolist()
        laggard = self._laggard()
        if laggard is not None:
            hosted = set(np.nonzero((self.engine.runner.experts.table == laggard).any(axis=(0, 2)))[0].tolist())
            by_tokens = [e for e in by_tokens if e in hosted] + [e for e in by_tokens if e not in hosted]
        return sorted(by_tokens[:count])

    def _laggard(self) -> int | None:
        """The live server the clients waited on LAGGARD_RATIO times as long
        as on the median other live server (90th percentile of recent steps);
        None when none stands out."""
        waits = self.engine.metrics.recent_server_wait(0.9)
        backend = self.engine.runner.experts
        live = [i for i in range(0 if waits is None else len(waits)) if backend.is_live(i)]
        if len(live) < 2:
            return None
        slowest = max(live, key=lambda i: waits[i])
        others = np.median([waits[i] for i in live if i != slowest])
        return slowest if waits[slowest] > 0 and waits[slowest] >= LAGGARD_RATIO * others else None

    def _drain_one(self, running: list[str]) -> str | None:
        """Drains a server (see the module doc); its name, None if every one
        holds the last live replica of some expert."""
        recent = self.engine.metrics.recent_server_slots()
        ours = [name for name in self._started if name in running]
        # Latest first: what this scaler started, then the running order reversed.
        latest_first = ours[::-1] + [name for name in running[::-1] if name not in ours]
        slots = {name: 0 if recent is None else int(recent[self.cluster.endpoint_of(name)])
                 for name in latest_first}
        refusals = []
        for name in sorted(latest_first, key=slots.get):  # stable: ties stay latest first
            try:
                self.engine.drain_server(name)
                return name
            except ValueError as e:  # it holds an expert's last live replica
                refusals.append(str(e))
        log.info("autoscaler holds: %s", "; ".join(refusals))
        return None

    def observe_engine(self, quantile: float = 0.9) -> int:
        """`observe` the engine's own step time: the `quantile` of its recent
        steps (`ServingMetrics.recent_step_time`), per-token latency for
        decode. Does nothing before the engine ran a step."""
        seconds = self.engine.metrics.recent_step_time(quantile)
        return 0 if seconds is None else self.observe(seconds * 1e3)

    def observe(self, latency_ms: float) -> int:
        """Feeds one latency observation; returns what was done: +1 a server
        was started, -1 one was drained, 0 nothing."""
        now = self._clock()
        running = self.running()
        decision = self.policy.decide(now_s=now, servers=len(running), latency_ms=latency_ms,
                                      last_change_s=self._last_change)
        if decision > 0:
            started = self._start_one(running)
            if started is None:
                return 0
            self._started.append(started)
        elif decision < 0:
            victim = self._drain_one(running)
            if victim is None:
                return 0
            if victim in self._started:
                self._started.remove(victim)
        else:
            return 0
        self._last_change = now
        log.info("autoscaler: %s at %.1f ms observed (target %.1f ms)",
                 f"started {started!r}" if decision > 0 else f"drained {victim!r}", latency_ms,
                 self.policy.latency_target_ms)
        return decision
