"""A corpus collection on Ray: the same shards as the single-process engine, collected by workers.

The shards are planned before any work starts, deterministically from the texts and settings alone
(not from the number of workers): texts sorted by length are cut into batches exactly as
:func:`lmscope.collect` cuts them, and consecutive batches are grouped into the shards the
single-process engine would write (a shard closes once it holds ``shard_mb`` of activations). So
both engines write the same files, and a collection reads the same whichever engine made it.

Each worker (an actor holding the model) collects one shard at a time and writes it under a
temporary name, then renames it. A worker that dies mid-shard is restarted by Ray (up to
``RESTARTS`` times) and its shard is given out again, to whichever worker is free (at most
``RETRIES`` times per shard). The driver alone writes ``collection.partial.json`` (after each
finished shard) and ``collection.json`` (last); a job that is stopped and run again keeps every
shard that is complete on disk and redoes the others.

Either stack of an encoder-decoder model is collected as the single-process engine collects it:
each text of a batch travels as (start on the token axis, token ids) and, for the decoder, its
source's token ids as well; the workers run the stack the job names (``Job.stack``).

Only the driver needs the texts; the model goes to the workers once, through Ray's object store.
While the workers of a local cluster that the job starts come up, the driver collects the first
shards itself (:mod:`lmscope.distributed._driver`), so the seconds they take to start are not lost.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from lmscope._files import TEMP_PREFIX
from lmscope.analysis._collection import META, PARTIAL, Collection, write_json
from lmscope.analysis.collect import Job, _batches, _resume, _run_batch, manifest
from lmscope.distributed._cluster import connect, local_cpus, require_ray
from lmscope.distributed._driver import Helper
from lmscope.distributed._worker import EXIT_HOOK, Worker
from lmscope.errors import LmscopeError

__all__ = ["collect_on_ray", "plan_shards"]

RESTARTS = 3  # times Ray restarts a worker process that died
RETRIES = 3  # times one shard is given out again after its worker died
PROBE_S = 0.5  # seconds between probes of a worker that Ray is restarting
STOP_S = 20.0  # the longest a stopped job waits for its worker processes to end

# Called by the driver with each finished shard's number (tests stop a job half-way through it).
_after_shard: Any = None


def plan_shards(job: Job, features: dict[str, int]) -> list[list[list[int]]]:
    """Shards as lists of batches (lists of text indices), exactly as the single-process engine cuts them."""
    per_token = 8 + 4 * sum(features[site] for site in job.sites) * len(job.layers)  # "dest" int64 + float32 rows
    limit = job.shard_mb * 2**20
    shards: list[list[list[int]]] = []
    current: list[list[int]] = []
    buffered = 0
    for group in _batches(job.ids, job.batch_size):
        current.append(group)
        buffered += per_token * sum(len(job.ids[i]) for i in group)
        if buffered >= limit:
            shards.append(current)
            current, buffered = [], 0
    if current:
        shards.append(current)
    return shards


def _features(job: Job) -> dict[str, int]:
    """Features per site, from a forward pass over one token."""
    import torch

    with torch.no_grad():
        sources = None if job.sources is None else [job.sources[0]]
        captured = _run_batch(job.loaded, [job.ids[0][:1]], job.sites, job.layers, job.pad, job.stack, sources)
    return {site: int(tensor.shape[-1]) for site, tensor in captured.items()}


def _complete(path: Path, tokens: int) -> bool:
    """Whether ``path`` is a finished shard of ``tokens`` rows (renamed into place only once complete)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            size = int.from_bytes(file.read(8), "little")
            header = json.loads(file.read(size))
        return header["dest"]["shape"] == [tokens]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def collect_on_ray(
    job: Job,
    root: Path,
    *,
    restart: bool = False,
    progress: bool = True,
    address: str | None = None,
    workers: int | None = None,
    worker_cpus: int = 1,
    worker_gpus: float = 0,
) -> Collection:
    """Collect ``job`` into ``root`` on Ray workers (``lmscope.collect(..., engine="ray")`` calls this).

    ``address``: a running cluster to join (else a local one starts); ``workers``: how many actors hold
    the model (default: as many as the cluster's CPUs, or GPUs, hold); each uses ``worker_cpus``
    CPUs (also its torch threads) and ``worker_gpus`` GPUs.
    """
    if worker_cpus < 1 or worker_gpus < 0 or (workers is not None and workers < 1):
        raise LmscopeError("workers and worker_cpus must be at least 1, and worker_gpus at least 0")
    if getattr(job.loaded.model, "hf_device_map", None):
        raise LmscopeError(
            "the Ray engine sends the whole model to each worker: load it without device_map (--device-map)"
        )
    began = time.perf_counter()
    features = _features(job)
    shards = plan_shards(job, features)
    names = [f"shard-{n:05d}.safetensors" for n in range(len(shards))]
    lengths = np.array([len(seq) for seq in job.ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    tokens = [int(sum(lengths[i] for group in shard for i in group)) for shard in shards]

    record = _resume(root, job.plan, restart)
    for temporary in root.glob(f"{TEMP_PREFIX}*shard-*.safetensors"):  # partial shards of a stopped run
        temporary.unlink(missing_ok=True)
    done = {n for n in range(len(shards)) if _complete(root / names[n], tokens[n])}
    for stale in set(root.glob("shard-*.safetensors")) - {root / names[n] for n in done}:
        stale.unlink(missing_ok=True)  # written by a run of another plan, or damaged
    batches_before = np.cumsum([0, *[len(shard) for shard in shards]]).tolist()

    def save_record() -> None:
        prefix = 0  # the single-process engine resumes after the finished shards' first gap
        while prefix < len(shards) and prefix in done:
            prefix += 1
        record.update(engine="ray", shards=names[:prefix], batches=batches_before[prefix], features=features)
        record.update(shard_tokens=tokens[:prefix], done=sorted(done))
        write_json(root / PARTIAL, record)

    save_record()
    todo = [n for n in range(len(shards)) if n not in done]
    timings: dict[int, dict[str, Any]] = {}
    retried = 0
    started = cluster = time.perf_counter()
    count = workers or 1
    helper = None
    if todo:
        local = max(1, workers or local_cpus() // worker_cpus)  # workers of a local cluster
        gpus = None if workers is None and worker_gpus else worker_gpus * local  # None: as many as there are
        batches = {n: [job.batch(group, starts) for group in shards[n]] for n in todo}
        payload = _payload(job)  # before the driver's own shards run the model (their hooks come and go)
        helps = _starts_local(address)
        try:
            with connect(address, local * worker_cpus, gpus) as ray:
                cluster = time.perf_counter()
                if helps:  # the driver collects while the workers start (not before: Ray's start has a time limit)
                    helper = Helper(job, root, batches, deque(todo), worker_cpus)
                    helper.start()
                count = _fit(ray, worker_cpus, worker_gpus, workers)
                run = _Run(ray, job, root, count, worker_cpus, worker_gpus, payload)
                payload = b""  # (Ray's object store holds it now)
                try:
                    started = time.perf_counter()
                    rest = helper.finish() if helper is not None else todo
                    timings, retried = run.collect(rest, batches, tokens, done, save_record, progress, len(shards))
                finally:
                    run.stop()
            if helper is not None:
                helper.join()  # the shard in hand
        finally:
            if helper is not None:
                helper.abort()  # (stopped early: the thread writes nothing more)
        if helper is not None:
            if helper.error is not None:
                raise helper.error
            timings.update(helper.done)
            done.update(helper.done)
            save_record()
    seconds = time.perf_counter() - began
    collected = sum(tokens[n] for n in timings)
    shard_rows = [
        {"name": names[n], "tokens": tokens[n], **timings.get(n, {"resumed": True})} for n in range(len(shards))
    ]
    run_info = {
        "engine": "ray",
        "workers": count,
        "worker_cpus": worker_cpus,
        "worker_gpus": worker_gpus,
        "shard_tokens": tokens,
        "timings": {
            "seconds": round(seconds, 3),
            "startup_seconds": round(started - began, 3),
            "cluster_seconds": round(max(cluster - began, 0.0), 3),  # until Ray answered
            "driver_shards": len(helper.done) if helper is not None else 0,
            "tokens_per_second": round(collected / max(seconds, 1e-9), 1),  # start and stop included
            "shards_retried": retried,
            "shards": shard_rows,
        },
    }
    meta = manifest(job, features, names, run_info)
    write_json(root / META, meta)  # last: the folder now holds a finished collection
    (root / PARTIAL).unlink(missing_ok=True)
    return Collection(meta, [root / name for name in names], root)


def _starts_local(address: str | None) -> bool:
    """Whether the job starts a local cluster of its own (not joining one, nor using this process's connection)."""
    return address is None and not require_ray().is_initialized()


def _payload(job: Job) -> bytes:
    """The model as the workers receive it: ``torch.save`` bytes of the ``LoadedModel``."""
    import torch

    buffer = io.BytesIO()
    with _without_local_hooks(job.loaded.model):
        torch.save(job.loaded, buffer)
    return buffer.getvalue()


def _fit(ray: Any, cpus: int, gpus: float, workers: int | None) -> int:
    """How many workers of ``cpus`` CPUs and ``gpus`` GPUs to start: ``workers`` if the cluster holds them
    (else a clear error rather than actors that wait for ever), by default as many as it holds."""
    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // cpus)
    if gpus:
        fits = min(fits, int(total.get("GPU", 0) // gpus))
    if fits < 1 or (workers is not None and workers > fits):
        asked = f"{workers or 1} worker{'s' if (workers or 1) > 1 else ''} of {cpus} CPUs and {gpus:g} GPUs"
        raise LmscopeError(
            f"the Ray cluster has {total.get('CPU', 0):g} CPUs and {total.get('GPU', 0):g} GPUs: not enough for "
            f"{asked}: ask for fewer (--workers, --worker-cpus, --worker-gpus) or add machines"
        )
    return workers or fits


class _Run:
    """The actors of one job, and the loop that hands them shards."""

    def __init__(self, ray: Any, job: Job, root: Path, count: int, cpus: int, gpus: float, payload: bytes):
        self.ray, self.job = ray, job
        self.pids: set[int] = set()  # this machine's worker processes, which stop() waits for
        self.model = ray.put(payload)  # kept while the job runs: restarted workers fetch it again
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=RESTARTS, max_task_retries=0)(Worker)
        hook = os.environ.get(EXIT_HOOK)
        self.actors = [remote.remote([self.model], str(root), cpus, gpus > 0, hook) for _ in range(count)]
        try:
            checks = ray.get([actor.check.remote() for actor in self.actors])
        except ray.exceptions.RayError as error:
            self.stop()
            raise LmscopeError(f"the Ray workers could not start: {_cause(error)}") from None
        for answer in checks:
            self._note(answer)
        errors = [c["error"] for c in checks if c["error"]]
        if errors:
            self.stop()
            raise LmscopeError(f"{errors[0]}: the output folder must be a shared folder every worker can write")

    def collect(self, todo: list[int], batches: dict[int, Any], tokens: list[int], done: set[int],
                save: Any, progress: bool, total: int) -> tuple[dict[int, dict[str, Any]], int]:  # fmt: skip
        """Hand out the shards in ``todo`` until all are written; returns their timings and the retries.

        Each worker has one task in flight: a shard, or (while Ray restarts a worker that died) a
        probe that returns once the new process is up. A restarting worker answers calls with
        ``ActorUnavailableError`` at once, so it is probed every ``PROBE_S`` until it answers; a worker
        past its restarts (``ActorDiedError`` to a probe) is given up.
        """
        from tqdm.auto import tqdm

        ray, job = self.ray, self.job
        pending: deque[int] = deque(todo)
        inflight: dict[Any, tuple[int, int | None]] = {}  # ref -> (worker, shard or None for a probe)
        restarting: dict[int, float] = {}  # worker -> when to probe it next
        gone: set[int] = set()
        attempts: dict[int, int] = {}
        timings: dict[int, dict[str, Any]] = {}
        retried, collected, began = 0, 0, time.perf_counter()
        bar = tqdm(total=total, initial=total - len(todo), desc="collect", unit="shard", disable=not progress)

        def submit(worker: int) -> None:
            if pending:
                number = pending.popleft()
                ref = self.actors[worker].run.remote(number, batches[number], job.sites, job.layers, job.pad, job.stack)
                inflight[ref] = (worker, number)

        def show() -> None:
            rate = collected / max(time.perf_counter() - began, 1e-9)
            alive = len(self.actors) - len(restarting) - len(gone)
            bar.set_postfix_str(f"{rate:,.0f} tok/s, {alive}/{len(self.actors)} workers, {retried} retried")

        try:
            for worker in range(len(self.actors)):
                submit(worker)
            show()
            while inflight or (pending and restarting):
                for worker, when in list(restarting.items()):  # probe restarting workers that are due
                    if when <= time.monotonic() and all(w != worker for w, _ in inflight.values()):
                        inflight[self.actors[worker].check.remote()] = (worker, None)
                if not inflight:  # only restarting workers, none due for a probe yet
                    time.sleep(PROBE_S)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=PROBE_S)
                if not ready:
                    continue
                worker, number = inflight.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayActorError as error:
                    if number is None:  # a probe: still restarting, or past its restarts
                        if isinstance(error, ray.exceptions.ActorUnavailableError):
                            restarting[worker] = time.monotonic() + PROBE_S
                        else:
                            restarting.pop(worker, None)
                            gone.add(worker)
                            if len(gone) == len(self.actors):
                                raise LmscopeError(
                                    f"every Ray worker died ({_cause(error)}): check their logs"
                                ) from None
                        show()
                        continue
                    if worker not in restarting:  # the worker process died during this shard: redo it
                        attempts[number] = attempts.get(number, 0) + 1
                        retried += 1
                        if attempts[number] > RETRIES:
                            raise LmscopeError(
                                f"shard {number} failed {attempts[number]} times, its worker dying each time "
                                f"({_cause(error)}): check the workers' memory and logs"
                            ) from None
                    pending.appendleft(number)
                    restarting[worker] = time.monotonic()
                    show()
                    continue
                except ray.exceptions.RayTaskError as error:  # an error in the work itself: retrying would not help
                    raise _task_error(error) from None
                self._note(result)
                if number is None:  # a restarted worker answers: back to work
                    restarting.pop(worker, None)
                    if result["error"]:
                        raise LmscopeError(f"{result['error']}: the output folder must be a shared folder")
                    submit(worker)
                    show()
                    continue
                done.add(number)
                collected += result["tokens"]
                timings[number] = {
                    "seconds": round(result["seconds"], 3),
                    "attempts": attempts.get(number, 0) + 1,
                    "host": result["host"],
                }
                save()
                if _after_shard is not None:
                    _after_shard(number)
                bar.update(1)
                show()
                submit(worker)
        finally:
            bar.close()
        if pending:
            raise LmscopeError("the Ray workers stopped before every shard was written: run the job again to resume")
        return timings, retried

    def _note(self, answer: dict[str, Any]) -> None:
        """Remember the process of a worker that answered, if it runs on this machine."""
        if answer.get("host") == socket.gethostname() and answer.get("pid"):
            self.pids.add(int(answer["pid"]))

    def stop(self) -> None:
        """End every actor, and wait for this machine's worker processes to be gone, so a stopped
        job leaves no worker writing (a rerun that starts at once finds no file still changing)."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # an actor already gone
                self.ray.kill(actor, no_restart=True)
        deadline = time.monotonic() + STOP_S
        while self.pids and time.monotonic() < deadline:
            self.pids = {pid for pid in self.pids if _alive(pid)}
            if self.pids:
                time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _without_local_hooks(model: Any) -> Any:
    """Set aside, while the model is pickled, the forward hooks that cannot be pickled.

    transformers installs closures as forward hooks the first time a model records its outputs
    (``output_attentions``, ``output_hidden_states``), which makes a model that has run once
    unpicklable. They are removed while the model is saved and put back afterwards; the module's
    "installed" mark is lifted with them, so a worker's copy installs its own on first use.
    """
    saved = {module: dict(module._forward_hooks) for module in model.modules() if module._forward_hooks}
    marked = [m for m in model.modules() if getattr(m, "_output_capturing_hooks_installed", False)]
    for module, hooks in saved.items():
        for hook_id, hook in hooks.items():
            if "<locals>" in getattr(hook, "__qualname__", ""):
                del module._forward_hooks[hook_id]
    for module in marked:
        module._output_capturing_hooks_installed = False
    try:
        yield
    finally:
        for module, hooks in saved.items():  # back in their order
            module._forward_hooks.clear()
            module._forward_hooks.update(hooks)
        for module in marked:
            module._output_capturing_hooks_installed = True


def _cause(error: Exception) -> str:
    return " ".join(str(error).split())[:300]


def _task_error(error: Any) -> LmscopeError:
    """The error a worker raised, as one line (lmscope's own errors keep their message)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, LmscopeError):
        return LmscopeError(str(cause))
    return LmscopeError(f"a Ray worker failed: {' '.join(str(cause or error).split())[-300:]}")
