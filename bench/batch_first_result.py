"""Time to the first result of a 64-prompt batch on the shipped checkpoint,
CPU, each command a fresh process (its compiles included) with an empty
compilation cache:

- `eaas-jax batch` with warm-up (the default) and with --no-warmup, on two
  workloads: "uniform" (one prompt shape, --ignore-eos, every request the same
  length: the run meets two step shapes) and "varied" (prompts of 3 to 60
  words, sampled, EOS allowed, up to 128 tokens: refills, drains, growth past
  a KV-block bucket);
- `eaas-jax generate --input` (results written at the end), uniform;
- `batch` once more in a process whose cache the first uniform run filled.

    python bench/batch_first_result.py [--prompts 64] [--append bench/RESULTS.md]

The first result's time is when its line appears in the output file (polled
every 10 ms), from the process start. "steps waiting" is the summary's count
of steps that waited for their program to compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, publish  # noqa: E402

MODEL = os.path.join(REPO, "checkpoints", "tiny-moe")
WORKLOADS = {
    "uniform": ["--max-tokens", "64", "--temperature", "0", "--ignore-eos"],
    "varied": ["--max-tokens", "128", "--temperature", "1", "--seed", "0"],
}
WORDS = "the quick brown fox jumps over a lazy dog import os sys def class return".split()


def prompts(workload: str, n: int) -> list[str]:
    if workload == "uniform":
        return [f"def handler_{i}(request, *args):" for i in range(n)]
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(n)]


def timed(command: list[str], output: str) -> tuple[float, float]:
    """(s to the first line of `output`, s to the process's end)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "eaas_jax.cli", *command], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = None
    while proc.poll() is None:
        if first is None and os.path.exists(output) and os.path.getsize(output) > 0:
            first = time.monotonic() - start
        time.sleep(0.01)
    end = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({proc.returncode})")
    return (first if first is not None else end), end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--append", help="append the results table to this file")
    args = ap.parse_args()
    rows = []  # (workload, command label, first s, all s, steps waiting or None)
    with tempfile.TemporaryDirectory() as tmp:
        def run(workload: str, command: str, label: str, cache: str, *extra: str) -> tuple:
            inp = os.path.join(tmp, f"{workload}.jsonl")
            if not os.path.exists(inp):
                with open(inp, "w") as f:
                    f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts(workload, args.prompts))
            output = os.path.join(tmp, f"{workload}-{len(rows)}.jsonl")
            summary = os.path.join(tmp, f"{workload}-{len(rows)}.summary.json")
            flags = ["--summary-json", summary] if command == "batch" else []
            first, end = timed([command, "--input", inp, "--output", output, "--compile-cache",
                                os.path.join(tmp, cache), "--model", MODEL, "--dtype", "float32",
                                *WORKLOADS[workload], *flags, *extra], output)
            waits = json.load(open(summary))["steps_waiting_for_compiles"] if flags else None
            rows.append((workload, label, first, end, waits))
            return rows[-1]

        for workload in WORKLOADS:
            run(workload, "batch", "`batch --no-warmup`", f"cache-{workload}-lazy", "--no-warmup")
            run(workload, "batch", "`batch` (warm-up)", f"cache-{workload}-warm")
        run("uniform", "generate", "`generate --input` (written at the end)", "cache-generate")
        run("uniform", "batch", "`batch` again, compile cache filled", "cache-uniform-warm")
    lazy = {w: first for w, label, first, _, _ in rows if label == "`batch --no-warmup`"}
    lines = [
        f"### Time to first result, {args.prompts}-prompt batch, CPU ({datetime.date.today()}, "
        f"commit {git_commit()})",
        "",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`python bench/batch_first_result.py --prompts {args.prompts}`; shipped checkpoint, float32, 32 "
        "sequences at once, each command a fresh process (compiles included; --compile-cache empty except in "
        "the last row, which the uniform warm-up run filled). uniform: one prompt shape, 64 tokens, greedy, "
        "--ignore-eos; varied: prompts of 3-60 words, up to 128 tokens, sampled, EOS allowed.",
        "",
        "| workload | command | first result, s | all results, s | steps waiting for a compile | "
        "first result vs --no-warmup |",
        "|---|---|---|---|---|---|",
        *(f"| {w} | {label} | {first:.1f} | {end:.1f} | {'' if waits is None else waits} | "
          f"{first / lazy[w]:.2f} |" for w, label, first, end, waits in rows),
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = dict(batch=args.prompts, unit="s", device=f"{platform.machine()}, {os.cpu_count()} cores (CPU)",
                      date=str(datetime.date.today()), commit=git_commit(),
                      command=f"python bench/batch_first_result.py --prompts {args.prompts}")
        append_rows(os.path.join(REPO, "bench", "results", "batch_first_result.jsonl"), [
            dict(metric=f"time_to_first_result_{w}_{label.strip('`').replace(' ', '_')}", value=first,
                 peer="batch --no-warmup", peer_value=lazy[w], ratio=first / lazy[w], all_results_s=end,
                 steps_waiting_for_compiles=waits, **common)
            for w, label, first, end, waits in rows])


if __name__ == "__main__":
    main()
