"""The GPU `cuda_ipc` expert transport: round trips between processes, faults,
deadlines, and the disaggregated engine against the embedded one.

Needs a CUDA build of the library and a GPU (skipped otherwise, e.g. on CI,
where only the clear error without them is tested).
The server processes run on the GPU named by EAAS_TEST_PEER_GPU (a
CUDA_VISIBLE_DEVICES value; run the tests with CUDA_VISIBLE_DEVICES=0 and
EAAS_TEST_PEER_GPU=1 on a two-GPU machine), else on this process's GPU, where
the driver time-slices the two processes (correct, slow).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import cuda_ipc, hidden_codec, wire

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _transport_worker import make_weights, reference  # noqa: E402

from conftest import SHIPPED  # noqa: E402

HAVE_GPU = cuda_ipc.available()
gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and the library built with CUDA")

PREFIX = f"g{os.getpid()}"
_names = itertools.count()
L, E, K, D, CAP = 2, 8, 2, 64, 16
GEO = dict(max_endpoints=4, num_channels=2, capacity=CAP, hidden_size=D, top_k=K, num_layers=L, num_experts=E)
WEIGHTS = make_weights(L, E, D, seed=0)
LONG_US = 30_000_000
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_transport_worker.py")


def _worker_env() -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.pop("JAX_PLATFORMS", None)
    peer = os.environ.get("EAAS_TEST_PEER_GPU")
    if peer is not None:
        env["CUDA_VISIBLE_DEVICES"] = peer
    return env


def _start(cfg: dict, env: dict | None = None) -> subprocess.Popen:
    """A _transport_worker server (env: _worker_env()'s by default), once it said "ready"."""
    proc = subprocess.Popen([sys.executable, WORKER, json.dumps(cfg)], env=env or _worker_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"worker did not start: {line!r}\n{err[-3000:]}")
    return proc


def _tokens(n: int, seed: int, dtype: str):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((n, D)).astype(np.float32)
    ids = rng.integers(0, E, size=(n, K)).astype(np.int32)
    ids[::3, 1] = -1  # some tokens use one slot only
    gates = rng.random((n, K)).astype(np.float32)
    payload, scales = hidden_codec.encode(jnp.asarray(hidden), dtype)
    sent_rows = np.asarray(hidden_codec.decode(payload, scales, jnp.float32))  # what the server sees
    return payload, scales, ids, gates, sent_rows


def _step(client, servers):
    """Two micro-batches in flight at once, as the engine's double batching."""

    @jax.jit
    def step(p0, s0, e0, g0, p1, s1, e1, g1):
        t0 = jnp.where(e0 >= 0, servers[0], -1)
        t1 = jnp.where(e1 >= 0, servers[0], -1)
        sent0 = client.dispatch(p0, e0, g0, t0, servers, layer=1, micro_batch=0, scales=s0)
        sent1 = client.dispatch(p1, e1, g1, t1, servers, layer=0, micro_batch=1, scales=s1, after=sent0)
        out0, st0, _ = client.combine(sent0, t0, servers, layer=1, micro_batch=0, timeout_us=LONG_US, after=sent1)
        out1, st1, _ = client.combine(sent1, t1, servers, layer=0, micro_batch=1, timeout_us=LONG_US, after=st0)
        return out0, out1, st0, st1

    return step


def exchange_and_check(client, rounds: int, dtype: str) -> None:
    """`rounds` steps of two micro-batches with server endpoint 1 (a
    _transport_worker): every status OK, every sum equal to NumPy's."""
    step = _step(client, jnp.array([1], jnp.int32))
    for it in range(rounds):
        p0, s0, e0, g0, x0 = _tokens(CAP, 100 + it, dtype)
        p1, s1, e1, g1, x1 = _tokens(5, 200 + it, dtype)
        out0, out1, st0, st1 = step(p0, s0, e0, g0, p1, s1, e1, g1)
        assert [int(st0[0]), int(st1[0])] == [wire.STATUS_OK] * 2, (it, client.stats())
        np.testing.assert_allclose(out0, reference(WEIGHTS, 1, x0, e0, g0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out1, reference(WEIGHTS, 0, x1, e1, g1), rtol=1e-5, atol=1e-5)


def check_all_answered(proc: subprocess.Popen, client, rounds: int) -> None:
    """After exchange_and_check: the server process accepted and answered
    every request, dropped nothing, and exited 0."""
    stats = client.stats()
    assert stats["requests_sent"] == stats["replies_accepted"] == 2 * rounds, stats
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    server = json.loads(stdout.split("server stats", 1)[1])
    assert server["requests_accepted"] == server["replies_sent"] == 2 * rounds, server
    assert not any(v for k, v in server.items() if k.startswith("drop_")), server


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_round_trip_between_processes_matches_reference(dtype):
    deployment = f"{PREFIX}-{next(_names)}"
    geo = dict(GEO, dispatch_dtype=dtype)
    rounds = 3
    proc = _start(dict(transport="cuda_ipc", deployment=deployment, endpoint=1, geometry=geo, seed=0,
                       hosted=np.ones((L, E), np.int32).tolist(), poll_capacity=2 * CAP,
                       messages=2 * rounds, deadline_s=120))
    try:
        with cuda_ipc.CudaIpcEndpoint(deployment, 0, **geo) as client:
            client.connect(1, timeout=30)
            # The server process owns endpoint 1: a second owner is refused.
            with pytest.raises(cuda_ipc.CudaIpcEndpointInUseError, match=f"pid {proc.pid}"):
                cuda_ipc.CudaIpcEndpoint(deployment, 1, **geo)
            exchange_and_check(client, rounds, dtype)
            check_all_answered(proc, client, rounds)
        assert not os.path.exists(cuda_ipc.directory_path(deployment, 1))
        assert not os.path.exists(cuda_ipc.directory_path(deployment, 0))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@gpu
def test_unreachable_server_and_deadline():
    """A server that does not exist is reported at once; one that never polls
    times out at the deadline (not before, not much after)."""
    deployment = f"{PREFIX}-{next(_names)}"
    silent = subprocess.Popen(
        [sys.executable, "-c",
         "import json, sys, time\n"
         "from eaas_jax.transport.cuda_ipc import CudaIpcEndpoint\n"
         "ep = CudaIpcEndpoint(sys.argv[1], 3, **json.loads(sys.argv[2]))\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n", deployment, json.dumps(GEO)],
        env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert silent.stdout.readline().strip() == "ready"
        with cuda_ipc.CudaIpcEndpoint(deployment, 0, **GEO) as client:
            client.connect(3, timeout=30)
            with pytest.raises(TimeoutError):
                client.connect(2, timeout=0.05)
            servers = jnp.array([2, 3], jnp.int32)
            timeout_us = 300_000

            @jax.jit
            def step(h, e, g):
                targets = jnp.where(e >= 0, jnp.where(e < 4, 2, 3), -1)
                sent = client.dispatch(h, e, g, targets, servers, layer=0, micro_batch=0)
                out, status, waited_us = client.combine(sent, targets, servers, layer=0, micro_batch=0,
                                                        timeout_us=timeout_us, after=sent)
                return sent, out, status, waited_us

            h, _, e, g, _ = _tokens(8, 1, "float32")
            jax.block_until_ready(step(h, e, g))  # compiles (and times out once)
            t0 = time.monotonic()
            sent, out, status, waited_us = jax.block_until_ready(step(h, e, g))
            wall = time.monotonic() - t0
            assert int(sent[0]) == -1 and int(sent[1]) > 0
            assert status.tolist() == [wire.STATUS_UNAVAILABLE, wire.STATUS_TIMEOUT]
            assert int(waited_us[0]) == 0 and timeout_us <= int(waited_us[1]) <= wall * 1e6
            assert 0.3 <= wall < 3.0, wall
            stats = client.stats()
            assert stats["timeouts"] == 2 and stats["peer_unavailable"] == 2, stats
    finally:
        silent.stdin.close()
        silent.wait(timeout=60)


@gpu
def test_geometry_mismatch_is_refused():
    deployment = f"{PREFIX}-{next(_names)}"
    proc = subprocess.Popen(
        [sys.executable, "-c",
         "import json, sys\n"
         "from eaas_jax.transport.cuda_ipc import CudaIpcEndpoint\n"
         "ep = CudaIpcEndpoint(sys.argv[1], 1, **json.loads(sys.argv[2]))\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()\n", deployment, json.dumps(dict(GEO, capacity=2 * CAP))],
        env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with cuda_ipc.CudaIpcEndpoint(deployment, 0, **GEO) as client:
            with pytest.raises(cuda_ipc.CudaIpcPeerRefusedError, match="capacity"):
                client.connect(1, timeout=30)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def assert_two_gpu_servers_equal_embedded(tmp_path, head: str) -> None:
    """The shipped checkpoint with its experts in two server processes (on the
    peer GPU, else this one), a deployment of `head` (name, transport and
    the like): the same greedy token ids as the embedded engine."""
    from eaas_jax.engine import Engine, SamplingParams

    device = os.environ.get("EAAS_TEST_PEER_GPU")
    on_peer = f"device = {device}\n" if device is not None else ""
    deployment = tmp_path / "gpu.toml"
    deployment.write_text(head + 'capacity = 64\ndispatch_dtype = "float32"\n'
                          f'[[servers]]\nname = "even"\nexperts = [0, 2, 4, 6]\n{on_peer}'
                          f'[[servers]]\nname = "odd"\nexperts = [1, 3, 5, 7]\n{on_peer}')
    prompts = ["def parse_args(argv):", "import os\n", "class Queue:\n    def __init__(self", "x = 1"]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    args = dict(max_num_seqs=4, max_model_len=128, dtype="float32", block_size=4)
    with Engine(SHIPPED, **args) as engine:
        want = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the servers' processes
    with Engine(SHIPPED, deployment=str(deployment), **args) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
    assert got == want


@gpu
def test_disaggregated_greedy_equals_embedded_on_gpus(tmp_path):
    assert_two_gpu_servers_equal_embedded(tmp_path, 'name = "tinygpu"\ntransport = "cuda_ipc"\n')


@gpu
def test_combine_without_its_dispatch_is_a_bad_reply():
    """A combine with no matching dispatch outstanding (a caller's bug) fails
    that server at once and is counted, instead of waiting for a reply."""
    deployment = f"{PREFIX}-{next(_names)}"
    with cuda_ipc.CudaIpcEndpoint(deployment, 0, **GEO) as client:
        servers = jnp.array([1], jnp.int32)
        targets = jnp.ones((4, K), jnp.int32)
        out, status, _ = jax.jit(lambda sent: client.combine(sent, targets, servers, layer=0, micro_batch=0,
                                                          timeout_us=LONG_US))(jnp.array([4], jnp.int32))
        assert status.tolist() == [wire.STATUS_BAD_REPLY]
        assert client.stats()["unmatched_combines"] == 1


# Endpoint 1 of GEO that answers the client (endpoint 0) line by line on stdin:
# "forge" publishes a request of its own to the client on micro-batch 0, i.e.
# into slot (1, 0) of the client's inbox, where its replies on micro-batch 0
# go: to the client's combine that is a reply of the wrong kind (malformed).
# "serve" polls once and replies (the toy experts of _transport_worker).
# Each prints "done" when finished.
_FORGING_SERVER = """
import json, sys
sys.path.insert(0, sys.argv[3])
import jax, jax.numpy as jnp
from eaas_jax.transport.cuda_ipc import CudaIpcEndpoint
from _transport_worker import expert_compute, make_weights

geo = json.loads(sys.argv[2])
L, E, D, K = geo["num_layers"], geo["num_experts"], geo["hidden_size"], geo["top_k"]
weights = make_weights(L, E, D, seed=0)
hosted = jnp.ones((L, E), jnp.int32)
with CudaIpcEndpoint(sys.argv[1], 1, **geo) as ep:
    ep.connect(0, timeout=30)

    @jax.jit
    def forge():
        ids = jnp.zeros((1, K), jnp.int32)
        return ep.dispatch(jnp.ones((1, D), jnp.float32), ids, jnp.ones((1, K), jnp.float32), ids,
                           jnp.array([0], jnp.int32), layer=0, micro_batch=0)

    @jax.jit
    def serve():
        r = ep.poll(hosted, capacity=2 * geo["capacity"], timeout_us=30_000_000)
        return ep.reply(expert_compute(weights, r.hidden, r.expert_ids, r.gates, r.layer), r.num_rows)

    print("ready", flush=True)
    for line in sys.stdin:
        jax.block_until_ready({"forge": forge, "serve": serve}[line.strip()]())
        print("done", flush=True)
"""


def _tell(proc: subprocess.Popen, command: str) -> None:
    """Sends `command` to a _FORGING_SERVER and waits until it is done."""
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done", f"the forging server failed at {command!r}"


@gpu
def test_malformed_replies_are_skipped_until_the_awaited_one_or_the_deadline():
    """A malformed reply in a server's slot is counted and skipped: the
    combine waiting there still takes the right reply after it (status OK,
    the reference rows); with only malformed replies it gives up at the
    deadline, with STATUS_BAD_REPLY rather than STATUS_TIMEOUT."""
    deployment = f"{PREFIX}-{next(_names)}"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    with cuda_ipc.CudaIpcEndpoint(deployment, 0, **GEO) as client:
        server = subprocess.Popen(
            [sys.executable, "-c", _FORGING_SERVER, deployment, json.dumps(GEO), tests_dir],
            env=_worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            client.connect(1, timeout=30)
            servers = jnp.array([1], jnp.int32)
            dispatch = jax.jit(lambda h, e, g: client.dispatch(h, e, g, jnp.where(e >= 0, 1, -1), servers,
                                                                layer=0, micro_batch=0))
            combine = jax.jit(lambda sent, e, timeout_us: client.combine(
                sent, jnp.where(e >= 0, 1, -1), servers, layer=0, micro_batch=0, timeout_us=timeout_us))
            h, _, e, g, x = _tokens(8, 3, "float32")

            # 1. A malformed reply, then the awaited one: OK, the right rows.
            sent = jax.block_until_ready(dispatch(h, e, g))
            _tell(server, "forge")
            combined = {}
            waiting = threading.Thread(target=lambda: combined.update(
                result=jax.block_until_ready(combine(sent, e, np.int32(LONG_US)))))
            waiting.start()
            deadline = time.monotonic() + 60
            while client.stats()["drop_kind"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert client.stats()["drop_kind"] == 1, client.stats()  # the waiting combine saw the forgery
            _tell(server, "serve")
            waiting.join(timeout=60)
            out, status, _ = combined["result"]
            assert status.tolist() == [wire.STATUS_OK], client.stats()
            np.testing.assert_allclose(out, reference(WEIGHTS, 0, x, e, g), rtol=1e-5, atol=1e-5)

            # 2. Only a malformed reply: STATUS_BAD_REPLY, at the deadline (not before).
            timeout_us = 300_000
            sent = jax.block_until_ready(dispatch(h, e, g))
            _tell(server, "forge")
            t0 = time.monotonic()
            out, status, waited_us = jax.block_until_ready(combine(sent, e, np.int32(timeout_us)))
            wall = time.monotonic() - t0
            assert status.tolist() == [wire.STATUS_BAD_REPLY], client.stats()
            assert timeout_us <= int(waited_us[0]) <= wall * 1e6
            np.testing.assert_array_equal(out, 0)
            stats = client.stats()
            assert stats["drop_kind"] == 2 and stats["replies_accepted"] == 1 and stats["timeouts"] == 1, stats
        finally:
            server.stdin.close()
            server.wait(timeout=60)


def _embedded_and_disaggregated(model: str, tmp_path, *, capacity: int, prompts, max_tokens: int,
                                 **engine_args) -> tuple[list, list, dict]:
    """Greedy tokens of `prompts` from the embedded engine and from one
    cuda_ipc expert server (on EAAS_TEST_PEER_GPU), and the client's counters."""
    from eaas_jax.engine import Engine, SamplingParams

    device = os.environ.get("EAAS_TEST_PEER_GPU")
    deployment = tmp_path / "deployment.toml"
    deployment.write_text(
        f'name = "gpu{next(_names)}"\ntransport = "cuda_ipc"\ncapacity = {capacity}\n'
        'dispatch_dtype = "float32"\n[[servers]]\nname = "experts"\n'
        + (f"device = {device}\n" if device is not None else "")
    )
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    with Engine(model, **engine_args) as engine:
        want = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the server's process
    with Engine(model, deployment=str(deployment), **engine_args) as engine:
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]
        stats = engine.runner.experts.endpoint.stats()
    return want, got, stats


@gpu
def test_prefill_larger_than_a_mailbox_equals_embedded_on_gpus(tmp_path):
    """Micro-batches of hundreds of tokens through 16-token mailboxes: dozens
    of chunked round trips per layer and step, still the embedded engine's
    greedy tokens."""
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, size=int(n)).tolist() for n in rng.integers(60, 120, size=8)]
    want, got, stats = _embedded_and_disaggregated(
        SHIPPED, tmp_path, capacity=16, prompts=prompts, max_tokens=12, max_num_seqs=8,
        max_model_len=160, dtype="float32", block_size=4, max_num_batched_tokens=1024)
    assert got == want
    assert stats["unmatched_combines"] == 0 and stats["requests_sent"] == stats["replies_accepted"], stats


@gpu
def test_a_thousand_exchanges_in_one_step_equal_embedded_on_gpus(tmp_path):
    """W1's prefill shape on a tiny model: 8 MoE layers, 8192 tokens through
    64-token mailboxes, 1024 dispatch/combine pairs in one compiled step. On
    2 x H200 (jaxlib 0.11.2) the combine handler ran 2048 times in that step,
    a second series of combines finding no dispatch outstanding, and the step
    failed (unmatched_combines=958), as W1's disaggregated prefill did."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=1000, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False)
    model = str(tmp_path / "model")
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 1000, size=128).tolist() for _ in range(64)]
    want, got, stats = _embedded_and_disaggregated(
        model, tmp_path, capacity=64, prompts=prompts, max_tokens=4, max_num_seqs=64, max_model_len=192,
        dtype="float32", block_size=16, max_num_batched_tokens=8192)
    assert got == want
    assert stats["unmatched_combines"] == 0 and stats["requests_sent"] == stats["replies_accepted"], stats


@gpu
def test_a_paused_server_is_probed_and_admitted_again_on_gpus(tmp_path, monkeypatch):
    """Fixed deadlines, every expert on two of three servers: a server paused
    past the deadline is marked dead, probed once it is back (a one-token
    exchange through the CUDA dispatch and combine kernels, outside any step:
    its pending request outlives the steps that send that server nothing) and
    routed to again once it answered; greedy tokens equal the embedded
    engine's throughout."""
    import signal

    from eaas_jax.engine import Engine, SamplingParams
    from eaas_jax.control_plane import server_pool
    from eaas_jax.control_plane.cluster import LocalCluster

    monkeypatch.setattr(server_pool, "PROBATION_S", 0.5)
    monkeypatch.setattr(server_pool, "MEMBERSHIP_CHECK_S", 0.1)
    device = os.environ.get("EAAS_TEST_PEER_GPU")
    on_peer = f"device = {device}\n" if device is not None else ""
    deployment = tmp_path / "gpu-replicas.toml"
    deployment.write_text(
        'name = "gpureplicas"\ntransport = "cuda_ipc"\ncapacity = 64\ntimeout_ms = 2000\n'
        f'[[servers]]\nname = "r0"\nexperts = ["0-5"]\n{on_peer}'
        f'[[servers]]\nname = "r1"\nexperts = ["2-7"]\n{on_peer}'
        f'[[servers]]\nname = "r2"\nexperts = ["0-1", "6-7"]\n{on_peer}')
    prompts = ["def parse_args(argv):", "import os\n", "class Queue:\n    def __init__(self", "x = 1"]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    args = dict(max_num_seqs=4, max_model_len=128, dtype="float32", block_size=4)

    def tokens(engine):
        return [o.outputs[0].token_ids for o in engine.generate(prompts, greedy, use_tqdm=False)]

    with Engine(SHIPPED, **args) as engine:
        want = tokens(engine)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the servers' processes
    with LocalCluster(SHIPPED, str(deployment), dtype="float32") as cluster:
        with Engine(SHIPPED, deployment=cluster, **args) as engine:
            backend, misses = engine.runner.experts, engine.metrics.server_counters["deadline_misses"]
            assert tokens(engine) == want
            r0 = cluster.process("r0")
            r0.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 120
                while backend.is_live(0):
                    assert time.monotonic() < deadline, "the paused r0 was not marked dead"
                    assert tokens(engine) == want
            finally:
                r0.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 120
            while not backend.is_live(0):
                assert time.monotonic() < deadline, "r0 was not admitted again"
                assert tokens(engine) == want
            slots = engine.metrics.server_slots.copy()
            assert tokens(engine) == want
            assert engine.metrics.server_slots[0] > slots[0] and misses.tolist() == [1, 0, 0]
            stats = backend.endpoint.stats()
            assert stats["unmatched_combines"] == 0, stats


@pytest.mark.skipif(HAVE_GPU, reason="checks the error raised where there is no GPU")
def test_without_a_gpu_opening_is_a_clear_error():
    deployment = f"{PREFIX}-{next(_names)}"
    with pytest.raises(cuda_ipc.CudaIpcError, match="(?i)cuda"):
        cuda_ipc.CudaIpcEndpoint(deployment, 0, **GEO)
    assert not os.path.exists(cuda_ipc.directory_path(deployment, 0))
