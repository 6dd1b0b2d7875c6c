"""The JAX peer of the W1 decode benchmark: jax-ml/jax-llm-examples' Qwen3
(a plain jitted decode step: dense KV cache, its MoE on `lax.ragged_dot`,
greedy argmax in the step) on the same HF directory, the same prompts and
the same device.

Nothing of it is vendored: `--jax-peer DIR` names the `qwen3` directory of
a jax-llm-examples checkout (Apache-2.0), whose commit the results name
(DIR/../COMMIT, or its git HEAD). Its settings here: bfloat16 weights, an
unquantized KV cache (its default is int8), its non-TPU kernels (none of
its Pallas kernels runs on GPUs), a one-device mesh; one helper of its
replaced (`segment_ids_to_positions`, below) to run under JAX 0.11.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import subprocess
import sys
import time


def peer_commit(peer_dir: str) -> str:
    """The jax-llm-examples commit of `peer_dir` (its qwen3 directory)."""
    pinned = os.path.join(os.path.dirname(os.path.abspath(peer_dir)), "COMMIT")
    if os.path.exists(pinned):
        with open(pinned) as f:
            return f.read().strip()[:12]
    return subprocess.run(["git", "-C", peer_dir, "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "unknown"


def segment_ids_to_positions(segment_ids):
    """The peer's `segment_ids_to_positions` for the segment ids it makes:
    per row, one run of ones and one of padding zeros, before or after it,
    so a token's index within its run is how many tokens of its id precede
    it. Under JAX 0.11 the peer's own (an `associative_scan` over the ids
    and `zeros_like` of them) raises "All operands should have the same
    sharding" on its explicit-axes mesh, and so did a version that
    concatenated slices of the ids; this one uses only elementwise ops and
    cumulative sums along the row, which keep their input's sharding. It
    costs nothing in a decode step either way (one [batch, 1] row)."""
    import jax.numpy as jnp

    real = segment_ids != 0
    counts = jnp.where(real, jnp.cumsum(real, axis=-1), jnp.cumsum(~real, axis=-1))
    return (counts - 1).astype(jnp.int32)


# Prompt tokens the peer prefills in one call (see Peer._prefill).
PREFILL_TOKENS = 2048


class Peer:
    """The peer's model loaded from HF `directory`, for sequences of up to
    `max_seq_len` tokens (its dense KV cache's length: each decode step
    attends over all of it)."""

    def __init__(self, peer_dir: str, directory: str, max_seq_len: int):
        import jax
        import jax.numpy as jnp
        from jax.sharding import AxisType

        sys.path.insert(0, peer_dir)
        from qwen3_jax import chkpt_utils, model as q3
        from safetensors.torch import load_file

        q3.segment_ids_to_positions = segment_ids_to_positions

        with open(os.path.join(directory, "config.json")) as f:
            hf = json.load(f)
        self.q3 = q3
        self.mesh = jax.make_mesh((1, 1, 1), ("x", "y", "z"), axis_types=(AxisType.Explicit,) * 3,
                                  devices=jax.devices()[:1])
        # transformers 5 writes num_local_experts and rope_parameters, which its config reader misses
        rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
        self.cfg = dataclasses.replace(
            q3.hf_to_jax_config(hf), moe_num_experts=hf.get("num_experts") or hf.get("num_local_experts"),
            rope_theta=rope, tie_embed=bool(hf.get("tie_word_embeddings")), mesh=self.mesh,
            max_seq_len=max_seq_len, quant_cache=False, dtype=jnp.bfloat16)
        state = {}
        for path in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            state.update(load_file(path))
        abstract = q3.Weights.abstract(self.cfg)
        weights = chkpt_utils.convert_model_or_layer(abstract, state, self.cfg, sequential=False)
        del state
        self.weights = jax.tree.map(lambda w, a, s: jax.device_put(w.astype(a.dtype), s), weights, abstract,
                                    q3.Weights.shardings(self.cfg), is_leaf=q3.is_param)

    def _prefill(self, prompts: list[list[int]]):
        """The peer's prefill of `prompts` (equal lengths), PREFILL_TOKENS of
        prompt at a time, each part into a KV cache of its own, the caches
        then joined along the batch: (its greedy tokens [batch, length],
        the cache). In parts because the peer's `lax.ragged_dot` compiles on
        GPUs under JAX 0.11 to a dense masked product over every expert:
        256 prompts of 128 tokens asked 48 GiB of an H100 at once."""
        import jax
        import jax.numpy as jnp
        import numpy as np

        q3, cfg = self.q3, self.cfg
        assert not cfg.quant_cache, "the parts' caches are joined as plain arrays"
        rows = max(1, PREFILL_TOKENS // len(prompts[0]))
        firsts, caches = [], []
        for start in range(0, len(prompts), rows):
            part = prompts[start:start + rows]
            cache = q3.KVCache.init(jax.random.key(0), cfg, len(part), cfg.max_seq_len)
            # pad_id -1: no prompt token counts as padding (random ids may hit the peer's PAD_ID)
            first, _, cache = q3.prefill(jnp.asarray(np.array(part, np.int32)), self.weights, cache, cfg, pad_id=-1)
            firsts.append(np.asarray(first))
            caches.append(cache)
        if len(caches) == 1:
            return firsts[0], caches[0]
        joined = dataclasses.replace(  # (equal lengths: every part's `iter` is the same)
            caches[0], k=[jnp.concatenate(layer) for layer in zip(*(c.k for c in caches))],
            v=[jnp.concatenate(layer) for layer in zip(*(c.v for c in caches))],
            starts=jnp.concatenate([c.starts for c in caches]))
        return np.concatenate(firsts), joined

    def time_decode(self, prompts: list[list[int]], steps: int) -> dict:
        """Prefill `prompts` (equal lengths), then `steps` greedy decode steps
        timed as the engine's are: host wall clock between token arrivals,
        the next step already queued on the device. Returns w1_decode_gpu's
        time_decode fields."""
        import statistics

        import jax
        import jax.numpy as jnp
        import numpy as np

        q3, cfg, weights, length = self.q3, self.cfg, self.weights, len(prompts[0])
        step = q3.decode_step
        compiled = getattr(step, "_cache_size", lambda: 0)
        with jax.sharding.set_mesh(self.mesh):
            first, cache = self._prefill(prompts)
            current = jnp.asarray(first[:, length - 1:length])
            tokens = [np.asarray(current)[:, 0]]
            for _ in range(2):  # compiles the decode step
                current, cache = step(current, weights, cache, cfg)
                tokens.append(np.asarray(current)[:, 0])
            programs = compiled()
            pending, cache = step(current, weights, cache, cfg)
            times, last = [], time.perf_counter()
            for _ in range(steps):
                following, cache = step(pending, weights, cache, cfg)  # queued behind `pending`
                tokens.append(np.asarray(pending)[:, 0])
                now = time.perf_counter()
                times.append(now - last)
                last, pending = now, following
            compiling = compiled() - programs
        times = times[1:]  # the first interval began before the queue was full
        return {"median": statistics.median(times), "min": min(times), "max": max(times),
                "compiling_steps": compiling, "tokens0": [int(t[0]) for t in tokens[:32]]}
