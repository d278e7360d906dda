"""Shared timing helpers for the benchmarks (not collected by pytest)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable

from lmscope.analysis.collect import read_texts
from lmscope.probing import ud_file


def ud_sentences(split: str = "dev") -> list[str]:
    """Sentences of Universal Dependencies English EWT (CC BY-SA 4.0), the copy inside lmscope."""
    return read_texts(ud_file(split))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, list[float]]:
    """Wall times of several functions run alternately (after one untimed run each), so machine load hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Median times of several functions run alternately (see :func:`interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats).items()}


def rss() -> int:
    """Resident memory of this process in bytes (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss(fn: Callable[[], object], every: float = 0.001) -> tuple[float, int]:
    """``(seconds, peak extra bytes)`` of ``fn``: resident memory sampled every ``every`` s, minus the level before."""
    before, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(every)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return seconds, max(peak[0], rss()) - before
