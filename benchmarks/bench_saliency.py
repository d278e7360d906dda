"""Saliency speed: every generated token's attribution from one batched backward pass.

On the embedded model (SmolLM2-135M), 10 tokens generated after a 15-token prompt:

- ``grad_x_input`` for all 10 outputs (lmscope) against
  - Ecco's approach, a forward and a backward pass over each output's prefix (full logits, as the
    model returns them; gradients w.r.t. the embeddings only, as Captum takes them), and
  - one plain forward + backward over the whole sequence (one output's gradient w.r.t. the
    embeddings), and one training-style forward + backward (loss over the sequence, gradients of
    every parameter);
- lmscope end to end under each matmul routing, in the same rounds: the automatic choice (decided
  from a trial of the gradient pass itself, its forward and batched backward, see
  ``lmscope.analysis._onednn``; the choice and its trial timings are printed), PyTorch's own
  products (MKL), and oneDNN forced (both oneDNN ways multiply only the backward's rows that the
  causal mask does not make zero, 195 of 240 here);
- integrated gradients (20 steps, 10 outputs) at the row budget chosen for the machine, timed in
  rounds alternating with the batched grad_x_input, and their ratio (the goal: at most 20x, as IG
  does 20x the backward work); without ``--quick`` also each of 2,048 and 256 rows in a fresh
  process with its peak memory above the idle process.

Repeats are interleaved (one of each per round) and medians reported, since machines are shared.
Run: ``python benchmarks/bench_saliency.py --threads 2 [--repeats 5] [--quick] [--profile ROWS]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

import lmscope
from _timing import interleaved, interleaved_times, peak_rss
from lmscope.analysis._gradients import default_rows, last_level_cache
from lmscope.analysis._onednn import choices, matmul_backend, onednn_matmuls

PROMPT = "The old lighthouse keeper climbed the stairs every night to light the lamp for the ships"
IG_STEPS = 20


def generated() -> tuple[lmscope.LM, lmscope.Output]:
    lm = lmscope.from_pretrained()
    prompt = lm.encode(PROMPT)[:15]
    return lm, lm.generate(prompt.tolist(), generate=10, sites=[])


def integrated_gradients_child(budget: int) -> None:
    """Run in a fresh process: one IG computation (its routing trial included), printing its seconds and peak memory."""
    _, out = generated()
    seconds, memory = peak_rss(lambda: out.saliency("ig", steps=IG_STEPS, batch_size=budget))
    print(seconds, memory)


def profile(out: lmscope.Output, budget: int) -> None:
    """Where integrated gradients spend their time at a row budget: the top operations and their shapes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    out.saliency("ig", steps=IG_STEPS, batch_size=budget)  # the routing trial, outside the profile
    with profiler(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.saliency("ig", steps=IG_STEPS, batch_size=budget)
    print(f"integrated gradients at {budget} rows, by operation and input shapes:")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ig-repeats", type=int, default=3, help="rounds of integrated gradients vs grad_x_input")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 IG round, no fresh-process IG runs")
    parser.add_argument("--profile", type=int, default=None, metavar="ROWS", help="profile IG at this row budget")
    parser.add_argument("--ig-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ig_child:
        integrated_gradients_child(args.ig_child)
        return
    if args.quick:
        args.repeats, args.ig_repeats = min(args.repeats, 3), 1

    lm, out = generated()
    if args.profile:
        profile(out, args.profile)
        return
    model = lm.model
    ids = out.token_ids  # [pos]
    n_pos, n_in = len(ids), out.n_input
    embed = model.get_input_embeddings()
    with torch.no_grad():
        emb = embed(ids[None])  # [1, pos, d_model]
    print(f"embedded model, {n_in}-token prompt + {n_pos - n_in} generated, torch threads {torch.get_num_threads()}")
    rows = default_rows(lm.loaded)
    print(f"row budget chosen for this machine: {rows} (last-level cache {last_level_cache() / 2**20:.0f} MiB)")

    def forward() -> None:
        with torch.no_grad():
            model(inputs_embeds=emb)

    def forward_backward() -> None:  # one output's gradient w.r.t. the embeddings, whole sequence
        e = emb.clone().requires_grad_(True)
        logits = model(inputs_embeds=e, logits_to_keep=1).logits[0, -1]
        torch.autograd.grad(torch.softmax(logits, -1)[ids[-1]], e)

    def forward_backward_full() -> None:  # the same with every position's logits, as model(...) gives them
        e = emb.clone().requires_grad_(True)
        logits = model(inputs_embeds=e).logits[0, -1]
        torch.autograd.grad(torch.softmax(logits, -1)[ids[-1]], e)

    def training_step() -> None:  # plain LM loss, gradients of every parameter and the embeddings
        e = emb.clone().requires_grad_(True)
        logits = model(inputs_embeds=e).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, ids[1:]).backward()
        model.zero_grad(set_to_none=True)

    def ecco_loop() -> list[torch.Tensor]:
        rows = []
        for t in range(n_in, n_pos):
            e = emb[:, :t].clone().requires_grad_(True)
            logits = model(inputs_embeds=e).logits[0, -1]
            (g,) = torch.autograd.grad(torch.softmax(logits, -1)[ids[t]], e)
            a = (g[0] * e[0].detach()).norm(dim=-1)
            rows.append(a / a.sum())
        return rows

    def batched() -> object:
        return out.saliency("grad_x_input")

    def batched_torch_products() -> object:
        with matmul_backend("torch"):
            return out.saliency("grad_x_input")

    def batched_onednn_products() -> object:
        with matmul_backend("onednn"):
            return out.saliency("grad_x_input")

    def loop_onednn_products() -> list[torch.Tensor]:
        with onednn_matmuls():
            return ecco_loop()

    # exactness, in the same run
    ours, loop = batched(), ecco_loop()
    diff = max(float((torch.as_tensor(a) - b).abs().max()) for a, b in zip(ours.attributions, loop, strict=True))
    print(f"max |lmscope - per-token loop| over all attributions: {diff:.2e}")
    for workload, choice in choices().items():
        print(f"matmul routing chosen for {workload}: {choice}")

    cases = {
        "forward": forward,
        "forward+backward": forward_backward,
        "fwd+bwd all logits": forward_backward_full,
        "training fwd+bwd": training_step,
        "per-token loop": ecco_loop,
        "lmscope (auto)": batched,
        "lmscope, PyTorch": batched_torch_products,
        "lmscope, oneDNN": batched_onednn_products,
        "loop, oneDNN": loop_onednn_products,
    }
    med = interleaved(cases, repeats=args.repeats)
    for name, t in med.items():
        print(f"  {name:18s} {1000 * t:8.1f} ms  ({t / med['forward']:5.1f}x forward)")
    ours_t = med["lmscope (auto)"]
    print(f"grad_x_input, 10 outputs: {med['per-token loop'] / ours_t:.1f}x faster than the per-token loop (goal >= 5)")
    print(f"  {ours_t / med['forward+backward']:.2f}x one forward+backward, logits at one position (goal <= 2.5)")
    print(f"  {ours_t / med['fwd+bwd all logits']:.2f}x one forward+backward with every position's logits")
    print(f"  {ours_t / med['training fwd+bwd']:.2f}x one training-style forward+backward")
    torch_t, onednn_t = med["lmscope, PyTorch"], med["lmscope, oneDNN"]
    print(
        f"end to end, same rounds: automatic routing {1000 * ours_t:.1f} ms, PyTorch's products "
        f"{1000 * torch_t:.1f} ms, oneDNN forced {1000 * onednn_t:.1f} ms "
        f"(automatic / PyTorch's = {ours_t / torch_t:.2f}; goal <= 1 within noise)"
    )
    print(
        f"batching alone (PyTorch's products): {med['per-token loop'] / torch_t:.1f}x faster than the loop; "
        f"both on oneDNN: {med['loop, oneDNN'] / onednn_t:.1f}x"
    )

    def integrated() -> object:
        return out.saliency("ig", steps=IG_STEPS)

    times = interleaved_times({"ig": integrated, "grad_x_input": batched}, repeats=args.ig_repeats)
    for workload, choice in choices().items():
        print(f"matmul routing chosen for {workload}: {choice}")
    ig_t, gxi_t = statistics.median(times["ig"]), statistics.median(times["grad_x_input"])
    print(
        f"integrated gradients, {IG_STEPS} steps, 10 outputs, {rows} rows: {ig_t:.2f} s "
        f"(rounds: {', '.join(f'{t:.2f}' for t in times['ig'])} s), {ig_t / gxi_t:.1f}x the batched grad_x_input "
        f"of the same rounds ({1000 * gxi_t:.0f} ms; goal <= {IG_STEPS})"
    )
    if args.quick:
        return
    print(f"integrated gradients, {IG_STEPS} steps, 10 outputs, by row budget (each in a fresh process):")
    threads = ["--threads", str(args.threads)] if args.threads else []
    for budget in sorted({rows, 2048, 256}, reverse=True):
        child = [sys.executable, __file__, "--ig-child", str(budget), *threads]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        seconds, memory = (float(x) for x in done.stdout.split()[-2:])
        print(
            f"  batch_size={budget:5d} rows: {seconds:6.2f} s ({seconds / gxi_t:5.1f}x grad_x_input), "
            f"peak memory +{memory / 2**20:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
