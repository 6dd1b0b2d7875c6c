"""The autoscaling policy (thresholds, hysteresis, limits) and the trace
simulator against static provisioning for the peak."""

from __future__ import annotations

import numpy as np
import pytest

from eaas_jax.control_plane.autoscaler import (ScalingPolicy, ServerModel, diurnal_trace, latency_ms, simulate,
                                         static_servers_for_attainment, static_servers_for_peak)

POLICY = ScalingPolicy(latency_target_ms=100, min_servers=1, max_servers=8, scale_up_at=0.8,
                       scale_down_at=0.4, cooldown_s=60)


def decide(latency, servers=4, now=1000.0, last=0.0, fewer=None, policy=POLICY):
    return policy.decide(now_s=now, servers=servers, latency_ms=latency, last_change_s=last,
                         latency_with_one_fewer_ms=fewer)


def test_thresholds_cooldown_and_limits():
    assert decide(81) == 1 and decide(39) == -1 and decide(60) == 0
    assert decide(81, now=1000, last=950) == 0  # within the cooldown
    assert decide(81, servers=8) == 0 and decide(39, servers=1) == 0  # at max / min
    assert decide(39, fewer=85) == 0  # draining would push the rest over the scale-up threshold
    assert decide(39, fewer=70) == -1


@pytest.mark.parametrize("kwargs", [dict(latency_target_ms=0), dict(min_servers=0), dict(min_servers=5, max_servers=4),
                                    dict(scale_down_at=0.8, scale_up_at=0.8), dict(cooldown_s=-1)])
def test_bad_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        ScalingPolicy(**{"latency_target_ms": 100, **kwargs})


def test_steady_load_settles_on_the_static_size_and_stays():
    model = ServerModel(server_tokens_per_s=1000, base_latency_ms=20, startup_s=30)
    trace = np.full(2000, 2500.0)
    static = static_servers_for_peak(trace, POLICY, model)
    assert static == 4  # 2500 tok/s: 3 servers run at 83% (120 ms), 4 at 62% (53 ms)
    grown = simulate(trace, 10, POLICY, model)  # from 1 server: the backlog it builds may cost one more
    assert static <= grown["servers"][-1] <= static + 1 and len(set(grown["servers"][1000:])) == 1
    assert simulate(trace, 10, POLICY, model, servers=static)["changes"] == 0


def test_load_hovering_between_the_thresholds_changes_nothing():
    model = ServerModel(server_tokens_per_s=1000, base_latency_ms=20, startup_s=30)
    # 4 servers; the load wanders between 45% and 70% latency-of-target territory
    trace = 2500 + 300 * np.sin(np.arange(3000) / 7.0)
    result = simulate(trace, 10, POLICY, model, servers=4)
    assert 0.4 * 100 < latency_ms(model, trace.min(), 4) and latency_ms(model, trace.max(), 4) < 0.8 * 100
    assert result["changes"] == 0 and result["slo_attainment"] == 1.0


def test_a_diurnal_trace_needs_fewer_server_hours_than_static_peak_provisioning():
    model = ServerModel(server_tokens_per_s=10_000, base_latency_ms=20, startup_s=120)
    trace = diurnal_trace(hours=48, step_s=10, bursts_per_day=0, seed=1)
    policy = ScalingPolicy(latency_target_ms=60, max_servers=32, scale_up_at=0.9, scale_down_at=0.7, cooldown_s=120)
    static = static_servers_for_peak(trace, policy, model)
    fixed = simulate(trace, 10, policy, model, servers=static, autoscale=False)
    scaled = simulate(trace, 10, policy, model)
    assert fixed["slo_attainment"] == 1.0 and fixed["server_hours"] == pytest.approx(static * 48)
    assert scaled["server_hours"] < 0.8 * fixed["server_hours"]
    assert scaled["slo_attainment"] > 0.99
    # The cheapest fixed fleet with the same attainment still costs more.
    assert static_servers_for_attainment(trace, 10, policy, model, 1.0) == static
    equal = static_servers_for_attainment(trace, 10, policy, model, scaled["slo_attainment"])
    assert scaled["server_hours"] < 0.8 * equal * 48


def test_overlapping_bursts_do_not_compound():
    trace = diurnal_trace(hours=24, step_s=10, swing=0.0, bursts_per_day=200, burst_factor=2.0, seed=0)
    assert set(np.unique(trace).round(3)) == {40_000.0, 80_000.0}
