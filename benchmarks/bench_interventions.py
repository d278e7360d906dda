"""Causal tracing and patching on the embedded model, against the straightforward loops, in one run.

Figures (issue 17):
- Causal tracing of a 10-token prompt (31 residual rows, the embedding included, × 10 positions,
  plus 30 attention and 30 MLP rows: 910 restorations, one noise sample): the batched computation
  (a KV-cached corrupted prefix per position, every restoration at that position as one batch)
  against one full forward pass per restoration. Goal: at least 5× faster.
- Attribution patching of every head (one forward, one backward) against exact patching of each
  head (heads × layers patched runs, batched): both times and the speed-up.

The two sides run alternately so that load on the shared machine hits both alike; ``--quick`` times
causal tracing on the first 6 tokens; ``--repeats N`` times each side N times.

    python benchmarks/bench_interventions.py [--quick]
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch

import lmscope
from lmscope.analysis.causal_tracing import causal_trace, causal_trace_loop
from lmscope.analysis.patching import activation_patching

PROMPT = "The Eiffel Tower is located in the city of"  # 10 tokens on SmolLM2
SUBJECT = "Eiffel Tower"


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


print = functools.partial(print, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 6 tokens of the prompt")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of each side (the fastest counts)")
    args = parser.parse_args()
    lm = lmscope.from_pretrained()
    ids = lm.encode(PROMPT).tolist()
    if args.quick:
        ids = ids[:6]
    text = lm.tokenizer.decode(ids)
    print(f"causal tracing of {len(ids)} tokens {text!r}, subject {SUBJECT!r}, one noise sample")
    repeats = max(1, args.repeats)
    fast_times, loop_times = [], []
    for _ in range(repeats):
        fast, t_fast = timed(lambda: causal_trace(lm, ids, SUBJECT, samples=1))
        loop, t_loop = timed(lambda: causal_trace_loop(lm, ids, SUBJECT, samples=1))
        fast_times.append(t_fast)
        loop_times.append(t_loop)
    n = int(np.isfinite(fast.scores).sum())
    diff = float(np.nanmax(np.abs(fast.scores - loop.scores)))
    print(f"  restorations: {n}; largest difference batched vs loop: {diff:.2e}")
    print(f"  batched: {min(fast_times):.2f} s   loop of {n} forward passes: {min(loop_times):.2f} s")
    print(f"  speed-up: {min(loop_times) / min(fast_times):.1f}x (goal >= 5x)")
    print(f"  peak (resid): layer {fast.peak()[0]}, position {fast.peak()[1]} {fast.tokens[fast.peak()[1]]!r}")

    clean, corrupt = "The capital of France is", "The capital of Italy is"
    result = activation_patching(lm, clean, corrupt, " Paris", " Rome", kind="heads")
    n_heads = lm.arch.n_layers * lm.arch.n_heads
    print(
        f"head patching ({n_heads} heads, {clean!r} vs {corrupt!r}): exact {result.exact_seconds:.2f} s "
        f"({n_heads} patched runs, batched), attribution {result.attribution_seconds:.2f} s (one forward and "
        f"backward), speed-up {result.exact_seconds / result.attribution_seconds:.1f}x; "
        f"Spearman rank correlation {result.spearman:.3f}"
    )
    top_exact = {(layer, head) for layer, head, _ in result.top(10)}
    top_attr = {(layer, head) for layer, head, _ in result.top(10, by="attribution")}
    print(f"  top-10 heads shared by exact and attribution patching: {len(top_exact & top_attr)}")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
