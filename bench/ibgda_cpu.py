"""W0 on the CPU: the ibgda transport (mlx5 work requests executed by the
software NIC, TCP over loopback) against shm (stores into shared memory), in
the same run: the decode step with two expert-server processes, and one
dispatch+combine round trip with one.

    python bench/ibgda_cpu.py [--batch 16] [--steps 40] [--rounds 64] [--append bench/RESULTS.md]

Methods as bench/disaggregated_cpu.py (whose helpers this uses); the greedy
tokens of both transports are checked equal to the embedded engine's. This
measures what the model NIC costs on the host; the GPU-initiated path (a
kernel writing the work requests) needs the device.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import tempfile

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

from _results import append_rows, git_commit, publish  # noqa: E402
from disaggregated_cpu import MODEL, decode_steps, parse_args, round_trip, stats  # noqa: E402
from eaas_jax.control_plane.cluster import LocalCluster  # noqa: E402
from eaas_jax.engine import Engine  # noqa: E402

TWO_SERVERS = '[[servers]]\nname = "even"\nexperts = [0, 2, 4, 6]\n[[servers]]\nname = "odd"\nexperts = [1, 3, 5, 7]\n'
ONE_SERVER = '[[servers]]\nname = "all"\n'


def deployment(directory: str, transport: str, servers: str) -> str:
    path = os.path.join(directory, f"{transport}-{len(servers)}.toml")
    with open(path, "w") as f:
        f.write(f'name = "bench-{transport}"\ntransport = "{transport}"\ncapacity = 256\n' + servers)
    return path


def main() -> None:
    args = parse_args(__doc__)

    engine_args = dict(dtype="float32", max_num_seqs=args.batch, max_model_len=128)
    with Engine(MODEL, **engine_args) as engine:
        times, reference = decode_steps(engine, args.batch, args.steps)
    steps = {"embedded": [t * 1e3 for t in times]}
    exchanges = {}
    with tempfile.TemporaryDirectory() as tmp:
        for transport in ("shm", "ibgda"):
            with LocalCluster(MODEL, deployment(tmp, transport, TWO_SERVERS), dtype="float32") as cluster:
                with Engine(MODEL, deployment=cluster, **engine_args) as engine:
                    times, got = decode_steps(engine, args.batch, args.steps)
                assert got == reference, f"{transport}: greedy tokens differ from the embedded engine's"
                steps[transport] = [t * 1e3 for t in times]
            with LocalCluster(MODEL, deployment(tmp, transport, ONE_SERVER), dtype="float32") as cluster:
                exchanges[transport] = {t: round_trip(cluster, t, args.rounds)[0] for t in (16, 64)}

    base = statistics.median(steps["embedded"])
    lines = [
        f"### W0 ibgda (model NIC) vs shm, CPU ({datetime.date.today()}, commit {git_commit()})",
        "",
        f"Device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; JAX {jax.__version__}; "
        f"`python bench/ibgda_cpu.py --batch {args.batch} --steps {args.steps} --rounds {args.rounds}`; "
        f"shipped checkpoint, float32, {args.batch} sequences decoding, double batching; greedy tokens of both "
        "transports equal to the embedded engine's.",
        "",
        "| experts | decode step ms, median (min-max) | vs embedded | vs shm |",
        "|---|---|---|---|",
        *[f"| {name} | {stats(ms)} | {statistics.median(ms) / base:.2f} | "
          f"{statistics.median(ms) / statistics.median(steps['shm']):.2f} |"
          for name, ms in (("embedded", steps["embedded"]), ("2 servers, shm", steps["shm"]),
                           ("2 servers, ibgda (model NIC)", steps["ibgda"]))],
        "",
        "| tokens | round trip µs, shm (1 server) | round trip µs, ibgda | ibgda / shm |",
        "|---|---|---|---|",
        *[f"| {t} | {exchanges['shm'][t]:.0f} | {exchanges['ibgda'][t]:.0f} | "
          f"{exchanges['ibgda'][t] / exchanges['shm'][t]:.1f} |" for t in (16, 64)],
        "",
    ]
    publish(lines, args.append)
    if args.append:
        common = dict(device=f"{platform.machine()}, {os.cpu_count()} cores (CPU)", date=str(datetime.date.today()),
                      commit=git_commit(), command=f"python bench/ibgda_cpu.py --batch {args.batch} --steps "
                      f"{args.steps} --rounds {args.rounds}")
        shm_step, ib_step = statistics.median(steps["shm"]), statistics.median(steps["ibgda"])
        rows = [dict(metric="w0_decode_step_ibgda_model_nic", batch=args.batch, value=ib_step, unit="ms",
                     peer="shm", peer_value=shm_step, ratio=ib_step / shm_step, **common)]
        rows += [dict(metric="w0_round_trip_ibgda_model_nic", batch=t, value=exchanges["ibgda"][t], unit="us",
                      peer="shm", peer_value=exchanges["shm"][t], ratio=exchanges["ibgda"][t] / exchanges["shm"][t],
                      **common) for t in (16, 64)]
        append_rows(os.path.join(REPO, "bench", "results", "ibgda_cpu.jsonl"), rows)


if __name__ == "__main__":
    main()
