"""Deployment files: parsing, validation against the model, the routing table."""

from __future__ import annotations

import glob
import logging
import os

import pytest

from eaas_jax.checkpoint import load_config
from eaas_jax.control_plane.cluster import LocalCluster
from eaas_jax.control_plane.deployment import Deployment, DeploymentError

from conftest import REPO, SHIPPED, TINY_CONFIG


def _load(tmp_path, text: str) -> Deployment:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return Deployment.load(path)


def test_shipped_deployment_files_fit_the_shipped_checkpoint():
    config = load_config(SHIPPED)
    files = sorted(glob.glob(os.path.join(REPO, "configs", "deploy", "*.toml")))
    assert len(files) >= 3
    for path in files:
        Deployment.load(path).check(config)


def test_routing_table_lists_replicas_in_file_order(tmp_path):
    d = _load(tmp_path, """
name = "t"
[[servers]]
name = "a"
experts = ["0-4"]
[[servers]]
name = "b"
experts = [3, "5-7"]
[[servers]]
name = "c"
layers = [1]
""")
    d.check(TINY_CONFIG)
    table = d.routing_table(TINY_CONFIG)
    assert table.shape == (TINY_CONFIG.num_moe_layers, TINY_CONFIG.num_experts, 3)
    assert table[0, 0].tolist() == [0, -1, -1]
    assert table[0, 3].tolist() == [0, 1, -1]
    assert table[0, 7].tolist() == [1, -1, -1]
    assert table[1, 0].tolist() == [0, 2, -1]
    assert table[1, 3].tolist() == [0, 1, 2]
    assert d.max_endpoints == 3 + 2 and d.client_endpoint(1) == 4
    assert d.geometry(TINY_CONFIG)["num_channels"] == 2


@pytest.mark.parametrize("text, message", [
    ("name = 'bad name!'\n[[servers]]\nname='a'", "name must be"),
    ("name = 't'", "at least one"),
    ("name = 't'\ncolour = 1\n[[servers]]\nname='a'", "unknown keys \\['colour'\\]"),
    ("name = 't'\ntransport = 'carrier-pigeon'\n[[servers]]\nname='a'", "transport must be"),
    ("name = 't'\ncapacity = 0\n[[servers]]\nname='a'", "capacity must be an integer >= 1"),
    ("name = 't'\ndouble_batching = 'yes'\n[[servers]]\nname='a'", "double_batching must be"),
    ("name = 't'\ntimeout_ms = 100\nmin_timeout_ms = 200\n[[servers]]\nname='a'",
     "min_timeout_ms must be an integer in \\[1, timeout_ms=100\\], got 200"),
    ("name = 't'\nmin_timeout_ms = 1.5\n[[servers]]\nname='a'", "min_timeout_ms must be an integer"),
    ("name = 't'\n[[servers]]\nname='a'\n[[servers]]\nname='a'", "used twice"),
    ("name = 't'\n[[servers]]\nname='a'\nexperts = [-1]", "not an index"),
    ("name = 't'\n[[servers]]\nname='a'\nexperts = ['5-2']", "empty range"),
    ("name = 't'\n[[servers]]\nname='a'\ngpu = 1", "servers\\[0\\]: unknown keys"),
    ("name = 't'\n[[servers]]\nname='a'\ndevice = 1", "device is for the cuda_ipc transport"),
    ("name = 't'\ntransport = 'cuda_ipc'\n[[servers]]\nname='a'\ndevice = -1", "device must be a GPU index"),
    ("name = 't'\ntransport = 'cuda_ipc'\n[[servers]]\nname='a'\ndevice = '1'", "device must be a GPU index"),
    ("name = [", "not valid TOML"),
    ("name = 't'\nspare_endpoints = -1\n[[servers]]\nname='a'", "spare_endpoints must be an integer >= 0"),
])
def test_malformed_files_are_rejected_with_the_reason(tmp_path, text, message):
    with pytest.raises(DeploymentError, match=message):
        _load(tmp_path, text)


