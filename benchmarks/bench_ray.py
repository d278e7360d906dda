"""Collection on Ray against the single-process engine, on the same cores (issue 16).

UD English EWT sentences on the embedded model (resid_post at every layer): the single-process
batched collection with 2 torch threads, then ``engine="ray"`` with 2 local workers of 1 thread each
(the local cluster's start, the workers' start and the model's trip to them included, as a user
waits for them; the driver collects the first shards meanwhile). Prints tokens/s of both and the
ratio of times (goal: Ray at most 1.25x), and checks that both wrote the same collection.

Measured on 2 cores, nearly idle (load 1.5), 2,000 sentences (30,200 tokens, 27 shards): single
process 51.8 and 53.9 s; Ray 64.5 and 62.9 s (1.24x and 1.17x), Ray answering after 5.9 and 8.0 s,
the workers ready after 17.2 and 20.3 s, the driver collecting 3 shards meanwhile; shard files
identical (an earlier idle run, before the driver collected while the workers started: 1.27x). Under
load (about 5), the driver's shards made no measurable difference: 1.06x with them, 1.04x without,
in the same run (the starting workers and the driver share the same 2 cores).

    python benchmarks/bench_ray.py                    # 2,000 sentences (~5 GB of temporary shards)
    python benchmarks/bench_ray.py --sentences 200    # a shorter run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lmscope

sys.path.insert(0, str(Path(__file__).parent))
from _timing import ud_sentences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=2000, help="UD sentences (default 2000; dev then test)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the single process (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (default 2)")
    parser.add_argument("--worker-cpus", type=int, default=1, help="CPUs and threads per Ray worker (default 1)")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="activations per shard in MB (default 64)")
    parser.add_argument("--address", default=None, help="a running Ray cluster to use (default: start a local one)")
    args = parser.parse_args()

    texts = (ud_sentences("dev") + ud_sentences("test"))[: args.sentences]
    lm = lmscope.from_pretrained()
    options = dict(batch_size=args.batch_size, shard_mb=args.shard_mb, progress=False)
    print(f"{len(texts)} UD sentences, resid_post at {lm.arch.n_layers} layers, {lm.name}, CPUs: {os.cpu_count()}")
    folder = Path(tempfile.mkdtemp(prefix="lmscope-bench-ray-"))
    try:
        torch.set_num_threads(args.threads)
        lmscope.collect(lm, texts[:32], **options)  # warm-up (in memory)
        start = time.perf_counter()
        single = lmscope.collect(lm, texts, out_dir=folder / "single", **options)
        single_s = time.perf_counter() - start
        tokens = single.n_tokens
        print(f"single process, {args.threads} threads:  {single_s:7.1f} s  {tokens / single_s:7.0f} tokens/s")

        start = time.perf_counter()
        ray = lmscope.collect(
            lm, texts, out_dir=folder / "ray", engine="ray", workers=args.workers, worker_cpus=args.worker_cpus,
            address=args.address, **options,
        )  # fmt: skip
        ray_s = time.perf_counter() - start
        timings = json.loads((folder / "ray" / "collection.json").read_text())["timings"]
        startup, cluster = timings["startup_seconds"], timings["cluster_seconds"]
        label = f"Ray, {args.workers} workers x {args.worker_cpus} thread"
        print(f"{label}:   {ray_s:7.1f} s  {tokens / ray_s:7.0f} tokens/s")
        print(f"  until Ray answered {cluster:.1f} s, until the workers were ready {startup:.1f} s; meanwhile the "
              f"driver collected {timings['driver_shards']} of {len(timings['shards'])} shards")  # fmt: skip
        print(f"Ray / single time: {ray_s / single_s:.2f}x (goal <= 1.25x)")

        for layer in (0, lm.arch.n_layers // 2, lm.arch.n_layers - 1):
            np.testing.assert_array_equal(single.get("resid_post", layer), ray.get("resid_post", layer))
        same = all(
            (folder / "single" / name).read_bytes() == (folder / "ray" / name).read_bytes()
            for name in json.loads((folder / "single" / "collection.json").read_text())["shards"]
        )
        print(f"same collection: values equal, shard files {'identical' if same else 'DIFFERENT'}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
