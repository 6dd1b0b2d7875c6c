"""The placement planner: replicas on distinct servers, balanced load, hot
experts replicated, bad arguments refused; its deployment file serves."""

from __future__ import annotations

import numpy as np
import pytest

from eaas_jax.cli import main as cli
from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.control_plane.deployment import Deployment
from eaas_jax.control_plane.placement import plan_placement

from conftest import SHIPPED


def copies_of(placement, num_experts):
    return np.bincount([e for experts in placement.values() for e in experts], minlength=num_experts)


def test_every_expert_gets_its_replicas_on_distinct_servers_and_servers_stay_even():
    placement = plan_placement(8, ["a", "b", "c"], replicas=2)
    assert copies_of(placement, 8).tolist() == [2] * 8
    assert all(len(set(experts)) == len(experts) for experts in placement.values())
    assert sorted(len(experts) for experts in placement.values()) == [5, 5, 6]


def test_measured_load_is_balanced_and_the_hottest_experts_get_another_replica():
    load = np.array([[100, 1, 1, 1, 1, 1, 1, 30], [100, 1, 1, 1, 1, 1, 1, 30]])  # [layers, experts]
    placement = plan_placement(8, ["a", "b", "c", "d"], replicas=1, load=load, hot_replicas=2)
    copies = copies_of(placement, 8)
    assert copies[[0, 7]].tolist() == [2, 2] and copies[1:7].tolist() == [1] * 6
    per_expert = load.sum(axis=0) / copies
    server_load = sorted(sum(per_expert[e] for e in experts) for experts in placement.values())
    # 200 + 60 + 12 over 4 servers: expert 0's halves (100 each) alone on two servers
    assert server_load[-1] == pytest.approx(100) and server_load[0] >= 30


@pytest.mark.parametrize("kwargs, match", [
    (dict(replicas=4), r"replicas must be in \[1, 3\]"),
    (dict(replicas=0), r"replicas must be in"),
    (dict(hot_replicas=1), "give the measured load"),
    (dict(load=np.ones(7)), r"load must be \[num_experts=8\]"),
    (dict(load=-np.ones(8)), "non-negative"),
    (dict(replicas=3, load=np.ones(8), hot_replicas=1), "already uses all"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(8, ["a", "b", "c"], **kwargs)


def test_more_servers_than_copies_is_refused():
    with pytest.raises(ValueError, match=r"\['d'\] would host nothing"):
        plan_placement(3, ["a", "b", "c", "d"])


def test_cli_plans_from_scraped_metrics_and_the_plan_serves(tmp_path, capsys):
    metrics = tmp_path / "metrics.prom"
    with Engine(SHIPPED, max_num_seqs=4, max_model_len=128, dtype="float32") as engine:
        prompts = ["def parse(path):", "import os\n"]
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        want = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
        metrics.write_text(engine.metrics_text())
    out = tmp_path / "planned.toml"
    assert cli(["plan-placement", "--model", SHIPPED, "--servers", "2", "--replicas", "1", "--load", str(metrics),
                "--hot-replicas", "1", "--name", "planned-test", "--out", str(out)]) == 0
    deployment = Deployment.load(out)
    assert [s.name for s in deployment.servers] == ["experts-0", "experts-1"]
    assert deployment.routing_table(engine.config).shape[-1] == 2  # the hottest expert on both
    with Engine(SHIPPED, deployment=str(out), max_num_seqs=4, max_model_len=128, dtype="float32") as engine:
        assert [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)] == want
    assert cli(["plan-placement", "--model", SHIPPED, "--servers", "2", "--replicas", "3", "--out", str(out)]) == 2
    assert "replicas must be" in capsys.readouterr().err
