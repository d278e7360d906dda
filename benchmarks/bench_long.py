"""Long inputs: a trace of N tokens (default 8,192) of the embedded model in memory and on disk.

For each mode (``memory``: an ordinary Trace; ``store``: ``lm.trace(..., store=FOLDER)``, the
tensors written layer by layer and read back memory-mapped), in a fresh process so that peaks are
separate: the plain forward pass of the same input (no capture), the trace with the default
sites, the logit lens of the last position, ``rankings_watch``, the attention head view of one
layer (sparsified: the strongest ``--top-k`` keys per query, ``analysis.attention.top_keys``,
computed a head and a block of rows at a time), and the flow graph of the last position. Each
step's time is reported as a ratio to the plain forward, with the process's peak resident
memory (``VmHWM``) after it. The peak is reset after the plain forward (whose own ``[pos, vocab]``
logits are freed first), so the steps' peaks are lmscope's, not the baseline's; the forward's own peak
is printed next to them.

``--flow-all 2048``: the flow graph for every position of a 2,048-token trace (in memory): its
time vs the forward of the same input, and its peak extra memory (``VmHWM`` reset before it).

The input repeats sentences of Universal Dependencies English EWT (shipped inside lmscope) and is
cut to exactly N tokens; N may not exceed the model's context (SmolLM2: 8,192 positions).

Run: ``python benchmarks/bench_long.py [--tokens 8192] [--modes memory,store] [--flow-all 2048]``
(``--tokens 256`` for a quick check; ``--store-dir`` for where the disk-backed trace is written).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


def status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak() -> None:
    """Forget the peak so far: ``VmHWM`` restarts from the current resident memory (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def long_ids(lm, n: int):
    """Exactly ``n`` token ids of UD English EWT sentences, repeated as needed."""
    import torch

    from _timing import ud_sentences
    from lmscope.capture import context_length

    limit = context_length(lm.loaded)
    if limit is not None and n > limit:
        raise SystemExit(f"--tokens {n} exceeds {lm.name}'s context of {limit} positions")
    sentences, ids = ud_sentences("dev"), []
    while len(ids) < n:
        for sentence in sentences:
            ids += lm.tokenizer(" " + sentence)["input_ids"]
            if len(ids) >= n:
                break
    return torch.tensor(ids[:n])


def child(mode: str, n: int, store_dir: str | None, layer: int, top_k: int, threads: int | None) -> dict:
    import torch

    import lmscope
    from lmscope.analysis.attention import top_keys

    if threads:
        torch.set_num_threads(threads)
    lm = lmscope.from_pretrained()
    ids = long_ids(lm, n)
    lm.trace(ids[:16].tolist())  # warm up
    result: dict = {"mode": mode, "tokens": n, "rss_model": status("VmRSS")}

    def step(name: str, fn):
        start = time.perf_counter()
        value = fn()
        result[name] = {"seconds": time.perf_counter() - start, "peak": status("VmHWM")}
        print(f"  {mode}: {name} {result[name]['seconds']:.1f} s, peak {result[name]['peak'] / 2**30:.2f} GiB",
              file=sys.stderr, flush=True)  # fmt: skip
        return value

    reset_peak()
    with torch.no_grad():
        step("forward", lambda: lm.model(input_ids=ids[None], use_cache=False).logits.sum().item())
    # The plain forward makes its own [pos, vocab] logits (as Hugging Face does): its peak is reported
    # on its own, and lmscope's steps are measured from the resident memory after it.
    reset_peak()
    result["rss_before_trace"] = status("VmRSS")
    folder = tempfile.mkdtemp(prefix="lmscope-bench-long-", dir=store_dir) if mode == "store" else None
    try:
        out = step("trace", lambda: lm.trace(ids.tolist(), store=folder))
        result["trace_bytes"] = out.trace.nbytes()
        step("lens", lambda: out.layer_predictions(position=-1, topk=5))
        step("rankings_watch", lambda: out.rankings_watch([" the", " of", " and"], position=-1))
        step("attention_head_view", lambda: top_keys(out.trace, layer, top_k))
        step("flow", lambda: out.flow(position=-1))
    finally:
        if folder is not None:
            for path in Path(folder).iterdir():
                path.unlink()
            os.rmdir(folder)
    return result


def flow_all(n: int, threads: int | None) -> dict:
    import torch

    import lmscope

    if threads:
        torch.set_num_threads(threads)
    lm = lmscope.from_pretrained()
    ids = long_ids(lm, n)
    with torch.no_grad():
        lm.model(input_ids=ids[:16][None], use_cache=False)  # warm up
        start = time.perf_counter()
        lm.model(input_ids=ids[None], use_cache=False)
        forward = time.perf_counter() - start
    out = lm.trace(ids.tolist())
    before = status("VmRSS")
    reset_peak()
    start = time.perf_counter()
    graph = out.flow(position=None)
    seconds = time.perf_counter() - start
    return {"tokens": n, "forward": forward, "flow_all": seconds, "ratio": seconds / forward,
            "peak_extra": status("VmHWM") - before, "edges": len(graph.edges)}  # fmt: skip


def report(results: list[dict]) -> None:
    steps = ("trace", "lens", "rankings_watch", "attention_head_view", "flow")
    for r in results:
        forward = r["forward"]["seconds"]
        peak = r["forward"]["peak"] / 2**30
        print(f"{r['mode']}: {r['tokens']} tokens, trace {r['trace_bytes'] / 2**30:.2f} GiB, model loaded "
              f"{r['rss_model'] / 2**30:.2f} GiB; plain forward {forward:.1f} s (peak {peak:.2f} GiB); "
              f"resident before the trace {r['rss_before_trace'] / 2**30:.2f} GiB")  # fmt: skip
        for name in steps:
            s = r[name]
            print(f"  {name:20s} {s['seconds'] / forward:7.2f}x forward  peak {s['peak'] / 2**30:6.2f} GiB")
        print(f"  peak resident memory of lmscope's steps (after the plain forward): "
              f"{max(r[name]['peak'] for name in steps) / 2**30:.2f} GiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--modes", default="memory,store", help="memory, store or both (default)")
    parser.add_argument("--layer", type=int, default=10, help="the layer of the attention head view (default 10)")
    parser.add_argument("--top-k", type=int, default=8, help="keys kept per query in the head view (default 8)")
    parser.add_argument("--store-dir", default=None, help="where the disk-backed trace goes (default: temp dir)")
    parser.add_argument("--flow-all", type=int, default=None, metavar="N", help="flow graph of all positions at N")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "flow-all":
        print(json.dumps(flow_all(args.tokens, args.threads)))
        return
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.store_dir, args.layer, args.top_k, args.threads)))
        return
    results, common = [], ["--layer", str(args.layer), "--top-k", str(args.top_k)]
    common += ["--threads", str(args.threads)] if args.threads else []
    common += ["--store-dir", args.store_dir] if args.store_dir else []
    if args.flow_all is None or args.modes:
        for mode in [m for m in args.modes.split(",") if m]:
            done = subprocess.run([sys.executable, __file__, "--child", mode, "--tokens", str(args.tokens), *common],
                                  stdout=subprocess.PIPE, text=True, check=True)  # fmt: skip
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    flow = None
    if args.flow_all is not None:
        command = [sys.executable, __file__, "--child", "flow-all", "--tokens", str(args.flow_all), *common]
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        flow = json.loads(done.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps({"runs": results, "flow_all": flow}))
        return
    report(results)
    if flow is not None:
        print(f"flow graph of all {flow['tokens']} positions: {flow['flow_all']:.1f} s = {flow['ratio']:.2f}x the "
              f"forward ({flow['forward']:.1f} s), peak extra memory {flow['peak_extra'] / 2**30:.2f} GiB, "
              f"{flow['edges']} edges")  # fmt: skip


if __name__ == "__main__":
    main()
