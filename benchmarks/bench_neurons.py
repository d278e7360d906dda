"""Corpus collection throughput, and linear CKA in feature-space vs Gram form (issue 7).

    python benchmarks/bench_neurons.py                       # 2,000 UD sentences, embedded model
    python benchmarks/bench_neurons.py --sentences 200 --repeats 3 --threads 1

1. Collection of ``resid_post`` at all 30 layers of the embedded model over UD English EWT dev
   sentences, streamed to shards on disk: batched (``batch_size``) vs one sentence at a time
   (``batch_size=1``, the same code path), plus a plain forward pass per sentence (no capture)
   and ``lm.trace`` per sentence for reference. Tokens per second, peak resident memory above
   the starting point, and the largest difference between batched and per-sentence activations.
2. Linear CKA of two ``[10,000 × 1,536]`` matrices: the feature-space form lmscope uses
   (``‖bᵀa‖²_F / (‖aᵀa‖_F ‖bᵀb‖_F)``) vs the straightforward Gram form (``tokens × tokens``).

Timings are medians of ``--repeats`` runs, interleaved so machine load hits every variant alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable

import numpy as np
import torch

import lmscope
from _timing import peak_rss, ud_sentences
from lmscope.analysis import cka


def bench_collection(texts: list[str], repeats: int, batch_size: int) -> None:
    lm = lmscope.from_pretrained()
    ids = [lm.encode(t)[None] for t in texts]
    n_tokens = sum(x.shape[1] for x in ids)
    print(f"collection: {len(texts)} UD sentences, {n_tokens} tokens, resid_post at 30 layers, {lm.name}")
    kept: dict[int, dict[int, np.ndarray]] = {}  # batch size -> layer -> [tokens, d_model]

    def collect(size: int) -> Callable[[], object]:
        def run() -> None:
            with tempfile.TemporaryDirectory() as out:
                col = lmscope.collect(lm, texts, batch_size=size, out_dir=out, progress=False)
                kept[size] = {layer: col.get("resid_post", layer) for layer in (0, 15, 29)}

        return run

    def plain() -> None:
        with torch.no_grad():
            for x in ids:
                lm.model(input_ids=x, use_cache=False)

    def traced() -> None:
        for text in texts:
            lm.trace(text, sites=("resid_post",))

    variants = {
        f"batched (batch_size={batch_size})": collect(batch_size),
        "one at a time (batch_size=1)": collect(1),
        "plain forward per sentence": plain,
        "lm.trace per sentence": traced,
    }
    lmscope.collect(lm, texts[:64], batch_size=batch_size, progress=False)  # warm-up
    results: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            results[name].append(peak_rss(fn, every=0.005))
    seconds = {name: statistics.median(s for s, _ in runs) for name, runs in results.items()}
    peaks = {name: max(p for _, p in runs) for name, runs in results.items()}
    batched = seconds[f"batched (batch_size={batch_size})"]
    for name in variants:
        print(
            f"  {name:32s} {seconds[name]:8.2f} s  {n_tokens / seconds[name]:8.1f} tokens/s  "
            f"peak +{peaks[name] / 2**20:7.1f} MiB  batched speed-up {seconds[name] / batched:5.2f}x"
        )
    worst = 0.0
    for layer in (0, 15, 29):
        a, b = kept[batch_size][layer], kept[1][layer]
        worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    print(f"  batched == one at a time: largest difference {worst:.2e} of the largest activation (layers 0/15/29)")


def gram_cka(a: np.ndarray, b: np.ndarray) -> float:
    """The straightforward form: centered ``tokens × tokens`` Gram matrices."""
    a, b = a - a.mean(0), b - b.mean(0)
    k, m = a @ a.T, b @ b.T  # [tokens, tokens] each
    return float((k * m).sum() / (np.linalg.norm(k) * np.linalg.norm(m)))


def bench_cka(repeats: int, n: int = 10_000, d: int = 1536) -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, d))
    b = a @ rng.normal(size=(d, d)) / np.sqrt(d) + rng.normal(size=(n, d))
    values: dict[str, float] = {}
    fns = {"feature space": lambda: values.update(f=cka(a, b)), "Gram form": lambda: values.update(g=gram_cka(a, b))}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(peak_rss(fn, every=0.005)[0])
    feature, gram = (statistics.median(times[name]) for name in fns)
    print(f"linear CKA of two [{n} x {d}] matrices (float64): {values['f']:.6f} (Gram form {values['g']:.6f})")
    print(f"  feature space {feature:7.2f} s   Gram form {gram:7.2f} s   speed-up {gram / feature:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="collection repeats (each writes ~2 GB per variant)")
    parser.add_argument("--cka-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip", choices=("collection", "cka"), default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads, repeats = torch.get_num_threads(), f"{args.repeats} / CKA {args.cka_repeats}"
    print(f"torch threads: {threads}, CPUs: {os.cpu_count()}, repeats: {repeats} (medians)")
    if args.skip != "collection":
        bench_collection(ud_sentences()[: args.sentences], args.repeats, args.batch_size)
    if args.skip != "cka":
        bench_cka(args.cka_repeats)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
