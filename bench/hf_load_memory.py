"""Peak host memory of loading a sharded HF safetensors checkpoint, against
transformers' `from_pretrained` of the same directory (the peer), each in a
fresh process.

    python bench/hf_load_memory.py [--dir DIR] [--shard-mb 64] [--append bench/RESULTS.md]

A random Qwen3-MoE model (~150M parameters, bfloat16 on disk) is written with
`save_pretrained` in shards of `--shard-mb` (unless --dir already holds one).
Each loader runs in its own process; the figure is its peak resident set
(VmHWM, which unlike ru_maxrss does not inherit the parent's peak) minus the resident set just before loading (after imports and
backend start-up), so it counts the parameters, any host copies and the
mapped shard pages. "beyond params" is that minus the loaded parameters'
bytes: the issue's target is about one shard.
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

from _results import REPO, git_commit, publish

_MEASURE = r"""
import json, sys
sys.path.insert(0, {repo!r})
kind, directory, dtype = sys.argv[1:4]

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

if kind == "eaas":
    import jax, jax.numpy as jnp
    from eaas_jax.checkpoint import load_model, flat_params
    jax.numpy.zeros(1).block_until_ready()  # start the backend first
    before = status_mb("VmRSS")
    model = load_model(directory, dtype=jnp.dtype(dtype))
    params = sum(v.nbytes for v in flat_params(model).values())
else:
    import torch, transformers
    before = status_mb("VmRSS")
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
peak = status_mb("VmHWM")
print(json.dumps({{"before_mb": before, "peak_mb": peak, "params_mb": params / 2**20}}))
"""


def make_checkpoint(directory: str, shard_mb: int) -> None:
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(
        "qwen3_moe", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=32,
        num_experts_per_tok=4, moe_intermediate_size=512, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size=f"{shard_mb}MB")


def measure(kind: str, directory: str, dtype: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE.format(repo=REPO), kind, directory, dtype],
        capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", help="existing HF directory to load (default: make one)")
    parser.add_argument("--shard-mb", type=int, default=64)
    parser.add_argument("--append", help="results file to append the table to")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.dir or os.path.join(tmp, "qwen3-moe-random")
        if not args.dir:
            make_checkpoint(directory, args.shard_mb)
        shards = [os.path.getsize(os.path.join(directory, f)) / 2**20
                  for f in os.listdir(directory) if f.endswith(".safetensors")]
        rows = []
        for dtype in ("bfloat16", "float32"):
            for kind, label in (("eaas", "eaas-jax load_model"), ("hf", "transformers from_pretrained")):
                r = measure(kind, directory, dtype)
                used = r["peak_mb"] - r["before_mb"]
                rows.append((dtype, label, r["params_mb"], used, used - r["params_mb"]))
    commit = git_commit()
    lines = [
        f"### HF checkpoint load, peak host memory ({datetime.date.today()}, commit {commit})",
        "",
        f"Device: {platform.machine()}, {os.cpu_count()} cores, CPU backend; "
        f"`python bench/hf_load_memory.py --shard-mb {args.shard_mb}`; random Qwen3-MoE, "
        f"{len(shards)} bfloat16 shards, largest {max(shards):.0f} MiB, {sum(shards):.0f} MiB in all.",
        "",
        "| load dtype | loader | params MiB | peak RSS growth MiB | beyond params MiB | beyond params / largest shard |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, label, params, used, beyond in rows:
        lines.append(f"| {dtype} | {label} | {params:.0f} | {used:.0f} | {beyond:.0f} | {beyond / max(shards):.2f} |")
    publish(lines, args.append)


if __name__ == "__main__":
    main()
