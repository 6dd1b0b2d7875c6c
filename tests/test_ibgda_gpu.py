"""The `ibgda` transport on GPUs: the cuda_ipc kernels, with each message
copied into a staging slot and posted by a GPU thread that writes the mlx5
WQEs into the model NIC's send queue, rings its doorbell and polls its CQEs
(ffi/ibgda_post.cuh). The model NIC validates every WQE as hardware would,
so a wrong byte fails the exchange with an error completion.

Needs a CUDA build of the library and a GPU (skipped otherwise, e.g. on CI;
the CPU side of the backend is tests/test_ibgda.py). Servers run on the GPU
named by EAAS_TEST_PEER_GPU, else on this process's (see test_cuda_ipc.py).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import cuda_ipc, ibgda, wire

from test_cuda_ipc import (CAP, GEO, E, L, _start, _tokens, _worker_env, assert_two_gpu_servers_equal_embedded,
                           check_all_answered, exchange_and_check)

HAVE_GPU = cuda_ipc.available()
pytestmark = pytest.mark.skipif(not HAVE_GPU, reason="needs a GPU and the library built with CUDA")

PREFIX = f"ib{os.getpid()}"
_names = itertools.count()


@contextlib.contextmanager
def _served(deployment: str, geo: dict, messages: int, env: dict | None = None):
    """A _transport_worker ibgda server on endpoint 1 for `messages`
    requests; killed on leaving if it has not exited."""
    proc = _start(dict(transport="ibgda", deployment=deployment, endpoint=1, geometry=geo, seed=0,
                       hosted=np.ones((L, E), np.int32).tolist(), poll_capacity=2 * CAP, messages=messages,
                       deadline_s=120), env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float8_e4m3fn"])
def test_gpu_round_trips_through_the_model_nic_match_the_reference(dtype):
    """Client and server on GPUs: two micro-batches in flight, every byte of
    both ways written by GPU-posted RDMA WRITEs; the sums equal NumPy's."""
    deployment = f"{PREFIX}-{next(_names)}"
    geo = dict(GEO, dispatch_dtype=dtype)
    rounds = 3
    with _served(deployment, geo, 2 * rounds) as proc, ibgda.IbgdaEndpoint(deployment, 0, **geo) as client:
        assert client.device == 0, "the endpoint of a GPU process must live on its GPU"
        client.connect(1, timeout=30)
        exchange_and_check(client, rounds, dtype)
        check_all_answered(proc, client, rounds)


def test_a_gpu_client_and_a_cpu_server_talk_through_their_nics():
    """The WQEs the GPU writes land in a CPU endpoint's shm inbox (and the
    CPU handler's in the GPU's host-mapped one): one wire, two posters."""
    deployment = f"{PREFIX}-{next(_names)}"
    rounds = 2
    cpu = dict(_worker_env(), JAX_PLATFORMS="cpu")
    with _served(deployment, GEO, 2 * rounds, env=cpu) as proc, ibgda.IbgdaEndpoint(deployment, 0, **GEO) as client:
        assert client.device == 0
        client.connect(1, timeout=30)
        exchange_and_check(client, rounds, "float32")
        check_all_answered(proc, client, rounds)


def test_a_cut_link_fails_the_qp_and_the_server_becomes_unavailable():
    """With the client's link down the NIC gives up after its retries and
    writes an error CQE; the kernel that reclaims it marks the QP failed, so
    later dispatches report the server unavailable (at once, not at the
    deadline) and the control path sees PeerState.FAILED."""
    deployment = f"{PREFIX}-{next(_names)}"
    with _served(deployment, GEO, 2), ibgda.IbgdaEndpoint(deployment, 0, **GEO) as client:
        client.connect(1, timeout=30)
        exchange_and_check(client, 1, "float32")
        client.set_nic_faults(link_down=True)
        servers = jnp.array([1], jnp.int32)
        p, s, e, g, _ = _tokens(4, 7, "float32")
        t = jnp.where(e >= 0, 1, -1)

        @jax.jit
        def exchange(p, s, e, g):
            sent = client.dispatch(p, e, g, t, servers, layer=0, micro_batch=0, scales=s)
            _, status, _ = client.combine(sent, t, servers, layer=0, micro_batch=0, timeout_us=200_000,
                                          after=sent)
            return sent, status

        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sent, status = exchange(p, s, e, g)
            seen.append((int(sent[0]), int(status[0])))
            if seen[-1] == (-1, wire.STATUS_UNAVAILABLE):
                break
        assert seen[0][1] == wire.STATUS_TIMEOUT, seen  # posted, never answered
        assert seen[-1] == (-1, wire.STATUS_UNAVAILABLE), seen
        assert client.peer_state(1) == ibgda.PeerState.FAILED
        assert client.stats()["peer_unavailable"] >= 1


def test_disaggregated_greedy_equals_embedded_over_ibgda_on_gpus(tmp_path):
    """The shipped checkpoint, its experts in two server processes reached
    through GPU-posted WQEs: the same greedy token ids as the embedded engine."""
    assert ibgda.on_gpu(), "this process's (and so its servers') ibgda endpoints live on GPUs"
    assert_two_gpu_servers_equal_embedded(tmp_path, 'name = "tinyibgpu"\ntransport = "ibgda"\nnic = "model"\n')
