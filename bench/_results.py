"""What every bench script does with its table: name the commit, print, append."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
    """HEAD's short hash, or $BENCH_COMMIT where the tree was copied without
    its own history (a device machine)."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    return subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def machine() -> str:
    """The GPUs `nvidia-smi` lists ("1 x NVIDIA H200"), else the CPU and its
    cores: for scripts whose own process does not hold the device."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        names = [n.strip() for n in out.stdout.splitlines() if n.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.TimeoutExpired):
        names = []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if names and visible is not None:
        names = names[:len([d for d in visible.split(",") if d.strip()])]
    if names:
        return f"{len(names)} x {names[0]}"
    return f"{platform.machine()}, {os.cpu_count()} cores"


def mps_running() -> bool:
    """Whether a CUDA MPS control daemon serves this user's processes (then
    server processes on one GPU run side by side instead of time-sliced)."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    if not os.path.exists(os.path.join(pipe, "control")):
        return False
    # (a pipe outlives its daemon: the daemon's process too, as device_run.sh asks)
    return subprocess.run(["pgrep", "-f", "^nvidia-cuda-mps-control"], capture_output=True).returncode == 0


def jax_device() -> str:
    """This process's first JAX device: its kind ("NVIDIA H100 80GB HBM3"),
    or the CPU and its cores."""
    import jax

    device = jax.devices()[0]
    return (f"{platform.machine()}, {os.cpu_count()} cores (CPU)" if device.platform == "cpu"
            else device.device_kind)


def median_seconds(fn, args, iters: int) -> float:
    """Median wall time of `iters` calls of the jitted `fn(*args)`, each waited
    for, after one warm-up call."""
    import time

    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run_phase(command: list[str], *, name: str, raw: str | None = None, env: dict | None = None) -> dict:
    """Runs one phase of a bench in its own process (each gets the devices to
    itself); its result is the JSON object on its last stdout line. With
    `raw`, the result is also appended there, so a later phase failing does
    not lose it. The phase's wall time is logged, and kept in the raw record
    as "phase_seconds" (what plans a device call's parts)."""
    start = time.monotonic()
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
    seconds = time.monotonic() - start
    sys.stderr.write(out.stderr[-3000:])
    print(f"phase {name}: {seconds:.0f} s", file=sys.stderr)
    if out.returncode:
        raise SystemExit(f"phase {name} failed ({out.returncode})")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if raw:
        with open(raw, "a") as f:
            f.write(json.dumps({"phase": name, "phase_seconds": round(seconds, 1), **result}) + "\n")
    return result


def finished_phases(raw: str | None) -> dict[str, dict]:
    """Results of the phases a `raw` file already holds (the last of each
    name): what a run that was cut short left, for `--resume`."""
    if not raw or not os.path.exists(raw):
        return {}
    with open(raw) as f:
        return {r["phase"]: r for r in map(json.loads, filter(str.strip, f))}


def run_facts(device: str, unit: str) -> dict:
    """The fields every row of this run shares: unit, device, date, commit,
    and the command as it was typed."""
    import datetime

    return dict(unit=unit, device=device, date=str(datetime.date.today()), commit=git_commit(),
                command=f"python bench/{os.path.basename(sys.argv[0])} " + " ".join(sys.argv[1:]))


def append_rows(path: str, rows: list[dict]) -> None:
    """Appends machine-readable rows (metric, batch, value, unit, peer,
    peer_value, ratio, device, date, commit, command) to `path`
    (bench/results/<name>.jsonl), one JSON object a line."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def publish(lines: list[str], append_to: str | None) -> None:
    """Prints the table and appends it to `append_to` (bench/RESULTS.md) if given."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if append_to:
        with open(append_to, "a") as f:
            f.write("\n" + text)
