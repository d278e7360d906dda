"""Streaming layer similarity over a large collection: time and peak memory.

Linear CKA of every pair of ``resid_post`` layers of the embedded model (SmolLM2-135M: 30 blocks,
d_model 576: 30 x 30 pairs; issue 16's "31 x 31" counts the embeddings too, as ``hidden_states`` does)
over a collection of ``--tokens`` tokens, read one shard at a time
(:func:`lmscope.analysis.streaming.layer_similarity`). Memory is measured as the peak resident set
size of this process during the analysis minus its size before it (the collection is written by a
separate process, so writing it does not count); the goal is under 1 GiB.

By default the collection is synthetic: random activations in lmscope's on-disk collection format
(safetensors shards plus ``collection.json``) with the embedded model's shapes, ``--length``-token
texts, each layer the previous one plus noise, and a large first-token activation like the
model's attention sink. ``--real`` collects UD English EWT sentences with the embedded model
instead (slow on 2 cores: about 600 tokens/s; dev and test hold about 60,000 tokens, so a larger
collection takes them again), in one process or with ``--engine ray`` on Ray workers. ``--collection
DIR`` reuses a collection folder written earlier (by this script with ``--collection``, or by
``lmscope collect``), or keeps the one it writes there. The cost of the analysis does not depend on
the values, only on tokens, layers and features: time grows linearly with tokens, memory does not.

Memory is measured as the peak resident size (``ru_maxrss``: anonymous and file-backed pages, so a
memory-mapped shard counts) minus the size before the analysis, and split into its anonymous and
file-backed peaks (``RssAnon``, ``RssFile``, sampled every 50 ms).

Measured on real shards (UD EWT through the embedded model: shards of 34 to 122 MB, texts of up to
347 tokens), 2 BLAS threads, ``--memory-mb 512``, on 2 cores shared with other work (load 8 to 12,
so the times are rough). Before, a shard was read whole and copied to float64 (the 122 MB one was
mapped, copied in float32 and in float64 at once), each auto-product was copied again for the Gram
matrices, the per-position sums (91 MiB for 347-token texts) were not counted in the budget, and
all of it lived in glibc's heap: the 100,000-token collection grew the process by 1,158 MiB in
317.8 s (an earlier run); its 6 largest shards (7,089 tokens) by 1,164 MiB (1,070 anonymous and
94 file-backed at the peak) in 596 and 190 s over two runs (156 and 135 CPU-seconds). Now the same 6 shards grow it
by 642 MiB (641 anonymous, 1 file-backed: 509 MiB of statistics within the 512 asked, a 96 MiB
piece, scipy's import) in 147 and 232 s (79 and 87 CPU-seconds: the wall times follow the load;
the CPU time is about 0.6 of before with 2 threads, which spin less between fewer, larger products,
and the same on 1 thread: 2,000 synthetic tokens, 24 CPU-seconds before, 27 now, load 7),
with the same matrix (to 2e-15). Products in float32 (added in float64)
were no faster in CPU time here (77 CPU-seconds) and moved CKA by up to 3e-7: not used.
Memory does not grow with the number of shards or tokens; time grows linearly with tokens
(about ``tokens × 465 × 576²`` multiply-adds for 30 layers, float64 BLAS).

    python benchmarks/bench_streaming.py --tokens 5000            # a quick check (synthetic)
    python benchmarks/bench_streaming.py --tokens 100000          # synthetic, 6.9 GB on disk
    python benchmarks/bench_streaming.py --tokens 100000 --real --engine ray --collection /tmp/ud100k
    python benchmarks/bench_streaming.py --collection /tmp/ud100k  # the analysis again, on the same collection
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

D_MODEL, N_LAYERS = 576, 30  # the embedded SmolLM2-135M


def _rss_mb() -> float:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * resource.getpagesize() / 2**20


def _status_mb() -> dict[str, float]:
    """This process's resident memory split: anonymous (heap, arrays) and file-backed (mapped files, libraries)."""
    out = {}
    with open("/proc/self/status") as file:
        for line in file:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) / 2**10  # kB -> MiB
    return out


