"""Reaching a Ray cluster: the optional import, a quick check that an address answers, joining or starting one.

Without ``address`` a small local cluster starts for the job (as many CPUs as the workers need, no
dashboard, its session files in a temporary folder) and is shut down afterwards. With ``address``
(``"auto"``, ``"HOST:PORT"`` of a head node started by ``ray start --head``, or ``"ray://HOST:PORT"``)
the job joins that cluster and leaves it running. If this process is already connected to Ray
(``ray.init`` was called), that connection is used and left open.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmscope.errors import LmscopeError

__all__ = ["check_address", "cluster_processes", "connect", "end_processes", "local_cpus", "require_ray"]

INSTALL = "pip install 'lmscope[distributed]'"
TIMEOUT_S = 5.0  # how long an address may take to answer before it counts as not answering


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise LmscopeError(f"the Ray engine needs the ray package: {INSTALL}") from None
    return ray


def check_address(address: str | None) -> None:
    """A clear error if ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) does not answer within a few seconds.

    ``None`` and ``"auto"`` pass (``"auto"`` is checked by Ray when joining, which fails at once).
    """
    if address is None or address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LmscopeError(f"Ray address {address!r} is not HOST:PORT: give e.g. 10.0.0.1:6379 or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S):
            pass
    except OSError as error:
        why = "no answer" if isinstance(error, TimeoutError) else " ".join((error.strerror or str(error)).split())
        raise LmscopeError(
            f"no Ray cluster answers at {address} ({why} within {TIMEOUT_S:g} s): start one there with "
            "`ray start --head`, check the address, or leave out --address to start a local cluster"
        ) from None


@contextlib.contextmanager
def connect(address: str | None, cpus: float, gpus: float | None) -> Iterator[Any]:
    """Ray, connected: to the running connection, to the cluster at ``address``, or to a new local one.

    A local cluster gets ``cpus`` CPUs and ``gpus`` GPUs (what the workers ask for) and is shut down on
    exit, its session folder removed.
    """
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    check_address(address)
    level = os.environ.get("RAY_BACKEND_LOG_LEVEL")
    os.environ["RAY_BACKEND_LOG_LEVEL"] = level or "error"  # Ray's retry warnings would bury lmscope's error
    quiet = dict(log_to_driver=False, logging_level=logging.ERROR)
    temporary = None
    try:
        if address is None:
            temporary = tempfile.mkdtemp(prefix="lmscope-ray-")  # short: Ray's socket paths must stay short
            try:
                ray.init(
                    num_cpus=cpus,
                    num_gpus=gpus,
                    include_dashboard=False,
                    _temp_dir=temporary,
                    **quiet,
                )
            except Exception as error:  # Ray raises a bare Exception when its processes start too slowly
                end_processes(temporary)
                raise LmscopeError(
                    f"a local Ray cluster did not start ({' '.join(str(error).split())[:200]}): try again when the "
                    "machine is less busy, or start one with `ray start --head` and pass --address auto"
                ) from None
        else:
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, RuntimeError) as error:
                raise LmscopeError(
                    f"cannot join the Ray cluster at {address}: {' '.join(str(error).split())[:200]}: check that "
                    "`ray start --head` runs there and, if it uses token authentication, set RAY_AUTH_MODE=token "
                    "with its token (`ray get-auth-token`); or leave out --address to start a local cluster"
                ) from None
        yield ray
    finally:
        ray.shutdown()  # also ends the processes of a local cluster that failed to start
        if level is None:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)
        if temporary is not None:
            end_processes(temporary)
            shutil.rmtree(temporary, ignore_errors=True)


def local_cpus() -> int:
    """CPUs this machine offers a local cluster."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cluster_processes(folder: str) -> list[int]:
    """Ids of the running processes of the local cluster whose session files are in ``folder`` (Linux): those
    named with it, and those writing their logs there (Ray renames its agents and workers, ``ray::...``)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        if int(entry.name) == os.getpid():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if folder in line or any(os.readlink(fd).startswith(folder) for fd in (entry / "fd").iterdir()):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def end_processes(folder: str, wait_s: float = 10.0) -> list[int]:
    """End the processes of the local cluster in ``folder`` (a start that failed half-way leaves some that
    ``ray.shutdown`` does not know): SIGTERM, then SIGKILL to those still there after ``wait_s``; returns
    any still running a few seconds after that."""
    for signal_, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 5.0)):
        for pid in cluster_processes(folder):
            with contextlib.suppress(OSError):
                os.kill(pid, signal_)
        deadline = time.monotonic() + wait
        while cluster_processes(folder) and time.monotonic() < deadline:
            time.sleep(0.2)
    return cluster_processes(folder)
