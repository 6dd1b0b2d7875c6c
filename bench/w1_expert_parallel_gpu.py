"""W1 on several local GPUs: the monolithic expert-parallel engine (experts
sharded over N GPUs, the rest replicated, `Engine(expert_parallel=N)`) against
the embedded engine on one GPU, in the same run.

    python bench/w1_expert_parallel_gpu.py [--gpus 2] [--batches 64,256] [--steps 32] [--append bench/RESULTS.md]

Same workload, checkpoint and timing as `w1_decode_gpu.py` (whose helpers this
uses); each configuration runs in its own process. Greedy tokens of prompt 0
are compared between the two.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

from _results import REPO, git_commit, publish
import w1_decode_gpu as w1


def phase(directory: str, batches: list[int], steps: int, expert_parallel: int) -> dict:
    sys.path.insert(0, REPO)
    from eaas_jax.engine import Engine

    start = time.time()
    engine = Engine(directory, dtype="bfloat16", max_num_seqs=max(batches),
                    max_model_len=w1.PROMPT_LEN + steps + 16, block_size=16,
                    max_num_batched_tokens=8192, expert_parallel=expert_parallel)
    result = {"load_s": time.time() - start}
    for batch in batches:
        result[f"b{batch}"] = w1.time_decode(engine, batch, steps)
    return result


def run_phase(args, expert_parallel: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--phase", str(expert_parallel), "--dir", args.dir,
         "--batches", args.batches, "--steps", str(args.steps)],
        capture_output=True, text=True,
    )
    sys.stderr.write(out.stderr[-3000:])
    if out.returncode:
        raise SystemExit(f"phase expert_parallel={expert_parallel} failed ({out.returncode})")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if args.raw:  # keep each phase's numbers even if a later phase fails
        with open(args.raw, "a") as f:
            f.write(json.dumps({"expert_parallel": expert_parallel, **result}) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dir", default="/tmp/w1-qwen3-moe-8l")
    parser.add_argument("--phase", type=int, help="(internal) run one configuration")
    parser.add_argument("--append", help="results file to append the table to")
    parser.add_argument("--raw", help="JSONL file to append each phase's raw numbers to")
    parser.add_argument("--commit", help="commit to record (default: git HEAD)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.phase is not None:
        print(json.dumps(phase(args.dir, batches, args.steps, args.phase)))
        return

    if not os.path.exists(os.path.join(args.dir, "config.json")):
        w1.phase_make(args.dir)
    one = run_phase(args, 1)
    many = run_phase(args, args.gpus)
    import jax

    lines = [
        f"### W1 decode, expert-parallel over {args.gpus} GPUs vs one GPU "
        f"({datetime.date.today()}, commit {args.commit or git_commit()})",
        "",
        f"Device: {args.gpus} x {jax.devices()[0].device_kind}; JAX {jax.__version__}; "
        f"`python bench/w1_expert_parallel_gpu.py --gpus {args.gpus} --batches {args.batches} "
        f"--steps {args.steps}`; bfloat16.",
        "",
        f"| batch | 1 GPU step ms median (min-max) | {args.gpus} GPUs step ms median (min-max) | "
        f"speed-up | greedy tokens equal (first 32, prompt 0) |",
        "|---|---|---|---|---|",
    ]
    for batch in batches:
        a, b = one[f"b{batch}"], many[f"b{batch}"]
        lines.append(
            f"| {batch} | {w1.step_ms(a)} | {w1.step_ms(b)} | {a['median'] / b['median']:.2f}x | "
            f"{w1.equal_prefix(a['tokens0'], b['tokens0'])}/32 |"
        )
    publish(lines, args.append)


if __name__ == "__main__":
    main()
