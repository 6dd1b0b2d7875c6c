"""Native (C++/XLA FFI) handlers of the expert transport.

The handlers live in a plain shared library, ``libeaas_ffi.so``, that CMake
builds from ``ffi/`` and installs into the ``eaas_jax`` package directory
(wheel or editable install). This module finds it, loads it once with ctypes,
registers its handlers with XLA (``jax.ffi.register_ffi_target``,
``api_version=1``: the typed FFI) for the CPU platform, and wraps them as JAX
functions built on ``jax.ffi.ffi_call``. Nothing is loaded at import time; the
first call does it (thread-safe, exactly once per process).

Set ``EAAS_FFI_LIBRARY=/path/to/libeaas_ffi.so`` to use a specific build.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from eaas_jax.transport import wire

__all__ = [
    "HEADER_CHECKSUM_TARGET",
    "IBGDA_COMBINE_TARGET",
    "IBGDA_DISPATCH_TARGET",
    "IBGDA_POLL_TARGET",
    "IBGDA_REPLY_TARGET",
    "SHM_COMBINE_TARGET",
    "SHM_DISPATCH_TARGET",
    "SHM_POLL_TARGET",
    "SHM_REPLY_TARGET",
    "NativeLibraryNotFoundError",
    "built_xla_ffi_api_version",
    "counter_names",
    "header_checksum",
    "header_checksum_reference",
    "library_path",
    "load_library",
    "register_targets",
]

#: Environment variable overriding the library location.
LIBRARY_ENV_VAR = "EAAS_FFI_LIBRARY"
#: Distribution name (for locating the installed library via its RECORD).
_DIST_NAME = "eaas-jax"

#: XLA custom-call target name of the header checksum handler.
HEADER_CHECKSUM_TARGET = "eaas_header_checksum"

#: XLA custom-call target names of the ``shm`` transport (see transport/shm.py).
SHM_DISPATCH_TARGET = "eaas_shm_dispatch"
SHM_COMBINE_TARGET = "eaas_shm_combine"
SHM_POLL_TARGET = "eaas_shm_poll"
SHM_REPLY_TARGET = "eaas_shm_reply"

#: XLA custom-call target names of the ``ibgda`` transport (transport/ibgda.py).
IBGDA_DISPATCH_TARGET = "eaas_ibgda_dispatch"
IBGDA_COMBINE_TARGET = "eaas_ibgda_combine"
IBGDA_POLL_TARGET = "eaas_ibgda_poll"
IBGDA_REPLY_TARGET = "eaas_ibgda_reply"

#: XLA target name -> exported C symbol, registered for platform "cpu". The
#: ibgda targets are the shm handlers: for an ibgda endpoint they post WQEs
#: to its NIC (ffi/ibgda_writer.h); the names tell the two apart in HLO.
_CPU_HANDLERS: dict[str, str] = {
    HEADER_CHECKSUM_TARGET: "eaas_header_checksum",
    SHM_DISPATCH_TARGET: "eaas_shm_dispatch",
    SHM_COMBINE_TARGET: "eaas_shm_combine",
    SHM_POLL_TARGET: "eaas_shm_poll",
    SHM_REPLY_TARGET: "eaas_shm_reply",
    IBGDA_DISPATCH_TARGET: "eaas_shm_dispatch",
    IBGDA_COMBINE_TARGET: "eaas_shm_combine",
    IBGDA_POLL_TARGET: "eaas_shm_poll",
    IBGDA_REPLY_TARGET: "eaas_shm_reply",
}

#: XLA custom-call target names of the ``cuda_ipc`` transport (transport/cuda_ipc.py).
CUDA_IPC_DISPATCH_TARGET = "eaas_cuda_ipc_dispatch"
CUDA_IPC_COMBINE_TARGET = "eaas_cuda_ipc_combine"
CUDA_IPC_POLL_TARGET = "eaas_cuda_ipc_poll"
CUDA_IPC_REPLY_TARGET = "eaas_cuda_ipc_reply"

#: XLA target name -> exported C symbol, registered for platform "CUDA" when
#: the library was built with a CUDA compiler. The ibgda targets are the
#: cuda_ipc kernels: for an ibgda endpoint opened on a GPU they post WQEs to
#: its NIC (ffi/ibgda_post.cuh).
_CUDA_HANDLERS: dict[str, str] = {
    CUDA_IPC_DISPATCH_TARGET: "eaas_cuda_ipc_dispatch",
    CUDA_IPC_COMBINE_TARGET: "eaas_cuda_ipc_combine",
    CUDA_IPC_POLL_TARGET: "eaas_cuda_ipc_poll",
    CUDA_IPC_REPLY_TARGET: "eaas_cuda_ipc_reply",
    IBGDA_DISPATCH_TARGET: "eaas_cuda_ipc_dispatch",
    IBGDA_COMBINE_TARGET: "eaas_cuda_ipc_combine",
    IBGDA_POLL_TARGET: "eaas_cuda_ipc_poll",
    IBGDA_REPLY_TARGET: "eaas_cuda_ipc_reply",
}


class NativeLibraryNotFoundError(ImportError):
    """The compiled eaas FFI library is not installed next to the package."""


def _library_filename() -> str:
    if sys.platform == "win32":
        return "eaas_ffi.dll"
    if sys.platform == "darwin":
        return "libeaas_ffi.dylib"
    return "libeaas_ffi.so"


def _candidate_paths() -> list[Path]:
    """Where the library may be, in order of preference."""
    name = _library_filename()
    candidates: list[Path] = []
    override = os.environ.get(LIBRARY_ENV_VAR)
    if override:
        return [Path(override)]  # explicit choice: no silent fallback
    # Normal install: <site-packages>/eaas_jax/. Editable (scikit-build-core
    # "redirect" mode): eaas_jax.__path__ lists the install tree in
    # site-packages first, then the source tree.
    import eaas_jax

    for pkg_dir in getattr(eaas_jax, "__path__", []):
        candidates.append(Path(pkg_dir) / name)
    # The installed distribution's file list: finds the library even when a
    # source checkout shadows the installed package on sys.path (e.g. running
    # `python -m pytest` from the repo root after a non-editable install).
    try:
        dist = importlib.metadata.distribution(_DIST_NAME)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == name:
                candidates.append(Path(dist.locate_file(file)))
    seen: set[Path] = set()
    unique = []
    for path in candidates:
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


def library_path() -> Path:
    """Path of the compiled FFI library; raises if it is not built/installed."""
    candidates = _candidate_paths()
    for path in candidates:
        if path.is_file():
            return path.resolve()
    searched = "\n  ".join(str(p) for p in candidates) or "(no candidate locations)"
    raise NativeLibraryNotFoundError(
        f"eaas-jax native FFI library {_library_filename()!r} not found. Searched:\n"
        f"  {searched}\n"
        "It is compiled by CMake when the package is installed: run "
        "`pip install -e . --no-build-isolation` (development) or `pip install .` "
        f"from the repository root, or set {LIBRARY_ENV_VAR} to the built library."
    )


@functools.cache
def load_library() -> ctypes.CDLL:
    """Load the FFI library once; the handle is kept alive for the process."""
    path = library_path()
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeLibraryNotFoundError(
            f"failed to load eaas-jax native FFI library {path}: {e}. "
            "Rebuild it with `pip install -e . --no-build-isolation`."
        ) from e


def bind_functions(signatures: dict) -> ctypes.CDLL:
    """The library with the C functions in `signatures` (name -> (argtypes,
    restype)) given their prototypes, so ctypes checks and converts each call."""
    lib = load_library()
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


_REGISTER_LOCK = threading.Lock()


def built_xla_ffi_api_version() -> tuple[int, int]:
    """(major, minor) XLA FFI API version of the headers the library was built with."""
    fn = load_library().eaas_ffi_xla_api_version
    fn.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    fn.restype = None
    major, minor = ctypes.c_int(), ctypes.c_int()
    fn(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


@functools.cache
def counter_names() -> tuple[str, ...]:
    """Names of the per-endpoint counters (``stats()`` of every backend), in
    the library's order (kCounterNames in ffi/transport_common.h)."""
    fn = load_library().eaas_shm_stat_names
    fn.argtypes = []
    fn.restype = ctypes.c_char_p
    return tuple(fn().decode().split(","))


