"""Capture overhead on an encoder-decoder model: ``lm.trace(source, target=...)`` vs a plain forward.

A random-weight T5 sized like t5-small (6 + 6 layers, d_model 512, 8 heads, d_ff 2,048, vocabulary
32,128), 128 source tokens and 32 target tokens (the decoder start token first). lmscope's traced
pass with the default sites of both stacks (residual states, attention and MLP updates, the
encoder's, decoder's and cross-attention probabilities, values, MLP activations, and the decoder's
cross-attention updates) against the same forward pass of the bare Hugging Face model. Goal: at
most 1.3x.

Repeats are interleaved (one of each per round) and medians reported, since machines are shared;
the load average is printed with the result, and so is the ratio of CPU time (this process's, all
threads), which a busy machine disturbs less than wall time.
Run: ``python benchmarks/bench_seq2seq.py --threads 2 [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))
import lmscope
from _timing import interleaved

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SOURCE, TARGET = 128, 32


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
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = lmscope.from_pretrained("tiny-t5").tokenizer  # token strings only: the ids below are random
    lm = lmscope.wrap(t5_small_sized(), tokenizer, name="t5-small-sized")
    generator = torch.Generator().manual_seed(1)
    source = torch.randint(2, 32000, (SOURCE,), generator=generator)
    target = torch.randint(2, 32000, (TARGET - 1,), generator=generator)
    decoder = torch.cat([torch.tensor([0]), target])  # [TARGET]: start token, then the target
    run = dict(input_ids=source[None], attention_mask=torch.ones(1, SOURCE, dtype=torch.long),
               decoder_input_ids=decoder[None], use_cache=False)  # fmt: skip

    def plain() -> None:
        with torch.no_grad():
            lm.model(**run)

    def traced() -> None:
        lm.trace(source.tolist(), target=target.tolist())

    out = lm.trace(source.tolist(), target=target.tolist())
    assert out.trace.n_pos == TARGET and out.trace.encoder.n_pos == SOURCE
    with torch.no_grad():
        assert (out.logits - lm.model(**run).logits[0]).abs().max() <= 1e-4
    load = os.getloadavg()
    times = interleaved({"plain": plain, "trace": traced}, repeats=args.repeats)
    after = os.getloadavg()
    cpu: dict[str, list[float]] = {"plain": [], "trace": []}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("trace", traced)):
            start = time.process_time()
            fn()
            cpu[name].append(time.process_time() - start)
    cpu_ratio = statistics.median(cpu["trace"]) / statistics.median(cpu["plain"])
    print(
        f"capture overhead, t5-small-sized (6+6 layers, d_model 512, 8 heads), {SOURCE} source + {TARGET} target "
        f"tokens, default sites of both stacks: plain forward {times['plain'] * 1e3:.1f} ms, lm.trace "
        f"{times['trace'] * 1e3:.1f} ms, ratio {times['trace'] / times['plain']:.2f}x (goal <= 1.3x); "
        f"threads {torch.get_num_threads()}, load average {load[0]:.1f} before, {after[0]:.1f} after "
        f"({os.cpu_count()} CPUs); CPU time ratio {cpu_ratio:.2f}x"
    )


if __name__ == "__main__":
    main()
