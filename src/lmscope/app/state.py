"""The web app's state: loaded models and recorded runs, both bounded, safe under concurrent requests.

* :class:`ModelCache` keeps at most ``size`` models, keyed by ``(model, device, dtype)``, so a
  change of device or dtype really loads the model anew (and the old one is dropped once the cache
  is full). Each key has one lock: every request that runs a model holds it, so concurrent users
  never interleave hooks or gradients on the same weights. A lock lives only while someone holds
  or waits for it, so the lock table is bounded by the requests in flight, not by the keys ever seen.
* :class:`RunCache` keeps runs (a Trace plus the model key it came from) least-recently-used first
  out, bounded both in count and in the bytes their captured tensors hold (``Trace.nbytes``).
  A run holds no reference to the model: analyses re-attach it from the model cache, so evicting a
  model frees its memory even while its runs stay.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscope.capture import Trace

__all__ = ["ModelCache", "ModelKey", "Run", "RunCache"]


@dataclass(frozen=True)
class ModelKey:
    """What identifies a loaded model: its configured name (or path), device and dtype."""

    model: str
    device: str
    dtype: str


class ModelCache:
    """At most ``size`` loaded models, least recently used evicted first; one lock per key."""

    def __init__(self, size: int, load: Callable[[ModelKey], Any]):
        self.size = size
        self._load = load
        self._models: OrderedDict[ModelKey, Any] = OrderedDict()
        self._locks: dict[ModelKey, tuple[threading.Lock, int]] = {}  # key -> (lock, holders and waiters)
        self._guard = threading.Lock()

    @contextmanager
    def lock(self, key: ModelKey) -> Iterator[None]:
        """Hold the lock that serializes all work on the model under ``key``."""
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users = self._locks[key][1] - 1
                if users:
                    self._locks[key] = (lock, users)
                else:
                    del self._locks[key]

    def locks(self) -> int:
        """How many locks the table holds (one per key in use)."""
        with self._guard:
            return len(self._locks)

    @contextmanager
    def using(self, key: ModelKey) -> Iterator[Any]:
        """The model under ``key`` (loaded if needed), held exclusively for the block."""
        with self.lock(key):
            with self._guard:
                lm = self._models.get(key)
                if lm is not None:
                    self._models.move_to_end(key)
            if lm is None:
                lm = self._load(key)  # outside the guard: other models stay usable while this loads
                with self._guard:
                    self._models[key] = lm
                    while len(self._models) > self.size:
                        self._models.popitem(last=False)
            yield lm

    def put(self, key: ModelKey, lm: Any) -> None:
        """Add an already loaded model under ``key`` (e.g. one the caller holds), evicting as needed."""
        with self.lock(key), self._guard:
            self._models[key] = lm
            self._models.move_to_end(key)
            while len(self._models) > self.size:
                self._models.popitem(last=False)

    def loaded(self) -> list[ModelKey]:
        """Keys of the loaded models, least recently used first."""
        with self._guard:
            return list(self._models)


@dataclass(frozen=True)
class Run:
    """One recorded run: its Trace, the model it came from (``None`` for an uploaded trace), its summary."""

    id: str
    trace: Trace
    key: ModelKey | None
    nbytes: int
    info: Mapping[str, Any] = field(default_factory=dict)


class RunCache:
    """Runs by id, least recently used dropped first, within ``size`` runs and ``max_bytes`` bytes."""

    def __init__(self, size: int, max_bytes: int):
        self.size = size
        self.max_bytes = max_bytes
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._bytes = 0
        self._guard = threading.Lock()
        self.evicted = 0
        self.store_dir: Path | None = None  # runs stored on disk here have their file deleted when they leave

    def add(self, trace: Trace, key: ModelKey | None, info: Mapping[str, Any] | None = None) -> Run:
        """Store a run (dropping old ones to make room) and return it; ``info["id"]`` is its new id.

        A run stored on disk (``trace.stored``) holds no memory to count."""
        run_id = uuid.uuid4().hex[:16]
        run = Run(run_id, trace, key, 0 if trace.stored else trace.nbytes(), {"id": run_id, **(info or {})})
        with self._guard:
            self._runs[run.id] = run
            self._bytes += run.nbytes
            # The newest run always stays, even if it alone exceeds the byte budget.
            while len(self._runs) > 1 and (len(self._runs) > self.size or self._bytes > self.max_bytes):
                _, old = self._runs.popitem(last=False)
                self._bytes -= old.nbytes
                self.evicted += 1
                self._forget(old)
        return run

    def _forget(self, run: Run) -> None:
        """Delete the file of a run the app stored on disk."""
        stored = run.trace.stored
        if stored is not None and self.store_dir is not None and stored.parent == self.store_dir:
            stored.unlink(missing_ok=True)

    def get(self, run_id: str) -> Run | None:
        with self._guard:
            run = self._runs.get(run_id)
            if run is not None:
                self._runs.move_to_end(run_id)
            return run

    def remove(self, run_id: str) -> bool:
        with self._guard:
            run = self._runs.pop(run_id, None)
            if run is not None:
                self._bytes -= run.nbytes
                self._forget(run)
            return run is not None

    def stats(self) -> dict[str, int]:
        """Count and memory of the cached runs, with their limits."""
        with self._guard:
            return {
                "runs": len(self._runs),
                "bytes": self._bytes,
                "max_runs": self.size,
                "max_bytes": self.max_bytes,
                "evicted": self.evicted,
            }
