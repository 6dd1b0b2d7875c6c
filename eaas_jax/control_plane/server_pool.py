"""`ServerPool`: the expert servers one attention client routes to, and what it knows of them.

The pool connects the client to a deployment (starting the servers itself, or
finding them in etcd, or sharing a running cluster), and owns everything the
client decides about servers between steps: which are live (membership,
failures, drains), probation and probes for those that failed but stayed up,
steps run again when every replica only paused, replicas of servers that
joined on spare endpoints, and the routing-table arrays the compiled step
takes (`experts`, a `RemoteExpertBackend`). The engine asks it at step
boundaries (`follow_membership`, `after_step`) and never touches a server.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from eaas_jax.attention_client.remote_backend import (RemoteExpertBackend, failed_servers, transport_anomalies,
                                                      unserved_error)
from eaas_jax.control_plane.admission import AdmissionProbes
from eaas_jax.control_plane.cluster import LocalCluster, RegistryCluster
from eaas_jax.control_plane.deployment import Deployment
from eaas_jax.control_plane.probation import Probation
from eaas_jax.control_plane.registry import RegistryError
from eaas_jax.model.experts_backend import ExchangeReport

log = logging.getLogger(__name__)

# How often, at most, a step boundary asks the cluster which servers are up.
MEMBERSHIP_CHECK_S = 1.0
# A server marked dead by a failed exchange that is still up (the same
# process) is probed again after PROBATION_S, doubled per failure in a row
# (a missed probe included) up to PROBATION_MAX_S (`control_plane.probation`),
# and gets its traffic back once it answers (`control_plane.admission`).
PROBATION_S = 5.0
PROBATION_MAX_S = 60.0


class RunStepAgain(Exception):
    """A step's tokens are to be dropped and its positions run again (its
    servers only paused: nothing is wrong with the requests)."""


class ServerPool:
    """The expert servers of `deployment` as one client sees them.

    deployment: a deployment TOML (the pool starts its servers, or finds them
      in `registry`), or a running `LocalCluster`/`RegistryCluster` to share.
    double_batching: override the deployment's choice for this client.
    `close()` leaves the deployment (and stops servers the pool started).
    """

    def __init__(self, model_path, deployment, *, config, dtype: str, registry: str | None = None,
                 double_batching: bool | None = None):
        shared = isinstance(deployment, (LocalCluster, RegistryCluster))
        spec = deployment.deployment if shared else Deployment.load(deployment)
        spec.check(config)
        if double_batching is None:
            double_batching = spec.double_batching
        elif double_batching and not spec.double_batching:
            raise ValueError(
                f"double batching needs two mailbox channels, but {spec.source} sets double_batching = false"
            )
        self.client_endpoint = None
        self._owns_cluster = not shared
        if shared:
            self.cluster = deployment
        elif registry is not None:
            self.cluster = RegistryCluster(registry, spec, config=config)
        else:
            self.cluster = LocalCluster(model_path, spec, dtype=dtype)
        try:
            self._open(spec, config, double_batching)
        except BaseException:
            self.close()
            raise
        self.metrics = None  # `report_to`
        self._next_membership_check = 0.0
        # Server endpoint -> the incarnation (process) it was last seen up as:
        # one that was drained is admitted again only as a new process, one
        # that failed an exchange also after its probation and a probe.
        self._incarnations: dict[int, object] = {}
        self._probation = Probation(PROBATION_S, PROBATION_MAX_S)

    def _open(self, spec: Deployment, config, double_batching: bool) -> None:
        """Opens this client's endpoint and maps the started servers' inboxes."""
        endpoint = self.cluster.claim_client()
        try:
            self.client_endpoint = spec.open_endpoint(self.cluster.shm_name, endpoint, config,
                                                      self.cluster.endpoint_entries(endpoint))
        except BaseException:
            self.cluster.release_client(endpoint)
            raise
        for server in spec.started_servers:
            self.client_endpoint.connect(server, timeout=30.0)
        self.experts = RemoteExpertBackend(
            self.client_endpoint, list(range(spec.num_server_endpoints)), spec.routing_table(config),
            timeout_us=spec.timeout_ms * 1000, double_batching=double_batching,
            min_timeout_us=None if spec.min_timeout_ms is None else spec.min_timeout_ms * 1000,
        )
        for server in set(range(spec.num_server_endpoints)) - set(spec.started_servers):
            self.experts.set_live(server, False)  # standby or spare: admitted once up (`follow_membership`)
        self._probes = AdmissionProbes(self.client_endpoint)

    @property
    def deployment(self) -> Deployment:
        return self.cluster.deployment

    def server_labels(self) -> list[str]:
        """Metric labels of the server endpoints: the file's names, then one per
        spare endpoint until a server joins there (`_place_joined_server`)."""
        deployment = self.deployment
        return [s.name for s in deployment.servers] + [f"spare-{e}" for e in deployment.spare_range]

    def report_to(self, metrics) -> None:
        """Counts servers marked dead, steps run again and joined servers' names in `metrics`."""
        self.metrics = metrics

    def describe(self) -> str:
        return f"in {len(self.deployment.started_servers)} servers"

    def unservable(self) -> str | None:
        """Why no request can be served now (experts with no live replica), or None."""
        lost = self.experts.experts_without_live_replica()
        if not lost:
            return None
        layer, expert = lost[0]
        return (f"{len(lost)} experts have no live replica (MoE layer {layer}, expert {expert} among them): "
                "every request routed to them would fail")

    def live_mask(self) -> list[bool]:
        return [self.experts.is_live(s) for s in range(self.deployment.num_server_endpoints)]

    def transport_stats(self) -> dict[str, int] | None:
        return None if self.client_endpoint is None else self.client_endpoint.stats()

    def close(self, wait_for_steps=lambda: None) -> None:
        """Leaves the deployment: closes this client's mailbox once the steps
        queued on the device (`wait_for_steps`) ran, frees its slot, and stops
        the expert servers this pool started (idempotent)."""
        if self.client_endpoint is not None:
            wait_for_steps()  # a step still queued on the device uses the mailbox
            endpoint, self.client_endpoint = self.client_endpoint, None
            endpoint.close()
            self.cluster.release_client(endpoint.endpoint)
        if self._owns_cluster:
            self._owns_cluster = False
            self.cluster.close()

    # ------------------------------------------------------------------ drains

    def drain(self, name: str, wait_for_steps) -> None:
        """Drains expert server `name`: it gets no tokens from the next step on,
        the steps already queued (`wait_for_steps`) finish with it, then it is
        stopped if this pool's cluster started it. Refuses, changing nothing,
        when an expert would be left without a live replica."""
        endpoint = self.cluster.endpoint_of(name)
        others = [s for s in range(self.deployment.num_server_endpoints)
                  if s != endpoint and self.experts.is_live(s)]
        table = self.experts.table
        orphaned = np.argwhere((table == endpoint).any(-1) & ~np.isin(table, others).any(-1))
        if len(orphaned):
            layer, expert = orphaned[0]
            raise ValueError(f"draining {name!r} would leave {len(orphaned)} (MoE layer, expert) pairs with no "
                             f"live replica, e.g. (layer {layer}, expert {expert})")
        self.experts.set_live(endpoint, False)
        self._probation.forget(endpoint)  # drained: back only as a new process, not after a probation
        wait_for_steps()  # the steps queued before this one was routed around
        code = self.cluster.stop_server(name)
        log.info("drained expert server %r (exit code %s)", name, code)

    # -------------------------------------------------------------- membership

    def follow_membership(self, wait_for_steps) -> None:
        """Applies the cluster's membership to the routing table from the next
        step on, asked at most every MEMBERSHIP_CHECK_S (clusters report a
        server up only once it is ready): a server that is gone (the process
        exited; with etcd, the lease expired) gets no more tokens, so no step
        waits out a deadline on it; one that came back as another process is
        routed to at its new inbox; one that came up (a standby one started,
        a failed or drained one running as a new process) is admitted; one
        marked dead by a failed exchange that is still up is probed once its
        probation ends (after the steps queued on the device, which
        `wait_for_steps` waits for) and admitted when it answers. Tables
        change without recompiling."""
        now = time.monotonic()
        if now < self._next_membership_check:
            return
        self._next_membership_check = now + MEMBERSHIP_CHECK_S
        try:
            up = self.cluster.servers_up()
        except RegistryError as e:  # a registry outage is not a server failure
            log.warning("cannot tell which expert servers are up (%s); routing table unchanged", e)
            return
        for endpoint in range(self.deployment.num_server_endpoints):
            incarnation, known = up.get(endpoint), self._incarnations.get(endpoint)
            if self.experts.is_live(endpoint):
                if incarnation is None:
                    log.warning("%s is gone; routing around it", self.cluster.describe_server(endpoint))
                    self._route_out(endpoint)
                    continue
                if known is not None and incarnation != known:  # killed and restarted between two checks
                    log.warning("%s runs as a new process; sending to its new inbox",
                                self.cluster.describe_server(endpoint))
                    if not self._map_inbox(endpoint):
                        self._route_out(endpoint)
                self._incarnations[endpoint] = incarnation
                self._probation.served(endpoint, now)
            elif incarnation is None:
                self._probes.forget(endpoint)
            elif self._probes.outstanding(endpoint, incarnation):
                self._readmit_if_answered(endpoint, now)
            elif incarnation != known:
                self._incarnations[endpoint] = incarnation
                self._probation.forget(endpoint)  # a new process starts with a clean record
                self._probes.forget(endpoint)  # one sent to its predecessor
                self._admit(endpoint)
            elif self._probation.is_over(endpoint, now) and self._map_inbox(endpoint):
                wait_for_steps()  # steps queued while it was routed to would share its mailboxes
                self._probes.start(endpoint, incarnation)

    def _route_out(self, endpoint: int) -> None:
        """No tokens to server `endpoint` from the next step on (counted as marked dead)."""
        self.experts.set_live(endpoint, False)
        if self.metrics is not None:
            self.metrics.server_marked_dead(endpoint)

    def _map_inbox(self, endpoint: int) -> bool:
        """Maps server `endpoint`'s current inbox (not a predecessor's); False
        (logged) if it cannot be reached yet."""
        try:
            self.client_endpoint.connect(endpoint)
        except (OSError, RuntimeError, ValueError) as e:  # the next check retries
            log.warning("cannot reach expert server %d yet: %s", endpoint, e)
            return False
        return True

    def _admit(self, endpoint: int, why: str = "") -> None:
        """Maps server `endpoint`'s inbox and routes tokens to it again; a
        server on a spare endpoint first takes its place in the routing table
        as a replica of what it hosts."""
        try:
            if endpoint in self.deployment.spare_range:
                self._place_joined_server(endpoint)
        except (ValueError, LookupError) as e:  # the next check retries
            log.warning("cannot admit expert server %d yet: %s", endpoint, e)
            return
        if self._map_inbox(endpoint):
            self.experts.set_live(endpoint, True)
            log.info("admitted %s%s", self.cluster.describe_server(endpoint), why)

    def _readmit_if_answered(self, endpoint: int, now: float) -> None:
        """A server marked dead that stayed up, probed at the last check
        (`AdmissionProbes`): admitted if it answered, else probed again after
        a longer probation."""
        if self._probes.answered(endpoint):
            self._admit(endpoint, why=" (it failed an exchange but stayed up, and answered a probe)")
        else:
            seconds = self._probation.failed(endpoint, now)
            log.warning("%s did not answer a probe; probing again in %g s",
                        self.cluster.describe_server(endpoint), seconds)

    def _place_joined_server(self, endpoint: int) -> None:
        """Routes to the server that joined on spare `endpoint` the (layer,
        expert) pairs it registered (LookupError if it is gone again;
        ValueError if a pair is outside the model)."""
        joined = self.cluster.joined_servers()[endpoint]
        self.experts.set_hosted(endpoint, joined.hosted)
        if self.metrics is not None:
            self.metrics.name_server(endpoint, joined.name)

    # ---------------------------------------------------------------- failures

    def after_step(self, report: ExchangeReport, step_arrays, num_tokens: int, seconds: float) -> str | None:
        """Takes in what a fetched step's exchanges saw (`step_arrays`: what the
        step was given, its deadline among them; `seconds` its time on the
        device). Servers that failed get no more tokens from the next step on
        (their replicas take over; the step itself was completed by in-step
        failover). Raises RunStepAgain where the step left token slots
        unserved only because their servers paused; otherwise returns the
        error of the requests whose rows had unserved slots (None if none)."""
        failures = failed_servers(report.statuses, report.labels, self.cluster.describe_server,
                                  step_arrays.timeout_us / 1000)
        if not failures:
            self.experts.observe_step(num_tokens, seconds)
        anomalies = transport_anomalies(self.client_endpoint.stats()) if failures else ""
        if anomalies:
            failures = {server: f"{what} [this client's transport counters: {anomalies}]"
                        for server, what in failures.items()}
        unserved = report.unserved_slots
        paused = self._paused_servers(failures, step_arrays) if unserved else set()
        for server, what in failures.items():
            if self.experts.is_live(server) and server not in paused:
                probation_s = self._probation.failed(server, time.monotonic())
                log.warning("%s; routing around it (probed again in %g s if it stays up)", what, probation_s)
                self._route_out(server)
        if paused:
            self._retry_with_full_deadlines(paused, failures, unserved)
        return unserved_error(report.unserved, failures) if report.unserved_rows.any() else None

    def _paused_servers(self, failures: dict[int, str], step_arrays) -> set[int]:
        """Of the servers that failed a step leaving slots unserved, those
        still up as the same process, if the step's deadline was an adapted
        one below the maximum: a pause on every replica of some experts (a
        burst, a neighbour's teardown on a shared GPU) rather than their
        death, which a step run again with the full deadline rides out."""
        deadlines = self.experts.deadlines
        if deadlines is None or step_arrays.timeout_us >= deadlines.max_us:
            return set()
        try:
            up = self.cluster.servers_up()
        except RegistryError:
            return set()
        return {server for server in failures
                if up.get(server) is not None and up.get(server) == self._incarnations.get(server)}

    def _retry_with_full_deadlines(self, paused: set[int], failures: dict[int, str], unserved: int) -> None:
        """Keeps the paused servers live, clears what queued steps found of
        them, and has deadlines learnt again from the maximum; raises
        RunStepAgain. A second miss comes with the full deadline: no loop."""
        for server in paused:
            self.experts.clear_failure(server)
            log.warning("%s, but it is still up", failures[server])
        self.experts.deadlines.forget()
        if self.metrics is not None:
            self.metrics.retried_steps += 1
        log.warning("%d token-expert slots had no replica that replied in time; the step runs again with "
                    "the full deadline", unserved)
        raise RunStepAgain
