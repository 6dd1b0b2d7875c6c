"""`AsyncEngine`: one thread drives an `Engine`; asyncio handlers submit
requests to it and read their outputs as the steps produce them.

The engine is not thread-safe, so everything that touches it (adding and
aborting requests, stepping, reading its metrics) runs on the loop thread:
handlers hand it commands and await their results. Between commands the
thread runs steps while any request is unfinished, and sleeps otherwise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import uuid
from typing import AsyncIterator, Callable, NamedTuple

from eaas_jax.engine.outputs import RequestOutput

log = logging.getLogger(__name__)


def _copy_outcome(done: concurrent.futures.Future, result: asyncio.Future) -> None:
    if result.cancelled():
        return
    error = done.exception()
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(done.result())


class ServerBusy(Exception):
    """The queue of unfinished sequences is full (`max_queue`)."""


class EngineStopped(RuntimeError):
    """The engine loop has stopped (shut down, or a step failed)."""


class _Reader(NamedTuple):
    """Where a request's outputs go, and how many sequences it is (its n)."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sequences: int


class AsyncEngine:
    """Drives `engine` on a thread of its own; at most `max_queue` sequences
    (a request of n choices is n) unfinished at once (more are refused with
    ServerBusy)."""

    def __init__(self, engine, *, max_queue: int = 256):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.failure: BaseException | None = None  #: what stopped the loop, if anything did
        self.num_aborted = 0  #: requests whose client went away before they finished
        self._wake = threading.Condition()
        self._commands: list[tuple[Callable, concurrent.futures.Future]] = []
        self._stopping = False
        # request id -> its reader: loop thread only
        self._readers: dict[str, _Reader] = {}
        self._thread = threading.Thread(target=self._run, name="eaas-engine-loop", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def num_unfinished(self) -> int:
        """Requests queued or running for a reader."""
        return len(self._readers)

    # ------------------------------------------------------------ handlers' side

    def submit(self, fn: Callable) -> concurrent.futures.Future:
        """Runs `fn(engine)` on the loop thread between steps; its future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            if not self.running:
                future.set_exception(EngineStopped(self._stopped_reason()))
                return future
            self._commands.append((fn, future))
            self._wake.notify()
        return future

    async def call(self, fn: Callable):
        """`submit(fn)`, awaited. (Not asyncio.wrap_future: its callback raises
        on the loop thread when the caller's event loop has closed.)"""
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        def resolve(done: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(_copy_outcome, done, result)
            except RuntimeError:  # the caller's event loop has closed: nobody waits
                pass

        self.submit(fn).add_done_callback(resolve)
        return await result

    async def generate(self, prompt, params, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Queues a request and yields its output after each step that gave it
        tokens, the last one finished. Raises ValueError or TypeError (bad
        prompt or params) or ServerBusy before yielding anything. However the
        iteration ends early (the client went away, or the caller was
        cancelled even before the request was queued), the request is
        aborted: its KV blocks are freed at the next step."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        rid = request_id or f"http-{uuid.uuid4().hex}"

        def add(engine) -> None:
            if params.n > self.max_queue:
                raise ValueError(f"n must be at most {self.max_queue} on this server (--max-queue), got {params.n}")
            unfinished = sum(reader.sequences for reader in self._readers.values())
            if unfinished + params.n > self.max_queue:
                raise ServerBusy(f"the server has {unfinished} sequences unfinished and {params.n} more would pass "
                                 f"its limit of {self.max_queue} (--max-queue); retry later")
            engine.add_request(prompt, params, rid)
            self._readers[rid] = _Reader(loop, outputs, params.n)

        finished, queued = False, None  # queued: None while unknown (add sent, not answered)
        try:
            try:
                await self.call(add)
            except (ValueError, TypeError, ServerBusy, EngineStopped):
                queued = False  # refused: the id may be another request's
                raise
            queued = True
            while not finished:
                output = await outputs.get()
                if isinstance(output, BaseException):
                    raise output
                finished = output.finished
                yield output
        finally:
            if not finished and queued is not False:
                self.abort(rid)

    def abort(self, rid: str) -> None:
        """Aborts request `rid` at the next step, if it is still running
        (commands run in order: after its add)."""
        self.submit(lambda engine: self._abort(engine, rid))

    def shutdown(self) -> None:
        """Stops the loop after the step in progress; pending commands and
        readers get EngineStopped. The engine itself is left to its owner."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join()

    # --------------------------------------------------------------- loop thread

    def _abort(self, engine, rid: str) -> None:
        if self._readers.pop(rid, None) is not None:
            engine.abort_request(rid)
            self.num_aborted += 1

    def unservable(self) -> str | None:
        """Why requests cannot be served now (the engine's reason; on the loop thread)."""
        return self.engine.unservable()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not (self._commands or self._stopping or self._readers):
                        self._wake.wait()
                    if self._stopping:
                        return
                    commands, self._commands = self._commands, []
                for fn, future in commands:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn(self.engine))
                        except BaseException as e:  # noqa: BLE001 - the caller's to handle
                            future.set_exception(e)
                if self._readers and self.engine.has_unfinished_requests():
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # noqa: BLE001 - see _fail_running
                        self._fail_running(e)
                        continue
                    for output in outputs:
                        self._deliver(output)
                elif self._readers:  # a bug: readers of requests the engine no longer has
                    for rid in list(self._readers):
                        self._deliver_to(rid, RuntimeError(f"the engine lost request {rid}"))
                        self._readers.pop(rid)
        except BaseException as e:  # noqa: BLE001 - a failed step stops serving; /health says so
            log.exception("the engine loop stopped")
            self.failure = e
        finally:
            with self._wake:
                self._stopping = True
                commands, self._commands = self._commands, []
            stopped = EngineStopped(self._stopped_reason())
            for _, future in commands:
                if future.set_running_or_notify_cancel():
                    future.set_exception(stopped)
            for rid in list(self._readers):
                self._deliver_to(rid, stopped)

    def _fail_running(self, error: Exception) -> None:
        """A step raised: every unfinished request fails with the reason (the
        step's device state may be gone, so the engine drops all of them and
        rebuilds it: `Engine.recover`), and serving goes on. If the engine
        cannot recover, the loop stops and /health says so."""
        log.exception("a step failed; the %d unfinished requests fail", len(self._readers))
        failure = EngineStopped(f"the step failed: {type(error).__name__}: {error}")
        for rid in list(self._readers):
            self._deliver_to(rid, failure)
        self._readers.clear()
        self.engine.recover()  # raising: the loop stops (`failure`)

    def _deliver(self, output: RequestOutput) -> None:
        self._deliver_to(output.request_id, output)
        if output.finished:
            self._readers.pop(output.request_id, None)

    def _deliver_to(self, rid: str, item) -> None:
        reader = self._readers.get(rid)
        if reader is None:
            return
        loop, queue, _ = reader
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # its event loop closed: nobody reads it
            self._abort(self.engine, rid)

    def _stopped_reason(self) -> str:
        if self.failure is not None:
            return f"the engine stopped: {type(self.failure).__name__}: {self.failure}"
        return "the engine is shutting down"
