"""Serving metrics of an engine, rendered in Prometheus' text exposition
format (through prometheus_client).

What an operator (or an autoscaler) watches: the tokens routed to each expert
(its load), the token-expert slots sent to each expert server, each server's
deadline misses, bad replies, times it was marked dead, the transport's
dropped messages by reason, how long steps take, the time to each request's
first token and between its tokens, and how full the scheduler and the KV
cache are. Counters only grow for the engine's lifetime; `render` reads them
without resetting.
"""

from __future__ import annotations

import bisect
import collections
from typing import Mapping, Sequence

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from eaas_jax.transport import wire

# A server's combine status -> the per-server counter it adds to.
_STATUS_COUNTERS = {
    wire.STATUS_TIMEOUT: "deadline_misses",
    wire.STATUS_BAD_REPLY: "bad_replies",
    wire.STATUS_UNAVAILABLE: "unreachable",
}


# Upper bounds in seconds of the step-time histogram's buckets: decode steps
# take milliseconds on GPUs, tens of them on CPUs, long prefills seconds.
STEP_SECONDS_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# Time to a request's first token: queueing and its prefill.
TTFT_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time between a request's tokens: a decode step, or more when a prefill runs between.
ITL_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
# Steps whose times `recent_step_time` takes quantiles over.
RECENT_STEPS = 256

EXPERT_TOKENS = "eaas_expert_tokens_total"


def read_expert_tokens(text: str, num_moe_layers: int, num_experts: int) -> np.ndarray:
    """[num_moe_layers, num_experts] token counts from a saved `render` text
    (what the placement planner balances)."""
    load = np.zeros((num_moe_layers, num_experts), np.int64)
    found = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != EXPERT_TOKENS:
                continue
            layer, expert = int(sample.labels["layer"]), int(sample.labels["expert"])
            if not (0 <= layer < num_moe_layers and 0 <= expert < num_experts):
                raise ValueError(f"(layer {layer}, expert {expert}) is not in this model")
            load[layer, expert] = int(sample.value)
            found += 1
    if not found:
        raise ValueError(f"no {EXPERT_TOKENS} samples")
    return load