def test_cuda_ipc_deployment_names_each_servers_gpu(tmp_path):
    d = _load(tmp_path, "name = 't'\ntransport = 'cuda_ipc'\n[[servers]]\nname='a'\ndevice = 1\n"
                        "[[servers]]\nname='b'")
    assert d.transport == "cuda_ipc"
    assert [s.device for s in d.servers] == [1, None]
    assert d.endpoint_paths("t")[0] == "/dev/shm/eaas-t-0.cuda-ipc"


def test_replicas_that_share_a_gpu_are_found(tmp_path):
    # Every expert on two servers (r0: 0-5, r1: 2-7, r2: 0-1 and 6-7): with r0
    # and r1 on GPU 1, experts 2-5 have both replicas there.
    d = _load(tmp_path, "name = 't'\ntransport = 'cuda_ipc'\n"
                        "[[servers]]\nname = 'r0'\nexperts = ['0-5']\ndevice = 1\n"
                        "[[servers]]\nname = 'r1'\nexperts = ['2-7']\ndevice = 1\n"
                        "[[servers]]\nname = 'r2'\nexperts = ['0-1', '6-7']\ndevice = 0\n"
                        "[[servers]]\nname = 'lone'\nlayers = [0]\nexperts = [0]\ndevice = 0\n")
    gpu_of = lambda endpoint: str(d.servers[endpoint].device)  # noqa: E731
    layers = range(TINY_CONFIG.num_moe_layers)
    assert d.replicas_on_one_gpu(TINY_CONFIG, gpu_of) == {"1": [(l, e) for l in layers for e in range(2, 6)]}
    # r2 on GPU 1 as well: every expert but layer 0's expert 0 (also on 'lone', GPU 0).
    everything_on_1 = d.replicas_on_one_gpu(TINY_CONFIG, lambda endpoint: "0" if endpoint == 3 else "1")
    assert everything_on_1 == {"1": [(l, e) for l in layers for e in range(8) if (l, e) != (0, 0)]}
    # One replica is not a shared failure domain: a single-server file has nothing to report.
    single = _load(tmp_path, "name = 't'\n[[servers]]\nname = 'a'\n")
    assert single.replicas_on_one_gpu(TINY_CONFIG, lambda endpoint: "0") == {}


def test_a_local_cluster_warns_of_replicas_on_one_gpu(tmp_path, monkeypatch, caplog):
    """Its servers' GPUs: `device`, else round robin from the GPU after the
    client's; only the warning runs here (starting cuda_ipc servers needs GPUs)."""
    d = _load(tmp_path, "name = 't'\ntransport = 'cuda_ipc'\n"
                        "[[servers]]\nname = 'r0'\nexperts = ['0-5']\n"
                        "[[servers]]\nname = 'r1'\nexperts = ['2-7']\n"
                        "[[servers]]\nname = 'r2'\nexperts = ['0-1', '6-7']\ndevice = 1\n")
    cluster = LocalCluster.__new__(LocalCluster)  # no processes
    cluster.deployment, cluster._config, cluster._joined = d, TINY_CONFIG, {}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert [cluster._gpu_of(endpoint) for endpoint in range(3)] == ["1", "0", "1"]
    with caplog.at_level(logging.WARNING, logger="eaas_jax.control_plane.cluster"):
        cluster._warn_of_replicas_on_one_gpu()  # r0 and r2 on GPU 1: experts 0-1
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "4 (MoE layer, expert) pairs, e.g. (layer 0, expert 0), have every replica on GPU 1: a fault of that GPU "
        "loses them all (under MPS, so can one killed server); place replicas on different GPUs"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # r0 and r1 on GPU 3 (r2 on 1): experts 2-5
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="eaas_jax.control_plane.cluster"):
        cluster._warn_of_replicas_on_one_gpu()
    assert len(caplog.records) == 1 and "8 (MoE layer, expert) pairs, e.g. (layer 0, expert 2), have every " \
        "replica on GPU 3" in caplog.records[0].getMessage()


