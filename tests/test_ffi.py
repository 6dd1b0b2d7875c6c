"""The compiled XLA FFI library (ffi/) called through jax.ffi."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eaas_jax.transport import native


@pytest.fixture(autouse=True)
def on_cpu():
    """The handlers here are the CPU transport's: run them on the CPU device
    also on a machine whose default device is a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def _random_headers(n: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h), dtype=np.uint8)


def _bytes_rows(*rows: bytes) -> np.ndarray:
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), -1)


def test_library_is_found_and_loads():
    path = native.library_path()
    assert path.is_file()
    assert path.name.startswith(("libeaas_ffi", "eaas_ffi"))
    lib = native.load_library()
    assert native.load_library() is lib  # loaded once
    assert hasattr(lib, "eaas_header_checksum")


def test_built_api_version_is_supported_by_runtime():
    major, minor = native.built_xla_ffi_api_version()
    assert (major, minor) >= (0, 1)
    native.register_targets()  # raises if this jaxlib rejects that version


def test_missing_library_error_names_path_and_fix(monkeypatch, tmp_path):
    missing = tmp_path / "libeaas_ffi.so"
    monkeypatch.setenv(native.LIBRARY_ENV_VAR, str(missing))
    with pytest.raises(native.NativeLibraryNotFoundError) as info:
        native.library_path()
    assert isinstance(info.value, ImportError)
    assert str(missing) in str(info.value)
    assert "pip install -e ." in str(info.value)


def test_reference_known_answers():
    # Published FNV-1a 32-bit test vectors.
    assert native.header_checksum_reference(_bytes_rows(b"a"))[0] == 0xE40C292C
    assert native.header_checksum_reference(_bytes_rows(b"foobar"))[0] == 0xBF9CF968
    empty = np.zeros((3, 0), dtype=np.uint8)
    np.testing.assert_array_equal(
        native.header_checksum_reference(empty), np.full(3, 0x811C9DC5, np.uint32)
    )


def test_known_answers_native():
    out = native.header_checksum(jnp.asarray(_bytes_rows(b"foobar", b"barfoo")))
    assert out.dtype == jnp.uint32
    assert int(out[0]) == 0xBF9CF968
    np.testing.assert_array_equal(
        np.asarray(out), native.header_checksum_reference(_bytes_rows(b"foobar", b"barfoo"))
    )


@pytest.mark.parametrize("n,h", [(1, 1), (7, 32), (64, 64), (3, 257)])
def test_matches_reference(n, h):
    headers = _random_headers(n, h, seed=n * 1000 + h)
    out = native.header_checksum(jnp.asarray(headers))
    assert out.shape == (n,)
    assert out.dtype == jnp.uint32
    np.testing.assert_array_equal(np.asarray(out), native.header_checksum_reference(headers))


def test_accepts_numpy_input():
    headers = _random_headers(5, 16, seed=1)
    np.testing.assert_array_equal(
        np.asarray(native.header_checksum(headers)), native.header_checksum_reference(headers)
    )


def test_under_jit():
    headers = _random_headers(33, 48, seed=2)

    @jax.jit
    def f(x):
        # Mix the FFI call with ordinary XLA ops inside one compiled program.
        return native.header_checksum(x) ^ jnp.uint32(0xFFFFFFFF)

    out = f(jnp.asarray(headers))
    expected = native.header_checksum_reference(headers) ^ np.uint32(0xFFFFFFFF)
    np.testing.assert_array_equal(np.asarray(out), expected)
    # Same shapes again: cached executable, same result.
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(headers))), expected)


def test_under_vmap():
    batch = np.random.default_rng(3).integers(0, 256, size=(4, 6, 24), dtype=np.uint8)
    out = jax.jit(jax.vmap(native.header_checksum))(jnp.asarray(batch))
    assert out.shape == (4, 6)
    expected = np.stack([native.header_checksum_reference(b) for b in batch])
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_empty_batch():
    headers = jnp.zeros((0, 32), dtype=jnp.uint8)
    out = native.header_checksum(headers)
    assert out.shape == (0,)
    assert out.dtype == jnp.uint32
    out_jit = jax.jit(native.header_checksum)(headers)
    assert out_jit.shape == (0,)
    assert native.header_checksum_reference(np.zeros((0, 32), np.uint8)).shape == (0,)


def test_zero_length_headers():
    out = native.header_checksum(jnp.zeros((5, 0), dtype=jnp.uint8))
    np.testing.assert_array_equal(np.asarray(out), np.full(5, 0x811C9DC5, np.uint32))


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint32, jnp.float32])
def test_wrong_dtype_is_rejected(dtype):
    bad = jnp.zeros((4, 8), dtype=dtype)
    with pytest.raises(TypeError, match=r"uint8.*got dtype"):
        native.header_checksum(bad)
    with pytest.raises(TypeError, match=r"uint8"):
        jax.jit(native.header_checksum)(bad)
    with pytest.raises(TypeError, match=r"uint8"):
        native.header_checksum_reference(np.zeros((4, 8), dtype=np.dtype(dtype)))


def test_python_list_is_rejected():
    with pytest.raises(TypeError, match=r"uint8"):
        native.header_checksum([[1, 2, 3]])


@pytest.mark.parametrize("shape", [(), (8,), (2, 3, 4)])
def test_wrong_rank_is_rejected(shape):
    with pytest.raises(ValueError, match=r"shape \[N, H\]"):
        native.header_checksum(jnp.zeros(shape, dtype=jnp.uint8))


def test_handler_itself_checks_dtype():
    # Bypass the Python validation: XLA's typed-FFI decoding must still refuse
    # a buffer of the wrong element type instead of reading garbage.
    native.register_targets()
    call = jax.ffi.ffi_call(
        native.HEADER_CHECKSUM_TARGET,
        jax.ShapeDtypeStruct((4,), jnp.uint32),
        vmap_method="broadcast_all",
    )
    with pytest.raises(Exception, match=r"(?i)dtype"):
        jax.block_until_ready(call(jnp.zeros((4, 8), dtype=jnp.int32)))


def test_registration_is_idempotent_and_thread_safe():
    errors: list[BaseException] = []

    def worker():
        try:
            native.register_targets()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    native.register_targets()
    headers = _random_headers(2, 8, seed=4)
    np.testing.assert_array_equal(
        np.asarray(native.header_checksum(headers)), native.header_checksum_reference(headers)
    )
