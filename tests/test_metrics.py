"""Serving metrics: the Prometheus exposition text, and the per-expert load an
engine counts against what its requests must have routed."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from eaas_jax.engine import SamplingParams
from eaas_jax.engine.metrics import RECENT_STEPS, ServingMetrics
from eaas_jax.model.experts_backend import ExchangeReport
from eaas_jax.transport import wire

def parse(text: str) -> dict[tuple[str, str], float]:
    """{(name, labels as '{k="v",...}' in sorted order, unescaped): value} of an
    exposition text, read by prometheus_client's parser."""
    return {(s.name, "{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else ""):
            s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_render_counts_each_servers_failures_and_escapes_labels():
    metrics = ServingMetrics(1, 2, ['a"b', "c\\d"])
    ok, timeout, bad = wire.STATUS_OK, wire.STATUS_TIMEOUT, wire.STATUS_BAD_REPLY
    report = ExchangeReport(statuses=np.array([[ok, timeout], [bad, timeout]]), labels=[(0, 0), (0, 0)],
                          unserved=np.array([3]), unserved_rows=np.array([True, False]), expert_tokens=np.array([[5, 7]]), server_slots=np.array([9, 4]),
                          server_wait_us=np.array([1_500, 250_000]))
    assert metrics.recent_server_wait(0.5) is None and metrics.recent_server_slots() is None
    metrics.observe(report)
    metrics.observe(report._replace(server_wait_us=np.array([500, 50_000])))
    assert metrics.recent_server_slots().tolist() == [18, 8]
    metrics.server_marked_dead(1)
    metrics.failed_requests, metrics.retried_steps = 1, 2  # what the engine counts
    samples = parse(metrics.render(live=[True, False], transport={"drop_checksum": 2, "timeouts": 4}))
    assert samples[("eaas_steps_total", "")] == 2
    assert samples[("eaas_expert_tokens_total", '{expert="1",layer="0"}')] == 14
    assert samples[("eaas_server_token_slots_total", '{server="a"b"}')] == 18
    assert samples[("eaas_server_deadline_misses_total", '{server="c\\d"}')] == 4
    assert samples[("eaas_server_deadline_misses_total", '{server="a"b"}')] == 0
    assert samples[("eaas_server_bad_replies_total", '{server="a"b"}')] == 2
    assert samples[("eaas_server_marked_dead_total", '{server="c\\d"}')] == 1
    assert samples[("eaas_server_live", '{server="c\\d"}')] == 0
    assert samples[("eaas_unserved_slots_total", "")] == 6
    assert samples[("eaas_failed_requests_total", "")] == 1
    assert samples[("eaas_retried_steps_total", "")] == 2
    assert samples[("eaas_server_wait_seconds_total", '{server="c\\d"}')] == 0.3
    np.testing.assert_allclose(metrics.recent_server_wait(1.0), [0.0015, 0.25])
    np.testing.assert_allclose(metrics.recent_server_wait(0.0), [0.0005, 0.05])
    assert samples[("eaas_transport_dropped_messages_total", '{reason="checksum"}')] == 2
    assert samples[("eaas_transport_events_total", '{event="timeouts"}')] == 4
    # Recent slots cover the last RECENT_STEPS steps only.
    for _ in range(RECENT_STEPS):
        metrics.observe(report._replace(server_slots=np.array([0, 1])))
    assert metrics.recent_server_slots().tolist() == [0, RECENT_STEPS]


def test_step_times_are_a_cumulative_histogram_and_recent_quantiles():
    metrics = ServingMetrics(1, 2)
    assert metrics.recent_step_time(0.9) is None
    for seconds in (0.003, 0.005, 0.05, 7.0):
        metrics.observe_step_time(seconds)
    samples = parse(metrics.render())
    bucket = lambda le: samples[("eaas_step_seconds_bucket", f'{{le="{le}"}}')]  # noqa: E731
    assert [bucket(0.002), bucket(0.005), bucket(0.02), bucket(0.05), bucket(5.0), bucket("+Inf")] == [0, 2, 2, 3, 3, 4]
    assert samples[("eaas_step_seconds_count", "")] == 4
    assert abs(samples[("eaas_step_seconds_sum", "")] - 7.058) < 1e-6
    assert metrics.recent_step_time(0.5) == 0.0275 and metrics.recent_step_time(1.0) == 7.0


def test_embedded_engine_counts_every_real_token_once_per_routed_expert(tiny_engine):
    """Each prompt token and each generated token but the last goes through
    every MoE layer once, to top_k experts: padding rows must not count."""
    before = tiny_engine.metrics.expert_tokens.copy()
    samples_before = parse(tiny_engine.metrics_text())
    prompts = ["def f(x):", "import os\nimport sys", "a"]
    outs = tiny_engine.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                                use_tqdm=False)
    processed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    counted = tiny_engine.metrics.expert_tokens - before
    config = tiny_engine.config
    assert counted.shape == (config.num_moe_layers, config.num_experts)
    assert counted.sum(axis=1).tolist() == [processed * config.num_experts_per_tok] * config.num_moe_layers
    samples = parse(tiny_engine.metrics_text())
    assert sum(v for (name, _), v in samples.items() if name == "eaas_expert_tokens_total") == \
        int(tiny_engine.metrics.expert_tokens.sum())
    # Every step the engine ran has its time in the histogram.
    assert samples[("eaas_step_seconds_count", "")] == samples[("eaas_steps_total", "")] > 0
    assert samples[("eaas_step_seconds_sum", "")] > 0

    def added(name):
        return samples[(name, "")] - samples_before[(name, "")]

    # Each request's first token, and each later one (5 tokens: 4 gaps), in the latency histograms.
    assert added("eaas_time_to_first_token_seconds_count") == len(prompts)
    assert added("eaas_inter_token_latency_seconds_count") == 4 * len(prompts)
    assert added("eaas_time_to_first_token_seconds_sum") > 0
    assert added("eaas_prompt_tokens_total") == sum(len(o.prompt_token_ids) for o in outs)
    # Finished: nothing holds KV blocks or waits.
    assert samples[("eaas_kv_blocks_used", "")] == 0 < samples[("eaas_kv_blocks", "")]
    assert samples[("eaas_sequences_running", "")] == samples[("eaas_requests_unfinished", "")] == 0
    assert samples[("eaas_step_programs", "")] == tiny_engine.num_compilations > 0
    assert samples[("eaas_step_programs_compiling", "")] == 0  # the run's own compiles: done
    assert samples[("eaas_step_compile_waits", "")] == tiny_engine.runner.num_compile_waits
