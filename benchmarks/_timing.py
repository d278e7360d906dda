"""Shared timing helpers for the benchmarks (not collected by pytest)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

UD_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ud-english-ewt"


def ud_sentences(split: str = "dev") -> list[str]:
    """Sentences of Universal Dependencies English EWT (CC BY-SA 4.0), from ``shared/data``."""
    path = UD_DIR / f"en_ewt-ud-{split}.conllu"
    prefix = "# text = "
    return [line[len(prefix) :].strip() for line in path.open(encoding="utf-8") if line.startswith(prefix)]


def median_seconds(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Median times of several functions run alternately, so machine load hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
