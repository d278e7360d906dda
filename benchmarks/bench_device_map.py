"""A model with half its layers offloaded to disk: trace time vs the same model in memory, and equal results.

The embedded SmolLM2-135M (30 layers), loaded once in memory and once with a ``device_map`` that
keeps the embeddings, the head (tied to them) and layers 0-14 on the CPU and offloads layers
15-29 and the final norm to disk (``offload_folder``; accelerate memory-maps their weights and
loads each layer for its forward pass). Both trace the same input with the default sites; repeats
are interleaved and medians reported, with the load average, since machines are shared. Then
checks that the results are equal: logits, the logit lens of the last position, and the flow
graph of the last position (``--no-flow`` skips it).

Run: ``python benchmarks/bench_device_map.py --threads 2 [--tokens 256] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import interleaved, ud_sentences

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def half_on_disk(lm: lmscope.LM) -> dict[str, str]:
    """The second half of the blocks and the final norm on disk, the rest (a tied head too) on the CPU."""
    names = {id(module): name for name, module in lm.model.named_modules()}
    blocks = [names[id(block)] for block in lm.arch.blocks]
    disk = {*blocks[len(blocks) // 2 :], names[id(lm.arch.final_norm)]}
    head, embed = lm.model.get_output_embeddings(), lm.model.get_input_embeddings()
    if head.weight is not embed.weight:
        disk.add(names[id(head)])
    device_map = {block: "disk" if block in disk else "cpu" for block in blocks}
    for name in lm.model.state_dict():
        owner = name.rpartition(".")[0]
        if not any(owner == key or owner.startswith(f"{key}.") for key in device_map):
            device_map[owner] = "disk" if owner in disk else "cpu"
    return device_map


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-flow", action="store_true", help="skip comparing the flow graphs")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    memory = lmscope.from_pretrained()
    with tempfile.TemporaryDirectory(prefix="lmscope-bench-offload-") as folder:
        placed = lmscope.from_pretrained(device_map=half_on_disk(memory), offload_folder=folder)
        on_disk = sum(1 for device in placed.model.hf_device_map.values() if device == "disk")
        ids = memory.tokenizer(" ".join(ud_sentences()[:200]))["input_ids"][: args.tokens]
        times = interleaved({"memory": lambda: memory.trace(ids), "offloaded": lambda: placed.trace(ids)},
                            args.repeats)  # fmt: skip
        a, b = memory.trace(ids), placed.trace(ids)
        logits = float((a.logits - b.logits).abs().max())
        la, lb = a.layer_predictions(position=-1, topk=10), b.layer_predictions(position=-1, topk=10)
        lens = float(np.abs(np.asarray(la.probs) - np.asarray(lb.probs)).max())
        print(f"{len(ids)} tokens, default sites, {on_disk} modules of {len(placed.model.hf_device_map)} on disk "
              f"(load average {os.getloadavg()[0]:.1f}, threads {torch.get_num_threads()})")  # fmt: skip
        print(f"trace in memory:   {times['memory']:.3f} s (median of {args.repeats})")
        print(f"trace, half on disk: {times['offloaded']:.3f} s = {times['offloaded'] / times['memory']:.2f}x")
        same = la.tokens == lb.tokens
        print(f"logits max |diff| {logits:.2e}; lens probs max |diff| {lens:.2e}; same lens tokens {same}")
        if not args.no_flow:
            fa, fb = a.flow(position=-1), b.flow(position=-1)
            same = [(e.kind, e.layer, e.source.pos, e.target.pos) for e in fa.edges] == [
                (e.kind, e.layer, e.source.pos, e.target.pos) for e in fb.edges
            ]
            worst = max((abs(x.weight - y.weight) for x, y in zip(fa.edges, fb.edges, strict=False)), default=0.0)
            print(
                f"flow graph (last position): {len(fa.edges)} edges, same edges {same}, weights max |diff| {worst:.2e}"
            )


if __name__ == "__main__":
    main()
