"""The engine's own host time a decode step, without the device: what bounds
a step once the host does more than the device (W1 at batch 256 on an H100:
7.4 ms of host a step against 5.2 ms of kernels, bench/RESULTS.md).

A tiny random model's engine decodes `batch` greedy sequences; its step
program is replaced by a replay of the program's own first results for each
shape (the KV cache passed through), so a step costs what the engine does
around the program: scheduling, the rows' inputs, the call, fetching and
appending the tokens, the metrics. Best of three runs of `--steps` steps.
With `--decode-window K` a step program samples K tokens a row: the time is
given a token (a call's over the tokens it brought each row).

    python bench/host_bookkeeping.py [--batches 1,64,256] [--steps 100] [--decode-window 1] [--profile BATCH]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def replay_step_program(runner) -> None:
    """Makes `runner`'s step program return its first results for each
    shape (and each call's own KV cache) without running."""
    real, first = runner._jitted, {}

    def replay(*args, **static):
        key = (args[3].shape, tuple(sorted((k, repr(v)) for k, v in static.items())))
        if key not in first:
            results, cache, next_tokens, carry = jax.block_until_ready(real(*args, **static))
            first[key] = results, next_tokens, carry
            return results, cache, next_tokens, carry
        results, next_tokens, carry = first[key]
        return results, args[2], next_tokens, carry

    replay.lower = real.lower  # (compiling still lowers the real program)
    runner._jitted = replay


def decode(engine, batch: int, steps: int, profiler: cProfile.Profile | None = None) -> tuple[float, int]:
    """Seconds a decoded token of `batch` sequences of `steps` tokens
    (their prefill and first steps left out), and the engine steps timed."""
    from eaas_jax.engine import SamplingParams

    for i in range(batch):
        engine.add_request([1 + i % 50] * 8, SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    for _ in range(3):
        engine.step_finished()
    done, generated, start = 0, engine.metrics.generated_tokens, time.perf_counter()
    if profiler:
        profiler.enable()
    while engine.has_unfinished_requests():
        engine.step_finished()
        done += 1
    if profiler:
        profiler.disable()
    tokens_a_row = (engine.metrics.generated_tokens - generated) / batch
    return (time.perf_counter() - start) / tokens_a_row, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--decode-window", type=int, default=1, help="the engine's decode_window")
    parser.add_argument("--profile", type=int, help="also list the functions' own time at this batch")
    args = parser.parse_args()
    from conftest import SHIPPED, tiny_model

    from eaas_jax.checkpoint import save_checkpoint
    from eaas_jax.engine import Engine

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="host-bookkeeping-") as path:
        save_checkpoint(path, tiny_model(), tokenizer_file=os.path.join(SHIPPED, "tokenizer.json"))
        print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; {os.cpu_count()} cores; "
              f"{args.steps} tokens a sequence a run, best of 3; decode_window={args.decode_window}")
        print("| batch | host ms a token step | µs a row |\n|---|---|---|")
        for batch in batches:
            engine = Engine(path, max_num_seqs=batch, max_model_len=args.steps + 16, dtype="float32",
                            block_size=4, decode_window=args.decode_window)
            replay_step_program(engine.runner)
            decode(engine, batch, args.steps)  # compiles
            best = min(decode(engine, batch, args.steps)[0] for _ in range(3))
            print(f"| {batch} | {best * 1e3:.3f} | {best * 1e6 / batch:.1f} |")
            if batch == args.profile:
                profiler = cProfile.Profile()
                _, done = decode(engine, batch, args.steps, profiler)
                stats = pstats.Stats(profiler).stats
                print(f"\nbatch {batch} under Python's profiler, functions by their own time:\n")
                print("| function | own µs a step | calls a step |\n|---|---|---|")
                for (file, line, name), (_, calls, own, _, _) in sorted(stats.items(), key=lambda i: -i[1][2])[:15]:
                    print(f"| `{os.path.basename(file)}:{line} {name}` | {own / done * 1e6:.1f} | {calls / done:.1f} |")
                print()


if __name__ == "__main__":
    main()
