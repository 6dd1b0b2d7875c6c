"""The softmax router's top k: the Pallas kernel (interpreted here) against
XLA's softmax and top_k, ties included; which shapes and settings take it;
the Router's results through it; and its lowering for CUDA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import triton_kernels_lowered_for_cuda
from eaas_jax.kernels import router_top_k as rt


def _logits(rows, experts, seed=0):
    logits = 3 * jax.random.normal(jax.random.key(seed), (rows, experts), jnp.float32)
    # exact ties: row 0 holds one value four times, among its largest; row 1 is all equal
    logits = logits.at[0, jnp.array([1, 3, 6, experts - 1])].set(9.0)
    return logits.at[1].set(0.5)


@pytest.mark.parametrize("rows, experts, k, normalize, scale", [
    (2, 8, 2, True, 1.0), (5, 128, 8, True, 1.0), (3, 64, 8, False, 2.5), (4, 16, 16, False, 1.0)])
def test_the_kernel_chooses_the_experts_and_weights_xla_does_ties_to_the_lower_expert(rows, experts, k,
                                                                                      normalize, scale):
    logits = _logits(rows, experts)
    ids, weights, probs = rt.pallas_softmax_top_k(logits, k, normalize=normalize, scale=scale, interpret=True)
    xla_ids, xla_weights, xla_probs = rt.xla_softmax_top_k(logits, k, normalize=normalize, scale=scale)
    assert ids.dtype == jnp.int32 and ids.shape == (rows, k) and weights.shape == (rows, k)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(xla_ids))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(xla_weights), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(xla_probs), rtol=1e-6)
    # independently of XLA: row 0's tied four first, in expert order; row 1 (all equal) its first k experts
    assert list(np.asarray(ids[0, :min(k, 4)])) == [1, 3, 6, experts - 1][:k]
    assert list(np.asarray(ids[1])) == list(range(k))
    chosen = np.take_along_axis(np.asarray(xla_probs), np.asarray(ids), axis=-1)
    expected = chosen / chosen.sum(-1, keepdims=True) if normalize else chosen
    np.testing.assert_allclose(np.asarray(weights), expected * scale, rtol=1e-6)


def test_softmax_top_k_takes_the_kernel_only_on_gpus_when_switched_on_and_for_shapes_it_takes(monkeypatch,
                                                                                             kernel_switch):
    calls = []
    monkeypatch.setattr(rt, "pallas_softmax_top_k", lambda logits, k, **kw: calls.append(logits.shape) or
                        rt.xla_softmax_top_k(logits, k, normalize=kw["normalize"], scale=kw["scale"]))
    logits = _logits(3, 8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    rt.softmax_top_k(logits, 2, normalize=True, scale=1.0)
    assert calls == [(3, 8)]  # the default: the kernel
    rt.softmax_top_k(logits[:, :6], 2, normalize=True, scale=1.0)  # six experts: XLA's
    assert len(calls) == 1
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    rt.softmax_top_k(logits, 2, normalize=True, scale=1.0)
    assert len(calls) == 1  # not on the CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    kernel_switch("EAAS_JAX_ROUTER", "xla")
    rt.softmax_top_k(logits, 2, normalize=True, scale=1.0)
    assert len(calls) == 1  # switched off: XLA's
    kernel_switch("EAAS_JAX_ROUTER", "kernal")
    with pytest.raises(ValueError, match="'kernel' or 'xla', got 'kernal'"):
        rt.softmax_top_k(logits, 2, normalize=True, scale=1.0)


@pytest.mark.parametrize("experts, k, takes", [(128, 8, True), (8, 2, True), (8, 8, True), (60, 4, False),
                                               (64, 6, False), (4, 8, False)])
def test_the_kernel_takes_power_of_two_experts_and_top_k(experts, k, takes):
    assert rt.kernel_supports(experts, k) is takes


def test_the_router_routes_through_softmax_top_k_and_gives_what_it_did_by_xla(monkeypatch):
    """A softmax router without bias or groups (Mixtral's, Qwen's, OLMoE's)
    through the interpreted kernel: the ids, weights and probabilities of its
    own XLA form, at decode's [B, 1, d] and prefill's [1, T, d]."""
    from flax import nnx

    from eaas_jax.model import moe
    from eaas_jax.model.config import ModelConfig

    config = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                         intermediate_size=48, num_experts=16, num_experts_per_tok=4, moe_intermediate_size=16,
                         norm_topk_prob=True)
    router = moe.Router(config, dtype=jnp.float32, rngs=nnx.Rngs(0))
    for shape in ((3, 1, 32), (1, 7, 32)):
        x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
        reference = router(x)  # on the CPU: XLA's form
        monkeypatch.setattr(moe, "softmax_top_k", lambda *a, **kw: rt.softmax_top_k(*a, **kw, interpret=True))
        ours = router(x)
        monkeypatch.undo()
        assert ours.expert_ids.shape == shape[:2] + (4,) and ours.probs.shape == shape[:2] + (16,)
        np.testing.assert_array_equal(np.asarray(ours.expert_ids), np.asarray(reference.expert_ids))
        np.testing.assert_allclose(np.asarray(ours.weights), np.asarray(reference.weights), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.probs), np.asarray(reference.probs), rtol=1e-6)


@pytest.mark.parametrize("rows, experts, k", [(1, 128, 8), (256, 128, 8), (7, 8, 2), (3, 64, 8)])
def test_the_kernel_lowers_for_cuda_to_one_triton_kernel_a_program_a_row(rows, experts, k):
    (kernel,) = triton_kernels_lowered_for_cuda(
        lambda logits: rt.pallas_softmax_top_k(logits, k, normalize=True, scale=1.0),
        jax.ShapeDtypeStruct((rows, experts), jnp.float32))
    assert re.search(rf"\bgrid_x = {rows}\b", kernel)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the compiled kernel runs on GPUs (bench/device_run.sh gpu_tests)")
@pytest.mark.parametrize("rows, experts, k", [(1, 128, 8), (256, 128, 8), (7, 8, 2)])
def test_the_compiled_kernel_chooses_what_xla_does_on_a_gpu(rows, experts, k):
    logits = _logits(rows, experts, seed=rows)
    ids, weights, probs = jax.jit(lambda x: rt.pallas_softmax_top_k(x, k, normalize=True, scale=1.0))(logits)
    xla_ids, xla_weights, xla_probs = jax.jit(lambda x: rt.xla_softmax_top_k(x, k, normalize=True, scale=1.0))(logits)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(xla_ids))
    np.testing.assert_allclose(np.asarray(weights), np.asarray(xla_weights), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(probs), np.asarray(xla_probs), rtol=1e-6)
