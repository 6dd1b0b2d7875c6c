"""Autoscaling expert servers: a policy with hysteresis, and a simulator that
replays a traffic trace against it.

`ScalingPolicy.decide` looks at the expert servers' observed latency (e.g.
the p99 exchange wait an engine measures) and says whether to add a server,
drain one, or hold: add above `scale_up_at` of the latency target, drain
below `scale_down_at` of it, and never two changes within `cooldown_s` (the
gap between the two thresholds plus the cooldown is the hysteresis that
keeps it from flapping). A drain is refused when the remaining servers would
run above the scale-up threshold at the current load.

`simulate` drives the policy with a trace of offered load (tokens/s through
the experts) against a fluid queueing model of the servers (each serves
`server_tokens_per_s`; a new one takes `startup_s` to load and compile before
it takes traffic; work beyond capacity queues) and reports server-hours and
the fraction of time the latency met the target, beside static provisioning
for the trace's peak.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    latency_target_ms: float
    min_servers: int = 1
    max_servers: int = 64
    scale_up_at: float = 0.8  # of the target: add a server above this
    scale_down_at: float = 0.4  # of the target: drain one below this
    cooldown_s: float = 120.0  # at least this long between two changes

    def __post_init__(self):
        if not self.latency_target_ms > 0:
            raise ValueError(f"latency_target_ms must be > 0, got {self.latency_target_ms}")
        if not 1 <= self.min_servers <= self.max_servers:
            raise ValueError(f"need 1 <= min_servers <= max_servers, got {self.min_servers}, {self.max_servers}")
        if not 0 < self.scale_down_at < self.scale_up_at <= 1:
            raise ValueError("need 0 < scale_down_at < scale_up_at <= 1 (the gap is the hysteresis), got "
                             f"{self.scale_down_at}, {self.scale_up_at}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {self.cooldown_s}")

    def decide(self, *, now_s: float, servers: int, latency_ms: float, last_change_s: float,
               latency_with_one_fewer_ms: float | None = None) -> int:
        """+1 (add a server), -1 (drain one) or 0.

        latency_with_one_fewer_ms: the latency expected at the current load
          with one server fewer (from a load model); a drain that would cross
          the scale-up threshold is refused.
        """
        if now_s - last_change_s < self.cooldown_s:
            return 0
        if latency_ms > self.scale_up_at * self.latency_target_ms and servers < self.max_servers:
            return 1
        if latency_ms < self.scale_down_at * self.latency_target_ms and servers > self.min_servers:
            if latency_with_one_fewer_ms is None or \
                    latency_with_one_fewer_ms <= self.scale_up_at * self.latency_target_ms:
                return -1
        return 0


def diurnal_trace(hours: float = 48, step_s: float = 10, *, mean_tokens_per_s: float = 40_000,
                  swing: float = 0.6, bursts_per_day: float = 6, burst_factor: float = 1.8,
                  burst_minutes: float = 15, seed: int = 0) -> np.ndarray:
    """Offered load per `step_s` interval: a daily sine of +-`swing` around the
    mean, with bursts (load x `burst_factor` for `burst_minutes`; overlapping
    bursts do not compound) at random times."""
    rng = np.random.default_rng(seed)
    t = np.arange(0, hours * 3600, step_s)
    load = mean_tokens_per_s * (1 + swing * np.sin(2 * math.pi * (t / 86_400 - 0.25)))
    in_burst = np.zeros(t.shape, bool)
    for start in rng.uniform(0, hours * 3600, size=rng.poisson(bursts_per_day * hours / 24)):
        in_burst |= (t >= start) & (t < start + burst_minutes * 60)
    return np.where(in_burst, burst_factor * load, load)


@dataclasses.dataclass(frozen=True)
class ServerModel:
    server_tokens_per_s: float = 10_000  # one server's throughput at full use
    base_latency_ms: float = 20.0  # an exchange's latency on an idle server
    startup_s: float = 120.0  # a new server's load + compile before it serves


def latency_ms(model: ServerModel, load: float, servers: int, backlog: float = 0.0) -> float:
    """Exchange latency at `load` tokens/s spread over `servers` (M/M/1-like
    growth with utilisation), plus the time to drain a backlog."""
    capacity = servers * model.server_tokens_per_s
    rho = min(load / capacity, 0.99)
    return model.base_latency_ms / (1 - rho) + 1e3 * backlog / capacity


def simulate(trace: Sequence[float], step_s: float, policy: ScalingPolicy, model: ServerModel,
             *, servers: int | None = None, autoscale: bool = True) -> dict:
    """Replays `trace` (tokens/s per interval of `step_s`). Returns server_hours,
    slo_attainment (fraction of intervals at or under the target), the
    number of scaling changes and the servers over time."""
    servers = policy.min_servers if servers is None else servers
    if not policy.min_servers <= servers <= policy.max_servers:
        raise ValueError(f"servers={servers} is outside [{policy.min_servers}, {policy.max_servers}]")
    starting: list[float] = []  # ready times of servers still starting
    backlog, last_change, met, server_seconds, changes = 0.0, -math.inf, 0, 0.0, 0
    history = []
    for i, load in enumerate(trace):
        now = i * step_s
        ready = [r for r in starting if r <= now]
        servers += len(ready)
        starting = [r for r in starting if r > now]
        capacity = servers * model.server_tokens_per_s
        backlog = max(0.0, backlog + (load - capacity) * step_s)
        observed = latency_ms(model, load, servers, backlog)
        met += observed <= policy.latency_target_ms
        server_seconds += (servers + len(starting)) * step_s  # starting servers hold their GPU too
        if autoscale:
            fewer = latency_ms(model, load, servers - 1, backlog) if servers > 1 else math.inf
            change = policy.decide(now_s=now, servers=servers + len(starting), latency_ms=observed,
                                   last_change_s=last_change, latency_with_one_fewer_ms=fewer)
            if change > 0:
                starting.append(now + model.startup_s)
            elif change < 0:
                servers -= 1
            if change:
                last_change, changes = now, changes + 1
        history.append(servers + len(starting))
    return {"server_hours": server_seconds / 3600, "slo_attainment": met / len(trace), "changes": changes,
            "servers": np.asarray(history)}


def static_servers_for_attainment(trace: Sequence[float], step_s: float, policy: ScalingPolicy,
                                  model: ServerModel, attainment: float) -> int:
    """The fewest servers that, never changing, meet the latency target in at
    least `attainment` of the trace's intervals."""
    for n in range(policy.min_servers, policy.max_servers + 1):
        if simulate(trace, step_s, policy, model, servers=n, autoscale=False)["slo_attainment"] >= attainment:
            return n
    raise ValueError(f"even {policy.max_servers} static servers attain less than {attainment}")


def static_servers_for_peak(trace: Sequence[float], policy: ScalingPolicy, model: ServerModel) -> int:
    """The fewest servers whose latency at the trace's peak meets the target."""
    peak = max(trace)
    for n in range(policy.min_servers, policy.max_servers + 1):
        if latency_ms(model, peak, n) <= policy.latency_target_ms and peak <= n * model.server_tokens_per_s:
            return n
    raise ValueError(f"even {policy.max_servers} servers miss the target at the peak of {peak:.0f} tokens/s")
