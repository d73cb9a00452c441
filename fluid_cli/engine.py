"""The serving engine: one thread decodes for many asyncio clients, with continuous batching.

Requests enter through a thread-safe inbox, bounded by the rows and the queue allowed (one more is refused with
`QueueFull`). The decoding thread runs `Decoder.serve`, which takes them from the inbox between forwards: a
request that arrives while others decode starts at the next forward, in the first free row. Each committed block,
then the `DecodeResult`, goes to the request's asyncio queue through its event loop (`Job.events`). A cancelled
request (its client hung up) leaves the inbox at once, or its row before the next forward. `stop` refuses new
requests, cancels what waits and what decodes (their queues get `Stopped`) and ends the thread.

The engine keeps the live numbers that `/metrics` reads: the forwards and row-forwards of `BatchStats`, the queue
length and the rows in use; `on_finish` sees every finished `DecodeResult` (in the decoding thread).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from fluid_cli.decode import BatchStats, Decoder, DecodeResult, Request


class QueueFull(Exception):
    """Every row is busy and the queue is full."""


class Stopped(Exception):
    """The engine is stopping: the request was not (or not completely) decoded."""


@dataclass(eq=False)
class Job:
    """One request in the engine: what its client awaits."""

    key: int
    loop: asyncio.AbstractEventLoop
    # a committed block (list[int]), then the DecodeResult; or an exception (Stopped, a failed forward)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: Any) -> None:
        """Hand `item` to the client's event loop (from any thread); a loop that has closed is gone with its
        client."""
        with suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    async def result(self) -> DecodeResult:
        """Wait for the end of the generation, skipping the blocks."""
        while not isinstance(item := await self.events.get(), DecodeResult):
            if isinstance(item, BaseException):
                raise item
        return item


class Engine:
    def __init__(self, decoder: Decoder, *, max_queue: int, max_len: int, warmup: list[int],
                 on_finish: Callable[[DecodeResult], None] | None = None):
        """`decoder` decodes `decoder.batch_size` rows of `max_len` positions (prompt + completion; the widest
        feed is added here); at most `max_queue` requests wait for a row. A short run of the `warmup` prompt first
        measures the cost policy's forward costs (or reads them from the disk cache), so that no request pays for
        them."""
        decoder.run([Request(warmup, max_new_tokens=2)])
        self.decoder, self.max_queue, self.on_finish = decoder, max_queue, on_finish
        self.max_len = max_len + decoder.width + 1
        self.batch = BatchStats(batch_size=decoder.batch_size, compiled=decoder.settings.compile)
        self._lock = threading.Condition()
        self._inbox: deque[tuple[Job, Request, tuple[int, str]]] = deque()
        self._active: dict[int, Job] = {}  # in a row
        self._cancelled: set[int] = set()  # in a row, to be dropped before the next forward
        self._keys = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="fluid-decoder", daemon=True)

    # -- the clients' side (event loop threads) -------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request, budget: tuple[int, str]) -> Job:
        """Queue a request whose `generation_budget` is `budget`; its blocks and result arrive in `Job.events`."""
        job = Job(next(self._keys), asyncio.get_running_loop())
        with self._lock:
            if self._stopping:
                raise Stopped("the server is shutting down")
            if len(self._inbox) + len(self._active) >= self.decoder.batch_size + self.max_queue:
                raise QueueFull(f"{self.decoder.batch_size} requests are decoding and {len(self._inbox)} waiting "
                                f"(the most the server queues is {self.max_queue}): retry later")
            self._inbox.append((job, request, budget))
            self._lock.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Drop `job` (its client is gone): from the inbox now, from its row before the next forward; a finished
        job is left alone."""
        with self._lock:
            waiting = next((item for item in self._inbox if item[0] is job), None)
            if waiting is not None:
                self._inbox.remove(waiting)
            elif job.key in self._active:
                self._cancelled.add(job.key)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, cancel every request waiting or decoding, and end the decoding thread."""
        with self._lock:
            self._stopping = True
            for job, _, _ in self._inbox:
                job.put(Stopped("the server shut down before the request was decoded"))
            self._inbox.clear()
            for key, job in self._active.items():
                self._cancelled.add(key)
                job.put(Stopped("the server shut down while the request was decoding"))
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return len(self._inbox)

    @property
    def rows_in_use(self) -> int:
        return len(self._active)

    # -- the decoding thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._inbox and not self._stopping:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.decoder.serve(self._take, self.max_len, self.batch, self._on_block, self._on_done,
                                   self._drop)
            except Exception as e:  # noqa: BLE001 - a failed forward fails the requests in it, not the server
                with self._lock:
                    for job in self._active.values():
                        job.put(e)
                    self._active.clear()
                    self._cancelled.clear()

    def _take(self) -> tuple[int, Request, tuple[int, str]] | None:
        with self._lock:
            if not self._inbox or self._stopping:
                return None
            job, request, budget = self._inbox.popleft()
            self._active[job.key] = job
            return job.key, request, budget

    def _on_block(self, key: int, tokens: list[int]) -> None:
        with self._lock:
            job = self._active.get(key)
        if job is not None:
            job.put(tokens)

    def _on_done(self, key: int, result: DecodeResult) -> None:
        with self._lock:
            job = self._active.pop(key, None)
        if self.on_finish is not None:
            self.on_finish(result)
        if job is not None:
            job.put(result)

    def _drop(self, key: int) -> bool:
        """Whether the row of `key` is cancelled; a cancelled row leaves the rows in use here (the decoder drops
        it on this answer)."""
        with self._lock:
            if key not in self._cancelled:
                return False
            self._cancelled.discard(key)
            self._active.pop(key, None)
            return True
