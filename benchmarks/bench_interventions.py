"""Causal tracing and patching on the embedded model, against the straightforward loops, in one run.

Figures (issue 17):
- Causal tracing of a 10-token prompt (31 residual rows, the embedding included, × 10 positions,
  plus 30 attention and 30 MLP rows: 910 restorations, one noise sample): the batched computation
  (a KV-cached corrupted prefix per position, every restoration at that position as one batch)
  against one full forward pass per restoration. Goal: at least 5× faster.
- Attribution patching of every head (one forward, one backward) against exact patching of each
  head (heads × layers patched runs, batched): both times and the speed-up.

- Causal tracing of "The capital of France is" → " Paris" with " France" corrupted: the peak
  (layer, position) of each heatmap, and the best restoration at the subject's last token.
- Faithfulness on 10 prompts (``PROMPTS``): the flow graph's top-k edges ablated against k random
  edges (mean logit drop of each curve, and on how many prompts the top-k hurt more: goal at least 8
  of 10), and every saliency method's deletion curve against random deletion (ERASER's
  comprehensiveness, its random counterpart, and sufficiency). ``--skip-faithfulness`` leaves them out.

The two sides run alternately so that load on the shared machine hits both alike; ``--quick`` times
causal tracing on the first 6 tokens; ``--repeats N`` times each side N times.

    python benchmarks/bench_interventions.py [--quick] [--skip-faithfulness]
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
PROMPTS = (
    "The capital of France is",
    "The Eiffel Tower is located in the city of",
    "The keys to the cabinet are on the",
    "Water freezes at zero degrees",
    "The opposite of hot is",
    "One, two, three, four,",
    "Monday, Tuesday, Wednesday,",
    "The cat sat on the",
    "She went to the bakery to buy some",
    "The chemical symbol for gold is",
)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


print = functools.partial(print, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 6 tokens of the prompt")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats of each side (the fastest counts)")
    parser.add_argument("--skip-faithfulness", action="store_true", help="leave out the faithfulness figures")
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

    france, t_france = timed(lambda: causal_trace(lm, "The capital of France is", "France", " Paris", samples=3))
    last_subject = france.subject[-1]
    print(
        f"causal tracing {''.join(france.tokens)!r} -> ' Paris' (subject ' France' noised, 3 samples, "
        f"{t_france:.1f} s): clean {france.clean_prob:.3f}, corrupted {france.corrupted_prob:.3f}"
    )
    for i, site in enumerate(france.sites):
        layer, pos = france.peak(site)
        column = france.scores[i][:, last_subject]
        best = int(np.nanargmax(column))
        print(
            f"  {site}: peak layer {layer}, position {pos} {france.tokens[pos]!r} "
            f"(p={float(np.nanmax(france.scores[i])):.3f}); at the subject's last token {last_subject}: "
            f"layer {france.layers[best]} (p={float(column[best]):.3f})"
        )
    if not args.skip_faithfulness:
        faithfulness(lm)


def faithfulness(lm) -> None:
    from lmscope.analysis.faithfulness import FAITHFULNESS_METHODS

    print("faithfulness of the flow graph (threshold 0.04, 3 random draws): mean logit drop, top-k vs random k")
    wins = 0
    for prompt in PROMPTS:
        result, seconds = timed(lambda p=prompt: lm.faithfulness(p, draws=3))
        wins += result.beats_random
        print(
            f"  {prompt!r} -> {result.target!r}: {result.n_units} edges, ks {list(result.ks)}: "
            f"top {result.top_auc:.3f} vs random {result.random_auc:.3f} ({seconds:.1f} s)"
        )
    print(f"  the top-k edges hurt more than random on {wins} of {len(PROMPTS)} prompts (goal >= 8)")
    for method in FAITHFULNESS_METHODS[1:]:
        rows = [lm.faithfulness(prompt, method=method, draws=8) for prompt in PROMPTS]
        comp = np.mean([r.comprehensiveness for r in rows])
        rand = np.mean([r.random_comprehensiveness for r in rows])
        suff = np.mean([r.sufficiency for r in rows])
        wins = sum(r.comprehensiveness > r.random_comprehensiveness for r in rows)
        drop = np.mean([r.top_auc for r in rows]), np.mean([r.random_auc for r in rows])
        print(
            f"saliency {method} (zero-embedding deletion, 8 draws), mean over the prompts: comprehensiveness "
            f"{comp:.4f} vs random {rand:.4f} (higher on {wins} of {len(PROMPTS)}), sufficiency {suff:.4f}; "
            f"mean logit drop top {drop[0]:.3f} vs random {drop[1]:.3f}"
        )


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
