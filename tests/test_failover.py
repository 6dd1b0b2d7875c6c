"""In-step failover with real expert-server processes: a server killed mid-run
loses no request and changes no output when its experts have replicas; with
no replica left, steps fail fast with a clear error."""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.engine import Engine, ExpertServerError, SamplingParams
from eaas_jax.control_plane import server_pool
from eaas_jax.control_plane.server_pool import MEMBERSHIP_CHECK_S
from eaas_jax.engine.metrics import RECENT_STEPS
from eaas_jax.model.experts_backend import ExchangeReport
from eaas_jax.control_plane.autoscaler import ScalingPolicy
from eaas_jax.attention_client.remote_backend import RemoteExpertBackend
from eaas_jax.control_plane.cluster import LocalCluster
from eaas_jax.control_plane.deployment import DeploymentError
from eaas_jax.attention_client.exchange import route
from eaas_jax.control_plane.scaler import ClusterScaler

from conftest import TINY_CONFIG
from test_disaggregated import ENGINE_ARGS, PROMPTS, token_ids

# Every expert of the random tiny model on exactly two of three servers; the
# client spreads each expert's tokens over its live replicas, so every server
# has work until r0 dies, then r2 and r1 take r0's share.
REPLICATED = ('name = "replicas"\ntimeout_ms = 2000\ncapacity = 64\n'
              '[[servers]]\nname = "r0"\nexperts = ["0-5"]\n'
              '[[servers]]\nname = "r1"\nexperts = ["2-7"]\n'
              '[[servers]]\nname = "r2"\nexperts = ["0-1", "6-7"]\n')
# The same with r2 a spare, started mid-run (r0 and r1 hold every expert).
STANDBY_R2 = REPLICATED + "standby = true\n"
# r0 and r1 only, and one spare endpoint for a server that is not in the file.
JOINABLE = "spare_endpoints = 1\n" + REPLICATED.split('[[servers]]\nname = "r2"')[0]
REQUESTS = [f"{PROMPTS[i % len(PROMPTS)]} # {i}" for i in range(64)]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as engine:
        return token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False))


