"""The part-of-speech probing study (issue: probing classifiers with control tasks).

    python benchmarks/bench_probing.py                          # minilm-l6: 10,000 words, 5 seeds
    python benchmarks/bench_probing.py --model embedded --seeds 2 --every 3 --no-reference --memory-mb 2048

Runs the full study: the first 10,000 words of UD English EWT, 67/33 split by sentence (a tenth of the
training words picks learning rate and epoch), every layer, embeddings + hidden states (resid_post) + FFN
activations (mlp_act), 5 seeds, Adam 50 epochs at 0.1 / 0.001 / 1e-5. Prints the wall time of the whole
study (goal: under 15 minutes on 2 cores), the share spent in plain forward passes over the corpus (a
batched Hugging Face forward of the same sentences, median of 3, as the reference cost). Both in CPU time
(process time) as well as wall time: on a machine shared with other jobs wall time measures the load., the table, and
writes the plot to ``docs/probing-<model>.png`` and the result to ``docs/probing-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import UD_DIR
from lmscope.probing import ProbingDataset, load_ud, probe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def plain_forward_seconds(lm: lmscope.LM, texts: list[str], batch_size: int = 16) -> float:
    """Median CPU time of plain batched forward passes over every text (no capture), the reference cost."""
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id or 0

    def run() -> None:
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                group = ids[start : start + batch_size]
                longest = max(map(len, group))
                batch = torch.full((len(group), longest), pad)
                mask = torch.zeros_like(batch)
                for row, seq in enumerate(group):
                    batch[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                lm.model(input_ids=batch, attention_mask=mask, use_cache=False)

    times = []
    for _ in range(3):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="minilm-l6", help="minilm-l6 (default) or embedded")
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--every", type=int, default=1, help="probe every N-th layer (and the last; default 1)")
    parser.add_argument("--memory-mb", type=float, default=1024, help="activations held at once (default 1024)")
    parser.add_argument("--no-reference", action="store_true", help="skip timing the plain forward passes")
    args = parser.parse_args()
    name = None if args.model == "embedded" else args.model
    lm = lmscope.from_pretrained(name)
    label = "smollm2-135m" if name is None else args.model

    sentences = load_ud(args.tokens, UD_DIR)
    dataset = ProbingDataset.build(lm.tokenizer, sentences, "upos")
    forward = None if args.no_reference else plain_forward_seconds(lm, dataset.texts)

    start, cpu = time.perf_counter(), time.process_time()
    n_layers = lm.arch.n_layers
    layers = sorted({*range(0, n_layers, args.every), n_layers - 1})
    result = probe(lm, dataset, layers=layers, seeds=args.seeds, progress=True, memory_mb=args.memory_mb)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu

    DOCS.mkdir(exist_ok=True)
    result.plot(DOCS / f"probing-{label}.png")
    (DOCS / f"probing-{label}.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    n_probes = len(result.rows) * len(result.seeds) * 2 * 3  # task + control, 3 learning rates
    print(result)
    print()
    print(f"model {lm.name}, {lm.arch.n_layers} layers, torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    print(f"whole study: {total:.0f} s wall ({total / 60:.1f} min; goal < 15 min on 2 cores)")
    print(f"             {cpu:.0f} s CPU ({cpu / 60:.1f} min; wall time on an idle machine is at most this)")
    if forward is not None:
        print(
            f"plain forward over the {len(dataset.texts)} sentences: {forward:.1f} s CPU (study = {cpu / forward:.0f}x)"
        )
    print(f"{len(result.rows)} (site, layer) x {len(result.seeds)} seeds; {n_probes} linear probes trained")


if __name__ == "__main__":
    main()
