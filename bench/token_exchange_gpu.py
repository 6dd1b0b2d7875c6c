"""Token exchange between two GPUs: one dispatch + combine round trip of the
`cuda_ipc` transport against XLA's all-to-all moving the same bytes.

    python bench/token_exchange_gpu.py [--tokens 16,64,256,1024] [--dtype bfloat16] [--append bench/RESULTS.md]

(`bench/ibgda_gpu.py` runs its client and server roles with `--transport
ibgda` as well, on one GPU.)

Three processes: an expert server on GPU 1 and a client on GPU 0 (the
transport: the client sends T rows of width 2048 in the dispatch dtype, the
server answers each with a float32 row; the server's "expert" is a fixed
buffer, so only the exchange is timed), then one process with both GPUs
running `jax.lax.all_to_all` in `shard_map` over the same bytes (T rows of the
dispatch dtype out, T float32 rows back). Both sides time `--iters`
dependent round trips unrolled inside ONE compiled program, called `--calls`
times after a warm-up call; the table gives microseconds per round trip.
The server serves the same way (unrolled poll + reply, two calls in flight)
until the client is done.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import threading
import time

from _results import REPO, git_commit, publish

D = 2048
K = 2
DEPLOYMENT = f"xbench{os.getpid()}"


def geometry(args) -> dict:
    return dict(max_endpoints=2, num_channels=1, capacity=max(args.token_list), hidden_size=D, top_k=K,
                num_layers=1, num_experts=2, dispatch_dtype=args.dtype)


def open_endpoint(args, endpoint: int):
    """The role's endpoint of `args.transport` (on this process's GPU)."""
    sys.path.insert(0, REPO)
    from eaas_jax.transport import backends

    return backends.get(args.transport).open_endpoint(args.deployment, endpoint, geometry(args))


def server(args) -> None:
    import jax
    import jax.numpy as jnp

    geo = geometry(args)
    with open_endpoint(args, 1) as ep:
        hosted = jnp.ones((1, 2), jnp.int32)
        c = geo["capacity"]

        @jax.jit
        def rounds(hosted, answer):
            token = None
            for _ in range(args.iters):
                request = ep.poll(hosted, capacity=c, timeout_us=200_000, after=token)
                token = ep.reply(answer, request.num_rows)
            return token

        answer = jnp.ones((c, D), jnp.float32)
        rounds = rounds.lower(hosted, answer).compile()
        done = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
        print("ready", flush=True)
        # Serves until the orchestrator closes stdin, two calls in flight so the
        # GPU never waits for the host between calls; idle polls return empty.
        in_flight = []
        while not done.is_set():
            in_flight.append(rounds(hosted, answer))
            if len(in_flight) > 2:
                jax.block_until_ready(in_flight.pop(0))
        jax.block_until_ready(in_flight)
        print(json.dumps({"server": ep.stats()}), flush=True)


def client(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    with open_endpoint(args, 0) as ep:
        ep.connect(1, timeout=120)
        servers = jnp.array([1], jnp.int32)
        result, failures = {}, {}
        for t in args.token_list:
            rng = np.random.default_rng(0)
            hidden = jnp.asarray(rng.standard_normal((t, D)), args.dtype)
            scales = jnp.ones((t,), jnp.float32)
            ids = jnp.asarray(rng.integers(0, 2, (t, K)), jnp.int32)
            gates = jnp.full((t, K), 0.5, jnp.float32)
            targets = jnp.ones((t, K), jnp.int32)

            @jax.jit
            def rounds(hidden, scales, ids, gates, targets):
                token, total = None, jnp.zeros((), jnp.int32)
                for _ in range(args.iters):
                    sent = ep.dispatch(hidden, ids, gates, targets, servers, layer=0, micro_batch=0,
                                       scales=scales, after=token)
                    out, status, _ = ep.combine(sent, targets, servers, layer=0, micro_batch=0,
                                             timeout_us=args.timeout_s * 1_000_000, after=sent)
                    token = status
                    total = total + (status[0] != 0)
                return total, out[0, 0]

            jax.block_until_ready(rounds(hidden, scales, ids, gates, targets))  # compile + warm up
            print(f"{args.transport} {t} tokens: warmed up", file=sys.stderr, flush=True)
            start = time.perf_counter()
            outs = [rounds(hidden, scales, ids, gates, targets) for _ in range(args.calls)]
            jax.block_until_ready(outs)
            elapsed = time.perf_counter() - start
            failures[t] = sum(int(bad) for bad, _ in outs) + int(float(outs[-1][1]) != 1.0)
            result[t] = elapsed / (args.calls * args.iters) * 1e6
            print(f"{args.transport} {t} tokens: {result[t]:.1f} us per round trip, {failures[t]} failed; "
                  f"{ep.stats()}",
                  file=sys.stderr, flush=True)
        print(json.dumps({"client_us": result, "failures": failures, "client": ep.stats()}), flush=True)


def xla(args) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    devices = jax.devices()[:2]
    mesh = Mesh(devices, ("x",))
    result = {}
    for t in args.token_list:
        # Each device holds [2, t, D]: row block i goes to device i, so t rows
        # cross to the peer each way, as in one dispatch + combine.
        out_rows = jnp.ones((4, t, D), args.dtype)
        back_rows = jnp.ones((4, t, D), jnp.float32)

        def body(x, y):
            for _ in range(args.iters):
                x = jax.lax.all_to_all(x, "x", 0, 0, tiled=True)
                y = jax.lax.all_to_all(y, "x", 0, 0, tiled=True)
            return x, y

        rounds = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=(P("x"), P("x"))))
        x = jax.device_put(out_rows, NamedSharding(mesh, P("x")))
        y = jax.device_put(back_rows, NamedSharding(mesh, P("x")))
        jax.block_until_ready(rounds(x, y))
        start = time.perf_counter()
        outs = [rounds(x, y) for _ in range(args.calls)]
        jax.block_until_ready(outs)
        result[t] = (time.perf_counter() - start) / (args.calls * args.iters) * 1e6
        print(f"all_to_all {t} tokens: {result[t]:.1f} us per round trip", file=sys.stderr, flush=True)
    print(json.dumps({"xla_us": result}), flush=True)


def run(role: str, args, gpus: str) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpus, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env.pop("JAX_PLATFORMS", None)
    return subprocess.Popen(
        [sys.executable, __file__, "--role", role, "--tokens", args.tokens, "--dtype", args.dtype,
         "--iters", str(args.iters), "--calls", str(args.calls), "--timeout-s", str(args.timeout_s),
         "--deployment", DEPLOYMENT, "--transport", args.transport],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # stderr: shown as it comes


def last_json(proc: subprocess.Popen, what: str, timeout: float = 900) -> dict:
    stdout, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise SystemExit(f"{what} failed ({proc.returncode}); its stderr is above")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="16,64,256,1024")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float8_e4m3fn"])
    parser.add_argument("--iters", type=int, default=64, help="round trips per compiled call")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per size")
    parser.add_argument("--timeout-s", type=int, default=5, help="deadline of a combine")
    parser.add_argument("--append", help="append the table to this file (bench/RESULTS.md)")
    parser.add_argument("--commit", help="commit to report (default: git HEAD)")
    parser.add_argument("--role", choices=["server", "client", "xla"], help=argparse.SUPPRESS)
    parser.add_argument("--deployment", default=DEPLOYMENT, help=argparse.SUPPRESS)
    parser.add_argument("--transport", default="cuda_ipc", choices=["cuda_ipc", "ibgda"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.token_list = [int(t) for t in args.tokens.split(",")]
    if args.role:
        {"server": server, "client": client, "xla": xla}[args.role](args)
        return

    srv = run("server", args, "1")
    try:
        if srv.stdout.readline().strip() != "ready":
            raise SystemExit("server did not start; its stderr is above")
        client_result = last_json(run("client", args, "0"), "client")
        server_result = last_json(srv, "server", timeout=120)  # its stdin closes: it stops
    finally:
        if srv.poll() is None:
            srv.kill()
    xla_result = last_json(run("xla", args, "0,1"), "xla all_to_all")

    import jax

    device = jax.devices()[0].device_kind
    itemsize = {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}[args.dtype]
    lines = [
        f"## Token exchange between two GPUs ({datetime.date.today()}, commit {args.commit or git_commit()})",
        "",
        f"{device} x2, one dispatch+combine round trip (cuda_ipc: client process on GPU 0, server process on "
        f"GPU 1) vs XLA all_to_all of the same bytes (one process, both GPUs), width {D}, dispatch "
        f"{args.dtype}, replies float32; {args.iters} dependent round trips unrolled in one compiled program, "
        f"mean of {args.calls} calls. `python bench/token_exchange_gpu.py --tokens {args.tokens} "
        f"--dtype {args.dtype}`",
        "",
        "| tokens | bytes out + back | cuda_ipc us | XLA all_to_all us | cuda_ipc / XLA | failed round trips |",
        "|---|---|---|---|---|---|",
    ]
    for t in args.token_list:
        ours, theirs = client_result["client_us"][str(t)], xla_result["xla_us"][str(t)]
        lines.append(f"| {t} | {t * D * (itemsize + 4) / 1e6:.2f} MB | {ours:.1f} | {theirs:.1f} | "
                     f"{ours / theirs:.2f} | {client_result['failures'][str(t)]} |")
    drops = {k: v for side in (client_result["client"], server_result["server"]) for k, v in side.items()
             if v and (k.startswith("drop_") or k in ("timeouts", "torn_reads"))}
    lines += ["", f"Transport counters with nonzero drops/timeouts: {drops or 'none'}."]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
