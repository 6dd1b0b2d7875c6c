"""Serving metrics of an engine, rendered in Prometheus' text exposition format.

What an operator (or an autoscaler) watches: the tokens routed to each expert
(its load), the token-expert slots sent to each expert server, each server's
deadline misses, bad replies, times it was marked dead, the transport's
dropped messages by reason, and how long steps take. Counters only grow for
the engine's lifetime; `render` reads them without resetting.
"""

from __future__ import annotations

import collections
import re
from typing import Mapping, Sequence

import numpy as np

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
# Steps whose times `recent_step_time` takes quantiles over.
RECENT_STEPS = 256

EXPERT_TOKENS = "eaas_expert_tokens_total"
_EXPERT_TOKENS_SAMPLE = re.compile(EXPERT_TOKENS + r'\{layer="(\d+)",expert="(\d+)"\} (\d+)')


def read_expert_tokens(text: str, num_moe_layers: int, num_experts: int) -> np.ndarray:
    """[num_moe_layers, num_experts] token counts from a saved `render` text
    (what the placement planner balances)."""
    load = np.zeros((num_moe_layers, num_experts), np.int64)
    found = 0
    for line in text.splitlines():
        m = _EXPERT_TOKENS_SAMPLE.fullmatch(line.strip())
        if m:
            layer, expert, count = map(int, m.groups())
            if layer >= num_moe_layers or expert >= num_experts:
                raise ValueError(f"(layer {layer}, expert {expert}) is not in this model")
            load[layer, expert] = count
            found += 1
    if not found:
        raise ValueError(f"no {EXPERT_TOKENS} samples")
    return load


def _label(value) -> str:
    """A label value, escaped as the exposition format asks."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Family:
    """The lines of one metric family."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.name = name

    def add(self, value, **labels) -> None:
        text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        self.lines.append(f"{self.name}{{{text}}} {value}" if text else f"{self.name} {value}")


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
        self.step_seconds_counts = np.zeros(len(STEP_SECONDS_BUCKETS) + 1, np.int64)  # the last: above all
        self.step_seconds_sum = 0.0
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
        self.step_seconds_counts[np.searchsorted(STEP_SECONDS_BUCKETS, seconds)] += 1
        self.step_seconds_sum += seconds
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

    def render(self, *, live: Sequence[bool] = (), transport: Mapping[str, int] | None = None) -> str:
        """The exposition text. live: per server, whether it gets traffic now;
        transport: the client endpoint's counters (`endpoint.stats()`)."""
        families = []

        def family(name, kind, help_text):
            families.append(_Family(name, kind, help_text))
            return families[-1]

        family("eaas_steps_total", "counter", "Model steps run.").add(self.steps)
        family("eaas_generated_tokens_total", "counter", "Tokens generated.").add(self.generated_tokens)
        steps = family("eaas_step_seconds", "histogram",
                       "Time of each model step on the device, from when it could start to when its results arrived.")
        for bound, count in zip((*STEP_SECONDS_BUCKETS, "+Inf"), np.cumsum(self.step_seconds_counts)):
            steps.lines.append(f'eaas_step_seconds_bucket{{le="{bound}"}} {count}')
        steps.lines += [f"eaas_step_seconds_sum {self.step_seconds_sum:.6f}",
                        f"eaas_step_seconds_count {int(self.step_seconds_counts.sum())}"]
        experts = family(EXPERT_TOKENS, "counter",
                         "Tokens routed to each expert (each of a token's top-k experts counts it).")
        for (layer, expert), count in np.ndenumerate(self.expert_tokens):
            experts.add(int(count), layer=layer, expert=expert)
        if self.server_names:
            slots = family("eaas_server_token_slots_total", "counter",
                           "Token-expert slots sent to each expert server (failover re-sends included).")
            for name, count in zip(self.server_names, self.server_slots):
                slots.add(int(count), server=name)
            waits = family("eaas_server_wait_seconds_total", "counter",
                           "Time this client's exchanges waited on each expert server's replies.")
            for name, seconds in zip(self.server_names, self.server_wait_seconds):
                waits.add(f"{seconds:.6f}", server=name)
            for counter, help_text in (
                ("deadline_misses", "Exchanges in which the server did not reply by the deadline."),
                ("bad_replies", "Exchanges in which the server sent no valid reply by the deadline, only invalid ones."),
                ("unreachable", "Exchanges in which the server's mailbox could not be written."),
                ("marked_dead", "Times the engine marked the server dead and routed around it."),
            ):
                f = family(f"eaas_server_{counter}_total", "counter", help_text)
                for name, count in zip(self.server_names, self.server_counters[counter]):
                    f.add(int(count), server=name)
            if live:
                f = family("eaas_server_live", "gauge", "1 if the server gets traffic, 0 if routed around.")
                for name, is_live in zip(self.server_names, live):
                    f.add(int(bool(is_live)), server=name)
            family("eaas_unserved_slots_total", "counter",
                   "Token-expert slots no live replica served (their requests failed or their steps ran again).").add(
                self.unserved_slots)
            family("eaas_failed_requests_total", "counter",
                   "Requests failed because a token of theirs had no live replica of its expert.").add(
                self.failed_requests)
            family("eaas_retried_steps_total", "counter",
                   "Steps run again with the full deadline: every replica of some experts missed an adapted "
                   "one while up.").add(self.retried_steps)
        if transport:
            dropped = family("eaas_transport_dropped_messages_total", "counter",
                             "Messages this client's transport dropped, by the check they failed.")
            for name, count in transport.items():
                if name.startswith("drop_"):
                    dropped.add(int(count), reason=name[len("drop_"):])
            events = family("eaas_transport_events_total", "counter",
                            "This client's other transport counters (sends, accepts, timeouts, ...).")
            for name, count in transport.items():
                if not name.startswith("drop_"):
                    events.add(int(count), event=name)
        return "\n".join(line for f in families for line in f.lines) + "\n"
