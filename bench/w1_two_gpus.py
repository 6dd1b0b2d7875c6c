"""W1 on the two GPUs of one host: disaggregated (attention client on GPU 0,
every expert in one expert-server process on GPU 1, `cuda_ipc` transport)
against the monolithic expert-parallel engine over both GPUs
(`Engine(expert_parallel=2)`: experts sharded, the rest replicated, one
all-reduce per MoE layer) and the embedded engine on one GPU, in the same run.

    python bench/w1_two_gpus.py [--batches 64,256] [--steps 32] [--dispatch-dtype bfloat16] [--append bench/RESULTS.md]
                                [--raw phases.jsonl [--resume]]

The disaggregated configuration is timed twice against the same servers: with
double batching (two micro-batches per step, one's attention overlapping the
other's experts) and without.

Same workload, checkpoint and timing as `w1_decode_gpu.py` (whose helpers this
uses); each configuration runs in its own process(es) and sees only its GPUs.
Greedy tokens of prompt 0 are compared with the one-GPU engine's. `--raw`
keeps each configuration's numbers as it finishes; with `--resume` a second
run takes those from there and runs only the rest.
`--transport shm` runs the same three configurations on the CPU (two host
devices, shared-memory transport): a smoke test of this script, not a number
to report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

from _results import REPO, finished_phases, git_commit, publish, run_phase as run_in_process
import w1_decode_gpu as w1

CONFIGS = ("one", "expert_parallel", "disaggregated")


def deployment_file(directory: str, transport: str, dispatch_dtype: str, capacity: int) -> str:
    """Every expert in one server, on GPU 1 under cuda_ipc."""
    path = os.path.join(directory, "w1-deployment.toml")
    with open(path, "w") as f:
        f.write(f'name = "w1"\ntransport = "{transport}"\ncapacity = {capacity}\ntimeout_ms = 120000\n'
                f'dispatch_dtype = "{dispatch_dtype}"\n[[servers]]\nname = "experts"\n'
                + ("device = 1\n" if transport == "cuda_ipc" else ""))
    return path


def phase(args, config: str) -> dict:
    sys.path.insert(0, REPO)
    from eaas_jax.engine import Engine
    from eaas_jax.control_plane.cluster import LocalCluster

    batches = [int(b) for b in args.batches.split(",")]
    engine_args = w1.engine_options(max(batches), args.steps)

    def measure(**extra) -> dict:
        start = time.time()
        with Engine(args.dir, **engine_args, **extra) as engine:
            # The expert server's grouped matmul comes from the same install.
            result = {"load_s": time.time() - start, **w1.kernels()}
            for batch in batches:
                result[f"b{batch}"] = w1.time_decode(engine, batch, args.steps)
        return result

    if config == "one":
        return measure()
    if config == "expert_parallel":
        return measure(expert_parallel=2)
    # Disaggregated, with and without double batching, against one set of servers.
    # Double batching overlaps one micro-batch's attention with the other's
    # experts, but each micro-batch is a server round that reads every expert
    # it touches: at decode sizes that is nearly all of them, twice per layer.
    deployment = deployment_file(args.workdir, args.transport, args.dispatch_dtype, capacity=max(batches))
    with LocalCluster(args.dir, deployment, dtype="bfloat16") as cluster:
        result = measure(deployment=cluster, double_batching=True)
        single = measure(deployment=cluster, double_batching=False)
    result["single"] = {f"b{batch}": single[f"b{batch}"] for batch in batches}
    return result


def run_phase(args, config: str) -> dict:
    env = dict(os.environ)
    if args.transport == "shm":  # CPU smoke test: two host devices for expert_parallel
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    else:
        env["CUDA_VISIBLE_DEVICES"] = "0,1" if config == "expert_parallel" else "0"
    return run_in_process(
        [__file__, "--phase", config, "--dir", args.dir, "--batches", args.batches, "--steps", str(args.steps),
         "--transport", args.transport, "--dispatch-dtype", args.dispatch_dtype, "--workdir", args.workdir],
        name=config, raw=args.raw, env=env,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="64,256")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--dir", default="/tmp/w1-qwen3-moe-8l", help="W1 checkpoint (made if missing)")
    parser.add_argument("--dispatch-dtype", default="bfloat16", choices=["float32", "bfloat16", "float8_e4m3fn"])
    parser.add_argument("--transport", default="cuda_ipc", choices=["cuda_ipc", "shm"])
    parser.add_argument("--phase", choices=CONFIGS, help="(internal) run one configuration")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--append", help="results file to append the table to")
    parser.add_argument("--raw", help="JSONL file to append each phase's raw numbers to")
    parser.add_argument("--resume", action="store_true",
                        help="take the configurations --raw already holds from there (a run cut short)")
    parser.add_argument("--commit", help="commit to record (default: git HEAD)")
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args, args.phase)))
        return

    if not os.path.exists(os.path.join(args.dir, "config.json")):
        w1.phase_make(args.dir)
    with tempfile.TemporaryDirectory(prefix="w1-two-gpus-") as workdir:
        args.workdir = workdir
        done = finished_phases(args.raw) if args.resume else {}
        results = {config: done.get(config) or run_phase(args, config) for config in CONFIGS}
    import jax

    device = "CPU (smoke test)" if args.transport == "shm" else f"2 x {jax.devices()[0].device_kind}"
    lines = [
        f"### W1 decode on two GPUs: disaggregated vs expert-parallel vs one GPU "
        f"({datetime.date.today()}, commit {args.commit or git_commit()})",
        "",
        f"Device: {device}; JAX {jax.__version__}; `python bench/w1_two_gpus.py --batches {args.batches} "
        f"--steps {args.steps} --dispatch-dtype {args.dispatch_dtype}`; bfloat16. Disaggregated: client on GPU 0, "
        f"all experts in one server process on GPU 1 ({args.transport}, tokens sent as {args.dispatch_dtype}). "
        f"Grouped matmul: {results['one']['grouped_matmul']}; decode attention: {results['one']['decode_attention']}.",
        "",
        "| batch | 1 GPU step ms | expert-parallel 2 GPUs step ms | disaggregated 2 GPUs step ms | "
        "disaggregated, one micro-batch, step ms | best disaggregated / expert-parallel throughput | "
        "greedy tokens equal to 1 GPU (EP, disagg., one micro-batch; leading equal / generated) |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch in [int(b) for b in args.batches.split(",")]:
        one, ep, dis = (results[c][f"b{batch}"] for c in CONFIGS)
        single = results["disaggregated"]["single"][f"b{batch}"]
        best = min(dis["median"], single["median"])
        lines.append(
            f"| {batch} | {w1.step_ms(one)} | {w1.step_ms(ep)} | {w1.step_ms(dis)} | {w1.step_ms(single)} | "
            f"{ep['median'] / best:.2f} | {w1.tokens_equal(one['tokens0'], ep['tokens0'])}, "
            f"{w1.tokens_equal(one['tokens0'], dis['tokens0'])}, "
            f"{w1.tokens_equal(one['tokens0'], single['tokens0'])} |"
        )
    publish(lines, args.append)


if __name__ == "__main__":
    main()
