"""Gradients of many target tokens of an encoder-decoder model w.r.t. both of its inputs, batched.

An encoder-decoder model reads two token sequences: the source ``x`` (the encoder's input) and
the decoder's tokens ``y`` (the start token, then the target). Target token ``y_t`` (``t ≥ 1``)
is predicted from the decoder state at ``t − 1``, which sees every source token and the decoder
prefix ``y_<t``. Saliency of ``y_t`` needs ``∂f_t/∂e^src_s`` for every source position ``s`` and
``∂f_t/∂e^dec_s`` for every ``s < t``, where ``e`` are the token embeddings as each stack's
embedding module produces them (BART's scaled embedding included; Marian's and Pegasus's scale,
applied by the stack afterwards, excluded: gradient × input and integrated gradients do not
depend on such a constant, only the plain gradient norm does), and ``f_t`` is the token's
probability, its logit or a logit difference (:class:`lmscope.analysis._gradients.Targets`).

The straightforward way (inseq's and Ecco's) runs the whole model, encoder included, and one
backward pass per target over ``(x, y_<t)``. Here one forward pass over ``(x, y)`` serves every
target: the decoder's causal mask makes ``logits[t − 1]`` depend on exactly ``y_<t`` and every
source token, so the ``n`` targets are ``n`` vector-Jacobian products through the same graph,
done as one batched backward pass (``is_grads_batched``; the vocabulary-sized head is
differentiated once, as in :mod:`lmscope.analysis._gradients`). The encoder runs once instead of
``n`` times; what remains is ``n`` pulls of a cotangent back through it, batched into large
products.

Where the time goes (t5-small-sized, 128 source + 10 target tokens, 2 threads): every exact
method pulls ``n`` cotangents back through the whole encoder, so in floating-point operations one
forward pass and ``n`` backward passes is all that sharing the encoder saves (about 1.8x against
the per-token loop). The rest comes from running those pull-backs well:

- all targets in one pass (:func:`seq2seq_rows`): a second chunk re-runs the encoder's forward;
- self-attention by each family's eager function during gradient passes: SDPA's fused CPU
  backward has no batching rule, so a batched backward through it runs once per target and stacks
  the results (a quarter of the pass, with the copies it adds); eager attention's products batch
  over the targets (its softmax backward still runs once per target, a small share);
- cross-attention rewritten so that the encoder's keys and values are not differentiated
  (:mod:`lmscope.analysis._cross_attention`): the pull-back to the encoder output goes through
  products with ``heads × t`` inner terms instead of two ``d_model``-square products per layer
  and target (the pass's products: 36.1 G multiply-adds before, 32.8 G after);
- the batched backward's float32 products routed to oneDNN where a trial pass finds that faster
  (:func:`lmscope.analysis._onednn.routed`). The forward stays on PyTorch's products: routed
  too, its ~1e-6 differences flip ReLU units near zero, and the source gradients then differ
  from the per-token loop's by 0.5 % of their largest entry, which the trial rejects.

Of the 32.8 G multiply-adds left, 24.2 G are the ``n`` pull-backs through the encoder's linear
maps (2.4 G per target: ``[n · src_pos, d_model]`` rows through every projection and the FFN) and
2.8 G the forward pass; no exact method avoids them.

Measured so (``benchmarks/bench_seq2seq_saliency.py``, 2 threads on a 2-core machine shared with
other jobs): before the cross-attention rewrite, 3.9x faster than the per-token loop at load 2.4,
4.1x at load 9 and 9.3x at load 16, and 2.7-3.7x on an idle machine (the loop's many small
operations suffer most from a busy machine). The 5x goal is not reached on a quiet machine: what
remains is mostly the ``n`` pull-backs through the encoder themselves, which the benchmark times
alone as the floor of any exact method.

The embeddings are swapped in by scoped forward hooks on the two stacks' embedding modules
(removed on exit, even on error): the model is called with its ordinary token ids, so every
family's own masks, position embeddings and scales apply unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import PreTrainedModel

from lmscope.analysis._cross_attention import rewritten_cross_attention
from lmscope.analysis._gradients import Targets, default_rows
from lmscope.analysis._onednn import routed

__all__ = [
    "embedding_modules",
    "seq2seq_embeddings",
    "seq2seq_gradients",
    "seq2seq_integrated_gradients",
    "seq2seq_occlusion",
    "seq2seq_rows",
    "seq2seq_scores",
]

_LOGIT_ELEMENTS = 2**25  # the most vocabulary-sized logits one occlusion pass keeps (128 MiB in float32)
_MIN_ROWS = 4096  # a batched backward over source + prefix carries at least this many positions


def seq2seq_rows(lm: object) -> int:
    """The most positions (targets × (source + prefix)) in one batched backward of an encoder-decoder.

    At least 4,096: unlike a decoder-only model's, each extra chunk runs the encoder's forward
    again, which costs more than the cache effects :func:`~lmscope.analysis._gradients.default_rows`
    guards against (10 targets over 128 + 11 positions on t5-small: one chunk of 1,390 rows
    instead of 7 + 3 targets).
    """
    return max(default_rows(lm), _MIN_ROWS)  # type: ignore[arg-type]


def embedding_modules(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The encoder's and the decoder's token embedding modules (possibly one shared module)."""
    stacks = model.get_encoder(), model.get_decoder()
    return tuple(getattr(s, "embed_tokens", None) or s.get_input_embeddings() for s in stacks)  # type: ignore[return-value]


