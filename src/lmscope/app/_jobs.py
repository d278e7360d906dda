"""Model work off the event loop: a few worker threads, a bounded queue per model, cancellation.

Every request that runs a model (a run, an analysis, opening a trace) becomes a :class:`Job`
queued under its model's key. :class:`Jobs` runs at most one job per key at a time (a model's
hooks and gradients are never shared) on a small fixed set of daemon threads, so:

* the event loop, static files and light routes (``/api/status``, ``/api/config``) never wait
  behind model work, and no thread ever blocks waiting for another request's model;
* each key queues at most ``queue_size`` jobs (running one included) and all keys together at
  most ``max_jobs``; beyond that :class:`Busy` (HTTP 503 with ``Retry-After``);
* a job is cancelled when its client goes away or the server shuts down: its event is set, and
  :func:`cancellable` makes the model's next Transformer block raise :class:`Cancelled`, so even a
  long integrated-gradients run stops within one forward or backward pass.

Few threads also bound the allocator: glibc gives each allocating thread its own heap ("arena"),
and freed tensor memory scattered over many arenas is rarely returned to the system.
:func:`limit_allocator` caps the arenas and :func:`release_memory` returns free heap pages after
each job.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Busy", "Cancelled", "Job", "Jobs", "cancellable", "limit_allocator", "release_memory"]

log = logging.getLogger("lmscope.app")


class Busy(Exception):
    """The queue of a model (or of the whole app) is full: try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was cancelled (its client went away, or the server is shutting down)."""


@dataclass(eq=False)
class Job:
    """One unit of model work: ``work(cancel)`` run on a worker thread; its result in ``future``."""

    key: Hashable
    work: Callable[[threading.Event], Any]
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[Any] = field(default_factory=Future)


class Jobs:
    """A fixed pool of ``workers`` daemon threads running jobs, one at a time per key (see the module)."""

    def __init__(self, workers: int, queue_size: int, max_jobs: int | None = None):
        self.workers = workers
        self.queue_size = queue_size
        self.max_jobs = max_jobs or 4 * queue_size
        self._queues: dict[Hashable, deque[Job]] = {}
        self._running: dict[Hashable, Job] = {}
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._seconds = 1.0  # recent mean job duration, for Retry-After
        self.done = 0

    def submit(self, key: Hashable, work: Callable[[threading.Event], Any]) -> Job:
        """Queue ``work`` under ``key``; :class:`Busy` when the key's (or the app's) queue is full."""
        job = Job(key, work)
        with self._cond:
            if self._closed:
                raise Busy("the server is shutting down", 5)
            waiting = len(self._queues.get(key, ())) + (key in self._running)
            total = sum(map(len, self._queues.values())) + len(self._running)
            if waiting >= self.queue_size or total >= self.max_jobs:
                retry = max(1, min(120, round(self._seconds * (waiting + 1) / max(1, self.workers))))
                if waiting >= self.queue_size:
                    what = f"this model is busy: {waiting} requests are already queued or running"
                    what += f" (queue_size {self.queue_size})"
                else:
                    what = f"the server is busy: {total} requests are already queued or running"
                raise Busy(f"{what}; try again in {retry} s", retry)
            self._queues.setdefault(key, deque()).append(job)
            while len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"lmscope-model-{len(self._threads)}", daemon=True)
                self._threads.append(thread)
                thread.start()
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Cancel ``job``: dropped if still queued, else stopped at its model's next block."""
        job.cancel.set()
        with self._cond:
            queue = self._queues.get(job.key)
            if queue is not None and job in queue:
                queue.remove(job)
                if not queue:
                    del self._queues[job.key]
                job.future.set_exception(Cancelled("cancelled before it started"))

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {
                "workers": self.workers,
                "running": len(self._running),
                "queued": sum(map(len, self._queues.values())),
                "queue_size": self.queue_size,
                "max_jobs": self.max_jobs,
                "done": self.done,
            }

    def close(self, timeout: float = 3.0) -> None:
        """Refuse new jobs, cancel every queued and running one, and wait up to ``timeout`` s for them."""
        with self._cond:
            self._closed = True
            queued = [job for queue in self._queues.values() for job in queue]
            self._queues.clear()
            running = list(self._running.values())
            self._cond.notify_all()
        for job in queued:
            job.cancel.set()
            job.future.set_exception(Cancelled("the server is shutting down"))
        for job in running:
            job.cancel.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _take(self) -> Job | None:
        # The first key (in order of arrival) whose model is free; it then goes to the back.
        for key, queue in self._queues.items():
            if key not in self._running:
                job = queue.popleft()
                del self._queues[key]
                if queue:
                    self._queues[key] = queue
                self._running[key] = job
                return job
        return None

    def _work(self) -> None:
        while True:
            with self._cond:
                while (job := self._take()) is None:
                    if self._closed:
                        return
                    self._cond.wait()
            start, error, result = time.monotonic(), None, None
            try:
                if job.cancel.is_set():
                    raise Cancelled("cancelled before it started")
                result = job.work(job.cancel)
            except BaseException as caught:
                error = caught
            # The key is free before the request hears back, so that its client's next request fits.
            with self._cond:
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - start)
                self.done += 1
                self._running.pop(job.key, None)
                self._cond.notify_all()
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
            del job, result, error  # the result lives on in the future only as long as the request needs it
            release_memory()


@contextmanager
def cancellable(model: Any, cancel: threading.Event | None) -> Iterator[None]:
    """Make every Transformer block of ``model`` (an :class:`~lmscope.LM`) raise :class:`Cancelled`
    once ``cancel`` is set; the hooks are removed when the block ends."""
    if cancel is None:
        yield
        return
    if cancel.is_set():
        raise Cancelled("cancelled")

    def check(module: Any, args: Any) -> None:
        if cancel.is_set():
            raise Cancelled("cancelled")

    handles = [block.register_forward_pre_hook(check) for block in model.arch.blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


_M_ARENA_MAX = -8
_libc: Any = None


def _glibc() -> Any:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _libc = libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc


def limit_allocator(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (``M_ARENA_MAX``) for threads started from now on; False off glibc."""
    libc = _glibc()
    return bool(libc) and libc.mallopt(_M_ARENA_MAX, arenas) == 1


def release_memory() -> None:
    """Return the free pages of every malloc arena to the system (``malloc_trim``; no-op off glibc)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
