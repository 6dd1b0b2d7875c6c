"""Where the disaggregated W1 decode step's time goes: the embedded engine's
step, the attention client's step and the expert server's rounds, each traced
with the JAX profiler on the same GPU(s) in one run, their kernels summed by
name.

    python bench/disaggregated_profile.py [--dir /tmp/w1-qwen3-moe-8l] [--batch 64] [--steps 16]
        [--transport cuda_ipc] [--server-gpu 0] [--append bench/RESULTS.md]
    python bench/disaggregated_profile.py --dir checkpoints/tiny-moe --batch 4 --transport shm  # a CPU check

The client's transport kernels wait on the GPU for the server's replies, so
their time in the client's profile is the exchange as the client sees it;
the server's profile (EAAS_JAX_PROFILE_DIR, its whole serve loop: prefill and
decode rounds alike) says what a round costs there, its poll kernel
included (a poll waits on the GPU for requests to arrive). One server holds
every expert. With --server-gpu 0 it shares the client's GPU: run it under an
MPS daemon, else the two processes take turns in the driver's time slices.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile

from _results import REPO, append_rows, git_commit, mps_running, publish, run_phase
import ibgda_gpu
import w1_decode_gpu as w1

SETTINGS = ("embedded", "disaggregated")


def phase(args) -> dict:
    """One setting in this process: its decode step timed, then profiled;
    the server's rounds profiled too when it has one."""
    sys.path.insert(0, REPO)
    from eaas_jax.control_plane.cluster import LocalCluster
    from eaas_jax.engine import Engine

    engine_args = w1.engine_options(args.batch, args.steps)

    def measure(**extra) -> dict:
        with Engine(args.dir, **engine_args, **extra) as engine:
            step = w1.time_decode(engine, args.batch, args.steps)
            return {"step": step, "profile": w1.profile_decode(engine, args.batch, args.steps)}

    if args.phase == "embedded":
        return measure()
    profiles = os.path.join(args.workdir, "server-profiles")
    os.environ["EAAS_JAX_PROFILE_DIR"] = profiles  # read by the servers the cluster starts
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # client and server may share the GPU
    path = ibgda_gpu.deployment_file(args.workdir, args.transport, "bfloat16", capacity=args.batch,
                                     device=args.server_gpu)
    with LocalCluster(args.dir, path, dtype="bfloat16") as cluster:
        result = measure(deployment=cluster)
        # its trace is written as it stops, which takes longer than the
        # cluster's own stop waits for
        cluster.stop_server("experts", timeout=600)
    return {**result, "server": server_rounds(profiles)}


def server_rounds(profiles: str) -> dict:
    """The server's kernels over its whole trace, and its rounds: the calls
    of its poll kernel (one a round)."""
    summary = w1.device_kernel_times(profiles, 1, top=25)
    rounds = max((k["calls_per_step"] for k in summary["top"] if "Poll" in k["name"]), default=0)
    return {**summary, "rounds": rounds}


def server_lines(server: dict, top: int = 12) -> list[str]:
    rounds = server["rounds"] or 1
    return [
        f"Expert server, its whole serve loop: {server['rounds']:.0f} rounds (prefill and decode), "
        f"{server['device_us_per_step'] / rounds:.0f} µs of kernels a round.",
        "",
        "| kernel | µs per round | calls per round |",
        "|---|---|---|",
        *(f"| `{k['name']}` | {k['us_per_step'] / rounds:.1f} | {k['calls_per_step'] / rounds:.1f} |"
          for k in server["top"][:top]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default="/tmp/w1-qwen3-moe-8l", help="W1 checkpoint (made if missing)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--transport", default="cuda_ipc", choices=["cuda_ipc", "ibgda", "shm"])
    parser.add_argument("--server-gpu", type=int, default=0, help="the server's GPU (0: the client's)")
    parser.add_argument("--append", help="results file to append to (rows: bench/results/disaggregated_profile.jsonl)")
    parser.add_argument("--phase", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args)))
        return
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        w1.phase_make(args.dir)
    command = (f"python bench/disaggregated_profile.py --batch {args.batch} --steps {args.steps} "
               f"--transport {args.transport} --server-gpu {args.server_gpu}")
    runs = {}
    with tempfile.TemporaryDirectory(prefix="disaggregated-profile-") as workdir:
        for name in SETTINGS:
            runs[name] = run_phase([__file__, "--phase", name, "--dir", args.dir, "--batch", str(args.batch),
                                    "--steps", str(args.steps), "--transport", args.transport,
                                    "--server-gpu", str(args.server_gpu), "--workdir", workdir], name=name)
    import jax

    device = jax.devices()[0].device_kind
    embedded, disaggregated = runs["embedded"], runs["disaggregated"]
    lines = [
        f"### Disaggregated W1 decode step, profiled ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {device} (MPS daemon: {'yes' if mps_running() else 'no'}); `{command}`; bfloat16; "
        f"one expert server holding every expert, on GPU {args.server_gpu}, the client on GPU 0.",
        "",
        "| setting | step ms median (min-max) | kernels µs per step | kernels per step |",
        "|---|---|---|---|",
        *(f"| {label} | {w1.step_ms(run['step'])} | {run['profile']['device_us_per_step']:.0f} | "
          f"{run['profile']['kernels_per_step']:.0f} |"
          for label, run in (("embedded", embedded), (f"attention client ({args.transport})", disaggregated))),
        "",
        *w1.profile_lines("Embedded", embedded["profile"]),
        "",
        *w1.profile_lines(f"Attention client ({args.transport})", disaggregated["profile"]),
        "",
        *server_lines(disaggregated["server"]),
        "",
    ]
    publish(lines, args.append)
    if args.append:
        ratio = disaggregated["step"]["median"] / embedded["step"]["median"]
        append_rows(os.path.join(REPO, "bench", "results", "disaggregated_profile.jsonl"), [dict(
            metric=f"w1_decode_step_disaggregated_{args.transport}", batch=args.batch,
            value=disaggregated["step"]["median"] * 1e3, unit="ms", peer="embedded",
            peer_value=embedded["step"]["median"] * 1e3, ratio=ratio, server_gpu=args.server_gpu,
            server_rounds=disaggregated["server"]["rounds"], device=device, date=str(datetime.date.today()),
            commit=git_commit(), command=command)])


if __name__ == "__main__":
    main()