def has_cuda_handlers() -> bool:
    """Whether the library was built with the CUDA (cuda_ipc) handlers."""
    return hasattr(load_library(), "eaas_cuda_ipc_dispatch")


def _register(lib: ctypes.CDLL, handlers: dict[str, str], platform: str) -> None:
    for target, symbol in handlers.items():
        try:
            fn = getattr(lib, symbol)
        except AttributeError as e:
            raise RuntimeError(
                f"symbol {symbol!r} missing from {library_path()} (stale build?); "
                "rebuild with `pip install -e . --no-build-isolation`"
            ) from e
        try:
            jax.ffi.register_ffi_target(
                target, jax.ffi.pycapsule(fn), platform=platform, api_version=1
            )
        except Exception as e:  # XLA raises its own runtime error type
            import jaxlib

            major, minor = built_xla_ffi_api_version()
            raise RuntimeError(
                f"registering XLA FFI target {target!r} from {library_path()} "
                f"failed: {e}\nThe library was compiled against XLA FFI API "
                f"{major}.{minor} headers; jaxlib {jaxlib.__version__} rejects "
                "handlers built against newer headers than its own. Rebuild "
                "against this environment's jaxlib: `pip install -e . "
                "--no-build-isolation` (or `pip install --no-build-isolation .`)."
            ) from e


