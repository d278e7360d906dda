"""Capture overhead, embedded-model load times, and Trace memory (issue: foundation).

    python benchmarks/bench_capture.py

Prints: ``lm.trace`` with all default sites vs a plain Hugging Face forward of the same 128-token
input (median, interleaved runs in one process); first load (GGUF conversion into an empty cache)
vs second load (converted copy), each in a fresh process; bytes held by a 1,024-token Trace with
default sites, and with fewer sites and layers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import interleaved, ud_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TEXT = " ".join(ud_sentences()[:200])


def tokens(lm: lmscope.LM, n: int) -> torch.Tensor:
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    assert len(ids) >= n, len(ids)
    return ids[:n]


def capture_overhead(lm: lmscope.LM) -> None:
    ids = tokens(lm, 128)
    batch = ids[None]

    def plain() -> None:
        with torch.no_grad():
            lm.model(input_ids=batch)

    times = interleaved({"plain": plain, "trace": lambda: lm.trace(ids.tolist())}, repeats=9)
    print(
        f"capture overhead, 128 tokens, default sites: plain forward {times['plain'] * 1e3:.1f} ms, "
        f"lm.trace {times['trace'] * 1e3:.1f} ms, ratio {times['trace'] / times['plain']:.2f}x (goal <= 1.3x)"
    )


def load_times() -> None:
    code = "import time, lmscope; t = time.perf_counter(); lmscope.from_pretrained(); print(time.perf_counter() - t)"
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LMSCOPE_CACHE": cache, "HF_HUB_OFFLINE": "1"}
        first = float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        seconds = [
            float(
                subprocess.run(
                    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
                ).stdout.split()[-1]
            )
            for _ in range(3)
        ]
    second = sorted(seconds)[1]
    print(
        f"embedded load: first (GGUF conversion) {first:.1f} s, second (converted copy, median of 3) "
        f"{second:.2f} s, {first / second:.0f}x faster (goal: second <= 5 s and >= 5x faster)"
    )


def trace_memory(lm: lmscope.LM) -> None:
    ids = tokens(lm, 1024).tolist()
    full = lm.trace(ids).trace.nbytes()
    print(f"trace of 1,024 tokens, default sites, all 30 layers: {full / 2**20:.0f} MiB")
    for label, kwargs in (
        ("resid_post only", {"sites": ["resid_post"]}),
        ("default sites, layers 0-14", {"layers": slice(0, 15)}),
        ("default sites except attn_probs", {"sites": [s for s in lmscope.capture.DEFAULT_SITES if s != "attn_probs"]}),
    ):
        size = lm.trace(ids, **kwargs).trace.nbytes()
        print(f"  {label}: {size / 2**20:.0f} MiB ({size / full:.2f} of full)")


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    load_times()
    lm = lmscope.from_pretrained()
    capture_overhead(lm)
    trace_memory(lm)


if __name__ == "__main__":
    main()
