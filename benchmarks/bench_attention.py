"""Attention views on the embedded model: cost of each map and of the HTML, as multiples of a forward pass.

Run: ``python benchmarks/bench_attention.py``. Times are medians of interleaved repeats (the machine
is shared), each relative to a plain forward pass over the same tokens in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lmscope
from _timing import interleaved

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill, and nobody had moved them since. "


def main() -> None:
    lm = lmscope.from_pretrained()
    ids = lm.encode(TEXT * 8)[:128]
    batch = ids[None]
    out = lm.trace(ids.tolist(), sites=["attn_probs", "q", "k", "v"])

    def forward() -> None:
        with torch.no_grad():
            lm.model(batch, use_cache=False)

    times = interleaved(
        {
            "forward pass": forward,
            "trace (attn_probs, q, k, v)": lambda: lm.trace(ids.tolist(), sites=["attn_probs", "q", "k", "v"]),
            "weights": lambda: out.attention(),
            "rollout": lambda: out.attention(kind="rollout"),
            "value norm": lambda: out.attention(kind="value_norm"),
            "neuron view (1 layer)": lambda: out.attention(view="neuron", layer=10),
            "head view HTML (30 layers)": lambda: out.attention().to_html(),
        },
        repeats=5,
    )
    base = times["forward pass"]
    print(f"embedded model, {len(ids)} tokens, medians of 5 interleaved repeats")
    for name, seconds in times.items():
        print(f"{name:30s} {seconds * 1000:8.1f} ms  {seconds / base:6.2f}× forward")


if __name__ == "__main__":
    main()