class Histogram:
    """Counts of observations by bucket (`bounds`: upper bounds in seconds,
    one more bucket above them all) and their sum."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = np.zeros(len(self.bounds) + 1, np.int64)
        self.sum = 0.0

    def observe(self, seconds: float, times: int = 1) -> None:
        """Counts `seconds` (`times` times)."""
        # bisect, not np.searchsorted: this runs for every row of every step,
        # and numpy's call on a tuple costs ~3 µs of converting it each time.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += times
        self.sum += seconds * times

    def family(self, name: str, help_text: str) -> HistogramMetricFamily:
        cumulative = np.cumsum(self.counts)
        return HistogramMetricFamily(
            name, help_text, sum_value=self.sum,
            buckets=[(repr(float(b)), int(c)) for b, c in zip(self.bounds, cumulative)] + [("+Inf", int(cumulative[-1]))])


def render_families(families: Sequence[Metric]) -> str:
    """The exposition text of `families`."""

    class _Families(Collector):
        def collect(self):
            return iter(families)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry).decode()


def _check_quantile(quantile: float) -> None:
    if not 0 <= quantile <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")


class ServingMetrics:
    """Counters of one engine: `observe` each fetched step; the engine adds
    each token it appends to `generated_tokens`.

    server_names: the deployment's servers in endpoint order (empty when the
      experts are embedded).
    """

    def __init__(self, num_moe_layers: int, num_experts: int, server_names: Sequence[str] = ()):
        self.server_names = list(server_names)
        n = len(self.server_names)
        self.steps = 0
        self.generated_tokens = 0
        self.unserved_slots = 0
        self.retried_steps = 0
        self.failed_requests = 0
        self.expert_tokens = np.zeros((num_moe_layers, num_experts), np.int64)
        self.server_slots = np.zeros(n, np.int64)
        self.server_wait_seconds = np.zeros(n, np.float64)
        self._recent_server_wait: collections.deque[np.ndarray] = collections.deque(maxlen=RECENT_STEPS)
        self._recent_server_slots: collections.deque[np.ndarray] = collections.deque(maxlen=RECENT_STEPS)
        self.server_counters = {name: np.zeros(n, np.int64) for name in (*_STATUS_COUNTERS.values(), "marked_dead")}
        self.step_seconds = Histogram(STEP_SECONDS_BUCKETS)
        self.ttft_seconds = Histogram(TTFT_SECONDS_BUCKETS)
        self.itl_seconds = Histogram(ITL_SECONDS_BUCKETS)
        self.prompt_tokens = 0
        self._recent_step_seconds: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)

    def observe(self, report) -> None:
        """Adds one step's `ExchangeReport`."""
        self.steps += 1
        self.expert_tokens += report.expert_tokens
        if self.server_names:
            self.server_slots += report.server_slots
            self._recent_server_slots.append(np.asarray(report.server_slots, np.int64))
            wait_s = np.asarray(report.server_wait_us, np.float64) / 1e6
            self.server_wait_seconds += wait_s
            self._recent_server_wait.append(wait_s)
            self.unserved_slots += report.unserved_slots
            for status, counter in _STATUS_COUNTERS.items():
                self.server_counters[counter] += report.count(status)

    def name_server(self, endpoint: int, name: str) -> None:
        """Labels `endpoint`'s counters with the server now there (one that
        joined on a spare endpoint)."""
        self.server_names[endpoint] = name

    def server_marked_dead(self, endpoint: int) -> None:
        self.server_counters["marked_dead"][endpoint] += 1

    def observe_step_time(self, seconds: float) -> None:
        """One step's time on the device (the engine measures it from when the
        step could start to when its results arrived)."""
        self.step_seconds.observe(seconds)
        self._recent_step_seconds.append(seconds)

    def recent_step_time(self, quantile: float) -> float | None:
        """The `quantile` (in [0, 1]) of the last RECENT_STEPS steps' times in
        seconds; None before the first step."""
        _check_quantile(quantile)
        return float(np.quantile(self._recent_step_seconds, quantile)) if self._recent_step_seconds else None

    def recent_server_wait(self, quantile: float) -> np.ndarray | None:
        """Per server, the `quantile` of the time each of the last RECENT_STEPS
        steps waited on it in its exchanges (seconds); None before the first
        step. A server the clients wait on more than on the others is the one
        behind."""
        _check_quantile(quantile)
        if not self._recent_server_wait:
            return None
        return np.quantile(np.stack(self._recent_server_wait), quantile, axis=0)

    def recent_server_slots(self) -> np.ndarray | None:
        """Per server, the token-expert slots sent to it in the last
        RECENT_STEPS steps; None before the first step."""
        if not self._recent_server_slots:
            return None
        return np.sum(np.stack(self._recent_server_slots), axis=0)

    def families(self, *, live: Sequence[bool] = (), transport: Mapping[str, int] | None = None,
                 gauges: Mapping[str, tuple[float, str]] | None = None) -> list[Metric]:
        """The metric families. live: per server, whether it gets traffic
        now; transport: the client endpoint's counters (`endpoint.stats()`);
        gauges: name -> (value, help) read off the engine now."""
        out: list[Metric] = []

        def counter(name: str, help_text: str, value=None, labels: Sequence[str] = ()) -> CounterMetricFamily:
            out.append(CounterMetricFamily(name, help_text, value=value, labels=None if value is not None else labels))
            return out[-1]

        counter("eaas_steps_total", "Model steps run.", self.steps)
        counter("eaas_generated_tokens_total", "Tokens generated.", self.generated_tokens)
        counter("eaas_prompt_tokens_total", "Prompt tokens of the requests that got a first token.",
                self.prompt_tokens)
        out.append(self.step_seconds.family(
            "eaas_step_seconds", "Time of each model step on the device, from when it could start to when its "
            "results arrived."))
        out.append(self.ttft_seconds.family(
            "eaas_time_to_first_token_seconds", "From a request's arrival to its first token."))
        out.append(self.itl_seconds.family(
            "eaas_inter_token_latency_seconds", "Between two steps' tokens of one request."))
        for name, (value, help_text) in (gauges or {}).items():
            out.append(GaugeMetricFamily(name, help_text, value=value))
        experts = counter(EXPERT_TOKENS, "Tokens routed to each expert (each of a token's top-k experts counts it).",
                          labels=["layer", "expert"])
        for (layer, expert), count in np.ndenumerate(self.expert_tokens):
            experts.add_metric([str(layer), str(expert)], int(count))
        if self.server_names:
            def per_server(family, values):
                for name, value in zip(self.server_names, values):
                    family.add_metric([name], value)

            per_server(counter("eaas_server_token_slots_total", "Token-expert slots sent to each expert server "
                               "(failover re-sends included).", labels=["server"]), self.server_slots.tolist())
            per_server(counter("eaas_server_wait_seconds_total", "Time this client's exchanges waited on each "
                               "expert server's replies.", labels=["server"]), self.server_wait_seconds.tolist())
            for name, help_text in (
                ("deadline_misses", "Exchanges in which the server did not reply by the deadline."),
                ("bad_replies", "Exchanges in which the server sent no valid reply by the deadline, only invalid ones."),
                ("unreachable", "Exchanges in which the server's mailbox could not be written."),
                ("marked_dead", "Times the engine marked the server dead and routed around it."),
            ):
                per_server(counter(f"eaas_server_{name}_total", help_text, labels=["server"]),
                           self.server_counters[name].tolist())
            if live:
                family = GaugeMetricFamily("eaas_server_live", "1 if the server gets traffic, 0 if routed around.",
                                           labels=["server"])
                per_server(family, [int(bool(x)) for x in live])
                out.append(family)
            counter("eaas_unserved_slots_total", "Token-expert slots no live replica served (their requests failed "
                    "or their steps ran again).", self.unserved_slots)
            counter("eaas_failed_requests_total", "Requests failed because a token of theirs had no live replica "
                    "of its expert.", self.failed_requests)
            counter("eaas_retried_steps_total", "Steps run again with the full deadline: every replica of some "
                    "experts missed an adapted one while up.", self.retried_steps)
        if transport:
            dropped = counter("eaas_transport_dropped_messages_total",
                              "Messages this client's transport dropped, by the check they failed.", labels=["reason"])
            events = counter("eaas_transport_events_total",
                             "This client's other transport counters (sends, accepts, timeouts, ...).",
                             labels=["event"])
            for name, count in transport.items():
                if name.startswith("drop_"):
                    dropped.add_metric([name[len("drop_"):]], int(count))
                else:
                    events.add_metric([name], int(count))
        return out

    def render(self, **kwargs) -> str:
        """The exposition text of `families(**kwargs)`."""
        return render_families(self.families(**kwargs))
