"""The MoE layer against a per-token NumPy reference; grouped matmul against lax.ragged_dot."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eaas_jax.kernels import grouped_matmul as grouped_matmul_module
from eaas_jax.kernels.grouped_matmul import grouped_matmul, tiled_grouped_matmul, tokamax_grouped_matmul
from eaas_jax.model import moe
from eaas_jax.model.moe import ExpertBank

from conftest import TINY_CONFIG, tiny_model


def _silu(x):
    return x / (1 + np.exp(-x))


def _reference_moe_block(layer, bank, h):
    """Router + top-k experts + gated shared expert, one token at a time."""
    w_router = np.asarray(layer.router.gate.kernel.get_value())
    gate, up, down = (np.asarray(p.get_value()) for p in (bank.gate_proj, bank.up_proj, bank.down_proj))
    shared = layer.shared_expert
    s_gate, s_up, s_down = (
        np.asarray(getattr(shared.mlp, n).kernel.get_value()) for n in ("gate_proj", "up_proj", "down_proj")
    )
    s_w = np.asarray(shared.gate.kernel.get_value())
    k = TINY_CONFIG.num_experts_per_tok
    out = np.zeros_like(h)
    for n, x in enumerate(h):
        logits = x @ w_router
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:k]
        weights = probs[top] / probs[top].sum()
        for e, w in zip(top, weights):
            out[n] += w * ((_silu(x @ gate[e]) * (x @ up[e])) @ down[e])
        shared_out = (_silu(x @ s_gate) * (x @ s_up)) @ s_down
        out[n] += shared_out / (1 + np.exp(-(x @ s_w)))
    return out


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_bfloat16_router_scores_are_float32_sums_of_exact_products(monkeypatch, kernel_switch, backend):
    """The router's logits: a bfloat16 model's products (exact in float32)
    summed in float32, one row padded to a GEMM's on GPUs like any projection
    (layers.Linear) rather than a float32 copy of inputs and weights."""
    from eaas_jax.model.layers import GEMM_ROWS

    config = TINY_CONFIG
    router = moe.Router(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, config.hidden_size), jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    # XLA's softmax and top k after the logits: the router's kernel, a GPU's
    # default, does not run on a CPU that poses as one
    kernel_switch("EAAS_JAX_ROUTER", "xla")
    (dot,) = [e for e in jax.make_jaxpr(lambda x: router(x).probs)(x).eqns if e.primitive.name == "dot_general"]
    assert dot.invars[0].aval.dtype == jnp.bfloat16 and dot.params["preferred_element_type"] == jnp.float32
    assert dot.invars[0].aval.shape[0] == (GEMM_ROWS if backend == "gpu" else 1)
    w = np.asarray(router.gate.kernel.get_value(), np.float32)
    expected = np.asarray(x, np.float32).astype(np.float64) @ w.astype(np.float64)
    probs = np.exp(expected - expected.max())
    np.testing.assert_allclose(np.asarray(router(x).probs), probs / probs.sum(), rtol=1e-5, atol=1e-7)


def test_moe_layer_matches_per_token_numpy_reference():
    model = tiny_model(seed=3)
    layer = model.client.layers[TINY_CONFIG.first_k_dense]
    bank = model.experts.banks[0]
    h = np.random.default_rng(0).standard_normal((37, TINY_CONFIG.hidden_size)).astype(np.float32)

    @nnx.jit
    def moe_block(layer, bank, h):
        routing = layer.router(h)
        return bank(h, routing.expert_ids, routing.weights) + layer.shared_expert(h), routing

    got, routing = moe_block(layer, bank, jnp.asarray(h))
    assert len(np.unique(np.asarray(routing.expert_ids))) > 4  # the test exercises many experts
    np.testing.assert_allclose(np.asarray(got), _reference_moe_block(layer, bank, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 2])
def test_decode_sized_moe_layers_match_the_per_token_reference_on_the_gathered_path(num_tokens):
    """A token or two route to fewer slots than the bank has experts: the
    gathered path, against the same NumPy reference."""
    model = tiny_model(seed=4)
    layer = model.client.layers[TINY_CONFIG.first_k_dense]
    bank = model.experts.banks[0]
    assert moe.uses_gathered_experts(num_tokens * TINY_CONFIG.num_experts_per_tok, TINY_CONFIG.num_experts)
    h = np.random.default_rng(num_tokens).standard_normal((num_tokens, TINY_CONFIG.hidden_size)).astype(np.float32)

    @nnx.jit
    def moe_block(layer, bank, h):
        routing = layer.router(h)
        return bank(h, routing.expert_ids, routing.weights) + layer.shared_expert(h)

    np.testing.assert_allclose(np.asarray(moe_block(layer, bank, jnp.asarray(h))),
                               _reference_moe_block(layer, bank, h), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("num_tokens, top_k, num_experts", [(1, 8, 128), (3, 2, 16), (4, 4, 8)])
def test_the_gathered_and_grouped_expert_paths_agree(num_tokens, top_k, num_experts, dtype, tolerance):
    """Guards the gathered path against the grouped one, with repeated
    experts, ids the bank does not host (skipped) and gate weights."""
    keys = jax.random.split(jax.random.key(num_experts + top_k), 5)
    dim, hidden = 64, 32  # sizes the GPU's expert kernel tiles (expert_matvec.kernel_plan)
    x = jax.random.normal(keys[0], (num_tokens, dim), dtype)
    ids = jax.random.randint(keys[1], (num_tokens, top_k), -2, num_experts + 2)
    ids = ids.at[0, :2].set(1)  # one expert twice for one token
    weights = jax.random.uniform(keys[2], (num_tokens, top_k))
    gate, up = (jax.random.normal(k, (num_experts, dim, hidden), dtype) / 8 for k in keys[3:5])  # products ~1
    down = jax.random.normal(keys[4], (num_experts, hidden, dim), dtype) / 4
    args = (x, ids, weights, gate, up, down)
    gathered = np.asarray(jax.jit(moe._gathered_experts)(*args))
    grouped = np.asarray(jax.jit(moe._grouped_experts)(*args))
    np.testing.assert_allclose(gathered, grouped, rtol=tolerance, atol=tolerance)
    assert np.abs(grouped).max() > 0.1  # not all skipped
    masked = np.asarray(jax.jit(moe._gathered_experts)(
        x, jnp.where((ids >= 0) & (ids < num_experts), ids, -1), weights, gate, up, down))
    np.testing.assert_allclose(gathered, masked, rtol=tolerance, atol=tolerance)  # out-of-bank ids: skipped


def test_the_gathered_path_has_the_grouped_paths_gradients_and_takes_no_tokens():
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(keys[0], (2, 8))
    ids = jnp.array([[0, 3], [5, 9]], jnp.int32)  # 9: not hosted
    weights = jnp.array([[0.6, 0.4], [0.7, 0.3]])
    gate, up = (jax.random.normal(k, (6, 8, 12)) for k in keys[1:3])
    down = jax.random.normal(keys[3], (6, 12, 8))

    def loss(path):
        return lambda *a: (path(a[0], ids, weights, *a[1:]) ** 2).sum()

    grads = [jax.grad(loss(p), argnums=(0, 1, 2, 3))(x, gate, up, down)
             for p in (moe._gathered_experts, moe._grouped_experts)]
    for ours, theirs in zip(*grads):
        # An absolute bound on the gradient's scale: each element is a float32
        # sum whose terms reach it, and GPU kernels sum them in other orders
        # (an H100 put one of 576 elements 1.6e-5 apart, relative).
        scale = np.abs(np.asarray(theirs)).max()
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6 * scale)
    empty = moe._gathered_experts(x[:0], ids[:0], weights[:0], gate, up, down)
    assert empty.shape == (0, 8)


def test_routed_experts_gathers_only_for_fewer_slots_than_experts(monkeypatch, fresh_expert_traces):
    calls = []
    for name in ("_gathered_experts", "_grouped_experts"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    gate = jnp.ones((16, 4, 6))
    down = jnp.ones((16, 6, 4))
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # the CPU's crossover: half as many slots

    def path(tokens):
        moe.routed_experts(jnp.ones((tokens, 4)), jnp.zeros((tokens, 2), jnp.int32), jnp.ones((tokens, 2)),
                           gate, gate, down)
        return calls[-1]

    assert [path(n) for n in (1, 4, 5)] == ["_gathered_experts", "_gathered_experts", "_grouped_experts"]
    monkeypatch.setenv("EAAS_JAX_GATHERED_EXPERTS", "off")
    assert path(1) == "_grouped_experts"
    monkeypatch.setenv("EAAS_JAX_GATHERED_EXPERTS", "auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # its own measured crossover: as many slots
    assert moe.uses_gathered_experts(128, 128) and not moe.uses_gathered_experts(129, 128)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # unmeasured: grouped unless asked
    assert not moe.uses_gathered_experts(1, 16)
    monkeypatch.setenv("EAAS_JAX_GATHERED_EXPERTS", "on")
    assert moe.uses_gathered_experts(16, 16) and not moe.uses_gathered_experts(17, 16)


def test_expert_bank_skips_ids_it_does_not_host():
    bank = ExpertBank(4, 8, 16, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 8))
    ids = jnp.array([[0, 1], [2, 9], [-1, 3], [4, 4], [1, 2]], jnp.int32)
    w = jnp.full((5, 2), 0.5)
    got = np.asarray(bank(x, ids, w))
    only_valid = np.asarray(bank(x, jnp.where((ids >= 0) & (ids < 4), ids, -1), w))
    np.testing.assert_allclose(got, only_valid)
    np.testing.assert_array_equal(got[3], 0.0)  # both of token 3's experts are foreign
    single = np.asarray(bank(x[1:2], jnp.array([[2, -1]]), jnp.array([[0.5, 0.5]])))
    # 10 slots took the grouped path, these 2 the gathered one (on GPUs
    # different kernels, summing in other orders): near-zero outputs need an
    # absolute bound
    np.testing.assert_allclose(got[1], single[0], rtol=1e-6, atol=1e-6 * np.abs(single).max())


@pytest.mark.parametrize(
    "sizes",
    [[3000, 0, 1000, 5, 1187, 1000, 1000, 1000], [3, 0, 1, 0, 0, 1, 2, 1], [0, 0, 0, 0, 0, 0, 0, 5], [1, 1, 0, 0, 0, 0, 0, 0]],
    ids=["large", "small", "one-group", "rows-past-the-sum"],
)
def test_grouped_matmul_matches_ragged_dot(sizes):
    rows = max(sum(sizes), 16)
    x = jax.random.normal(jax.random.key(0), (rows, 24))
    w = jax.random.normal(jax.random.key(1), (8, 24, 40))
    gs = jnp.asarray(sizes, jnp.int32)
    expected = np.asarray(jax.lax.ragged_dot(x, w, gs))
    np.testing.assert_allclose(np.asarray(jax.jit(tiled_grouped_matmul)(x, w, gs)), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(jax.jit(grouped_matmul)(x, w, gs)), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(tiled_grouped_matmul(x, w, gs))[sum(sizes):], 0.0)


def test_grouped_matmul_gradient_matches_ragged_dot():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    w = jax.random.normal(jax.random.key(1), (4, 8, 8))
    gs = jnp.array([10, 0, 30, 20], jnp.int32)
    ours = jax.grad(lambda x, w: (tiled_grouped_matmul(x, w, gs) ** 2).sum(), argnums=(0, 1))(x, w)
    ref = jax.grad(lambda x, w: (jax.lax.ragged_dot(x, w, gs) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


class _GarbagePastTheSum:
    """Stands in for tokamax: right rows, NaN past the groups (allowed by its contract)."""

    @staticmethod
    def ragged_dot(x, w, sizes):
        out = jax.lax.ragged_dot(x, w, sizes)
        return jnp.where((jnp.arange(x.shape[0]) < sizes.sum())[:, None], out, jnp.nan)


def test_tokamax_wrapper_zeroes_rows_past_the_groups():
    x = jax.random.normal(jax.random.key(0), (16, 8))
    w = jax.random.normal(jax.random.key(1), (4, 8, 8))
    gs = jnp.array([3, 0, 5, 2], jnp.int32)
    out = np.asarray(jax.jit(lambda *a: tokamax_grouped_matmul(_GarbagePastTheSum, *a))(x, w, gs))
    np.testing.assert_allclose(out, np.asarray(jax.lax.ragged_dot(x, w, gs)), rtol=1e-6)
    assert (out[10:] == 0).all()


@pytest.mark.skipif(
    jax.default_backend() != "gpu" or grouped_matmul_module._tokamax() is None,
    reason="tokamax kernels run on GPUs with the optional tokamax package",
)
def test_tokamax_grouped_matmul_equals_ragged_dot_on_gpu():
    sizes = np.random.default_rng(0).multinomial(500, np.ones(16) / 16)
    x = jax.random.normal(jax.random.key(0), (512, 256), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (16, 256, 128), jnp.bfloat16)
    gs = jnp.asarray(sizes, jnp.int32)
    got = np.asarray(jax.jit(grouped_matmul)(x, w, gs), np.float32)
    expected = np.asarray(jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32), np.float32)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
    assert (got[500:] == 0).all()


def test_expert_token_counts_count_each_layers_real_routed_slots_apart():
    """Per layer and expert, the masked-in tokens' slots with an id in the
    bank; ids outside it (negative: skipped; past the bank) count nowhere,
    not in another layer's experts (the layers share one scatter)."""
    rng = np.random.default_rng(0)
    num_experts, tokens, top_k = 6, 5, 3
    ids = [rng.integers(-2, num_experts + 3, size=(tokens, top_k)).astype(np.int32) for _ in range(3)]
    mask = np.array([True, False, True, True, False])
    routings = [moe.Routing(jnp.asarray(i), jnp.ones((tokens, top_k)), jnp.zeros((tokens, num_experts)))
                for i in ids]
    expected = np.zeros((3, num_experts), np.int32)
    for layer, layer_ids in enumerate(ids):
        for expert in layer_ids[mask].reshape(-1):
            if 0 <= expert < num_experts:
                expected[layer, expert] += 1
    got = moe.expert_token_counts(routings, jnp.asarray(mask), num_experts)
    np.testing.assert_array_equal(np.asarray(got), expected)
    assert moe.expert_token_counts([], jnp.asarray(mask), num_experts).shape == (0, num_experts)
