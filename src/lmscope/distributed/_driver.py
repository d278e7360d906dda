"""The driver's own shards: while the workers of a local Ray cluster start, the driver collects.

Workers take seconds to start (each imports torch and transformers, then receives and loads the
model), and during them the driver holds the model, loaded and warm. :class:`Helper` is a thread
that takes shards from the front of the queue and writes them exactly as a worker does (the same
batches, the same :func:`lmscope.analysis.collect.batch_part` and
:func:`lmscope.analysis._collection.write_shard`), until the workers are ready: then it finishes
the shard in hand and takes no other. It runs the model on as many torch threads as each worker
(``worker_cpus``, 1 by default), leaving the other cores to the starting workers: torch's sums can
differ in their last bits between thread counts for some shapes (T5's decoder, for one), and the
driver's shards must equal the workers'. It starts
once Ray answers, not before: Ray gives its own processes a fixed time to start (30 s), which a
busy machine can exceed when the driver computes meanwhile.

Only a cluster the job starts itself is helped this way: a job that joins a cluster (``address``)
may run on a machine that is not meant to compute.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["Helper"]


class Helper(threading.Thread):
    """Collects shards from ``pending`` (shard numbers, shared with the driver's loop) into ``root``.

    :meth:`finish`: take no new shard (the one in hand is completed); :meth:`abort`: stop after the
    batch in hand, leaving its shard unwritten. ``done`` maps each written shard to its timings;
    ``error`` holds what the work raised, if anything.
    """

    def __init__(self, job: Any, root: Path, batches: dict[int, Any], pending: deque[int], threads: int = 1):
        super().__init__(name="lmscope-driver-shards", daemon=True)
        self.job, self.root, self.batches, self.pending = job, root, batches, pending
        self.threads = threads  # torch threads, as each worker has
        self.lock = threading.Lock()  # "stopped?" and "take a shard" happen together
        self.stopped = False
        self.aborted = threading.Event()
        self.done: dict[int, dict[str, Any]] = {}
        self.error: BaseException | None = None

    def finish(self) -> list[int]:
        """Take no new shard; returns the shards still pending (the driver's loop hands them to the workers)."""
        with self.lock:
            self.stopped = True
            return list(self.pending)

    def abort(self) -> None:
        """Stop as soon as the batch in hand is done, its shard left unwritten; waits for the thread."""
        self.finish()
        self.aborted.set()
        if self.is_alive():
            self.join()

    def _take(self) -> int | None:
        with self.lock:
            if self.stopped or not self.pending:
                return None
            return self.pending.popleft()

    def run(self) -> None:
        import torch

        from lmscope.analysis._collection import write_shard
        from lmscope.analysis.collect import batch_part
        from lmscope.distributed._worker import unpack

        job, threads = self.job, torch.get_num_threads()
        torch.set_num_threads(self.threads)  # as a worker runs; the other cores are for the starting workers
        try:
            with torch.no_grad():  # (grad mode is per thread)
                while (number := self._take()) is not None:
                    began, parts = time.perf_counter(), []
                    for batch in self.batches[number]:
                        if self.aborted.is_set():
                            return
                        starts, ids, sources = unpack(batch)
                        parts.append(
                            batch_part(job.loaded, ids, starts, job.sites, job.layers, job.pad, job.stack, sources)
                        )
                    write_shard(parts, self.root, number)
                    seconds = round(time.perf_counter() - began, 3)
                    self.done[number] = {"seconds": seconds, "attempts": 1, "host": socket.gethostname()}
                    self.done[number]["worker"] = "driver"
        except BaseException as error:  # handed to the driver's thread, which raises it
            self.error = error
        finally:
            torch.set_num_threads(threads)
