"""A Ray worker of a collection: an actor that holds the model and writes the shards it is given.

The driver sends the model once through Ray's object store (``torch.save`` bytes of the
``LoadedModel``, so a model on any device loads on the worker's CPU first), and each actor moves it
to its GPU if it was given one. A shard is a list of batches; the actor runs them with lmscope's
capture (:func:`lmscope.analysis.collect.batch_part`, exactly as the single-process engine does) and
writes the shard under a temporary name, then renames it (:func:`lmscope.analysis._collection.write_shard`),
so a worker that dies mid-shard never leaves a shard that reads as valid.
"""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

__all__ = ["EXIT_HOOK", "Worker", "check_folder", "unpack"]

# Tests set this (``"SHARD:MARKER"``) to make a worker process exit in the middle of shard SHARD once:
# the first worker to reach it creates the file MARKER and exits, as a crashed machine would.
EXIT_HOOK = "LMSCOPE_TEST_WORKER_EXIT"


class Worker:
    """Holds the model; :meth:`run` collects one shard into ``root`` (wrapped with ``ray.remote`` by the driver)."""

    def __init__(self, model: list[Any], root: str, threads: int, gpu: bool, exit_hook: str | None = None):
        import ray
        import torch

        torch.set_num_threads(threads)
        # [ref]: a reference inside a list is not resolved by Ray, so a restarted worker fetches it again
        self.loaded = torch.load(io.BytesIO(ray.get(model[0])), map_location="cpu", weights_only=False)
        if gpu and torch.cuda.is_available():
            self.loaded.model.to("cuda")
        self.root, self.exit_hook = Path(root), exit_hook

    def check(self) -> dict[str, Any]:
        """Where this worker runs, and an error if it cannot write into the collection's folder."""
        return {"host": socket.gethostname(), "pid": os.getpid(), "error": check_folder(self.root)}

    def run(
        self, number: int, batches: list[list[tuple[Any, ...]]], sites: tuple[str, ...], layers: tuple[int, ...],
        pad: int, stack: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Shard ``number`` from ``batches`` (each a list of (start on the token axis, token ids) per text, and
        for an encoder-decoder model's decoder (``stack="decoder"``) the text's source token ids third)."""
        import torch

        from lmscope.analysis._collection import write_shard
        from lmscope.analysis.collect import batch_part

        began = time.perf_counter()
        parts = []
        with torch.no_grad():
            for batch in batches:
                starts, ids, sources = unpack(batch)
                parts.append(batch_part(self.loaded, ids, starts, sites, layers, pad, stack, sources))
                self._maybe_exit(number)
        write_shard(parts, self.root, number)
        rows = sum(len(part["dest"]) for part in parts)
        seconds = time.perf_counter() - began
        return {"number": number, "tokens": rows, "seconds": seconds, "host": socket.gethostname(), "pid": os.getpid()}

    def _maybe_exit(self, number: int) -> None:
        if not self.exit_hook:
            return
        shard, _, marker = self.exit_hook.partition(":")
        if int(shard) == number and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)


def check_folder(root: str | os.PathLike[str]) -> str | None:
    """Why this process cannot write a file into ``root`` (it may not see the folder at all), or None."""
    probe = Path(root) / f".lmscope-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        why = " ".join((error.strerror or str(error)).split())
        return f"a worker on {socket.gethostname()} cannot write into {root} ({why})"
    return None


def unpack(batch: list[tuple[Any, ...]]) -> tuple[list[int], list[list[int]], list[list[int]] | None]:
    """A batch as the driver sends it (:meth:`lmscope.analysis.collect.Job.batch`): each text's start on the
    token axis, its token ids, and (a decoder's batch) its source token ids, else None."""
    starts, ids = [item[0] for item in batch], [item[1] for item in batch]
    sources = [item[2] for item in batch] if batch and len(batch[0]) > 2 else None
    return starts, ids, sources
