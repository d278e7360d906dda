"""Trace size with attention kept as queries and keys vs stored probabilities (issue 15, item 1).

    python benchmarks/bench_trace_size.py [--tokens 1024]

Prints, for the embedded model on a UD English EWT text of ``--tokens`` tokens with default sites:
``trace.nbytes()`` and the saved file's size, with attention kept as q/k (the default) and with
the probabilities stored (site ``attn_probs_stored``); the time of each ``lm.trace``; and the time
to compute one layer's probabilities, all heads and rows, and one query row of every layer, from
q/k. Goal: the default trace at most 0.5x of the 1,812 MiB a 1,024-token trace took when it stored
the probabilities.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import ud_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")
STORED = (*(s for s in lmscope.capture.DEFAULT_SITES if s != "attn_probs"), "attn_probs_stored")
BEFORE_MIB = 1812  # a 1,024-token trace with default sites when they stored attention probabilities


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    n = parser.parse_args().tokens
    lm = lmscope.from_pretrained()
    ids = lm.tokenizer(" ".join(ud_sentences()[:400]), return_tensors="pt")["input_ids"][0]
    assert len(ids) >= n, len(ids)
    ids = ids[:n].tolist()
    sizes = {}
    with tempfile.TemporaryDirectory() as folder:
        for label, sites in (("q/k (default)", None), ("stored probabilities", STORED)):
            start = time.perf_counter()
            trace = lm.trace(ids, sites=sites).trace
            seconds = time.perf_counter() - start
            path = trace.save(Path(folder) / "trace.safetensors")
            sizes[label] = (trace.nbytes(), path.stat().st_size)
            memory, disk = (size / 2**20 for size in sizes[label])
            print(f"{label:>21}: trace.nbytes() {memory:7.0f} MiB, file {disk:7.0f} MiB, lm.trace {seconds:.2f} s")
            if sites is None:
                start = time.perf_counter()
                trace.attention(15)
                whole = time.perf_counter() - start
                start = time.perf_counter()
                for layer in trace.layers:
                    trace.attention(layer, rows=[-1])
                row = time.perf_counter() - start
                print(f"{'':>21}  one layer's probabilities (all heads, rows) {whole * 1e3:.0f} ms; the last row of "
                      f"all {len(trace.layers)} layers {row * 1e3:.0f} ms")  # fmt: skip
            del trace
    lazy, stored = sizes["q/k (default)"], sizes["stored probabilities"]
    print(f"default trace / stored-probabilities trace: {lazy[0] / stored[0]:.2f}x in memory, "
          f"{lazy[1] / stored[1]:.2f}x on disk")  # fmt: skip
    if n == 1024:
        print(f"default trace vs the {BEFORE_MIB} MiB of before: {lazy[0] / 2**20 / BEFORE_MIB:.2f}x (goal <= 0.5x)")


if __name__ == "__main__":
    main()
