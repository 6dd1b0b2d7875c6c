"""The monolithic expert-parallel engine (experts sharded over local devices)
against the one-device engine. On the CPU, conftest gives JAX two devices."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.engine import Engine, SamplingParams
from eaas_jax.engine.expert_parallel import ExpertParallelExperts, expert_mesh
from eaas_jax.engine.runner import StepRows
from eaas_jax.model.transformer import ExpertStack

from conftest import TINY_CONFIG, replace_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices")

ENGINE_ARGS = dict(max_num_seqs=8, max_model_len=128, dtype="float32", block_size=4)


@pytest.fixture(scope="module")
def parallel_engine(tiny_checkpoint):
    return Engine(tiny_checkpoint, expert_parallel=2, **ENGINE_ARGS)


def test_each_device_holds_its_share_of_the_experts(parallel_engine):
    for leaf in jax.tree.leaves(parallel_engine.runner.experts.arrays):
        shards = leaf.addressable_shards
        assert len(shards) == 2
        assert shards[0].data.shape[0] == TINY_CONFIG.num_experts // 2
        assert not np.array_equal(np.asarray(shards[0].data), np.asarray(shards[1].data))


def test_the_step_sums_the_devices_partial_outputs_with_an_all_reduce(parallel_engine):
    sampling = [dict(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stream=0, step=0, banned=[])] * 2
    hlo = parallel_engine.runner.lower(StepRows([[5]] * 2, [3] * 2, [[0]] * 2, sampling)).compile().as_text()
    # one all-reduce per MoE layer (2 of TINY_CONFIG's 3 layers)
    assert hlo.count("all-reduce(") + hlo.count("all-reduce-start(") >= 2


def test_greedy_and_seeded_outputs_equal_the_one_device_engine(parallel_engine, tiny_engine):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(1, 4096, size=int(rng.integers(2, 30))).tolist() for _ in range(6)]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True, logprobs=2)
    for params in (greedy, seeded):
        ours = parallel_engine.generate(prompts, params, use_tqdm=False)
        reference = tiny_engine.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in reference]
    np.testing.assert_allclose(
        [o.outputs[0].cumulative_logprob for o in ours],
        [o.outputs[0].cumulative_logprob for o in reference], rtol=1e-4,
    )


def test_bad_expert_parallel_settings_are_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="over 3 devices, but this process sees 2"):
        Engine(tiny_checkpoint, expert_parallel=3, **ENGINE_ARGS)
    with pytest.raises(ValueError, match="a deployment runs them in servers"):
        Engine(tiny_checkpoint, expert_parallel=2, deployment="unused.toml", **ENGINE_ARGS)
    stack = ExpertStack(replace_config(num_experts=3, num_experts_per_tok=1), dtype=jnp.float32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="3 experts do not split evenly over 2 devices"):
        ExpertParallelExperts(stack, expert_mesh(2))


def test_the_expert_kernel_runs_inside_the_expert_parallel_shard_map(tiny_checkpoint, tiny_engine, monkeypatch,
                                                                    fresh_expert_traces):
    """Guards the shard_map around each device's experts against the Pallas
    expert kernel (the gathered path's projection on GPUs, interpreted here):
    a pallas_call's output type names no mesh axes it varies over, which
    shard_map's default check refuses."""
    from eaas_jax.kernels import expert_matvec as em
    from eaas_jax.model import moe

    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in tiny_engine.generate(prompts, params, use_tqdm=False)]
    kernel_calls = []

    kernel = em.differentiable_kernel
    monkeypatch.setattr(em, "differentiable_kernel", lambda *a: kernel_calls.append(a[3:5]) or kernel(*a))
    monkeypatch.setattr(moe, "expert_matvecs", functools.partial(em.expert_matvecs, interpret=True))
    monkeypatch.setattr(moe, "expert_matvec", functools.partial(em.expert_matvec, interpret=True))
    monkeypatch.setenv("EAAS_JAX_GATHERED_EXPERTS", "on")  # decode's 4 slots: each device's 4 experts gathered
    engine = Engine(tiny_checkpoint, expert_parallel=2, **ENGINE_ARGS)
    ours = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert kernel_calls
    assert ours == reference
