"""A step's host inputs and its results, each packed into one int32 buffer."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.engine import packed


class Pair(NamedTuple):
    ids: np.ndarray
    weights: np.ndarray


def _tree():
    return (
        np.arange(12, dtype=np.int32).reshape(3, 4) - 6,
        Pair(np.array([0, 1, 2**31, 2**32 - 1], np.uint32), np.array([1.5, -np.inf, np.nan, -0.0], np.float32)),
        np.zeros((3, 0), np.int32),  # (no penalized tokens: an empty field)
        np.array([True, False, True]),
    )


def _assert_same(got, tree):
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    for mine, theirs in zip(jax.tree.leaves(got), jax.tree.leaves(tree)):
        mine = np.asarray(mine)
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
        if theirs.dtype == np.bool_:
            np.testing.assert_array_equal(mine, theirs)
        else:  # bit for bit (NaN, -0.0)
            np.testing.assert_array_equal(mine.view(np.int32), theirs.view(np.int32))


def test_host_inputs_come_back_bit_for_bit_on_the_device():
    tree = _tree()
    buffer, layout = packed.pack(tree)
    assert isinstance(buffer, np.ndarray) and buffer.dtype == np.int32 and buffer.shape == (12 + 4 + 4 + 0 + 3,)
    _assert_same(jax.jit(packed.unpack, static_argnums=1)(jnp.asarray(buffer), layout), tree)


def test_device_results_come_back_bit_for_bit_on_the_host():
    tree = _tree()
    layouts = []

    def step(tree):
        buffer, layout = packed.pack_on_device(tree)
        layouts.append(layout)  # (known when traced: the runner keeps it per program)
        return buffer

    buffer = jax.jit(step)(jax.tree.map(jnp.asarray, tree))
    assert buffer.dtype == jnp.int32 and buffer.shape == (23,)
    assert layouts == [packed.pack(tree)[1]]  # both sides lay a tree out alike
    _assert_same(packed.unpack_on_host(np.asarray(buffer), layouts[0]), tree)


def test_layouts_of_equal_shapes_are_equal_and_hash_alike():
    """The layout is a static argument of the jitted step: equal shapes must
    not compile again, and other shapes must."""
    _, a = packed.pack(_tree())
    _, b = packed.pack(jax.tree.map(lambda x: x.copy(), _tree()))
    assert a == b and hash(a) == hash(b)
    _, c = packed.pack((np.zeros((4, 4), np.int32), *_tree()[1:]))
    _, d = packed.pack((_tree()[0].view(np.float32), *_tree()[1:]))  # same shapes, another dtype
    assert c != a and d != a


def test_a_field_of_another_width_is_refused():
    with pytest.raises(TypeError, match="4-byte number dtype or be bool, not int64"):
        packed.pack((np.zeros(3, np.int32), np.zeros(2, np.int64)))
    with pytest.raises(TypeError, match="not <U1"):
        packed.pack((np.array(["a"]),))
    with pytest.raises(TypeError, match="takes host"):
        packed.pack((jnp.zeros(3, jnp.int32),))
    with pytest.raises(TypeError, match="not float16"):
        packed.pack_on_device((jnp.zeros(2, jnp.float16),))


def test_a_buffer_of_another_length_is_refused():
    buffer, layout = packed.pack(_tree())
    with pytest.raises(ValueError, match="does not match its layout"):
        packed.unpack(jnp.asarray(np.concatenate([buffer, buffer[:1]])), layout)
    with pytest.raises(ValueError, match="does not match its layout"):
        packed.unpack_on_host(buffer[:-1], layout)