class _Sampler(threading.Thread):
    """The peak of each of :func:`_status_mb`'s figures, sampled every 50 ms while the analysis runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = _status_mb()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for name, value in _status_mb().items():
                self.peaks[name] = max(self.peaks[name], value)


def write_synthetic(root: Path, tokens: int, length: int, shard_mb: float, seed: int = 0) -> None:
    """A collection of ``tokens`` tokens in texts of ``length`` in the on-disk format, a shard at a time."""
    from lmscope.analysis._collection import FORMAT, META, VERSION, write_json, write_shard

    rng = np.random.default_rng(seed)
    texts = -(-tokens // length)
    lengths = np.full(texts, length)
    lengths[-1] = tokens - length * (texts - 1)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    per_shard = max(1, int(shard_mb * 2**20 // (length * N_LAYERS * D_MODEL * 4)))
    mix = np.eye(D_MODEL) + rng.normal(size=(D_MODEL, D_MODEL)) / (4 * np.sqrt(D_MODEL))
    shards = []
    root.mkdir(parents=True)
    for first in range(0, texts, per_shard):
        group = range(first, min(texts, first + per_shard))
        rows = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in group])
        x = rng.normal(size=(len(rows), D_MODEL)).astype(np.float32)
        sink = np.isin(rows, starts[list(group)])
        part = {"dest": rows.astype(np.int64)}
        for layer in range(N_LAYERS):
            x = (x @ mix + 0.3 * rng.normal(size=x.shape)).astype(np.float32)
            part[f"resid_post.{layer}"] = np.where(sink[:, None], 30 * x, x)
        shards.append(write_shard([part], root, len(shards)).name)
    model = {"name": "synthetic (shapes of SmolLM2-135M)", "model_type": "llama", "family": "llama",
             "n_layers": N_LAYERS, "n_heads": 9, "n_kv_heads": 3, "d_model": D_MODEL, "d_head": 64,
             "vocab_size": 49152, "parallel": False, "post_norm": False, "dtype": "float32",
             "n_neurons": 1536}  # fmt: skip
    ids = [[0] * int(k) for k in lengths]
    meta = {"format": FORMAT, "version": VERSION, "model": model, "sites": ["resid_post"],
            "layers": list(range(N_LAYERS)), "features": {"resid_post": D_MODEL},
            "texts": [f"synthetic text {i}" for i in range(texts)], "token_ids": ids,
            "tokens": [["t"] * len(seq) for seq in ids], "shards": shards}  # fmt: skip
    write_json(root / META, meta)


def write_real(root: Path, tokens: int, shard_mb: float, engine: str, workers: int | None) -> None:
    """A collection of UD English EWT sentences (about ``tokens`` tokens, the sentences taken again when
    they run out) from the embedded model, collected in this process or on Ray."""
    import lmscope
    from lmscope.analysis.collect import read_texts
    from lmscope.probing import ud_file

    lm = lmscope.from_pretrained()
    sentences = read_texts(ud_file("dev")) + read_texts(ud_file("test"))
    texts, total = [], 0
    while total < tokens:
        text = sentences[len(texts) % len(sentences)]
        texts.append(text)
        total += len(lm.tokenizer(text)["input_ids"])
    ray = dict(engine="ray", workers=workers) if engine == "ray" else {}
    lmscope.collect(lm, texts, sites="resid_post", out_dir=root, shard_mb=shard_mb, progress=True, **ray)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--length", type=int, default=64, help="tokens per synthetic text")
    parser.add_argument("--shard-mb", type=float, default=32.0)
    parser.add_argument("--memory-mb", type=float, default=512.0, help="bound on the statistics (float64)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (0: numpy's default)")
    parser.add_argument("--real", action="store_true", help="collect real activations with the embedded model")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="--real: how to collect")
    parser.add_argument("--workers", type=int, default=None, help="--real --engine ray: Ray workers")
    parser.add_argument("--collection", "--dir", dest="dir", help="use (or keep) the collection in this folder")
    parser.add_argument("--write", help=argparse.SUPPRESS)  # internal: write the collection and exit
    args = parser.parse_args()
    if args.write:
        if args.real:
            write_real(Path(args.write), args.tokens, args.shard_mb, args.engine, args.workers)
        else:
            write_synthetic(Path(args.write), args.tokens, args.length, args.shard_mb)
        return

    temporary = None if args.dir else tempfile.mkdtemp(prefix="lmscope-bench-streaming-")
    root = Path(args.dir) if args.dir else Path(temporary) / "collection"
    try:
        if not (root / "collection.json").exists():
            started = time.perf_counter()
            command = [sys.executable, __file__, "--write", str(root), "--tokens", str(args.tokens),
                       "--length", str(args.length), "--shard-mb", str(args.shard_mb)]  # fmt: skip
            command += ["--engine", args.engine] + (["--workers", str(args.workers)] if args.workers else [])
            subprocess.run(command + (["--real"] if args.real else []), check=True)
            print(f"wrote the collection in {time.perf_counter() - started:.0f} s")
        import lmscope
        from lmscope.analysis import streaming

        col = lmscope.load_collection(root)
        size = sum(p.stat().st_size for p in root.glob("shard-*.safetensors")) / 2**30
        synthetic = col.model.name.startswith("synthetic")
        kind = "synthetic (random, the model's shapes)" if synthetic else f"real ({col.model.name}, {len(col)} texts)"
        before, split = _rss_mb(), _status_mb()
        sampler = _Sampler()
        sampler.start()
        started, cpu = time.perf_counter(), time.process_time()
        result = streaming.layer_similarity(
            col, "cka", "resid_post", "resid_post", memory_mb=args.memory_mb, threads=args.threads or None
        )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        sampler.done.set()
        sampler.join()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB -> MiB
        n = len(result.layers_a)
        figures = {
            "collection": kind,
            "tokens": col.n_tokens,
            "layers": n,
            "pairs": n * n,
            "d_model": col.features["resid_post"],
            "shards": len(col._shards),
            "collection_gib": round(size, 2),
            "memory_mb_bound": args.memory_mb,
            "blas_threads": args.threads or "default",
            "seconds": round(seconds, 1),
            "tokens_per_s": round(col.n_tokens / seconds, 1),
            "cpu_seconds": round(cpu, 1),  # what it takes on one idle core (this machine is shared)
            "tokens_per_cpu_s": round(col.n_tokens / cpu, 1),
            "peak_rss_mib_beyond_start": round(peak - before, 1),
            # sampled peaks of each part (they need not peak at the same moment)
            "peak_anon_mib_beyond_start": round(sampler.peaks["RssAnon"] - split["RssAnon"], 1),
            "peak_file_mib_beyond_start": round(sampler.peaks["RssFile"] - split["RssFile"], 1),
            "load_average": round(os.getloadavg()[0], 1),
            "cka_layer0_layer1": round(float(result.matrix[0, 1]), 5),
        }
        print(json.dumps(figures, indent=2))
        print(f"peak memory beyond the start: {peak - before:.0f} MiB (goal < 1024 MiB)")
    finally:
        if temporary:
            shutil.rmtree(temporary, ignore_errors=True)


if __name__ == "__main__":
    main()
