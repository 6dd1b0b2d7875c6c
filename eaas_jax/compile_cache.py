"""XLA's persistent compilation cache for the command line.

Compiled step programs are kept on disk, so a second run (a resumed batch,
the next `generate`, a restarted expert server) loads them instead of
compiling again: on W1-sized models each step shape costs seconds to tens of
seconds to compile. The cache is a directory of this user's (by default
``$XDG_CACHE_HOME/eaas-jax/xla``, else ``~/.cache/eaas-jax/xla``; the
``EAAS_COMPILE_CACHE`` environment variable or ``--compile-cache`` choose
another, ``off`` none). Executables loaded from it run in this process, so a
directory another user could write to is refused.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["ENV_VAR", "default_directory", "enable"]

ENV_VAR = "EAAS_COMPILE_CACHE"
# Programs that compiled faster than this are not worth a file.
_MIN_COMPILE_SECONDS = 0.1

log = logging.getLogger(__name__)


def default_directory() -> str:
    """$EAAS_COMPILE_CACHE, else the user's cache directory's eaas-jax/xla."""
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eaas-jax", "xla")


def _unsafe(directory: str) -> str | None:
    """Why `directory` must not hold executables this process loads, or None."""
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not this user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"writable by others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def enable(directory: str | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on at `directory` (None: the
    default; "off" or "": leaves it off). Returns the directory in use, or
    None when off; a directory that cannot be used is logged and left off
    (the run goes on, compiling as usual)."""
    directory = default_directory() if directory is None else directory
    if directory in ("", "off"):
        os.environ[ENV_VAR] = "off"  # nor the processes this one starts
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        problem = _unsafe(directory) or (None if os.access(directory, os.W_OK) else "not writable")
    except OSError as e:
        problem = e.strerror or str(e)
    if problem:
        log.warning("compilation cache %s is %s: compiling without it", directory, problem)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_COMPILE_SECONDS)
    os.environ[ENV_VAR] = directory  # the processes this one starts (its expert servers) share it
    return directory
