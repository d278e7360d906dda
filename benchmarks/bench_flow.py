"""Information-flow graph cost (issue 5) on the embedded model.

    python benchmarks/bench_flow.py

    python benchmarks/bench_flow.py --moe

Prints, for a 128-token input: the full graph (contributions of every part for every layer and
position, edges pruned at 0.04, extraction for all positions, no node details) vs one plain
forward pass, and vs the straightforward vectorized computation that materializes the
``pos × pos × head × d_model`` term tensor per layer (written here); the peak extra memory of
the full graph; then how time and memory grow from 32 to 512 tokens. Times are medians of
interleaved runs in one process; memory is the peak resident set above the level before the call
(Linux ``clear_refs`` resets the peak).

``--moe``: the same full graph on a random mixture-of-experts model sized like the embedded one
(Mixtral layout: 30 layers, d_model 576, 9 heads, 8 experts of 1536 neurons, top-2), where every
routed expert of every FFN block is a component, vs one plain forward pass.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import interleaved, ud_sentences
from lmscope.analysis._contributions import head_updates
from lmscope.analysis.flow import flow

TEXT = " ".join(ud_sentences()[:300])


def tokens(lm: lmscope.LM, n: int) -> torch.Tensor:
    ids = lm.tokenizer(TEXT, return_tensors="pt")["input_ids"][0]
    assert len(ids) >= n, len(ids)
    return ids[:n]


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_extra_bytes(fn) -> int:
    """Peak resident memory above the current level while ``fn`` runs."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


@torch.no_grad()
def materialized(trace, arch) -> list[torch.Tensor]:
    """The straightforward way: all (q, k, h) terms as one tensor per layer, then L1 proximities."""
    out = []
    for layer in trace.layers:
        probs = trace.at("attn_probs", layer).float()  # [head, pos_q, pos_k]
        updates = head_updates(trace, arch, layer)  # [pos_k, head, d_model]
        pre = trace.at("resid_pre", layer).float()
        whole = pre + trace.at("attn_out", layer).float()  # [pos_q, d_model]
        terms = probs.permute(1, 2, 0)[..., None] * updates[None]  # [pos_q, pos_k, head, d_model]
        size = whole.abs().sum(-1)
        prox = (size[:, None, None] - (whole[:, None, None] - terms).abs().sum(-1)).clamp_min(0)
        resid = (size - (whole - pre).abs().sum(-1)).clamp_min(0)
        total = prox.sum((1, 2)) + resid
        out.append(prox / total[:, None, None])
    return out


def moe_model(lm: lmscope.LM) -> lmscope.LM:
    """A seeded random Mixtral sized like the embedded model, with the embedded model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dense = lm.model.config
    config = AutoConfig.for_model(
        "mixtral",
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        intermediate_size=dense.intermediate_size,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    return lmscope.wrap(model, lm.tokenizer, name="random Mixtral (embedded model's size, 8 experts, top-2)")


def main_moe() -> None:
    lm = moe_model(lmscope.from_pretrained())
    arch = lm.arch
    print(
        f"{lm.name}: {arch.n_layers} layers, d_model {arch.d_model}, {arch.n_experts} experts, top-{arch.top_k}; "
        f"torch threads {torch.get_num_threads()} (a shared machine: other work slows both timings)"
    )
    ids = tokens(lm, 128)
    trace = lm.trace(ids.tolist()).trace

    def forward() -> None:
        with torch.no_grad():
            lm.model(input_ids=ids[None])

    def graph():
        return flow(trace, arch, None, threshold=0.04, position=None, details=False)

    times = interleaved({"forward": forward, "graph": graph}, repeats=3)
    result = graph()
    routed = sum(1 for e in result.all_edges if e.experts)
    print(
        f"128 tokens: forward {times['forward']:.3f} s; full graph with every expert as a component "
        f"{times['graph']:.3f} s = {times['graph'] / times['forward']:.2f}x forward (goal <= 3x); "
        f"{len(result.all_edges)} edges >= 0.04, {routed} FFN edges with their experts"
    )
    single = interleaved(
        {
            "forward": forward,
            "graph": lambda: flow(trace, arch, lm.unembed, threshold=0.04, position=-1, details=True),
        },
        repeats=3,
    )
    print(
        f"out.flow() defaults (last position, with node details and top neurons per expert): "
        f"{single['graph']:.3f} s = {single['graph'] / single['forward']:.2f}x forward"
    )


def main() -> None:
    """``--threads N`` sets torch's thread count (1 gives steadier figures on a crowded machine);
    ``--sizes 32,128`` limits the growth table."""
    args = sys.argv[1:]
    if "--threads" in args:
        torch.set_num_threads(int(args[args.index("--threads") + 1]))
    if "--moe" in args:
        main_moe()
        return
    sizes = (32, 64, 128, 256, 512)
    if "--sizes" in args:
        sizes = tuple(int(n) for n in args[args.index("--sizes") + 1].split(","))
    lm = lmscope.from_pretrained()
    print(f"{lm!r}; torch threads {torch.get_num_threads()}")

    def forward(ids: torch.Tensor):
        def run() -> None:
            with torch.no_grad():
                lm.model(input_ids=ids[None])

        return run

    def graph(trace):
        return lambda: flow(trace, lm.arch, None, threshold=0.04, position=None, details=False)

    ids = tokens(lm, 128)
    trace = lm.trace(ids.tolist()).trace
    times = interleaved(
        {"forward": forward(ids), "graph": graph(trace), "materialized": lambda: materialized(trace, lm.arch)},
        repeats=3,
    )
    result = graph(trace)()
    memory = peak_extra_bytes(graph(trace))
    naive_memory = peak_extra_bytes(lambda: materialized(trace, lm.arch))
    print(
        f"128 tokens: forward {times['forward']:.3f} s; full graph {times['graph']:.3f} s "
        f"= {times['graph'] / times['forward']:.2f}x forward (goal <= 3x), {len(result.all_edges)} edges >= 0.04; "
        f"peak extra memory {memory / 2**20:.0f} MiB (goal < 1024 MiB)"
    )
    print(
        f"materialized pos x pos x head x d_model per layer: {times['materialized']:.3f} s "
        f"= {times['materialized'] / times['forward']:.1f}x forward, {naive_memory / 2**20:.0f} MiB peak extra; "
        f"the graph is {times['materialized'] / times['graph']:.1f}x faster"
    )
    single = interleaved(
        {
            "forward": forward(ids),
            "graph": lambda: flow(trace, lm.arch, lm.unembed, threshold=0.04, position=-1, details=True),
        },
        repeats=3,
    )
    print(
        f"out.flow() defaults (last position, with node details): {single['graph']:.3f} s "
        f"= {single['graph'] / single['forward']:.2f}x forward"
    )
    print("growth (full graph, no details; forward and graph medians of 3):", flush=True)
    for n in sizes:
        ids = tokens(lm, n)
        trace = lm.trace(ids.tolist()).trace
        t = interleaved({"forward": forward(ids), "graph": graph(trace)}, repeats=3)
        memory = peak_extra_bytes(graph(trace))
        print(
            f"  {n:4d} tokens: forward {t['forward']:.3f} s, graph {t['graph']:.3f} s "
            f"({t['graph'] / t['forward']:.2f}x), peak extra memory {memory / 2**20:.0f} MiB, "
            f"trace holds {trace.nbytes() / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