def test_files_that_do_not_fit_the_model_are_rejected(tmp_path):
    d = _load(tmp_path, "name = 't'\n[[servers]]\nname='a'\nexperts = [0, 9]")
    with pytest.raises(DeploymentError, match=r"server 'a' names experts \[9\].* 8 MoE experts"):
        d.check(TINY_CONFIG)
    d = _load(tmp_path, "name = 't'\n[[servers]]\nname='a'\nexperts = ['0-6']")
    with pytest.raises(DeploymentError, match="no server hosts MoE layer 0, expert 7"):
        d.check(TINY_CONFIG)
    with pytest.raises(DeploymentError, match="not found"):
        Deployment.load(tmp_path / "missing.toml")
    # A standby (spare) server does not count until started: every expert
    # needs a server started with the deployment.
    spare = "[[servers]]\nname='spare'\nexperts = [7]\nstandby = true\n"
    d = _load(tmp_path, "name = 't'\n[[servers]]\nname='a'\nexperts = ['0-6']\n" + spare)
    assert [s.standby for s in d.servers] == [False, True]
    with pytest.raises(DeploymentError, match="no server but a standby one hosts MoE layer 0, expert 7"):
        d.check(TINY_CONFIG)
    _load(tmp_path, "name = 't'\n[[servers]]\nname='a'\n" + spare).check(TINY_CONFIG)
    with pytest.raises(DeploymentError, match="standby must be true or false"):
        _load(tmp_path, "name = 't'\n[[servers]]\nname='a'\nstandby = 1\n")
    with pytest.raises(DeploymentError, match="no server named 'z'"):
        d.server_endpoint("z")


def test_adaptive_deadlines_are_opt_in(tmp_path):
    assert _load(tmp_path, "name = 't'\n[[servers]]\nname = 'a'\n").min_timeout_ms is None
    d = _load(tmp_path, "name = 't'\ntimeout_ms = 2000\nmin_timeout_ms = 50\n[[servers]]\nname = 'a'\n")
    assert (d.min_timeout_ms, d.timeout_ms) == (50, 2000)


def test_spare_endpoints_sit_between_the_files_servers_and_the_clients(tmp_path):
    d = _load(tmp_path, """
name = "t"
spare_endpoints = 2
[[servers]]
name = "a"
experts = ["0-4"]
[[servers]]
name = "b"
experts = ["3-7"]
""")
    d.check(TINY_CONFIG)
    assert list(d.spare_range) == [2, 3] and d.num_server_endpoints == 4
    assert d.client_endpoint(0) == 4 and d.max_endpoints == 4 + 2
    assert d.geometry(TINY_CONFIG)["max_endpoints"] == 6
    # Room for one more replica of every pair per spare endpoint.
    table = d.routing_table(TINY_CONFIG)
    assert table.shape[2] == 2 + 2 and table[0, 3].tolist() == [0, 1, -1, -1]
    joining = d.joining_server("c", "all", ["0-1", 6])
    assert joining.hosted(TINY_CONFIG) == [(l, e) for l in range(TINY_CONFIG.num_moe_layers) for e in (0, 1, 6)]
    with pytest.raises(DeploymentError, match="already has a server of that name"):
        d.joining_server("a", "all", "all")
    with pytest.raises(DeploymentError, match="name must be"):
        d.joining_server("no spaces", "all", "all")
    with pytest.raises(DeploymentError, match="experts.*not an index"):
        d.joining_server("c", "all", ["x"])
    with pytest.raises(DeploymentError, match="names experts \\[99\\]"):
        d.check_server(d.joining_server("c", "all", [99]), TINY_CONFIG)
    without = _load(tmp_path, "name = 't'\n[[servers]]\nname = 'a'\n")
    with pytest.raises(DeploymentError, match="no spare endpoint"):
        without.joining_server("c", "all", "all")


def test_a_local_cluster_refuses_a_deployment_not_loaded_from_a_file():
    """Its servers load the deployment file themselves: one built in memory
    (or whose file is gone) would start servers that fail to find it."""
    spec = Deployment.from_dict({"name": "mem", "servers": [{"name": "s0"}]})
    with pytest.raises(DeploymentError, match="not loaded from one"):
        LocalCluster(SHIPPED, spec)
