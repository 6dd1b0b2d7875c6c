"""Expert transport: everything a backend is, and nothing outside it names one.

Modules, bottom up: each imports only modules listed before it.

* :mod:`~eaas_jax.transport.wire` — the Python mirror of ``ffi/wire_format.h``
  (message header, kinds, hidden dtypes, checksum, geometry) and the one
  table of combine status codes.
* :mod:`~eaas_jax.transport.hidden_codec` (float8 rows and their scales) and
  :mod:`~eaas_jax.transport.private_files` (files only this user may touch):
  standalone helpers.
* :mod:`~eaas_jax.transport.native` — finds and loads the compiled library
  (``libeaas_ffi``, built by CMake from ``ffi/``) and registers its XLA FFI
  handlers, lazily: importing this package loads nothing.
* :mod:`~eaas_jax.transport.custom_calls` — the four custom calls (dispatch,
  combine, poll, reply), backend-neutral: an endpoint names its targets.
* :mod:`~eaas_jax.transport.shm` (CPU processes, POSIX shared memory) and
  :mod:`~eaas_jax.transport.cuda_ipc` (GPUs of one host): one backend each.
* :mod:`~eaas_jax.transport.backends` — the backends by name (each module
  imported when first asked for) and the protocol each implements.
"""
