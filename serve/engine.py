"""One worker thread that owns the model and decodes every request in one continuous batch.

MLX work stays on a single thread (the model is loaded there too): the worker
owns a runtime ``Engine`` and calls its ``step`` in a loop. New requests join
the batch between steps, a request whose client went away is dropped at the
next step, and each step's tokens become text per request (``TextStream``),
handed to the request's coroutine on the event loop. Tokenizing, the stop set
and the argument checks run in a thread pool, so neither the event loop nor the
batch waits for them. The runtime's PrefixCache lives on the worker and is
shared by all rows.

Admission is bounded: at most ``max_batch`` requests decode and ``max_queue``
more wait; past that ``stream`` raises ``QueueFull`` (the server answers 429).

A request may also ask for the block of every diffusion step (``blocks``): it
then gets a ``BlockStep`` after each denoising step, text or no text.

``call`` runs a function of the model on the worker thread between two steps
(prompt scoring for ``echo`` + ``logprobs``); it is admitted like a request.
"""

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Optional, Sequence, Union

import mlx.core as mx

from optiq_dhara.runtime import PrefixCache
from optiq_dhara.runtime.decode import make_request
from optiq_dhara.runtime.engine import Engine, Row
from optiq_dhara.runtime.prefix_cache import DEFAULT_BYTES
from optiq_dhara.runtime.sampling import Sampling
from optiq_dhara.runtime.settings import Settings, check_prompt
from optiq_dhara.runtime.stats import Stats, Step
from optiq_dhara.runtime.text import TextChunk, TextStream

Loader = Callable[[], tuple[Any, Any]]


class QueueFull(Exception):
    """Every batch slot and queue place is taken; the client should retry later."""


class ShuttingDown(RuntimeError):
    """The server is stopping: the request was not run, or was cut off at the deadline."""


class _Done:
    """Marks the end of a job's output."""


@dataclass
class BlockStep:
    """A diffusion row's block after one denoising step, for a request that asked for it.

    ``ids`` are the block's token ids from position ``start`` (the MASK id where
    still masked), ``tokens`` their text (None for MASK), ``committed`` the step
    (``stats.rounds``) that committed each position or None, ``step`` this step.
    """

    start: int
    step: int
    ids: list[int]
    tokens: list[Optional[str]]
    committed: list[Optional[int]]
    stats: Stats