@contextlib.contextmanager
def replicated_engine(checkpoint, tmp_path, deployment: str = REPLICATED):
    """An engine over the three servers of `deployment` (REPLICATED)."""
    path = tmp_path / "replicas.toml"
    path.write_text(deployment)
    with LocalCluster(checkpoint, str(path), dtype="float32") as cluster:
        with Engine(checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            yield cluster, engine


def run_requests(engine, after_step) -> list[list[int]]:
    """Steps `engine` through REQUESTS, calling after_step(steps, finished) after
    each step; returns the token ids in request order."""
    ids = [engine.add_request(prompt, PARAMS) for prompt in REQUESTS]
    outputs, steps = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        steps += 1
        after_step(steps, len(outputs))
    return [outputs[i] for i in ids]


@pytest.mark.parametrize("transport", ["shm", "ibgda"])
def test_a_replica_killed_mid_run_loses_no_request_and_changes_no_output(tiny_checkpoint, reference, tmp_path,
                                                                        transport):
    with replicated_engine(tiny_checkpoint, tmp_path, f'transport = "{transport}"\n' + REPLICATED) as (cluster,
                                                                                                       engine):
        finished_at_kill = []

        def kill_r0(steps, finished):
            if steps == 10:  # mid-run: requests in every stage, steps queued
                victim = cluster.process("r0")
                victim.kill()
                victim.wait()
                finished_at_kill.append(finished)

        assert run_requests(engine, kill_r0) == reference
        assert 0 < finished_at_kill[0] < len(REQUESTS)
        backend = engine.runner.experts
        assert not backend.is_live(0) and backend.is_live(1) and backend.is_live(2)
        # One deadline waited in all: the step queued behind the failed one
        # took its carry (r0 seen failing) and sent r0 nothing.
        assert backend.endpoint.stats()["timeouts"] == 1
        counters = engine.metrics.server_counters
        assert counters["deadline_misses"].tolist() == counters["marked_dead"].tolist() == [1, 0, 0]
        assert 'eaas_server_marked_dead_total{server="r0"} 1.0\n' in engine.metrics_text()
        assert engine.metrics.server_wait_seconds[0] >= 2.0  # the 2 s deadline its exchange waited on it


def test_with_adaptive_deadlines_a_frozen_replica_costs_a_fraction_of_the_fixed_deadline_and_is_readmitted(
        tiny_checkpoint, reference, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(server_pool, "PROBATION_S", 0.5)
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 0.1)
    # Deadlines between 300 ms and 5 s, from the step times this client saw.
    deployment = REPLICATED.replace("timeout_ms = 2000", "timeout_ms = 5000\nmin_timeout_ms = 300")
    with replicated_engine(tiny_checkpoint, tmp_path, deployment) as (cluster, engine):
        backend, r0 = engine.runner.experts, cluster.process("r0")
        step_seconds, frozen, thawed = [], [], []
        last = [time.monotonic(), engine.num_compilations]

        def freeze_then_thaw_r0(steps, finished):
            now = time.monotonic()
            if engine.num_compilations == last[1]:  # compiling a new shape takes seconds
                step_seconds.append(now - last[0])
            last[:] = now, engine.num_compilations
            # Mid-run, while the steps in flight have adapted deadlines (a
            # step larger than any seen three times waits the full 5 s).
            in_flight = [step.expert_arrays.timeout_us for _, step in engine._in_flight]
            if steps >= 10 and not frozen and in_flight and max(in_flight) < 5_000_000:
                r0.send_signal(signal.SIGSTOP)
                frozen.append(steps)
            elif frozen and not thawed and not backend.is_live(0):  # marked dead: the pause is over
                r0.send_signal(signal.SIGCONT)
                thawed.append(int(engine.metrics.server_slots[0]))

        with caplog.at_level("WARNING", logger="eaas_jax.control_plane.server_pool"):
            assert run_requests(engine, freeze_then_thaw_r0) == reference
        assert frozen and thawed and backend.endpoint.stats()["timeouts"] == 1
        # Still the same process once its probation ended: probed (the answer
        # is looked for at the next membership check), then it serves again.
        time.sleep(server_pool.PROBATION_S)
        generate_until(engine, reference, lambda: backend.is_live(0), "r0 was admitted again", timeout_s=30)
        assert token_ids(engine.generate(REQUESTS[:8], PARAMS, use_tqdm=False)) == reference[:8]
        assert backend.is_live(0) and engine.metrics.server_slots[0] > thawed[0]
        assert backend.endpoint.stats()["timeouts"] == 1
    [warning] = [r.getMessage() for r in caplog.records if "routing around it" in r.getMessage()]
    deadline_ms = float(re.search(r"within the ([0-9.]+) ms deadline", warning).group(1))
    assert 300 <= deadline_ms < 5000, warning
    slowest = max(step_seconds)
    assert slowest < 2.5, f"the failure cost a {slowest:.2f} s step (deadline {deadline_ms} ms)"


def test_with_adaptive_deadlines_a_pause_of_every_replica_reruns_the_step_with_the_full_deadline(
        tiny_checkpoint, reference, tmp_path, caplog):
    # Deadlines between 300 ms and 5 s. All three servers stop for longer than
    # the adapted deadline but less than 5 s (on 2 x H200 under MPS, killing
    # one server stalled the two on its GPU like this): no replica of any
    # expert answers in time, yet every server is up.
    deployment = REPLICATED.replace("timeout_ms = 2000", "timeout_ms = 5000\nmin_timeout_ms = 300")
    with replicated_engine(tiny_checkpoint, tmp_path, deployment) as (cluster, engine):
        servers = [cluster.process(name) for name in ("r0", "r1", "r2")]
        paused_for = []

        def thaw():
            for proc in servers:
                proc.send_signal(signal.SIGCONT)

        def pause_every_server(steps, finished):
            in_flight = [step.expert_arrays.timeout_us for _, step in engine._in_flight]
            if steps >= 10 and not paused_for and in_flight and max(in_flight) < 3_000_000:
                paused_for.append(max(in_flight) / 1e6 + 1.0)  # past every adapted deadline in flight
                for proc in servers:
                    proc.send_signal(signal.SIGSTOP)
                threading.Timer(paused_for[0], thaw).start()

        try:
            with caplog.at_level("WARNING", logger="eaas_jax.control_plane.server_pool"):
                assert run_requests(engine, pause_every_server) == reference
        finally:
            thaw()
        assert paused_for and engine.metrics.retried_steps == 1
        backend = engine.runner.experts
        assert all(backend.is_live(server) for server in range(3))
        assert engine.metrics.server_counters["marked_dead"].sum() == 0
        assert "eaas_retried_steps_total 1.0\n" in engine.metrics_text()
    messages = [r.getMessage() for r in caplog.records]
    assert any("runs again with the full deadline" in m for m in messages), messages
    assert not any("routing around it" in m for m in messages), messages


def test_route_spreads_each_experts_tokens_over_its_live_replicas():
    table = jnp.array([[[0, 1, 2], [1, -1, -1], [-1, -1, -1]]], jnp.int32)  # 1 layer, 3 experts, R = 3
    ids = jnp.zeros((60, 1), jnp.int32)
    for live, want in (([True, True, True], {0: 20, 1: 20, 2: 20}), ([True, False, True], {0: 30, 2: 30})):
        targets = np.asarray(route(table, jnp.array(live + [False]), 0, ids))
        assert dict(zip(*np.unique(targets, return_counts=True))) == want
    two_slots = np.asarray(route(table, jnp.ones(4, bool), 0, jnp.array([[0, 1], [2, 0]], jnp.int32)))
    assert two_slots.tolist() == [[0, 1], [-1, 2]]  # expert 1 on server 1 only; expert 2 nowhere
    assert np.asarray(route(table, jnp.array([False, False, True, True]), 0, jnp.array([[1]]))).tolist() == [[-1]]


def test_a_joined_server_becomes_one_more_replica_of_exactly_what_it_hosts():
    endpoint = SimpleNamespace(geometry=SimpleNamespace(max_endpoints=5, capacity=8))
    table = np.array([[[0, -1], [0, 1], [1, -1]]], np.int32)  # 1 layer, 3 experts, room for one more replica
    backend = RemoteExpertBackend(endpoint, [0, 1, 2], table, timeout_us=1000, double_batching=False)
    backend.set_hosted(2, [(0, 0), (0, 2)])
    assert backend.table.tolist() == [[[0, 2], [0, 1], [1, 2]]]
    assert np.asarray(backend.arrays.table).tolist() == backend.table.tolist()
    arrays = backend.arrays
    with pytest.raises(ValueError, match=r"\(MoE layer 0, expert 1\) already has 2 replicas"):
        backend.set_hosted(2, [(0, 2), (0, 1)])
    with pytest.raises(ValueError, match="outside the model"):
        backend.set_hosted(2, [(0, 3)])
    assert backend.table.tolist() == [[[0, 2], [0, 1], [1, 2]]] and backend.arrays is arrays  # unchanged
    backend.set_hosted(2, [(0, 2)])  # another server took the spare endpoint over: only its pairs
    assert backend.table.tolist() == [[[0, -1], [0, 1], [1, 2]]]
    assert backend.arrays.table.shape == arrays.table.shape  # same step shapes: no recompile


def test_a_failure_carried_to_later_steps_holds_until_the_host_readmits_the_server():
    endpoint = SimpleNamespace(geometry=SimpleNamespace(max_endpoints=4, capacity=8))
    backend = RemoteExpertBackend(endpoint, [0, 1], np.zeros((1, 2, 1), np.int32), timeout_us=1000,
                                  double_batching=False)
    carry = backend.initial_carry()
    assert backend.exchange(backend.arrays, carry).live.tolist() == [True, True, False, False]
    carry = carry.at[1].set(0)  # a step saw server 1 fail (host generation 0)
    assert backend.exchange(backend.arrays, carry).live.tolist() == [True, False, False, False]
    backend.set_live(1, False)  # the host learns of it ...
    assert backend.exchange(backend.arrays, carry).live.tolist() == [True, False, False, False]
    backend.set_live(1, True)  # ... and later re-admits the server: the old carry no longer applies
    assert backend.exchange(backend.arrays, carry).live.tolist() == [True, True, False, False]
    assert backend.exchange(backend.arrays, jnp.full((4,), 1, jnp.int32)).live.tolist() == [True, False, False, False]


def test_experts_without_a_live_replica_fail_fast_after_the_first_deadline(tiny_checkpoint, tmp_path, monkeypatch):
    # The deadline, not a membership check between the kill and the step, is to find the death.
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 3600.0)
    path = tmp_path / "disjoint.toml"
    path.write_text('name = "disjoint"\ntimeout_ms = 2000\ncapacity = 64\n'
                    '[[servers]]\nname = "low"\nexperts = ["0-3"]\n'
                    '[[servers]]\nname = "high"\nexperts = ["4-7"]\n')
    with LocalCluster(tiny_checkpoint, str(path), dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            assert token_ids(engine.generate(PROMPTS[:2], PARAMS, use_tqdm=False))  # compiled
            victim = cluster.process("high")
            victim.kill()
            victim.wait()
            with pytest.raises(ExpertServerError, match=r"'high'.*did not reply within the 2000 ms deadline"
                                                        r".* \[this client's transport counters: .*timeouts=1\b.*\]"
                                                        r".*no live replica left"):
                engine.generate(PROMPTS[:2], PARAMS, use_tqdm=False)
            assert not engine.runner.experts.is_live(1)
            # The dead server is known now: no deadline to wait for.
            engine.runner.wait()
            start = time.monotonic()
            unserved, to_high = engine.metrics.unserved_slots, engine.metrics.expert_tokens[:, 4:].sum()
            with pytest.raises(ExpertServerError, match="marked dead earlier.*no live replica left"):
                engine.generate(PROMPTS[:2], PARAMS, use_tqdm=False)
            assert time.monotonic() - start < 1.5
            # Every token-expert slot routed to experts 4-7 went unserved, counted
            # once per slot (a token with both of its experts there counts twice).
            assert engine.metrics.unserved_slots - unserved == engine.metrics.expert_tokens[:, 4:].sum() - to_high > 0
            assert not engine.has_unfinished_requests()


def test_killing_the_only_replica_of_an_expert_fails_just_the_requests_routed_to_it(
        tiny_checkpoint, reference, tmp_path, monkeypatch):
    # The death is to be found by the exchange's deadline: no membership check
    # (which would route around the dead process before any step waits) may
    # fall between the kill and the next step.
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 3600.0)
    # The least used (MoE layer, expert) of the run, alone on "solo"; every
    # other pair on one server of its layer.
    with Engine(tiny_checkpoint, **ENGINE_ARGS) as engine:
        engine.generate(REQUESTS, PARAMS, use_tqdm=False)
        load = engine.metrics.expert_tokens
    layer, expert = (int(i) for i in np.unravel_index(np.where(load > 0, load, load.max() + 1).argmin(), load.shape))
    other_layers = [l for l in range(TINY_CONFIG.num_moe_layers) if l != layer]
    others = [e for e in range(TINY_CONFIG.num_experts) if e != expert]
    path = tmp_path / "solo.toml"
    path.write_text('name = "solo"\ntimeout_ms = 2000\ncapacity = 64\n'
                    f'[[servers]]\nname = "other-layers"\nlayers = {other_layers}\n'
                    f'[[servers]]\nname = "layer"\nlayers = [{layer}]\nexperts = {others}\n'
                    f'[[servers]]\nname = "solo"\nlayers = [{layer}]\nexperts = [{expert}]\n')
    with LocalCluster(tiny_checkpoint, str(path), dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
            assert engine.unservable() is None
            victim = cluster.process("solo")
            victim.kill()
            victim.wait()
            with pytest.raises(ExpertServerError, match=r"of 64 requests failed .*'solo'.*did not reply within "
                                                        r"the 2000 ms deadline.*no live replica left") as raised:
                engine.generate(REQUESTS, PARAMS, use_tqdm=False)
            # One deadline waited, then the dead server's tokens fail at once.
            assert engine.runner.experts.endpoint.stats()["timeouts"] == 1
            assert not engine.has_unfinished_requests()
            outputs = raised.value.outputs
            failed = [i for i, out in enumerate(outputs) if out.error]
            assert 0 < len(failed) < len(REQUESTS), load
            for i, out in enumerate(outputs):
                if out.error:
                    assert "no live replica left" in out.error and out.outputs[0].finish_reason == "error"
                else:  # not routed to the dead expert: exactly as without the failure
                    assert out.outputs[0].token_ids == reference[i]
            assert engine.metrics.failed_requests == len(failed)
            assert f"eaas_failed_requests_total {float(len(failed))}\n" in engine.metrics_text()
            # What a health check reports: the expert with no replica left
            assert engine.unservable().startswith(f"1 experts have no live replica (MoE layer {layer}, expert {expert} ")


def test_a_drained_replica_exits_and_nothing_is_lost(tiny_checkpoint, reference, tmp_path):
    with replicated_engine(tiny_checkpoint, tmp_path) as (cluster, engine):
        slots_after_drain = []

        def drain_r1(steps, finished):
            if steps == 10:
                engine.drain_server("r1")
                assert cluster.process("r1").returncode == 0  # stopped once the queued steps ran
            if steps == 14:  # the steps queued before the drain have been collected by now
                slots_after_drain.append(engine.metrics.server_slots.copy())

        assert run_requests(engine, drain_r1) == reference
        slots = engine.metrics.server_slots
        assert slots_after_drain[0][1] > 0 and slots[1] == slots_after_drain[0][1]  # nothing after the drain
        assert (slots[[0, 2]] > slots_after_drain[0][[0, 2]]).all()
        backend = engine.runner.experts
        assert backend.endpoint.stats()["timeouts"] == 0 and engine.metrics.server_counters["marked_dead"].sum() == 0
        # r0 alone holds experts 2-5 now: draining it is refused and changes nothing.
        with pytest.raises(ValueError, match=r"draining 'r0' would leave 8 .* no live replica"):
            engine.drain_server("r0")
        assert backend.is_live(0) and cluster.process("r0").poll() is None
        assert token_ids(engine.generate(REQUESTS[:2], PARAMS, use_tqdm=False)) == reference[:2]


def test_a_replica_that_exited_while_idle_is_routed_around_before_any_deadline(tiny_checkpoint, reference,
                                                                                tmp_path):
    with replicated_engine(tiny_checkpoint, tmp_path) as (cluster, engine):
        assert token_ids(engine.generate(REQUESTS[:2], PARAMS, use_tqdm=False)) == reference[:2]
        victim = cluster.process("r2")
        victim.kill()
        victim.wait()
        time.sleep(MEMBERSHIP_CHECK_S)  # the next step boundary asks the cluster
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        backend = engine.runner.experts
        assert not backend.is_live(2) and backend.is_live(0) and backend.is_live(1)
        assert backend.endpoint.stats()["timeouts"] == 0  # no step sent r2 anything
        counters = engine.metrics.server_counters
        assert counters["marked_dead"].tolist() == [0, 0, 1] and counters["deadline_misses"].sum() == 0
        # Restarted, r2 is a new process: admitted at the next step boundary.
        slots = engine.metrics.server_slots.copy()
        cluster.start_server("r2")
        time.sleep(MEMBERSHIP_CHECK_S)
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert backend.is_live(2) and engine.metrics.server_slots[2] > slots[2]
        assert backend.endpoint.stats()["timeouts"] == 0


def generate_until(engine, reference, done, what: str, timeout_s: float = 120.0) -> None:
    """Generates REQUESTS[:8] (checking them against `reference`) until done()
    holds: what drives the engine's step boundaries while a server changes
    state."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        assert token_ids(engine.generate(REQUESTS[:8], PARAMS, use_tqdm=False)) == reference[:8]


def test_with_fixed_deadlines_replacements_and_paused_servers_come_back_only_once_they_answer(
        tiny_checkpoint, reference, tmp_path, caplog, monkeypatch):
    """Redundancy comes back after every kind of fault, with the shipped
    deployments' fixed deadlines: (1) a server killed and restarted on its
    endpoint while the engine is idle is sent to at its new inbox; (2) a
    paused server marked dead by a missed deadline is probed, not routed to,
    while it stays paused, and admitted once it answers; (3) a replacement
    started while the engine serves gets tokens only once it is ready. No
    step's exchange but those of the faults themselves misses its deadline
    (an unanswered probe is a transport timeout, but no step waits for it)."""
    monkeypatch.setattr(server_pool, "PROBATION_S", 0.5)
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 0.1)
    deployment = REPLICATED.replace("timeout_ms = 2000", "timeout_ms = 1000")
    with replicated_engine(tiny_checkpoint, tmp_path, deployment) as (cluster, engine):
        backend, counters = engine.runner.experts, engine.metrics.server_counters
        misses = counters["deadline_misses"]
        assert token_ids(engine.generate(REQUESTS[:8], PARAMS, use_tqdm=False)) == reference[:8]

        # (1) Killed and restarted while idle: the engine still maps the dead inbox.
        victim = cluster.process("r0")
        victim.kill()
        victim.wait()
        cluster.start_server("r0")
        slots = engine.metrics.server_slots.copy()
        time.sleep(server_pool.MEMBERSHIP_CHECK_S)
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert misses.sum() == 0 and backend.is_live(0) and engine.metrics.server_slots[0] > slots[0]

        # (2) Paused past the deadline mid-run, kept paused through a probe.
        r0, frozen = cluster.process("r0"), []

        def freeze_r0(steps, finished):
            if steps == 5:
                r0.send_signal(signal.SIGSTOP)
                frozen.append(steps)

        with caplog.at_level("WARNING", logger="eaas_jax.control_plane.server_pool"):
            assert run_requests(engine, freeze_r0) == reference
            assert not backend.is_live(0) and misses.tolist() == [1, 0, 0]
            generate_until(engine, reference, lambda: any("did not answer a probe" in r.getMessage() for r in caplog.records),
                            "a probe of the paused r0 went unanswered")
        r0.send_signal(signal.SIGCONT)
        generate_until(engine, reference, lambda: backend.is_live(0), "r0 was admitted again")
        slots = engine.metrics.server_slots.copy()
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert engine.metrics.server_slots[0] > slots[0] and misses.tolist() == [1, 0, 0]
        assert counters["marked_dead"].tolist() == [1, 0, 0]

        # (3) A replacement started while the engine serves.
        restarted = threading.Event()

        def kill_and_replace_r0(steps, finished):
            if steps == 5:
                victim = cluster.process("r0")
                victim.kill()
                victim.wait()
                threading.Thread(target=lambda: (cluster.start_server("r0"), restarted.set())).start()

        assert run_requests(engine, kill_and_replace_r0) == reference
        generate_until(engine, reference, restarted.is_set, "the replacement of r0 was ready")
        generate_until(engine, reference, lambda: backend.is_live(0), "the replacement of r0 was admitted")
        slots = engine.metrics.server_slots.copy()
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert engine.metrics.server_slots[0] > slots[0]
        # The kill cost at most one deadline (none when the membership check saw
        # the process gone first); the replacement none.
        assert misses.sum() <= 2 and counters["marked_dead"].tolist() == [2, 0, 0]


def test_the_scaler_starts_a_spare_mid_run_that_takes_traffic_and_drains_the_least_used_when_idle(
        tiny_checkpoint, reference, tmp_path):
    policy = ScalingPolicy(latency_target_ms=100, min_servers=1, max_servers=3, cooldown_s=60)
    clock = [0.0]
    with replicated_engine(tiny_checkpoint, tmp_path, STANDBY_R2) as (cluster, engine):
        backend = engine.runner.experts
        scaler = ClusterScaler(engine, policy, clock=lambda: clock[0])
        assert cluster.process("r2") is None and not backend.is_live(2) and scaler.running() == ["r0", "r1"]
        assert scaler.observe(60) == 0  # inside the hysteresis band
        slots_at_start = []

        def load_spike(steps, finished):
            if steps == 5:  # mid-run: the spare joins while requests are in flight
                slots_at_start.append(engine.metrics.server_slots.copy())
                assert scaler.observe(95) == 1

        assert run_requests(engine, load_spike) == reference
        slots = engine.metrics.server_slots.copy()
        assert slots_at_start[0][2] == 0 and slots[2] > 0  # r2 served once it was up, not before
        assert backend.is_live(2) and scaler.running() == ["r0", "r1", "r2"]
        clock[0] = 30
        assert scaler.observe(10) == 0  # cooling down
        clock[0] = 90
        # The clients sent r1 the least of late: r1 goes, not r2, which the scaler started.
        feed_recent_steps(engine, slots=[900, 10, 500])
        slots = engine.metrics.server_slots.copy()
        assert scaler.observe(10) == -1 and cluster.process("r1").returncode == 0  # drained, exited
        assert scaler.running() == ["r0", "r2"] and cluster.process("r2").poll() is None
        assert scaler.observe(10) == 0  # cooling down again
        clock[0] = 200
        # r0 alone holds experts 2-5 now and r2 experts 6-7: both refuse, the scaler holds.
        assert scaler.observe(10) == 0 and scaler.running() == ["r0", "r2"]
        assert backend.is_live(0) and backend.is_live(2)
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert engine.metrics.server_slots[1] == slots[1]  # nothing reached r1 after the drain
        assert backend.endpoint.stats()["timeouts"] == 0 and engine.metrics.server_counters["marked_dead"].sum() == 0
        # observe_engine feeds the policy the engine's own p90 step time.
        seen = []
        scaler.observe = lambda latency_ms: seen.append(latency_ms) or 0
        p90 = engine.metrics.recent_step_time(0.9)
        assert p90 > 0 and scaler.observe_engine(0.9) == 0 and seen == [p90 * 1e3]


@pytest.mark.parametrize("transport", ["shm", "ibgda"])
def test_a_server_not_in_the_file_joins_mid_run_takes_traffic_and_drains(tiny_checkpoint, reference, tmp_path,
                                                                         transport):
    with replicated_engine(tiny_checkpoint, tmp_path, f'transport = "{transport}"\n' + JOINABLE) as (cluster,
                                                                                                     engine):
        backend = engine.runner.experts
        layers = TINY_CONFIG.num_moe_layers
        assert not backend.is_live(2) and not (backend.table == 2).any()
        slots_at_join = []

        def join(steps, finished):
            if steps == 5:  # mid-run, requests in flight
                slots_at_join.append(engine.metrics.server_slots.copy())
                assert cluster.add_server("extra", experts=["0-1", "6-7"]) == 2

        assert run_requests(engine, join) == reference
        slots = engine.metrics.server_slots.copy()
        assert slots_at_join[0][2] == 0 and slots[2] > 0  # served once it was up, not before
        assert backend.is_live(2) and sorted(set(np.argwhere(backend.table == 2)[:, 1])) == [0, 1, 6, 7]
        assert (backend.table == 2).sum() == layers * 4
        assert 'eaas_server_token_slots_total{server="extra"}' in engine.metrics_text()
        with pytest.raises(DeploymentError, match="every spare endpoint .* has a running server"):
            cluster.add_server("another", experts=[0])
        engine.drain_server("extra")  # like any server: it exits, nothing is lost
        assert cluster.process("extra").returncode == 0 and not backend.is_live(2)

        # The freed endpoint takes a server hosting other experts; the table follows,
        # and r0 can then go: every expert it held is on 'wide' or r1.
        with pytest.raises(ValueError, match="draining 'r0' would leave"):
            engine.drain_server("r0")
        cluster.add_server("wide", experts=["0-5"])
        time.sleep(MEMBERSHIP_CHECK_S)
        assert token_ids(engine.generate(REQUESTS, PARAMS, use_tqdm=False)) == reference
        assert sorted(set(np.argwhere(backend.table == 2)[:, 1])) == [0, 1, 2, 3, 4, 5]
        assert engine.metrics.server_slots[2] > slots[2] and engine.metrics.server_names[2] == "wide"
        engine.drain_server("r0")
        assert token_ids(engine.generate(REQUESTS[:8], PARAMS, use_tqdm=False)) == reference[:8]
        assert backend.endpoint.stats()["timeouts"] == 0 and engine.metrics.server_counters["marked_dead"].sum() == 0


def feed_recent_steps(engine, *, waits_us=None, slots=None) -> None:
    """Fills the engine metrics' window of recent steps with steps that sent
    `slots` token-expert slots to each server and waited `waits_us` on it
    (what the scaler reads of load and queueing; zeros by default)."""
    metrics = engine.metrics
    n = len(metrics.server_names)
    step = ExchangeReport(statuses=np.zeros((0, n), np.int32), labels=[], unserved=np.zeros(0, np.int32),
                        unserved_rows=np.zeros(0, bool), expert_tokens=np.zeros_like(metrics.expert_tokens),
                        server_slots=np.asarray(slots if slots is not None else [0] * n, np.int64),
                        server_wait_us=np.asarray(waits_us if waits_us is not None else [0] * n))
    for _ in range(RECENT_STEPS):
        metrics.observe(step)


@pytest.mark.parametrize("r1_wait_us", [1_000, 10_000], ids=["even waits", "r1 lags"])
def test_with_every_file_server_running_the_scaler_adds_one_for_the_hottest_experts(tiny_checkpoint, reference,
                                                                                    tmp_path, r1_wait_us):
    policy = ScalingPolicy(latency_target_ms=100, min_servers=2, max_servers=3, cooldown_s=60)
    clock = [0.0]
    with replicated_engine(tiny_checkpoint, tmp_path, JOINABLE) as (cluster, engine):
        scaler = ClusterScaler(engine, policy, clock=lambda: clock[0])
        assert scaler.running() == ["r0", "r1"]
        added = []

        def load_spike(steps, finished):
            if steps == 5:
                added.append(engine.metrics.expert_tokens.sum(axis=0).copy())
                feed_recent_steps(engine, waits_us=[1_000, r1_wait_us, 0])
                assert scaler.observe(95) == 1

        assert run_requests(engine, load_spike) == reference
        # It hosts 6 experts (what r0 and r1 each host): those with the most
        # tokens when it was added, r1's (2-7) first when the clients waited
        # on r1 ten times as long as on r0.
        by_tokens = np.argsort(-added[0], kind="stable").tolist()
        if r1_wait_us > 1_000:
            by_tokens = [e for e in by_tokens if e >= 2] + [e for e in by_tokens if e < 2]
        hot = sorted(by_tokens[:6])
        assert cluster.joined_servers()[2] == ("hot-0", tuple((l, e) for l in range(TINY_CONFIG.num_moe_layers)
                                                             for e in hot))
        assert scaler.running() == ["r0", "r1", "hot-0"] and engine.metrics.server_slots[2] > 0
        clock[0] = 100
        assert scaler.observe(95) == 0  # max_servers
        clock[0] = 200
        feed_recent_steps(engine, slots=[50, 50, 50])  # even traffic: the server the scaler started last goes
        assert scaler.observe(10) == -1 and cluster.process("hot-0").returncode == 0  # drained, exited
        assert scaler.running() == ["r0", "r1"]
        assert token_ids(engine.generate(REQUESTS[:8], PARAMS, use_tqdm=False)) == reference[:8]
