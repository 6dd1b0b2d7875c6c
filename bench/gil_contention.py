"""Decode step time while other threads run Python, at several thread switch
intervals: what a background compile (tracing the model) costs the steps,
and why `eaas_jax.engine.gil` shortens the interval.

    python bench/gil_contention.py [--rows 32] [--steps 150] [--busy 0,1,4]
        [--intervals 0.005,0.001,0.0002,0.00005] [--append bench/RESULTS.md]

Each cell: the mean time of --steps decode steps of the tiny checkpoint at
--rows rows (`Engine.step`, outputs built as a server builds them), with that
many threads running a pure-Python loop beside them.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, REPO)

from _results import append_rows, git_commit, machine, publish, run_facts  # noqa: E402

from eaas_jax.engine import Engine, SamplingParams  # noqa: E402


def busy_python(stop: threading.Event) -> None:
    """Python bytecode without pause, as tracing a model is."""
    x = 0
    while not stop.is_set():
        for i in range(1000):
            x += i


def step_ms(engine: Engine, prompts, params, steps: int) -> float:
    """Mean ms of `steps` decode steps at len(prompts) rows (after 20 unmeasured)."""
    for p in prompts:
        engine.add_request(p, params)
    for _ in range(20):
        engine.step()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step_finished()
    return elapsed / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(REPO, "checkpoints", "tiny-moe"))
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--busy", default="0,1,4", help="busy Python threads beside the steps")
    ap.add_argument("--intervals", default="0.005,0.001,0.0002,0.00005", help="sys.setswitchinterval values, s")
    ap.add_argument("--append")
    args = ap.parse_args()
    busy_counts = [int(b) for b in args.busy.split(",")]
    intervals = [float(i) for i in args.intervals.split(",")]
    engine = Engine(args.model, max_num_seqs=args.rows, max_model_len=512, dtype="float32")
    prompts = [[5 + (i * 7 + j) % 300 for j in range(20)] for i in range(args.rows)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 40, ignore_eos=True)
    engine.generate(prompts, params, use_tqdm=False)  # compiles every shape the runs meet
    table = {}
    for interval in intervals:
        sys.setswitchinterval(interval)
        for n in busy_counts:
            stop = threading.Event()
            threads = [threading.Thread(target=busy_python, args=(stop,)) for _ in range(n)]
            for t in threads:
                t.start()
            try:
                table[interval, n] = step_ms(engine, prompts, params, args.steps)
            finally:
                stop.set()
                for t in threads:
                    t.join()
            print(f"interval {interval * 1e6:.0f} µs, {n} busy: {table[interval, n]:.2f} ms a step", file=sys.stderr)
    engine.shutdown()
    lines = [
        f"### Decode steps beside busy Python threads, by switch interval ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {machine()}; `python bench/gil_contention.py {' '.join(sys.argv[1:])}`; tiny checkpoint, "
        f"{args.rows} rows, mean ms of {args.steps} decode steps; the peer is the same steps with no busy thread "
        "at the interpreter's default interval (5 ms).",
        "",
        "| switch interval | " + " | ".join(f"{n} busy threads, ms (x alone at 5 ms)" for n in busy_counts) + " |",
        "|---|" + "---|" * len(busy_counts),
    ]
    alone = table.get((0.005, 0)) or table[intervals[0], busy_counts[0]]
    for interval in intervals:
        lines.append(f"| {interval * 1e6:.0f} µs | " + " | ".join(
            f"{table[interval, n]:.2f} ({table[interval, n] / alone:.1f}x)" for n in busy_counts) + " |")
    lines.append("")
    publish(lines, args.append)
    if args.append:
        common = run_facts(machine(), "ms")
        append_rows(os.path.join(REPO, "bench", "results", "gil_contention.jsonl"), [
            dict(metric="decode_step_beside_busy_threads", switch_interval_s=interval, busy_threads=n,
                 value=table[interval, n], peer="no busy thread, 5 ms interval", peer_value=alone,
                 ratio=table[interval, n] / alone, **common)
            for interval in intervals for n in busy_counts])


if __name__ == "__main__":
    main()
