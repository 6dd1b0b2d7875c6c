"""An expert server started by an engine dies with it, from its first moment on.

Loading and compiling take seconds to minutes, and a server orphaned then
would load, compile and serve nobody. The engine (`LocalCluster`) holds the
only write end of the server's stdin, which the kernel closes when the engine
dies, however it dies (SIGKILL included): end of file on stdin means it is
gone. Watching starts before the server imports JAX (stdlib only here).
Before the server serves, the process then exits at once, removing the
deployment's mailboxes once it knows them; while it serves, its loop stops and
`run_expert_server` returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)


class ParentWatch:
    """Watches stdin from construction on (a daemon thread)."""

    def __init__(self):
        self.gone = threading.Event()
        self._lock = threading.Lock()
        self._server = None  # an ExpertServer, once it serves
        self._paths: list[str] = []
        threading.Thread(target=self._watch, name="eaas-parent-watch", daemon=True).start()

    def remove_when_gone(self, paths: list[str]) -> None:
        """The deployment's mailbox paths: removed if the parent dies (the
        engine that owned them could not)."""
        with self._lock:
            self._paths = list(paths)

    def serving(self, server) -> None:
        """From now on the parent's death stops `server` (at once if it already happened)."""
        with self._lock:
            self._server = server
        if self.gone.is_set():
            server.stop()

    def remove_mailboxes(self) -> None:
        with self._lock:
            paths = self._paths
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _watch(self) -> None:
        stdin = os.fdopen(os.dup(0), "rb", buffering=0)
        while stdin.read(4096):
            pass
        log.warning("the process that started this server exited; stopping")
        self.gone.set()
        with self._lock:
            server = self._server
        if server is not None:
            server.stop()
            return
        self.remove_mailboxes()
        os._exit(1)  # still starting: nothing to finish
