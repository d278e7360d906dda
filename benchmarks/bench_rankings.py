"""Rankings on the embedded model, against one plain forward pass of the same input.

Figures (issue 3):
- ``rankings()`` over all 30 layers × all positions of a 128-token input: time ÷ a plain forward
  pass (goal ≤ 7.5×; the floor, unembedding every layer, is about 6.4×), and peak extra memory
  (goal < 400 MB; ``[layer, pos, vocab]`` float32 logits would be 755 MB). The floor (the
  lens logits of every row and nothing else) is timed too: rankings ÷ floor is the counting's cost,
  a ratio that load on a shared machine distorts less than the ratio to a forward pass..
- ``rankings_watch`` for 2 tokens at one position: time ÷ a forward pass (goal ≤ 0.2×).
- HTML size of the rankings view for 64 output tokens × 30 layers (goal < 1 MB).

Times are medians of interleaved repeats (the machine is shared). Memory is the peak resident set
size sampled every 0.5 ms during one ``rankings()`` call, minus the size just before it.

    python benchmarks/bench_rankings.py
"""

from __future__ import annotations

import torch

import lmscope
from _timing import interleaved, peak_rss, ud_sentences

N_TOKENS = 128


def main() -> None:
    lm = lmscope.from_pretrained()
    text = " ".join(ud_sentences("dev")[:40])
    ids = lm.encode(text)[:N_TOKENS]
    assert len(ids) == N_TOKENS
    out = lm.trace(ids.tolist(), sites=["resid_post"])
    short = lm.trace(ids[:65].tolist(), sites=["resid_post"])

    @torch.no_grad()
    def forward() -> None:
        lm.model(input_ids=ids[None], use_cache=False)

    hidden = out.trace.get("resid_post")[:, :-1].reshape(-1, lm.arch.d_model)  # [layer·pos, d_model]

    def unembed_every_row() -> None:  # the floor: the lens logits of every row, nothing else
        for start in range(0, len(hidden), 512):
            lm.unembed(hidden[start : start + 512])

    times = interleaved(
        {
            "forward": forward,
            "rankings": out.rankings,
            "watch": lambda: out.rankings_watch([" is", " are"], position=-1),
            "floor": unembed_every_row,
        },
        repeats=5,
    )
    forward_s = times["forward"]
    peaks = sorted(peak_rss(out.rankings, every=0.0005)[1] for _ in range(3))
    full_logits = out.trace.model.n_layers * N_TOKENS * out.trace.model.vocab_size * 4
    html = short.rankings().to_html()

    print(f"embedded model, {N_TOKENS}-token input, {torch.get_num_threads()} threads, medians of 5 interleaved runs")
    print(f"plain forward pass             {forward_s:8.3f} s")
    print(f"rankings() (30 layers x 127)   {times['rankings']:8.3f} s  = {times['rankings'] / forward_s:.2f}x forward")
    print(f"floor: unembed every row       {times['floor']:8.3f} s  = {times['floor'] / forward_s:.2f}x forward; "
          f"rankings() = {times['rankings'] / times['floor']:.2f}x the floor")  # fmt: skip
    print(f"rankings_watch (2 tokens)      {times['watch']:8.3f} s  = {times['watch'] / forward_s:.3f}x forward")
    print(f"rankings() peak extra memory   {peaks[1] / 2**20:8.1f} MiB (median of 3; "
          f"[layer, pos, vocab] logits would be {full_logits / 2**20:.0f} MiB)")  # fmt: skip
    ranks = short.rankings().ranks
    print(f"rankings view HTML, {ranks.shape[1]} tokens x {ranks.shape[0]} layers: {len(html.encode()) / 1024:.1f} KB")


if __name__ == "__main__":
    main()
