"""One worker thread that owns the model and runs every request, in arrival order.

MLX work stays on a single thread (the model is loaded there too), so requests
never interleave their forwards or their cache updates; the event loop only
queues jobs and relays what the worker emits. A job whose client went away is
flagged and the worker stops it at its next final chunk, so a disconnect costs
the others at most one decoding step. The runtime's PrefixCache lives on the
worker and carries shared prompt prefixes from one request to the next.
"""

import asyncio
import queue
import threading
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional

import mlx.core as mx

from optiq_dhara.runtime import PrefixCache, stream_text

Loader = Callable[[], tuple[Any, Any]]


class _Done:
    """Marks the end of a job's output."""


@dataclass
class _Job:
    prompt: Any
    options: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        """Hand ``item`` to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled.set()


class Engine:
    """Runs ``stream_text`` for queued requests on its own thread."""

    def __init__(self, load: Loader, *, prefix_cache: bool = True):
        self._load = load
        self._use_prefix_cache = prefix_cache
        self._jobs: queue.Queue[Optional[_Job]] = queue.Queue()
        self._ready = threading.Event()
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="dhara-mlx-engine", daemon=True)
        self.model: Any = None
        self.tokenizer: Any = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

    def start(self) -> "Engine":
        """Start the worker and wait until the model is loaded (re-raising a load failure)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def close(self) -> None:
        """Let the worker finish the job in hand and stop."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        """Jobs waiting for the worker."""
        return self._jobs.qsize()

    async def stream(self, prompt: Any, **options) -> AsyncIterator[Any]:
        """The TextChunks of one request as the worker makes them final.

        Leaving the iteration early (a disconnect cancels it) stops the job.
        Exceptions raised by the runtime come out here.
        """
        job = _Job(prompt, options, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancelled.set()

    def _run(self) -> None:
        try:
            self._work()
        finally:  # MLX asks every thread that used it to free its streams before exit
            mx.clear_streams()

    def _work(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            prefix_cache = PrefixCache() if self._use_prefix_cache else None
        except BaseException as exc:  # reported by start()
            self._load_error = exc
            return
        finally:
            self._ready.set()
        while (job := self._jobs.get()) is not None:
            self.counts[self._serve(job, prefix_cache)] += 1

    def _serve(self, job: _Job, prefix_cache: Optional[PrefixCache]) -> str:
        """Run one job; returns how it ended: completed, cancelled or failed."""
        if job.cancelled.is_set():  # its client left while it waited
            return "cancelled"
        try:
            chunks = stream_text(
                self.model, self.tokenizer, job.prompt, prefix_cache=prefix_cache, **job.options
            )
            with closing(chunks):
                for chunk in chunks:
                    if job.cancelled.is_set():
                        return "cancelled"
                    job.emit(chunk)
            job.emit(_Done())
            return "completed"
        except Exception as exc:  # handed to the request; the worker lives on
            job.emit(exc)
            return "failed"
