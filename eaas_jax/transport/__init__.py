"""Expert transport: wire format and the native XLA FFI handlers behind it.

The compiled library (``libeaas_ffi``, built by CMake from ``ffi/``) is loaded
lazily by :mod:`eaas_jax.transport.native`; importing this package does not
load it. Backends: :mod:`eaas_jax.transport.shm` (CPU, POSIX shared memory).
The wire format shared by every backend is documented in ``ffi/wire_format.h``.
"""
