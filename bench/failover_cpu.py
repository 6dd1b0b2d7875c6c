"""Throughput through an expert-server failure, on the CPU: the shipped
checkpoint's experts on three server processes, every expert on two of them;
the same greedy workload runs once fault-free and once with one server killed
(SIGKILL) at a known instant, each after a warm-up run of the same workload
in the same engine (so no compilation is timed).

    python bench/failover_cpu.py [--requests 64] [--max-tokens 32] [--kill-at 0.4] [--timeout-ms 500]
                                 [--min-timeout-ms 50] [--append bench/RESULTS.md]

Reports the throughput loss over the whole run against the fault-free run,
throughput per tenth of the fault-free duration, the slowest step (the one
that waited out the dead server's deadline and failed its tokens over) and
whether every request produced the fault-free run's tokens.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time

from _results import REPO, git_commit, publish

MODEL = os.path.join(REPO, "checkpoints", "tiny-moe")
PROMPTS = ["def parse_args(argv):", "import os\n", "class Queue:\n    def __init__(self", "x = 1",
           "for i in range(", "# sort the list\n", "return {", "while True:\n"]


def deployment_text(timeout_ms: int, min_timeout_ms: int | None) -> str:
    """Every one of the 8 experts on two of three servers (r0 first for 0-5);
    with `min_timeout_ms`, deadlines adapt between it and `timeout_ms`."""
    adaptive = "" if min_timeout_ms is None else f"min_timeout_ms = {min_timeout_ms}\n"
    return (f'name = "failover-bench"\ntimeout_ms = {timeout_ms}\n{adaptive}capacity = 64\n'
            '[[servers]]\nname = "r0"\nexperts = ["0-5"]\n'
            '[[servers]]\nname = "r1"\nexperts = ["2-7"]\n'
            '[[servers]]\nname = "r2"\nexperts = ["0-1", "6-7"]\n')


def run_workload(engine, requests, params, kill=None) -> dict:
    """Steps the engine until every request is done; `kill` = (seconds, fn)
    calls fn at the first step boundary after that many seconds."""
    ids = [engine.add_request(prompt, params) for prompt in requests]
    lengths: dict[str, int] = {}
    outputs: dict[str, list[int]] = {}
    timeline, step_times, killed_at = [], [], None
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        for out in engine.step():
            lengths[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        now = time.perf_counter()
        step_times.append(now - t0)
        timeline.append((now - start, sum(lengths.values())))
        if kill is not None and killed_at is None and now - start >= kill[0]:
            kill[1]()
            killed_at = time.perf_counter() - start
    return {"wall": time.perf_counter() - start, "tokens": sum(lengths.values()), "timeline": timeline,
            "max_step": max(step_times), "killed_at": killed_at, "outputs": [outputs[i] for i in ids]}


def measure(args, workdir: str, kill_fraction: float | None, fault_free_wall: float | None) -> dict:
    from eaas_jax.engine import Engine, SamplingParams
    from eaas_jax.runtime.cluster import LocalCluster

    path = os.path.join(workdir, "deployment.toml")
    with open(path, "w") as f:
        f.write(deployment_text(args.timeout_ms, args.min_timeout_ms))
    requests = [f"{PROMPTS[i % len(PROMPTS)]} # {i}" for i in range(args.requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    with LocalCluster(MODEL, path, dtype="float32") as cluster:
        with Engine(MODEL, deployment=cluster, max_num_seqs=args.max_num_seqs, max_model_len=128,
                    dtype="float32", block_size=4) as engine:
            run_workload(engine, requests, params)  # warm-up: compiles every shape the run uses
            kill = None
            if kill_fraction is not None:
                victim = cluster.process("r0")

                def kill_r0():
                    victim.kill()
                    victim.wait()

                kill = (kill_fraction * fault_free_wall, kill_r0)
            return run_workload(engine, requests, params, kill)


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
                        help="kill server r0 at this fraction of the fault-free run's duration")
    parser.add_argument("--timeout-ms", type=int, default=500, help="the deployment's combine deadline")
    parser.add_argument("--min-timeout-ms", type=int,
                        help="adaptive deadlines between this and --timeout-ms (default: fixed)")
    parser.add_argument("--append", help="results file to append the table to")
    args = parser.parse_args()
    if not 0 < args.kill_at < 1:
        parser.error("--kill-at must be in (0, 1)")
    with tempfile.TemporaryDirectory() as workdir:
        base = measure(args, workdir, None, None)
        failed = measure(args, workdir, args.kill_at, base["wall"])
    tput = base["tokens"] / base["wall"], failed["tokens"] / failed["wall"]
    equal = sum(a == b for a, b in zip(base["outputs"], failed["outputs"]))
    lines = [
        f"### Throughput through an expert-server failure, CPU ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {platform.machine()}, {os.cpu_count()} cores; `python bench/failover_cpu.py --requests "
        f"{args.requests} --max-tokens {args.max_tokens} --max-num-seqs {args.max_num_seqs} --kill-at "
        f"{args.kill_at} --timeout-ms {args.timeout_ms}"
        + ("" if args.min_timeout_ms is None else f" --min-timeout-ms {args.min_timeout_ms}")
        + "`; shipped checkpoint, float32; 3 expert servers, every "
        f"expert on 2; server r0 SIGKILLed {failed['killed_at']:.2f} s into the run.",
        "",
        "| run | wall s | tokens | tok/s | slowest step ms | requests with the fault-free tokens |",
        "|---|---|---|---|---|---|",
        f"| fault-free | {base['wall']:.2f} | {base['tokens']} | {tput[0]:.1f} | {base['max_step'] * 1e3:.0f} | - |",
        f"| r0 killed | {failed['wall']:.2f} | {failed['tokens']} | {tput[1]:.1f} | "
        f"{failed['max_step'] * 1e3:.0f} | {equal}/{args.requests} |",
        "",
        f"Throughput loss over the run: **{(1 - tput[1] / tput[0]) * 100:.1f}%** (target < 2%).",
        "",
        "tok/s per tenth of the fault-free run's duration (fault-free / killed): "
        + ", ".join(f"{a:.0f}/{b:.0f}" for a, b in zip(per_tenth(base["timeline"], base["wall"]),
                                                      per_tenth(failed["timeline"], base["wall"]))),
    ]
    publish(lines, args.append)


if __name__ == "__main__":
    main()