@functools.cache
def _register_targets_once() -> ctypes.CDLL:
    lib = load_library()
    _register(lib, _CPU_HANDLERS, "cpu")
    # Only where JAX has a CUDA backend: registering for a platform JAX
    # does not have fails.
    if has_cuda_handlers() and any(d.platform == "gpu" for d in jax.devices()):
        _register(lib, _CUDA_HANDLERS, "CUDA")
    return lib


def register_targets() -> None:
    """Register all native handlers with XLA, exactly once per process."""
    # functools.cache alone may run the body twice under a race; the lock makes
    # registration strictly once.
    with _REGISTER_LOCK:
        _register_targets_once()


def _check_headers(headers, *, where: str) -> None:
    dtype = getattr(headers, "dtype", None)
    if dtype is None or np.dtype(dtype) != np.uint8:
        raise TypeError(
            f"{where}: headers must be a uint8 array of shape [N, H], got dtype "
            f"{dtype if dtype is not None else type(headers).__name__}; "
            "pass raw header bytes (e.g. x.astype(jnp.uint8) or a byte view)"
        )
    if len(headers.shape) != 2:
        raise ValueError(
            f"{where}: headers must have shape [N, H] (N headers of H bytes), "
            f"got shape {tuple(headers.shape)}"
        )


def header_checksum(headers: jax.Array) -> jax.Array:
    """32-bit FNV-1a checksum of each header row, computed by the native handler.

    Args:
      headers: ``uint8[N, H]``, N message headers of H bytes (N and H may be 0).

    Returns:
      ``uint32[N]``. Works eagerly, under ``jax.jit`` and ``jax.vmap``; CPU only.
    """
    _check_headers(headers, where="header_checksum")
    headers = jnp.asarray(headers)
    register_targets()
    call = jax.ffi.ffi_call(
        HEADER_CHECKSUM_TARGET,
        jax.ShapeDtypeStruct(headers.shape[:1], jnp.uint32),
        # The handler treats every leading dim as a batch dim: u8[..., H] -> u32[...].
        vmap_method="broadcast_all",
    )
    return call(headers)


def header_checksum_reference(headers: np.ndarray) -> np.ndarray:
    """NumPy reference of :func:`header_checksum` (same FNV-1a as ffi/wire_format.h)."""
    _check_headers(headers, where="header_checksum_reference")
    return wire.fnv1a32(np.asarray(headers))
