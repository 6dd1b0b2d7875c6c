"""W0 on the CPU: decode step of the embedded engine vs the disaggregated one
(1 and 2 expert-server processes, shm transport), and one dispatch+combine
round trip against computing the same experts in-graph.

    python bench/disaggregated_cpu.py [--batch 16] [--steps 40] [--append bench/RESULTS.md]

Decode step: `batch` requests prefilled, then `steps` engine steps timed one by
one (host wall clock, each step ends with its sampled tokens on the host);
median/min/max over the steady state. The disaggregated greedy tokens are
checked equal to the embedded ones. Round trip: `rounds` exchanges of one
MoE layer unrolled in ONE compiled program, per-exchange time = total / rounds.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from _results import git_commit, publish  # noqa: E402
from eaas_jax.checkpoint import load_model  # noqa: E402
from eaas_jax.engine import Engine, SamplingParams  # noqa: E402
from eaas_jax.control_plane.cluster import LocalCluster  # noqa: E402
from eaas_jax.attention_client.exchange import route  # noqa: E402
from eaas_jax.transport import custom_calls, wire  # noqa: E402

MODEL = os.path.join(REPO, "checkpoints", "tiny-moe")
DEPLOY = {n: os.path.join(REPO, "configs", "deploy", f"tiny-moe-{n}-server{'s' if n > 1 else ''}.toml") for n in (1, 2)}


def prompts(batch: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(1, 4096, size=24).tolist() for _ in range(batch)]


def decode_steps(engine: Engine, batch: int, steps: int) -> tuple[list[float], list[list[int]]]:
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts(batch)]
    engine.step()  # prefill (and compile)
    engine.step()  # first decode step (compile)
    times = []
    outputs = {}
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        times.append(time.perf_counter() - start)
    return times[:-1], [outputs[i] for i in ids]  # the last step only finishes


def round_trip(cluster: LocalCluster, tokens: int, rounds: int) -> tuple[float, float]:
    """(µs per remote exchange, µs per in-graph computation of the same experts)."""
    with Engine(MODEL, deployment=cluster, dtype="float32", max_num_seqs=4, max_model_len=64) as engine:
        backend = engine.runner.experts
        model = load_model(MODEL)
        config = model.config
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.standard_normal((tokens, config.hidden_size)), jnp.float32)
        routing = model.client.layers[config.first_k_dense].router(x)
        targets = route(backend.arrays.table, backend.arrays.live, 0, routing.expert_ids)
        servers = jnp.asarray(backend.servers, jnp.int32)
        ep = backend.endpoint

        @jax.jit
        def exchange(x):
            token, acc = None, jnp.zeros_like(x)
            for _ in range(rounds):  # unrolled: the calls chain through their outputs
                sent = custom_calls.dispatch(ep, x + acc * 0, routing.expert_ids, routing.weights, targets, servers,
                                    layer=0, micro_batch=0, after=token)
                out, token, _ = custom_calls.combine(ep, sent, targets, servers, layer=0, micro_batch=0,
                                         timeout_us=10_000_000, after=sent)
                acc = acc + out
            return acc / rounds, token

        @jax.jit
        def local(x):
            acc = jnp.zeros_like(x)
            for _ in range(rounds):
                acc = acc + model.experts(0, x + acc * 0, routing)
            return acc / rounds

        remote_out, status = jax.block_until_ready(exchange(x))
        assert (np.asarray(status) == wire.STATUS_OK).all(), status
        np.testing.assert_allclose(np.asarray(remote_out), np.asarray(local(x)), rtol=1e-4, atol=1e-5)
        t_remote, t_local = [], []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(exchange(x))
            t_remote.append((time.perf_counter() - start) / rounds * 1e6)
            start = time.perf_counter()
            jax.block_until_ready(local(x))
            t_local.append((time.perf_counter() - start) / rounds * 1e6)
        return statistics.median(t_remote), statistics.median(t_local)


def stats(ms: list[float]) -> str:
    return f"{statistics.median(ms):.2f} ({min(ms):.2f}-{max(ms):.2f})"


def parse_args(doc: str) -> argparse.Namespace:
    """The options of the W0 CPU benches (`doc`: the script's docstring)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=64)
    ap.add_argument("--append", help="append the results table to this file")
    return ap.parse_args()


def main() -> None:
    args = parse_args(__doc__)

    rows = []
    engine_args = dict(dtype="float32", max_num_seqs=args.batch, max_model_len=128)
    with Engine(MODEL, **engine_args) as engine:
        times, reference = decode_steps(engine, args.batch, args.steps)
    embedded = [t * 1e3 for t in times]
    rows.append(("embedded", stats(embedded), "1.00", "-"))
    exchanges = {}
    for servers in (1, 2):
        with LocalCluster(MODEL, DEPLOY[servers], dtype="float32") as cluster:
            for double in (True, False):
                with Engine(MODEL, deployment=cluster, double_batching=double, **engine_args) as engine:
                    times, got = decode_steps(engine, args.batch, args.steps)
                assert got == reference, "disaggregated tokens differ from the embedded engine's"
                ms = [t * 1e3 for t in times]
                label = f"{servers} server{'s' if servers > 1 else ''}, double batching {'on' if double else 'off'}"
                rows.append((label, stats(ms), f"{statistics.median(ms) / statistics.median(embedded):.2f}", "equal"))
            if servers == 1:
                for tokens in (16, 64):
                    exchanges[tokens] = round_trip(cluster, tokens, args.rounds)

    commit = git_commit()
    lines = [
        f"### W0 disaggregated vs embedded, CPU ({datetime.date.today()}, commit {commit})",
        "",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__}; "
        f"`python bench/disaggregated_cpu.py --batch {args.batch} --steps {args.steps} --rounds {args.rounds}`; "
        f"shipped checkpoint, float32, {args.batch} sequences decoding.",
        "",
        "| experts | decode step ms, median (min-max) | vs embedded | greedy tokens vs embedded |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "| tokens | dispatch+combine round trip, µs (1 server process) | same experts in-graph, µs | ratio |",
        "|---|---|---|---|",
        *[f"| {t} | {r:.0f} | {l:.0f} | {r / l:.1f} |" for t, (r, l) in exchanges.items()],
        "",
    ]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
