"""`CompilePool`: threads that compile step programs ahead of the steps.

Not `concurrent.futures.ThreadPoolExecutor`: at interpreter exit that one
runs every queued item before its threads are joined, which for queued XLA
compiles means minutes. Here `stop()` (also called at interpreter exit,
before non-daemon threads are joined) drops what is queued; a compile that is
running finishes (XLA cannot be interrupted), and its thread then ends.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Callable

__all__ = ["CompilePool"]


class CompilePool:
    """`num_threads` threads running submitted calls in submission order."""

    def __init__(self, num_threads: int, name: str):
        self.num_threads = num_threads
        self._queue: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}") for i in range(num_threads)]
        for thread in self._threads:
            thread.start()
        # Runs in threading's shutdown, before it joins non-daemon threads
        # (the hook concurrent.futures uses; atexit would be too late).
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            register(self.stop)

    def submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        """`fn(*args)` on a pool thread; its future (cancelled if the pool stops first)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if self._stopped:
                raise RuntimeError("the compile pool has stopped")
            self._queue.append((future, fn, args))
            self._wake.notify()
        return future

    def stop(self) -> None:
        """Cancels the queued calls; those running finish. Returns at once."""
        with self._wake:
            self._stopped = True
            queued = list(self._queue)
            self._queue.clear()
            self._wake.notify_all()
        for future, _, _ in queued:  # outside the lock: cancelling runs the futures' callbacks
            future.cancel()

    def join(self) -> None:
        """Waits for the threads to end (after `stop()`)."""
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._queue and not self._stopped:
                    self._wake.wait()
                if not self._queue:
                    return
                future, fn, args = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the future's reader gets it
                future.set_exception(e)
