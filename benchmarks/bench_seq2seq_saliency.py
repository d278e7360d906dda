"""Saliency speed on an encoder-decoder model: 10 generated tokens from one batched backward pass.

A random-weight T5 sized like t5-small (6 + 6 layers, d_model 512, 8 heads, d_ff 2,048, vocabulary
32,128), 128 source tokens, 10 tokens generated greedily. ``grad_x_input`` of every generated
token over the source and the decoder prefix (lmscope: one forward pass, the encoder run once,
one batched backward pass) against the per-token loop as inseq and Ecco run it (for each target,
a forward pass of the whole model, encoder included, over the source and the target's prefix, and
a backward pass to both embeddings), plus one plain forward and one forward + backward for scale.

Where the time goes: every target's gradient w.r.t. the source must be pulled back through the
encoder, so any exact method does one forward pass and ``n`` backward passes' worth of products.
Sharing the encoder's forward pass alone gives ``n (F + B) / (F + n B)`` (about 1.8x for 10
targets with a backward pass ``B`` costing about a forward pass ``F``); the rest of the gain comes
from running the ``n`` pull-backs well (see :mod:`lmscope.analysis._seq2seq_gradients`): all 10
targets in one pass (the default row budget used to split them 7 + 3, running the encoder twice),
self-attention by the eager function during the pass (SDPA's fused CPU backward has no batching
rule, so the batched backward ran it once per target and stacked the results), cross-attention
rewritten so that the encoder's keys and values are not differentiated, and the pass's products
routed to oneDNN where the trial pass finds it faster. The benchmark prints that first figure
(from the measured ``F`` and ``B``) next to the measured ratio, the routing chosen, and the load
average; and, as the floor of any exact method, the time of the products the ``n`` pull-backs
through the encoder's linear maps must do, run alone through oneDNN (``[n · 128, d_model]`` rows
through every projection and FFN matrix of the 6 layers: 24.2 G multiply-adds).

Repeats are interleaved (one of each per round) and medians reported, since machines are shared.
Run: ``python benchmarks/bench_seq2seq_saliency.py --threads 2 [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import interleaved
from lmscope.analysis._onednn import choices, onednn_matmuls

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SOURCE, GENERATE = 128, 10


def t5_small_sized() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = lmscope.from_pretrained("tiny-t5").tokenizer  # token strings only: the ids below are random
    lm = lmscope.wrap(t5_small_sized(), tokenizer, name="t5-small-sized")
    model = lm.model
    source = torch.randint(2, 32000, (SOURCE,), generator=torch.Generator().manual_seed(1))
    out = lm.generate(source.tolist(), generate=GENERATE)
    generated = out.token_ids  # [1 + GENERATE] start token first
    n = len(generated)
    assert out.trace.encoder.n_pos == SOURCE and n == 1 + GENERATE, (out.trace.encoder.n_pos, n)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        src_emb, dec_emb = embed(source[None]), embed(generated[None])  # [1, pos, d_model]
    print(f"t5-small-sized random model, {SOURCE} source tokens, {n - 1} generated, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip

    def batched() -> object:
        return out.saliency("grad_x_input")

    def loop() -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = []
        for t in range(1, n):
            s = src_emb.clone().requires_grad_(True)
            d = dec_emb[:, :t].clone().requires_grad_(True)
            logits = model(inputs_embeds=s, decoder_inputs_embeds=d, use_cache=False).logits[0, -1]
            g_s, g_d = torch.autograd.grad(torch.softmax(logits, -1)[generated[t]], (s, d))
            a_s, a_d = (g_s[0] * s[0].detach()).norm(dim=-1), (g_d[0] * d[0].detach()).norm(dim=-1)
            total = a_s.sum() + a_d.sum()
            rows.append((a_s / total, a_d / total))
        return rows

    def forward() -> None:
        with torch.no_grad():
            model(inputs_embeds=src_emb, decoder_inputs_embeds=dec_emb, use_cache=False)

    config = model.config
    rows = (n - 1) * SOURCE  # every target's rows through the encoder
    shapes = [(config.d_model, config.d_ff), (config.d_ff, config.d_model)] + 4 * [(config.d_model, config.d_model)]
    operands = [(torch.randn(rows, k), torch.randn(m, k)) for k, m in shapes]  # [rows, in], weight [out, in]
    floor_macs = config.num_layers * sum(rows * k * m for k, m in shapes)

    def encoder_products() -> None:  # the n pull-backs' products through the encoder's linear maps, alone
        with onednn_matmuls():
            for _ in range(config.num_layers):
                for x, w in operands:
                    torch.nn.functional.linear(x, w)

    def forward_backward() -> None:  # one target's gradient w.r.t. both inputs
        s = src_emb.clone().requires_grad_(True)
        d = dec_emb.clone().requires_grad_(True)
        logits = model(inputs_embeds=s, decoder_inputs_embeds=d, use_cache=False).logits[0, -1]
        torch.autograd.grad(torch.softmax(logits, -1)[0], (s, d))

    ours, ref = batched(), loop()
    diff = max(
        float((torch.as_tensor(a) - b).abs().max())
        for i, pair in enumerate(ref)
        for a, b in zip((ours.source_attributions[i], ours.attributions[i]), pair, strict=True)
    )
    print(f"max |lmscope - per-token loop| over all attributions (source and decoder): {diff:.2e}")
    for choice in choices().values():
        print(f"  batched backward products: {choice}")
    load = os.getloadavg()
    med = interleaved(
        {
            "forward": forward,
            "forward+backward": forward_backward,
            "per-token loop": loop,
            "lmscope": batched,
            "encoder products": encoder_products,
        },
        repeats=args.repeats,
    )
    after = os.getloadavg()
    for name, t in med.items():
        print(f"  {name:18s} {1000 * t:8.1f} ms  ({t / med['forward']:5.1f}x forward)")
    backward = med["forward+backward"] - med["forward"]
    print(
        f"grad_x_input, {n - 1} outputs over source + prefix: {med['per-token loop'] / med['lmscope']:.2f}x faster "
        f"than the per-token loop (goal >= 5); load average {load[0]:.1f} before, {after[0]:.1f} after "
        f"({os.cpu_count()} CPUs)"
    )
    shared = med["per-token loop"] / (med["forward"] + (n - 1) * backward)
    print(
        f"  sharing the encoder's forward pass alone would give {shared:.2f}x (one forward + {n - 1} separate "
        "backward passes); the rest is the batched products"
    )
    floor = med["encoder products"]
    print(
        f"  the encoder pull-backs' products alone ({floor_macs / 1e9:.1f} G multiply-adds through oneDNN, "
        f"{2 * floor_macs / floor / 1e9:.0f} GFLOP/s): {1000 * floor:.0f} ms, "
        f"{floor / med['lmscope']:.0%} of lmscope's time; 5x needs lmscope within "
        f"{1000 * med['per-token loop'] / 5:.0f} ms"
    )


if __name__ == "__main__":
    main()
