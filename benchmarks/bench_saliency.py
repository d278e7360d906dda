"""Saliency speed: every generated token's attribution from one batched backward pass.

On the embedded model (SmolLM2-135M), 10 tokens generated after a 15-token prompt:

- ``grad_x_input`` for all 10 outputs (lmscope) against
  - Ecco's approach, a forward and a backward pass over each output's prefix (full logits, as the
    model returns them; gradients w.r.t. the embeddings only, as Captum takes them), and
  - one plain forward + backward over the whole sequence (one output's gradient w.r.t. the
    embeddings), and one training-style forward + backward (loss over the sequence, gradients of
    every parameter);
- the same two with the float32 products on the other library: lmscope on PyTorch's own (MKL),
  which is the batching alone, and the loop on oneDNN, which lmscope picks where it is faster
  (see ``lmscope.analysis._onednn``), so that what the batching and the library each bring shows;
- integrated gradients (20 steps): time, and peak memory above the idle process (each row budget
  in a fresh process), to show that chunking bounds it.

Repeats are interleaved (one of each per round) and medians reported, since the machine is shared.
Run: ``python benchmarks/bench_saliency.py [--repeats 5] [--threads N]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch

import lmscope
from _timing import interleaved, peak_rss
from lmscope.analysis._onednn import matmul_backend, onednn_matmuls, onednn_pays

PROMPT = "The old lighthouse keeper climbed the stairs every night to light the lamp for the ships"


def generated() -> tuple[lmscope.LM, lmscope.Output]:
    lm = lmscope.from_pretrained()
    prompt = lm.encode(PROMPT)[:15]
    return lm, lm.generate(prompt.tolist(), generate=10, sites=[])


def integrated_gradients_child(budget: int) -> None:
    """Run in a fresh process: one IG computation, printing its seconds and peak memory."""
    _, out = generated()
    seconds, memory = peak_rss(lambda: out.saliency("ig", steps=20, batch_size=budget))
    print(seconds, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--ig-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ig_child:
        integrated_gradients_child(args.ig_child)
        return

    lm, out = generated()
    model = lm.model
    ids = out.token_ids  # [pos]
    n_pos, n_in = len(ids), out.n_input
    embed = model.get_input_embeddings()
    with torch.no_grad():
        emb = embed(ids[None])  # [1, pos, d_model]
    print(f"embedded model, {n_in}-token prompt + {n_pos - n_in} generated, torch threads {torch.get_num_threads()}")

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

    def loop_onednn_products() -> list[torch.Tensor]:
        with matmul_backend("onednn"), onednn_matmuls(model.device):
            return ecco_loop()

    # exactness, in the same run
    ours, loop = batched(), ecco_loop()
    diff = max(float((torch.as_tensor(a) - b).abs().max()) for a, b in zip(ours.attributions, loop, strict=True))
    print(f"max |lmscope - per-token loop| over all attributions: {diff:.2e}")
    print(f"oneDNN products chosen for this machine: {onednn_pays()}")

    cases = {
        "forward": forward,
        "forward+backward": forward_backward,
        "fwd+bwd all logits": forward_backward_full,
        "training fwd+bwd": training_step,
        "per-token loop": ecco_loop,
        "lmscope batched": batched,
        "lmscope, MKL": batched_torch_products,
        "loop, oneDNN": loop_onednn_products,
    }
    med = interleaved(cases, repeats=args.repeats)
    for name, t in med.items():
        print(f"  {name:18s} {1000 * t:8.1f} ms  ({t / med['forward']:5.1f}x forward)")
    ours_t = med["lmscope batched"]
    print(f"grad_x_input, 10 outputs: {med['per-token loop'] / ours_t:.1f}x faster than the per-token loop (goal >= 5)")
    print(f"  {ours_t / med['forward+backward']:.2f}x one forward+backward, logits at one position (goal <= 2.5)")
    print(f"  {ours_t / med['fwd+bwd all logits']:.2f}x one forward+backward with every position's logits")
    print(f"  {ours_t / med['training fwd+bwd']:.2f}x one training-style forward+backward")
    mkl_t = med["lmscope, MKL"]
    print(
        f"batching alone (both on PyTorch's products): {med['per-token loop'] / mkl_t:.1f}x faster than the loop, "
        f"{mkl_t / med['forward+backward']:.2f}x one forward+backward"
    )
    print(f"both on oneDNN products: {med['loop, oneDNN'] / ours_t:.1f}x faster than the loop")

    print("integrated gradients, 20 steps, 10 outputs (each in a fresh process):")
    threads = ["--threads", str(args.threads)] if args.threads else []
    for budget in (2048, 256):
        child = [sys.executable, __file__, "--ig-child", str(budget), *threads]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        seconds, memory = (float(x) for x in done.stdout.split()[-2:])
        print(
            f"  batch_size={budget:5d} rows: {seconds:6.2f} s ({seconds / med['forward']:5.1f}x forward), "
            f"peak memory +{memory / 2**20:6.0f} MiB"
        )


if __name__ == "__main__":
    main()
