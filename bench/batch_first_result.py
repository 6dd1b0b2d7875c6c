"""Time to the first result of a 64-prompt batch on the shipped checkpoint,
CPU: `eaas-jax batch` (results streamed as requests finish) against
`eaas-jax generate --input` (results written at the end), same run, same
prompts and flags, each a fresh process (its compiles included) with an
empty compilation cache; then `batch` once more in a fresh process whose
cache the first `batch` filled (a resumed or repeated run).

    python bench/batch_first_result.py [--prompts 64] [--append bench/RESULTS.md]

The first result's time is when its line appears in the output file (polled
every 10 ms), from the process start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, publish  # noqa: E402

MODEL = os.path.join(REPO, "checkpoints", "tiny-moe")
FLAGS = ["--model", MODEL, "--max-tokens", "64", "--temperature", "0", "--ignore-eos", "--dtype", "float32"]


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
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in.jsonl")
        with open(inp, "w") as f:
            for i in range(args.prompts):
                f.write(json.dumps({"prompt": f"def handler_{i}(request, *args):"}) + "\n")
        def run(command: str, output: str, cache: str) -> tuple[float, float]:
            output = os.path.join(tmp, output)
            return timed([command, "--input", inp, "--output", output, "--compile-cache", os.path.join(tmp, cache),
                          *FLAGS], output)

        batch = run("batch", "batch.jsonl", "cache-batch")
        generate = run("generate", "generate.jsonl", "cache-generate")
        again = run("batch", "batch-again.jsonl", "cache-batch")
    lines = [
        f"### Time to first result, {args.prompts}-prompt batch, CPU ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"`python bench/batch_first_result.py --prompts {args.prompts}`; shipped checkpoint, float32, 64 tokens "
        "per prompt, greedy, 32 sequences at once, each command a fresh process (compiles included; "
        "--compile-cache empty, except the last row's, which the first row's run filled).",
        "",
        "| command | first result, s | all results, s | first result vs generate --input |",
        "|---|---|---|---|",
        f"| `eaas-jax batch` (streamed) | {batch[0]:.1f} | {batch[1]:.1f} | {batch[0] / generate[0]:.2f} |",
        f"| `eaas-jax generate --input` (written at the end) | {generate[0]:.1f} | {generate[1]:.1f} | 1.00 |",
        f"| `eaas-jax batch` again, compile cache filled | {again[0]:.1f} | {again[1]:.1f} | "
        f"{again[0] / generate[0]:.2f} |",
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = dict(batch=args.prompts, unit="s", device=f"{platform.machine()}, {os.cpu_count()} cores (CPU)",
                      date=str(datetime.date.today()), commit=git_commit(),
                      command=f"python bench/batch_first_result.py --prompts {args.prompts}")
        append_rows(os.path.join(REPO, "bench", "results", "batch_first_result.jsonl"), [
            dict(metric="time_to_first_result_batch", value=batch[0], peer="generate --input",
                 peer_value=generate[0], ratio=batch[0] / generate[0], **common),
            dict(metric="time_to_first_result_batch_compile_cache_filled", value=again[0],
                 peer="batch, compile cache empty", peer_value=batch[0], ratio=again[0] / batch[0], **common)])


if __name__ == "__main__":
    main()
