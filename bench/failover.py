"""Throughput through an expert-server failure: the shipped checkpoint's
experts on three server processes, every expert on two of them; the same
greedy workload runs fault-free and with server r0 killed (SIGKILL) at a known
instant, on the same servers and engine after a warm-up run (so no
compilation is timed).

    python bench/failover.py [--transport shm|cuda_ipc] [--requests 64] [--max-tokens 32] [--kill-at 0.4]
                             [--timeout-ms 500] [--min-timeout-ms 50] [--cycles 1] [--append bench/RESULTS.md]

`--transport shm` (default): CPU processes sharing this host's cores, float32.
`--transport cuda_ipc`: the client on GPU 0 and the servers on the GPUs of
`--server-gpus` (default all three on GPU 1), bfloat16. Several server
processes on one GPU share it through the driver's time slicing unless an MPS
daemon runs (the table says which). Measure without MPS: there a SIGKILLed
server took the GPU's other MPS clients down with it (bench/RESULTS.md,
2026-11-30).

Runs go fault-free, killed, killed, fault-free (`--cycles` times), r0
restarted as a new process before each run after a kill: consecutive runs of
one engine were measured 20% apart on GPUs (2026-11-30), more than a failure
costs, and this order cancels a steady drift. Reports the throughput loss of
the killed runs against the fault-free ones, each run's slowest step (a
killed run's is the one that waited out the dead server's deadline and failed
its tokens over), throughput per tenth of the first pair, and whether every
request produced the fault-free tokens.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import tempfile
import time

from _results import REPO, git_commit, mps_running, publish

MODEL = os.path.join(REPO, "checkpoints", "tiny-moe")
PROMPTS = ["def parse_args(argv):", "import os\n", "class Queue:\n    def __init__(self", "x = 1",
           "for i in range(", "# sort the list\n", "return {", "while True:\n"]


# How long a restarted r0 may take to be routed to again (a probation, if
# its first exchange missed the deadline, lasts 5 s).
ADMISSION_TIMEOUT_S = 30.0
SERVERS = {"r0": '["0-5"]', "r1": '["2-7"]', "r2": '["0-1", "6-7"]'}  # every one of the 8 experts on two


def deployment_text(args) -> str:
    """Three servers, r0 first for experts 0-5; with `min_timeout_ms`,
    deadlines adapt between it and `timeout_ms`."""
    text = f'name = "failover-bench"\ntransport = "{args.transport}"\ntimeout_ms = {args.timeout_ms}\n'
    if args.min_timeout_ms is not None:
        text += f"min_timeout_ms = {args.min_timeout_ms}\n"
    text += f"capacity = {args.max_num_seqs * 4}\n"
    for (name, experts), gpu in zip(SERVERS.items(), args.server_gpus):
        text += f'[[servers]]\nname = "{name}"\nexperts = {experts}\n'
        if gpu is not None:
            text += f"device = {gpu}\n"
    return text


def run_workload(engine, requests, params, kill=None) -> dict:
    """Steps the engine until every request is done; `kill` = (seconds, fn)
    calls fn at the first step boundary after that many seconds. Requests
    that failed (a token with no live replica of its expert) are counted."""
    ids = [engine.add_request(prompt, params) for prompt in requests]
    lengths: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    timeline, step_times, killed_at = [], [], None
    start, errors = time.perf_counter(), []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        for out in engine.step():
            lengths[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
                if out.error:
                    errors.append(out.error)
        now = time.perf_counter()
        step_times.append(now - t0)
        timeline.append((now - start, sum(lengths.values())))
        if kill is not None and killed_at is None and now - start >= kill[0]:
            kill[1]()
            killed_at = time.perf_counter() - start
    return {"wall": time.perf_counter() - start, "tokens": sum(lengths.values()), "timeline": timeline,
            "max_step": max(step_times), "killed_at": killed_at, "outputs": [outputs.get(i) for i in ids],
            "errors": errors}


def measure(args, workdir: str) -> list[tuple[str, dict]]:
    """The runs, in order, as (kind, result)."""
    from eaas_jax.engine import Engine, SamplingParams
    from eaas_jax.control_plane.server_pool import MEMBERSHIP_CHECK_S
    from eaas_jax.control_plane.cluster import LocalCluster

    path = os.path.join(workdir, "deployment.toml")
    with open(path, "w") as f:
        f.write(deployment_text(args))
    requests = [f"{PROMPTS[i % len(PROMPTS)]} # {i}" for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    runs = []
    with LocalCluster(MODEL, path, dtype=args.dtype) as cluster:
        with Engine(MODEL, deployment=cluster, max_num_seqs=args.max_num_seqs, max_model_len=128,
                    dtype=args.dtype, block_size=4 if args.transport == "shm" else 16) as engine:
            run_workload(engine, requests, params)  # warm-up: compiles every shape the run uses
            r0 = cluster.endpoint_of("r0")

            def kill_r0():
                cluster.process("r0").kill()
                cluster.process("r0").wait()

            def restart_r0():
                """Starts r0 again and warms it up until the engine routes to
                it: admitted at the first step boundary after it is ready, or
                after a probation and a probe if it missed an exchange."""
                cluster.start_server("r0")
                deadline = time.monotonic() + ADMISSION_TIMEOUT_S
                while True:
                    time.sleep(MEMBERSHIP_CHECK_S)
                    run_workload(engine, requests[:args.max_num_seqs], params)
                    if engine.runner.experts.is_live(r0):
                        return
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the restarted r0 was not admitted within {ADMISSION_TIMEOUT_S:g} s")

            for kind in ("fault-free", "killed", "killed", "fault-free") * args.cycles:
                if not engine.runner.experts.is_live(r0):
                    restart_r0()
                # The order starts fault-free: a kill comes at a fraction of that run's time.
                kill = (args.kill_at * runs[0][1]["wall"], kill_r0) if kind == "killed" else None
                runs.append((kind, run_workload(engine, requests, params, kill)))
    return runs


def per_tenth(timeline, span: float) -> list[float]:
    """Tokens per second in each tenth of `span` seconds (interpolated)."""
    def tokens_at(t):
        done = 0
        for when, tokens in timeline:
            if when > t:
                break
            done = tokens
        return done
    edges = [span * i / 10 for i in range(11)]
    return [(tokens_at(b) - tokens_at(a)) / (b - a) for a, b in zip(edges, edges[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kill-at", type=float, default=0.4,
                        help="kill server r0 at this fraction of the first fault-free run's duration")
    parser.add_argument("--timeout-ms", type=int, default=500, help="the deployment's combine deadline")
    parser.add_argument("--min-timeout-ms", type=int,
                        help="adaptive deadlines between this and --timeout-ms (default: fixed)")
    parser.add_argument("--transport", default="shm", choices=["shm", "cuda_ipc"],
                        help="shm: CPU processes; cuda_ipc: client on GPU 0, servers on --server-gpus")
    parser.add_argument("--server-gpus", default="1,1,1", help="cuda_ipc: the GPU of r0, r1 and r2")
    parser.add_argument("--cycles", type=int, default=1,
                        help="times to run fault-free, killed, killed, fault-free")
    parser.add_argument("--append", help="results file to append the table to")
    args = parser.parse_args()
    # The engine's failures, re-admissions and retries, timed, beside the table.
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("eaas_jax.control_plane.server_pool").setLevel(logging.INFO)
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be in (0, 1)")
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    if args.transport == "cuda_ipc":
        try:
            args.server_gpus = [int(g) for g in args.server_gpus.split(",")]
        except ValueError:
            parser.error(f"--server-gpus must be three GPU indices, got {args.server_gpus!r}")
        if len(args.server_gpus) != len(SERVERS) or min(args.server_gpus) < 0:
            parser.error(f"--server-gpus must be three GPU indices, got {args.server_gpus}")
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"  # the client's; each server gets its own
        args.dtype = "bfloat16"
    else:
        args.server_gpus = [None] * len(SERVERS)
        args.dtype = "float32"
    with tempfile.TemporaryDirectory() as workdir:
        runs = measure(args, workdir)
    fault_free = [r for kind, r in runs if kind == "fault-free"]
    killed = [r for kind, r in runs if kind == "killed"]
    reference = fault_free[0]["outputs"]
    tput = [sum(r["tokens"] for r in rs) / sum(r["wall"] for r in rs) for rs in (fault_free, killed)]
    command = (f"python bench/failover.py --transport {args.transport} --requests {args.requests} "
               f"--max-tokens {args.max_tokens} --max-num-seqs {args.max_num_seqs} --kill-at {args.kill_at} "
               f"--timeout-ms {args.timeout_ms}"
               + ("" if args.min_timeout_ms is None else f" --min-timeout-ms {args.min_timeout_ms}")
               + f" --cycles {args.cycles}")
    if args.transport == "cuda_ipc":
        import jax

        command += " --server-gpus " + ",".join(map(str, args.server_gpus))
        where = (f"GPUs: {jax.devices()[0].device_kind}, client on GPU 0, r0/r1/r2 on GPUs "
                 f"{'/'.join(map(str, args.server_gpus))}; MPS daemon: {'yes' if mps_running() else 'no'}")
    else:
        where = f"CPU: {platform.machine()}, {os.cpu_count()} cores, shared by the client and the servers"
    lines = [
        f"### Throughput through an expert-server failure, {args.transport} ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {where}; `{command}`; shipped checkpoint, {args.dtype}; 3 expert servers, every "
        f"expert on 2; in each killed run server r0 SIGKILLed at {killed[0]['killed_at']:.2f} s "
        "(the first; restarted before the next run).",
        "",
        "| run | kind | wall s | tokens | tok/s | slowest step ms | requests with the first fault-free run's tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, (kind, r) in enumerate(runs):
        equal = sum(a == b for a, b in zip(reference, r["outputs"]))
        lines.append(f"| {i + 1} | {kind} | {r['wall']:.2f} | {r['tokens']} | {r['tokens'] / r['wall']:.1f} | "
                     f"{r['max_step'] * 1e3:.0f} | {equal}/{args.requests} |")
    for i, (kind, r) in enumerate(runs):
        if r["errors"]:
            lines += ["", f"Run {i + 1}: {len(r['errors'])} requests failed; the first: {r['errors'][0][:600]}"]
    first_pair = fault_free[0], killed[0]
    lines += [
        "",
        f"Throughput loss, killed runs against fault-free runs: **{(1 - tput[1] / tput[0]) * 100:.1f}%** "
        f"({tput[1]:.1f} against {tput[0]:.1f} tok/s; target < 2%).",
        "",
        "tok/s per tenth of run 1's duration (run 1 / run 2): "
        + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(*(per_tenth(r["timeline"], first_pair[0]["wall"])
                                                           for r in first_pair))),
    ]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
