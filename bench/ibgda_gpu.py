"""The `ibgda` transport on a GPU (the kernels write the WQEs and ring the
model NIC's doorbell) against `cuda_ipc`, in the same run on the same GPU:

* the round trip of one dispatch + combine (`token_exchange_gpu.py`'s client
  and server roles, one process each), per transport;
* the W1 decode step of the disaggregated engine (attention client plus one
  expert-server process holding every expert), per transport, with the
  embedded engine on the same GPU beside them; greedy tokens compared.

    python bench/ibgda_gpu.py [--tokens 16,64,256] [--batches 64] [--steps 16] [--append bench/RESULTS.md]
                              [--raw phases.jsonl [--resume]]

One GPU: the client and server processes share it, side by side when an MPS
daemon runs (the table says whether one did), else time-sliced by the
driver. What `ibgda` means here is the model NIC: a CPU thread in each
process that looks at its doorbell records every 50 us and carries the bytes
over TCP on loopback, with the queues, staging slots and inboxes in host
memory mapped into the GPU. The ratio to cuda_ipc is thus the cost of that
NIC, not of an mlx5 one. With `--append`, rows also go to
bench/results/ibgda_gpu.jsonl. `--raw` keeps each part's numbers as it
finishes; with `--resume` a second run takes those from there (a device call
cut short).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

from _results import REPO, append_rows, finished_phases, git_commit, mps_running, publish, run_phase
import token_exchange_gpu as exchange
import w1_decode_gpu as w1

TRANSPORTS = ("cuda_ipc", "ibgda")
PHASES = ("one", *TRANSPORTS)


def deployment_file(directory: str, transport: str, dispatch_dtype: str, capacity: int, device: int = 0) -> str:
    """Every expert in one server process, on GPU `device` (0: the client's;
    shm: on the CPU)."""
    path = os.path.join(directory, f"w1-{transport}.toml")
    with open(path, "w") as f:
        f.write(f'name = "w1{transport.replace("_", "")}"\ntransport = "{transport}"\ncapacity = {capacity}\n'
                f'timeout_ms = 120000\ndispatch_dtype = "{dispatch_dtype}"\n'
                + ('nic = "model"\n' if transport == "ibgda" else "")
                + '[[servers]]\nname = "experts"\n' + (f'device = {device}\n' if transport != "shm" else ""))
    return path


def phase(args) -> dict:
    """One W1 configuration in this process: `one` (embedded) or a transport."""
    sys.path.insert(0, REPO)
    from eaas_jax.control_plane.cluster import LocalCluster
    from eaas_jax.engine import Engine

    batches = [int(b) for b in args.batches.split(",")]
    engine_args = w1.engine_options(max(batches), args.steps)

    def measure(**extra) -> dict:
        with Engine(args.dir, **engine_args, **extra) as engine:
            return {f"b{batch}": w1.time_decode(engine, batch, args.steps) for batch in batches}

    if args.phase == "one":
        return measure()
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # client and server share the GPU
    path = deployment_file(args.workdir, args.phase, args.dispatch_dtype, capacity=max(batches))
    with LocalCluster(args.dir, path, dtype="bfloat16") as cluster:
        return measure(deployment=cluster)


def round_trips(args, transport: str) -> dict:
    """token_exchange_gpu.py's server and client, both on GPU 0."""
    targs = SimpleNamespace(tokens=args.tokens, dtype=args.dispatch_dtype, iters=args.iters, calls=args.calls,
                            timeout_s=5, transport=transport)
    server = exchange.run("server", targs, "0")
    try:
        if server.stdout.readline().strip() != "ready":
            raise SystemExit(f"{transport} exchange server did not start; its stderr is above")
        client = exchange.last_json(exchange.run("client", targs, "0"), f"{transport} exchange client")
        served = exchange.last_json(server, f"{transport} exchange server", timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    return {"us": {int(t): v for t, v in client["client_us"].items()},
            "failures": sum(client["failures"].values()),
            "drops": {k: v for side in (client["client"], served["server"]) for k, v in side.items()
                      if v and (k.startswith("drop_") or k in ("timeouts", "torn_reads"))}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="16,64,256")
    parser.add_argument("--iters", type=int, default=32, help="round trips per compiled call")
    parser.add_argument("--calls", type=int, default=10, help="timed calls per size")
    parser.add_argument("--batches", default="64")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--dir", default="/tmp/w1-qwen3-moe-8l", help="W1 checkpoint (made if missing)")
    parser.add_argument("--dispatch-dtype", default="bfloat16", choices=["float32", "bfloat16", "float8_e4m3fn"])
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--append", help="results file to append the table to (rows: bench/results/ibgda_gpu.jsonl)")
    parser.add_argument("--raw", help="JSONL file to append each part's raw numbers to")
    parser.add_argument("--resume", action="store_true", help="take the parts --raw already holds from there")
    parser.add_argument("--commit", help="commit to record (default: git HEAD)")
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args)))
        return

    command = (f"python bench/ibgda_gpu.py --tokens {args.tokens} --batches {args.batches} --steps {args.steps} "
               f"--dispatch-dtype {args.dispatch_dtype}")
    mps = mps_running()
    done = finished_phases(args.raw) if args.resume else {}
    exchanges = {}
    for transport in TRANSPORTS:
        name = f"exchange_{transport}"
        if name in done:
            exchanges[transport] = {**done[name], "us": {int(t): v for t, v in done[name]["us"].items()}}
            continue
        start = time.time()
        exchanges[transport] = round_trips(args, transport)
        print(f"{transport} round trips: {exchanges[transport]} ({time.time() - start:.0f} s)", file=sys.stderr,
              flush=True)
        if args.raw:
            with open(args.raw, "a") as f:
                f.write(json.dumps({"phase": name, **exchanges[transport]}) + "\n")
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        w1.phase_make(args.dir)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0")
    steps = {}
    with tempfile.TemporaryDirectory(prefix="ibgda-gpu-") as workdir:
        for name in PHASES:
            steps[name] = done.get(name) or run_phase(
                [__file__, "--phase", name, "--dir", args.dir, "--batches", args.batches, "--steps",
                 str(args.steps), "--dispatch-dtype", args.dispatch_dtype, "--workdir", workdir],
                name=name, raw=args.raw, env=env)
    import jax

    device = jax.devices()[0].device_kind
    commit = args.commit or git_commit()
    tokens = [int(t) for t in args.tokens.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    lines = [
        f"### ibgda on a GPU (GPU-posted WQEs, model NIC) vs cuda_ipc ({datetime.date.today()}, commit {commit})",
        "",
        f"Device: 1 x {device}; JAX {jax.__version__}; `{command}`. Client and server processes on the one GPU "
        f"({'side by side under MPS' if mps else 'time-sliced by the driver: no MPS daemon'}). ibgda: the kernels "
        "write the mlx5 WQEs, the doorbell record and the doorbell, and reclaim from the CQ; the NIC is the model "
        "NIC (a CPU thread polling every 50 us, TCP on loopback; queues, staging and inboxes in host memory mapped "
        "into the GPU), so the ratios price that NIC, not an mlx5 one.",
        "",
        "| tokens | round trip µs, cuda_ipc | round trip µs, ibgda | ibgda / cuda_ipc |",
        "|---|---|---|---|",
        *[f"| {t} | {exchanges['cuda_ipc']['us'][t]:.1f} | {exchanges['ibgda']['us'][t]:.1f} | "
          f"{exchanges['ibgda']['us'][t] / exchanges['cuda_ipc']['us'][t]:.2f} |" for t in tokens],
        "",
        f"Failed round trips: cuda_ipc {exchanges['cuda_ipc']['failures']}, ibgda {exchanges['ibgda']['failures']}; "
        f"nonzero drop/timeout counters: cuda_ipc {exchanges['cuda_ipc']['drops'] or 'none'}, "
        f"ibgda {exchanges['ibgda']['drops'] or 'none'}.",
        "",
        "| batch | W1 step ms, embedded (1 GPU) | disaggregated, cuda_ipc | disaggregated, ibgda | ibgda / cuda_ipc | "
        "greedy tokens equal to embedded (cuda_ipc, ibgda; leading equal / generated, prompt 0) |",
        "|---|---|---|---|---|---|",
    ]
    for b in batches:
        one, cu, ib = (steps[name][f"b{b}"] for name in PHASES)
        lines.append(f"| {b} | {w1.step_ms(one)} | {w1.step_ms(cu)} | {w1.step_ms(ib)} | "
                     f"{ib['median'] / cu['median']:.2f} | {w1.tokens_equal(one['tokens0'], cu['tokens0'])}, "
                     f"{w1.tokens_equal(one['tokens0'], ib['tokens0'])} |")
    publish(lines, args.append)
    if args.append:
        common = dict(device=f"1 x {device}{' (MPS)' if mps else ''}", date=str(datetime.date.today()),
                      commit=commit, command=command)
        rows = [dict(metric="round_trip_ibgda_gpu_model_nic", batch=t, value=exchanges["ibgda"]["us"][t], unit="us",
                     peer="cuda_ipc", peer_value=exchanges["cuda_ipc"]["us"][t],
                     ratio=exchanges["ibgda"]["us"][t] / exchanges["cuda_ipc"]["us"][t], **common) for t in tokens]
        rows += [dict(metric="w1_decode_step_ibgda_gpu_model_nic", batch=b, value=steps["ibgda"][f"b{b}"]["median"] * 1e3,
                      unit="ms", peer="cuda_ipc", peer_value=steps["cuda_ipc"][f"b{b}"]["median"] * 1e3,
                      ratio=steps["ibgda"][f"b{b}"]["median"] / steps["cuda_ipc"][f"b{b}"]["median"], **common)
                 for b in batches]
        append_rows(os.path.join(REPO, "bench", "results", "ibgda_gpu.jsonl"), rows)


if __name__ == "__main__":
    main()