@torch.no_grad()
def seq2seq_embeddings(
    model: PreTrainedModel, source_ids: torch.Tensor, decoder_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source [src_pos, d_model], decoder [dec_pos, d_model])``: each stack's token embeddings."""
    device = next(model.parameters()).device
    enc, dec = embedding_modules(model)
    return enc(source_ids[None].to(device))[0], dec(decoder_ids[None].to(device))[0]


@contextmanager
def _swapped(model: PreTrainedModel, source: torch.Tensor, decoder: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """Token ids ``[batch, src_pos]``, ``[batch, dec_pos]`` whose embeddings are ``source`` and ``decoder``.

    The two stacks may share one embedding module, so the hook recognises the caller by the ids
    tensor it passes (by its storage: a stack may reshape it) and replaces the module's output by
    that stack's embeddings. The ids themselves are placeholders the embeddings stand in for.
    """
    device = source.device
    src_ids = torch.zeros(source.shape[:2], dtype=torch.long, device=device)
    dec_ids = torch.zeros(decoder.shape[:2], dtype=torch.long, device=device)
    swap = {src_ids.data_ptr(): source, dec_ids.data_ptr(): decoder}  # views keep the data pointer

    def replace(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return swap.get(args[0].data_ptr(), output)

    handles = [m.register_forward_hook(replace) for m in {id(m): m for m in embedding_modules(model)}.values()]
    try:
        yield src_ids, dec_ids
    finally:
        for handle in handles:
            handle.remove()


class _Box:
    value: torch.Tensor | None = None


@contextmanager
def _head_input(model: PreTrainedModel) -> Iterator[_Box]:
    """The LM head's input ``[batch, dec_pos, d_model]`` (after T5's rescaling) during one forward pass."""
    box = _Box()

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.value = args[0]

    handle = model.get_output_embeddings().register_forward_pre_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def _pick(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``f_t`` ``[batch, n]`` from decoder logits ``[batch, dec_pos, vocab]``."""
    prev = (targets.positions - 1).to(logits.device)  # [n] the positions that predict the targets
    logits = logits[:, prev].float()  # [batch, n, vocab]
    rows = torch.arange(len(targets), device=logits.device)
    token = targets.token.to(logits.device)
    if targets.foil is not None:
        return logits[:, rows, token] - logits[:, rows, targets.foil.to(logits.device)]
    if targets.kind == "logit":
        return logits[:, rows, token]
    return torch.log_softmax(logits, dim=-1)[:, rows, token].exp()


def seq2seq_scores(
    model: PreTrainedModel, source: torch.Tensor, decoder: torch.Tensor, targets: Targets
) -> torch.Tensor:
    """``f_t`` for every target, ``[batch, n]`` (float32), from embeddings ``[batch, src_pos | dec_pos, d_model]``."""
    with _swapped(model, source, decoder) as (src_ids, dec_ids):
        logits = model(input_ids=src_ids, decoder_input_ids=dec_ids, use_cache=False).logits
    return _pick(logits, targets)


def _vjps(
    model: PreTrainedModel, source: torch.Tensor, decoder: torch.Tensor, chunk: Targets
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∂f/∂source [n, *source.shape], ∂f/∂decoder [n, *decoder.shape], f [batch, n])``.

    The head is row-wise, so one ordinary backward pass of ``Σ f`` gives every ``∂f_i/∂h_i`` at
    the predicting rows; they become ``n`` cotangents of the head input ``h``, pulled back to both
    inputs in one batched backward pass.
    """
    n = len(chunk)
    with _head_input(model) as head:
        values = seq2seq_scores(model, source, decoder, chunk)  # [batch, n]
    h = head.value  # [batch, dec_pos, d_model]
    (dh,) = torch.autograd.grad(values.sum(), h, retain_graph=True)
    rows = torch.arange(n, device=h.device)
    index = (chunk.positions - 1).to(h.device)
    cotangents = torch.zeros((n, *h.shape), dtype=h.dtype, device=h.device)  # [n, batch, dec_pos, d_model]
    cotangents[rows, :, index] = dh[:, index].transpose(0, 1)

    def pull_back() -> tuple[torch.Tensor, ...]:  # the graph is kept: a routing trial runs this thrice
        return torch.autograd.grad(
            h, (source, decoder), grad_outputs=cotangents, is_grads_batched=True, retain_graph=True
        )

    param = next(model.parameters())
    g_src, g_dec = routed(pull_back, _workload(model, n * h.shape[0] * (source.shape[1] + decoder.shape[1])),
                          param.device, param.dtype)  # fmt: skip
    return g_src, g_dec, values.detach()


def _workload(model: PreTrainedModel, rows: int) -> tuple[object, ...]:
    """The class of a batched backward for the matmul routing: the model's shape, the rows
    (rounded up to a power of two) and the thread count."""
    config = model.config
    shape = tuple(getattr(config, name, None) for name in ("d_model", "d_ff", "num_layers", "encoder_layers"))
    return (
        "seq2seq batched backward",
        type(model).__name__,
        shape,
        1 << max(rows - 1, 0).bit_length(),
        torch.get_num_threads(),
    )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def seq2seq_gradients(
    model: PreTrainedModel, source: torch.Tensor, decoder: torch.Tensor, targets: Targets, rows: int = 2048
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(chunk, grads_src [n, src_pos, d_model], grads_dec [n, dec_pos', d_model], values [n])``.

    ``source [src_pos, d_model]`` and ``decoder [dec_pos, d_model]`` are the embeddings;
    ``dec_pos'`` is the chunk's longest decoder prefix, and decoder rows at ``s ≥ t`` are exactly
    zero. One forward pass and one batched backward pass per chunk of at most ``rows`` positions.
    """
    size = max(1, rows // (len(source) + len(decoder)))
    for sl in _chunks(len(targets), size):
        chunk = targets.chunk(sl)
        length = int(chunk.positions.max())  # the last predicting position is length - 1
        with torch.enable_grad(), rewritten_cross_attention(model):
            s = source[None].detach().clone().requires_grad_(True)  # [1, src_pos, d_model]
            d = decoder[None, :length].detach().clone().requires_grad_(True)  # [1, dec_pos', d_model]
            g_src, g_dec, values = _vjps(model, s, d, chunk)
        yield sl, g_src[:, 0].float(), g_dec[:, 0].float(), values[0]


def seq2seq_integrated_gradients(
    model: PreTrainedModel,
    source: torch.Tensor,
    decoder: torch.Tensor,
    baselines: tuple[torch.Tensor, torch.Tensor],
    targets: Targets,
    steps: int,
    rows: int = 2048,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(chunk, path_src [n, src_pos, d], path_dec [n, dec_pos', d])``: path integrals of the gradients.

    Both inputs move together along ``b + α(e − b)`` (one path for the pair, so completeness
    holds over source and decoder tokens together), with ``steps``-point Gauss-Legendre
    quadrature; the steps of a batch are independent sequences, so one batched backward gives
    every target's gradient at every step of the batch.
    """
    from lmscope.analysis._gradients import gauss_legendre

    alphas, weights = gauss_legendre(steps)
    width = len(source) + len(decoder)
    n_chunk = max(1, min(len(targets), rows // width))
    b_src, b_dec = baselines
    for sl in _chunks(len(targets), n_chunk):
        chunk = targets.chunk(sl)
        n, length = len(chunk), int(chunk.positions.max())
        e_s, e_d = source.detach(), decoder[:length].detach()
        z_s, z_d = b_src.detach().to(e_s), b_dec[:length].detach().to(e_d)
        per_batch = max(1, rows // (n * (len(source) + length)))
        total_s = torch.zeros(n, *e_s.shape, dtype=torch.float32, device=e_s.device)
        total_d = torch.zeros(n, *e_d.shape, dtype=torch.float32, device=e_d.device)
        for steps_sl in _chunks(steps, per_batch):
            alpha = torch.as_tensor(alphas[steps_sl], dtype=e_s.dtype, device=e_s.device)[:, None, None]  # [batch,1,1]
            weight = torch.as_tensor(weights[steps_sl], dtype=torch.float32, device=e_s.device)  # [batch]
            with torch.enable_grad(), rewritten_cross_attention(model):
                xs = (z_s + alpha * (e_s - z_s)).requires_grad_(True)  # [batch, src_pos, d_model]
                xd = (z_d + alpha * (e_d - z_d)).requires_grad_(True)  # [batch, dec_pos', d_model]
                g_src, g_dec, _ = _vjps(model, xs, xd, chunk)  # [n, batch, ..., d_model]
            total_s += torch.einsum("b,nbpd->npd", weight, g_src.float())
            total_d += torch.einsum("b,nbpd->npd", weight, g_dec.float())
        yield sl, total_s, total_d


@torch.no_grad()
def seq2seq_occlusion(
    model: PreTrainedModel,
    source: torch.Tensor,
    decoder: torch.Tensor,
    baselines: tuple[torch.Tensor, torch.Tensor],
    targets: Targets,
    rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(drops_src [src_pos, n], drops_dec [dec_pos', n], values [n])``: ``f(e) − f(e with row s := b_s)``.

    One variant per occluded position (every source position, and the decoder prefix up to the
    last target), batched into forward passes of at most ``rows`` positions; decoder entries at
    ``s ≥ t`` are exactly zero (the causal mask).
    """
    length = int(targets.positions.max())
    e_s, e_d = source, decoder[:length]
    b_s, b_d = baselines[0].to(e_s), baselines[1][:length].to(e_d)
    values = seq2seq_scores(model, e_s[None], e_d[None], targets)[0]  # [n]
    vocab = int(model.config.vocab_size)
    width = len(e_s) + length
    per_pass = max(1, min(rows // width, _LOGIT_ELEMENTS // (length * vocab)))
    n_src = len(e_s)
    drops = torch.zeros(n_src + length, len(targets), dtype=torch.float32, device=e_s.device)
    for start in range(0, n_src + length, per_pass):
        occluded = torch.arange(start, min(start + per_pass, n_src + length), device=e_s.device)  # [batch]
        xs = e_s.expand(len(occluded), -1, -1).clone()  # [batch, src_pos, d_model]
        xd = e_d.expand(len(occluded), -1, -1).clone()  # [batch, dec_pos', d_model]
        on_src = occluded < n_src
        rows_s, rows_d = on_src.nonzero().squeeze(1), (~on_src).nonzero().squeeze(1)
        xs[rows_s, occluded[rows_s]] = b_s[occluded[rows_s]]
        xd[rows_d, occluded[rows_d] - n_src] = b_d[occluded[rows_d] - n_src]
        drops[occluded] = (values - seq2seq_scores(model, xs, xd, targets)).float()  # [batch, n]
    later = torch.arange(length, device=e_s.device)[:, None] >= targets.positions.to(e_s.device)[None]
    drops[n_src:] = drops[n_src:].masked_fill(later, 0.0)
    return drops[:n_src], drops[n_src:], values.float()
