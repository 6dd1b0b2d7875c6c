"""The disaggregated engine (experts in expert-server processes) against the embedded one.

Real processes over the shm transport: greedy token ids must equal the embedded
engine's for the shipped checkpoint and a random config, with 1, 2 and 3
servers (one of them with replicated experts), with and without double
batching, and with two clients sharing the servers. Also: the compiled client
step holds the exchange custom calls of every layer and no host callback; a
killed server is named within the deadline; nothing is left behind.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from eaas_jax.engine import Engine, ExpertServerError, SamplingParams
from eaas_jax.engine.runner import StepRows
from eaas_jax.control_plane import server_pool
from eaas_jax.control_plane.cluster import KEEP_LOGS_ENV_VAR, LocalCluster
from eaas_jax.transport import hidden_codec

from conftest import REPO, SHIPPED, TINY_CONFIG, compiles_once_per_step_shape

PROMPTS = [
    "def parse_args(argv):",
    "import os\n",
    "class Queue:\n    def __init__(self",
    "x = 1",
    "    return self._",
    "for i in range(len(items)):\n        if",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
ENGINE_ARGS = dict(max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4)

# Deployments of the random TINY_CONFIG model (2 MoE layers x 8 experts).
RANDOM_DEPLOYMENTS = {
    1: '[[servers]]\nname = "all"\n',
    2: '[[servers]]\nname = "low"\nexperts = ["0-3"]\n[[servers]]\nname = "high"\nexperts = ["4-7"]\n',
    # Replicas: experts 3 and 4 of every layer and all of MoE layer 1 live on two servers.
    3: ('[[servers]]\nname = "r0"\nexperts = ["0-4"]\n[[servers]]\nname = "r1"\nexperts = ["3-7"]\n'
        '[[servers]]\nname = "r2"\nlayers = [1]\n'),
}
SHIPPED_DEPLOYMENTS = {
    n: os.path.join(REPO, "configs", "deploy", f"tiny-moe-{n}-server{'s' if n > 1 else ''}.toml")
    for n in (1, 2, 3)
}


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def write_deployment(directory, servers: int, *, timeout_ms: int = 10_000, dispatch_dtype: str = "float32") -> str:
    path = os.path.join(directory, f"random-{servers}-{timeout_ms}-{dispatch_dtype}.toml")
    with open(path, "w") as f:
        f.write(f'name = "rand{servers}"\ntimeout_ms = {timeout_ms}\ncapacity = 64\n'
                f'dispatch_dtype = "{dispatch_dtype}"\n' + RANDOM_DEPLOYMENTS[servers])
    return path


def assert_left_nothing(cluster: LocalCluster) -> None:
    assert all(p.poll() is not None for p in cluster._procs), "a server process is still running"
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{cluster.shm_name}-")]
    assert not leftovers, f"shared memory left behind: {leftovers}"


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    """Embedded greedy token ids per model."""
    out = {}
    for name, path in (("shipped", SHIPPED), ("random", tiny_checkpoint)):
        with Engine(path, **ENGINE_ARGS) as engine:
            out[name] = token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False))
    return out


@pytest.mark.parametrize("model", ["shipped", "random"])
@pytest.mark.parametrize("servers", [1, 2, 3])
def test_disaggregated_greedy_equals_embedded(model, servers, references, tiny_checkpoint, tmp_path):
    path = SHIPPED if model == "shipped" else tiny_checkpoint
    deployment = SHIPPED_DEPLOYMENTS[servers] if model == "shipped" else write_deployment(tmp_path, servers)
    with LocalCluster(path, deployment, dtype="float32") as cluster:
        assert len(cluster._procs) == servers
        for double_batching in (True, False):
            with Engine(path, deployment=cluster, double_batching=double_batching, **ENGINE_ARGS) as engine:
                assert engine.scheduler.decode_window == 1  # (the default with expert servers)
                with compiles_once_per_step_shape(engine):
                    got = token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False))
                    # Again: the first step now takes the KV cache and exchange
                    # carry the device made, not those the host made.
                    assert token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False)) == got
            assert got == references[model], f"double_batching={double_batching}"
    assert_left_nothing(cluster)


def _embedded_with_quantized_expert_inputs(path, dtype) -> Engine:
    """The embedded engine, its experts fed the tokens as the wire carries them
    in `dtype` (encoded, then decoded): the reference for that dispatch dtype."""
    engine = Engine(path, **ENGINE_ARGS)
    backend = engine.runner.experts
    exchange = backend.exchange

    def quantizing_exchange(arrays, carry):
        stack = exchange(arrays, carry)

        def experts(moe_layer, x, routing):
            payload, scales = hidden_codec.encode(x, dtype)
            return stack(moe_layer, hidden_codec.decode(payload, scales, x.dtype), routing)

        return experts

    backend.exchange = quantizing_exchange  # read when the step is first traced
    return engine


@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn"])
def test_narrow_dispatch_equals_embedded_with_the_same_rounding(dtype, references, tiny_checkpoint, tmp_path):
    with _embedded_with_quantized_expert_inputs(tiny_checkpoint, dtype) as engine:
        expected = token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False))
    if dtype == "float8_e4m3fn":  # the rounding matters: the comparison can tell
        assert expected != references["random"]
    deployment = write_deployment(tmp_path, 2, dispatch_dtype=dtype)
    with LocalCluster(tiny_checkpoint, deployment, dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            assert engine.runner.experts.endpoint.geometry.dispatch_dtype == dtype
            got = token_ids(engine.generate(PROMPTS, GREEDY, use_tqdm=False))
    assert got == expected
    assert_left_nothing(cluster)


@pytest.fixture(scope="module")
def shared_cluster(tiny_checkpoint, tmp_path_factory):
    """Two servers of the random model with a short deadline, for the tests below."""
    deployment = write_deployment(str(tmp_path_factory.mktemp("deploy")), 2, timeout_ms=3000)
    cluster = LocalCluster(tiny_checkpoint, deployment, dtype="float32")
    yield cluster
    cluster.close()
    assert_left_nothing(cluster)


def test_two_clients_share_the_servers(shared_cluster, tiny_checkpoint, references):
    engines = [Engine(tiny_checkpoint, deployment=shared_cluster, **ENGINE_ARGS) for _ in range(2)]
    halves = [PROMPTS[0::2], PROMPTS[1::2]]
    results, errors = [None, None], []

    def run(i):
        try:
            for _ in range(2):  # long enough for the two clients' steps to overlap
                results[i] = token_ids(engines[i].generate(halves[i], GREEDY, use_tqdm=False))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for engine in engines:
        engine.shutdown()
    assert not errors, errors
    assert results == [references["random"][0::2], references["random"][1::2]]
    endpoints = {e.pool.client_endpoint for e in engines}
    assert endpoints == {None}  # both left their slots
    for engine in engines:  # what each client sent a server = its routing's load on the experts there
        m = engine.metrics
        assert m.server_slots.tolist() == [m.expert_tokens[:, :4].sum(), m.expert_tokens[:, 4:].sum()]
        assert m.server_slots.min() > 0


def test_client_step_is_one_program_with_every_exchange_and_no_host_callback(shared_cluster, tiny_checkpoint):
    with Engine(tiny_checkpoint, deployment=shared_cluster, **ENGINE_ARGS) as engine:
        sampling = [{"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "seed": 0,
                     "stream": 0, "step": 0, "banned": []}] * 4
        rows = StepRows([[5]] * 4, [3] * 4, [[0]] * 4, sampling)
        lowered = engine.runner.lower(rows)
        text = lowered.as_text()
        compiled = lowered.compile().as_text()
    calls = []
    for line in text.splitlines():
        m = re.search(r"custom_call @(eaas_shm_\w+)", line)
        if m:
            layer = int(re.search(r"layer = (\d+)", line).group(1))
            mb = int(re.search(r"micro_batch = (\d+)", line).group(1))
            calls.append((m.group(1).removeprefix("eaas_shm_"), layer, mb))
    # Ping-pong: each micro-batch's combine comes after the other one's dispatch.
    expected = [("dispatch", 0, 0), ("dispatch", 0, 1)]
    for layer in range(1, TINY_CONFIG.num_moe_layers):
        expected += [("combine", layer - 1, 0), ("dispatch", layer, 0),
                     ("combine", layer - 1, 1), ("dispatch", layer, 1)]
    last = TINY_CONFIG.num_moe_layers - 1
    expected += [("combine", last, 0), ("combine", last, 1)]
    assert calls == expected
    # Host callbacks (jax.pure_callback, io_callback, debug.print) lower to
    # custom calls whose target names a callback.
    assert not re.findall(r"custom_call @\w*callback", text)
    assert not re.findall(r'custom_call_target="[^"]*callback', compiled)
    assert "eaas_shm" in compiled
    # Each exchange once in the compiled step (on GPUs, a W1-sized prefill step
    # once ran every combine twice: see tests/test_cuda_ipc.py).
    assert compiled.count('custom_call_target="eaas_shm_dispatch"') == len(expected) // 2
    assert compiled.count('custom_call_target="eaas_shm_combine"') == len(expected) // 2


def test_killed_server_is_named_within_the_deadline(shared_cluster, tiny_checkpoint, monkeypatch):
    # The deadline, not a membership check between the kill and the step, is to find the death.
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 3600.0)
    engine = Engine(tiny_checkpoint, deployment=shared_cluster, **ENGINE_ARGS)
    try:
        assert token_ids(engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False))  # warm: compiled
        victim = shared_cluster.process("high")
        victim.kill()
        victim.wait()
        start = time.monotonic()
        with pytest.raises(ExpertServerError, match=r"'high' \(endpoint 1; process \d+ was killed by SIGKILL.*"
                                                    r"did not reply within the 3000 ms deadline"):
            engine.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
        # About one deadline per step (the dead server is skipped for the rest
        # of it), not one per exchange (2 layers x 2 micro-batches = 12 s).
        assert time.monotonic() - start < 9.0
        assert not engine.has_unfinished_requests()
    finally:
        engine.shutdown()


CRASHING_CLIENT = textwrap.dedent("""
    import os, signal, sys
    from eaas_jax.engine import Engine
    engine = Engine(sys.argv[1], deployment=sys.argv[2], max_num_seqs=4, max_model_len=64, dtype="float32")
    print(engine.cluster.shm_name, *[p.pid for p in engine.cluster._procs], flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    with engine:
        raise RuntimeError("the test body failed")
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("how", ["exception", "kill"])
def test_a_crashing_client_leaves_no_servers_or_segments(how, tiny_checkpoint, tmp_path):
    deployment = write_deployment(tmp_path, 2)
    run = subprocess.run([sys.executable, "-c", CRASHING_CLIENT, tiny_checkpoint, deployment, how],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    shm_name, *pids = run.stdout.split()
    assert len(pids) == 2, run.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        any(_alive(int(p)) for p in pids)
        or any(f.startswith(f"eaas-{shm_name}-") for f in os.listdir("/dev/shm"))
    ):
        time.sleep(0.2)
    assert not [p for p in pids if _alive(int(p))]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{shm_name}-")]


# A client killed while its servers start: it prints the shm name and each
# server's pid as it is spawned, then waits (the test kills it).
CLIENT_KILLED_WHILE_SERVERS_START = textwrap.dedent("""
    import sys
    from eaas_jax.engine import Engine
    from eaas_jax.control_plane import cluster
    spawn = cluster.LocalCluster._spawn
    def spawn_and_tell(self, endpoint):
        proc = spawn(self, endpoint)
        print(self.shm_name, proc.pid, flush=True)
        return proc
    cluster.LocalCluster._spawn = spawn_and_tell
    Engine(sys.argv[1], deployment=sys.argv[2], max_num_seqs=4, max_model_len=64, dtype="float32")
""")


def test_servers_of_a_client_killed_while_they_start_exit_before_opening_their_inboxes(tiny_checkpoint, tmp_path):
    deployment = write_deployment(tmp_path, 2)
    child = subprocess.Popen([sys.executable, "-c", CLIENT_KILLED_WHILE_SERVERS_START, tiny_checkpoint, deployment],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        spawned = [child.stdout.readline().split() for _ in range(2)]
    finally:
        child.kill()
        child.communicate()
    assert all(len(line) == 2 for line in spawned), spawned
    shm_name, pids = spawned[0][0], [int(pid) for _, pid in spawned]
    deadline = time.monotonic() + 30
    opened = set()
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "orphaned expert servers kept starting"
        opened |= {f for f in os.listdir("/dev/shm") if f.startswith(f"eaas-{shm_name}-")}
        time.sleep(0.01)
    # They went while starting, before loading the model and opening their inboxes.
    assert not opened
    [log_dir] = glob.glob(os.path.join(tempfile.gettempdir(), f"eaas-{shm_name}-*"))
    for name in os.listdir(log_dir):
        assert "the process that started this server exited" in open(os.path.join(log_dir, name)).read()
    shutil.rmtree(log_dir)  # the killed client could not


def test_a_cluster_removes_its_log_directory_even_after_a_failure(tiny_checkpoint, tmp_path, caplog):
    deployment = write_deployment(str(tmp_path), 2)
    with LocalCluster(tiny_checkpoint, deployment, dtype="float32") as cluster:
        victim = cluster.process(cluster.deployment.servers[0].name)
        victim.kill()
        victim.wait()
    assert not os.path.exists(cluster.log_dir)
    # The failed server's log ends up in ours before its file goes.
    assert any("was killed by SIGKILL" in r.getMessage() and "its log ends" in r.getMessage() for r in caplog.records)


def test_bad_deployment_arguments_fail_before_starting_anything(tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="registry needs a deployment"):
        Engine(tiny_checkpoint, registry="etcd://127.0.0.1:1")
    path = tmp_path / "nodouble.toml"
    path.write_text('name = "nd"\ndouble_batching = false\n' + RANDOM_DEPLOYMENTS[1])
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError, match="double batching needs two mailbox channels"):
        Engine(tiny_checkpoint, deployment=str(path), double_batching=True, **ENGINE_ARGS)
    assert set(os.listdir("/dev/shm")) <= before


def test_profile_dir_gets_each_servers_trace(tiny_checkpoint, tmp_path, monkeypatch):
    """EAAS_JAX_PROFILE_DIR: every engine-started server traces its serve
    loop into <dir>/<server name>, written when it stops."""
    profiles = tmp_path / "profiles"
    monkeypatch.setenv("EAAS_JAX_PROFILE_DIR", str(profiles))
    monkeypatch.setenv(KEEP_LOGS_ENV_VAR, "1")  # and the servers' logs
    deployment = write_deployment(str(tmp_path), 2)
    with LocalCluster(tiny_checkpoint, deployment, dtype="float32") as cluster:
        with Engine(tiny_checkpoint, deployment=cluster, **ENGINE_ARGS) as engine:
            assert token_ids(engine.generate(PROMPTS[:1], GREEDY, use_tqdm=False))
        names = [spec.name for spec in cluster.deployment.servers]
    assert sorted(os.listdir(cluster.log_dir)) == sorted(f"{name}.log" for name in names)
    shutil.rmtree(cluster.log_dir)
    for name in names:
        traces = list((profiles / name).rglob("*.xplane.pb"))
        assert traces and all(t.stat().st_size > 0 for t in traces), (name, list(profiles.rglob("*")))