@dataclass
class _Job:
    prompt: list[int]
    settings: Settings
    sampling: Sampling
    text: TextStream
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    blocks: bool = False  # hand out a BlockStep after each diffusion step
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        """Hand ``item`` to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening
            self.cancelled.set()


@dataclass
class _Call:
    """A function run on the worker thread between engine steps (scoring)."""

    fn: Callable[[Any, Any], Any]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:
            self.cancelled.set()


class Worker:
    """Decodes the queued requests together on its own thread, ``max_batch`` at a time."""

    def __init__(
        self,
        load: Loader,
        *,
        max_batch: int = 32,
        max_queue: Optional[int] = None,
        prompt_cache_bytes: int = DEFAULT_BYTES,
    ):
        """``max_queue`` defaults to 4 x ``max_batch``; ``prompt_cache_bytes`` 0 turns
        the prefix cache off."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}.")
        max_queue = 4 * max_batch if max_queue is None else max_queue
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}.")
        if prompt_cache_bytes < 0:
            raise ValueError(f"prompt_cache_bytes must be >= 0, got {prompt_cache_bytes}.")
        self._load = load
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prompt_cache_bytes = prompt_cache_bytes
        self._jobs: queue.Queue[Optional[Union[_Job, _Call]]] = queue.Queue()
        self._admitted = 0  # requests between admission and their end (event loop only)
        self._rows = 0  # requests in the runtime engine (written by the worker)
        self._ready = threading.Event()
        self._abort = threading.Event()  # close()'s deadline passed: end the running requests
        self._load_error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="dhara-mlx-worker", daemon=True)
        self.model: Any = None
        self.tokenizer: Any = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self._pieces: dict[int, str] = {}  # token id -> its text (piece)

    def start(self) -> "Worker":
        """Start the worker and wait until the model is loaded (re-raising a load failure)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error
        return self

    def close(self, timeout: Optional[float] = None) -> bool:
        """Let the worker finish the requests in hand and stop; True once it has stopped.

        With a ``timeout`` (seconds) the requests still running then end with a
        ShuttingDown error (a stream gets it as an error chunk) at the next step,
        and the worker is waited for at most ``timeout`` more seconds (a step that
        hangs cannot be interrupted; the thread is a daemon and dies with the process).
        """
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def running(self) -> int:
        """Requests in the batch: prefilling or decoding."""
        return min(self._rows, self.max_batch)

    @property
    def pending(self) -> int:
        """Requests waiting for a place in the batch."""
        return self._jobs.qsize() + self._rows - self.running

    async def stream(
        self,
        prompt_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        blocks: bool = False,
        **options,
    ) -> AsyncIterator[Union[TextChunk, BlockStep]]:
        """The TextChunks of one request as the batch makes them final; with ``blocks``,
        also a BlockStep after each diffusion step (before that step's TextChunk).

        ``options`` are ``make_request``'s arguments after ``model`` (``stop_ids``
        aside: the stop set is the tokenizer's). Raises QueueFull when the batch
        and the queue are full, ValueError for arguments the runtime refuses (a mode
        the model lacks is refused by the engine before the request joins the batch).
        Leaving the iteration early (a disconnect cancels it) drops the request
        from the batch at the next step.
        """
        self._admit()
        job = None
        try:
            loop = asyncio.get_running_loop()
            job = await asyncio.to_thread(self._job, prompt_ids, stop, options, loop, blocks)
            self._jobs.put(job)
            while True:
                item = await job.out.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._admitted -= 1
            if job is not None:
                job.cancelled.set()

    def _admit(self) -> None:
        """Count one more request in, or refuse it (worker gone, batch and queue full)."""
        if not self.alive:
            raise ShuttingDown("The model worker is not running.")
        if self._admitted >= self.max_batch + self.max_queue:
            raise QueueFull(
                f"The server is busy: {self.max_batch} requests are decoding and "
                f"{self.max_queue} waiting. Retry shortly."
            )
        self._admitted += 1

    async def call(self, fn: Callable[[Any, Any], Any]) -> Any:
        """``fn(model, tokenizer)`` run on the worker thread between engine steps (MLX
        work such as scoring a prompt); its result, or its exception raised here."""
        self._admit()
        job = _Call(fn, asyncio.get_running_loop(), asyncio.Queue())
        try:
            self._jobs.put(job)
            item = await job.out.get()
            if isinstance(item, BaseException):
                raise item
            return item
        finally:
            self._admitted -= 1
            job.cancelled.set()

    def _job(self, prompt_ids, stop, options: dict, loop, blocks: bool) -> _Job:
        """A checked request, made off the event loop (the stop set maps the vocabulary)."""
        text = TextStream(self.tokenizer, stop=stop)
        settings, sampling = make_request(stop_ids=text.stop_ids, **options)
        prompt = check_prompt(prompt_ids, self.model.args.vocab_size)
        return _Job(prompt, settings, sampling, text, loop, asyncio.Queue(), blocks)

    def _run(self) -> None:
        try:
            self._work()
        finally:  # MLX asks every thread that used it to free its streams before exit
            mx.clear_streams()

    def _work(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            cache = PrefixCache(self.prompt_cache_bytes) if self.prompt_cache_bytes else None
            engine = Engine(self.model, max_batch=self.max_batch, prefix_cache=cache)
        except BaseException as exc:  # reported by start()
            self._load_error = exc
            return
        finally:
            self._ready.set()
        live: dict[Row, _Job] = {}
        accepting = True
        while accepting or live:
            if accepting:
                accepting = self._take(engine, live, wait=not live)
            if self._abort.is_set():
                for row, job in list(live.items()):
                    self._drop(engine, live, row)
                    job.emit(ShuttingDown("The server is shutting down; the request was cut off."))
                    self.counts["cancelled"] += 1
                break
            for row in [r for r, job in live.items() if job.cancelled.is_set()]:
                self._drop(engine, live, row)
                self.counts["cancelled"] += 1
            self._rows = len(live)
            if live:
                self._hand_out(engine, live, self._step(engine, live))
            self._rows = len(live)
        self._rows = len(live)
        while not self._jobs.empty():  # requests that came after close()
            if (job := self._jobs.get_nowait()) is not None:  # a _Job or a _Call
                job.emit(ShuttingDown("The server is shutting down."))

    def _take(self, engine: Engine, live: dict[Row, _Job], wait: bool) -> bool:
        """Add the queued jobs to the batch (waiting for one when ``wait``); False once
        ``close`` asked the worker to stop."""
        try:
            job = self._jobs.get(block=wait)
            while job is not None:
                if job.cancelled.is_set():  # its client left while it was queued
                    self.counts["cancelled"] += 1
                elif isinstance(job, _Call):
                    try:
                        job.emit(job.fn(self.model, self.tokenizer))
                        self.counts["completed"] += 1
                    except Exception as exc:
                        job.emit(exc)
                        self.counts["failed"] += 1
                else:
                    try:
                        live[engine.add(job.prompt, job.settings, job.sampling)] = job
                    except ValueError as exc:  # a mode the model lacks: refused, nothing ran
                        job.emit(exc)
                job = self._jobs.get_nowait()
            return False
        except queue.Empty:
            return True

    def _step(self, engine: Engine, live: dict[Row, _Job]) -> list[tuple[Row, Step]]:
        """One step of the batch; if it raises, every request in it fails with the error."""
        try:
            return engine.step()
        except Exception as exc:
            engine.fail()
            for job in live.values():
                job.emit(exc)
            self.counts["failed"] += len(live)
            live.clear()
            return []

    def _hand_out(self, engine: Engine, live: dict[Row, _Job], events) -> None:
        """Turn each row's Step into text for its request; end the requests whose
        text ended."""
        for row, step in events:
            job = live.get(row)
            if job is None:  # ended earlier (a stop string) or cancelled
                continue
            try:
                chunk = job.text.feed(step)
                block = self._block(step) if job.blocks and step.block is not None else None
            except Exception as exc:  # this request fails; the batch goes on
                self._drop(engine, live, row)
                job.emit(exc)
                self.counts["failed"] += 1
                continue
            if job.text.finished:  # a stop string ends a row the engine would continue
                self._drop(engine, live, row)
            if block is not None:
                job.emit(block)
            if chunk is not None:
                job.emit(chunk)
            if job.text.finished:
                job.emit(_Done())
                self.counts["completed"] += 1

    def _block(self, step: Step) -> BlockStep:
        """The block of a diffusion Step, with each token's text (None for MASK)."""
        mask = self.model.args.mask_token_id
        tokens = [None if t == mask else self.piece(t) for t in step.block]
        return BlockStep(
            step.block_start,
            step.stats.rounds,
            list(step.block),
            tokens,
            list(step.committed or []),
            step.stats,
        )

    def piece(self, token: int) -> str:
        """The text of one token (cached: diffusion blocks and logprobs repeat tokens)."""
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    @staticmethod
    def _drop(engine: Engine, live: dict[Row, _Job], row: Row) -> None:
        """Take ``row`` out of the batch (its state goes to the prefix cache)."""
        del live[row]
        engine.cancel(row)
