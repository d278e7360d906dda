"""Gradients of many next-token targets w.r.t. the input embeddings, from one forward pass.

Saliency needs ``∂f_t/∂e_s`` for every output position ``t`` and every input position ``s < t``,
where ``e [pos, d_model]`` are the input embeddings (``inputs_embeds``: what the model's forward
receives, before any scaling the model applies inside, e.g. Gemma's ``√d_model``) and ``f_t`` is
a function of the logits that predict token ``t`` (at position ``t - 1``).

The straightforward way (Ecco's) runs a forward and a backward pass over each prefix ``[0, t)``.
Under the causal mask one forward pass over the whole sequence already computes every
``logits[t - 1]`` from exactly its prefix, so ``∂f_t/∂e_s`` is zero for ``s ≥ t`` and equal to the
prefix computation for ``s < t``. The ``N`` targets are then ``N`` vector-Jacobian products
through the same graph, done at once as one batched backward pass
(``torch.autograd.grad(..., is_grads_batched=True)``, which vmaps the backward over ``N``
cotangents; see :func:`_vjps` for how the vocabulary-sized head is kept out of the batch). Targets
are chunked so that a batched backward carries at most ``rows`` token positions, which bounds
memory. Cost: one forward pass over the sequence plus backward work for ``N × pos`` positions,
against ``Σ_t 2t`` positions in small, inefficient passes for the per-prefix loop. Of those
``N × pos`` rows, target ``t``'s rows at ``s ≥ t`` are exactly zero, and where the pass's products
run through oneDNN (:mod:`lmscope.analysis._onednn`: the forward and the batched backward, routed
together as one pass) they multiply only the ``Σ_t t`` others (:func:`_zero_rows`): 195 of 240 rows
for 10 tokens generated after a 15-token prompt. Cutting those rows from the whole pass instead (a
forward in segments, each target's backward over its own prefix only) would read every weight once
more per segment, and a pass this short is bound by reading the weights: the forward of 24
positions costs about twice the batched backward's products for those 45 rows.

How many positions a batched backward carries (:func:`default_rows`) is set from the machine. On
a CPU the products' efficiency grows with the rows, and each pass has a fixed cost (every weight
is read from memory once per forward and once per backward, and a few thousand operations are
dispatched), so few, large passes pay; but once the widest activation of a pass (``[rows,
d_ff]`` float32) outgrows the last-level cache, each of the backward's elementwise operations
streams it from memory, and the pass slows down and starts to depend on what else the machine
is doing. Integrated gradients at 2,048 rows on SmolLM2-135M (``d_ff = 1,536``: 12 MiB per
activation, against a 32 MiB cache shared with other processes) ran between 9.5 and 36.7 s on
the same machine; profiled there (20 steps, 10 outputs, one thread, PyTorch's products), the
products took only 44 % of the operations' time, the elementwise products and sums over
``[n, batch, pos, d_ff]`` gradients 34 %, and the stacking that vmap's per-target fallbacks add
(the attention and SiLU backward have no batching rule) 5 %, with 16 GiB allocated in all. The
default keeps that activation within a quarter of the cache.

Those per-target fallbacks are kept on purpose. Building attention and SiLU instead as autograd
functions whose backward vmap batches (the attention probabilities kept from the forward, the
backward as batched ``bmm`` and elementwise products; ``φ'(x)`` kept for the activation) was
measured on SmolLM2-135M, 10 targets, one thread: per layer the batched attention backward took as
long as the 10 fused per-target kernels (0.82 against 0.83 ms), the activation's 0.15 against
0.24 ms, but the forward 0.25 ms longer and the backward ran more operations (5,875 against
5,515): the whole pass took 30–50 ms longer (of about 650 ms of CPU time).

Gradients are taken w.r.t. the embeddings only. Callers consume these generators inside
:func:`frozen_parameters`, so no parameter gradient is computed, stored or left behind, and the
forward passes do not keep the activations that only parameter gradients would need.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from lmscope.analysis._onednn import ZeroRows, routed
from lmscope.models import LoadedModel

__all__ = [
    "Targets",
    "default_rows",
    "frozen_parameters",
    "gauss_legendre",
    "gradients",
    "input_embeddings",
    "integrated_gradients",
    "last_level_cache",
    "scores",
]


@dataclass(frozen=True)
class Targets:
    """What is differentiated for each output position ``t`` (``token`` is the token at ``t``).

    ``f_t = p(token_t)`` (``kind="prob"``), ``logit(token_t)`` (``"logit"``), or, with ``foil``,
    the contrast ``logit(token_t) − logit(foil_t)`` (Yin & Neubig 2022).
    """

    positions: torch.Tensor  # [n] output positions t, each >= 1
    token: torch.Tensor  # [n] token id at t
    foil: torch.Tensor | None = None  # [n] contrast token ids
    kind: str = "prob"

    def __len__(self) -> int:
        return len(self.positions)

    def chunk(self, sl: slice) -> Targets:
        foil = None if self.foil is None else self.foil[sl]
        return Targets(self.positions[sl], self.token[sl], foil, self.kind)


@contextmanager
def frozen_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Turn off ``requires_grad`` on every parameter, restoring each flag afterwards, even on error."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@torch.no_grad()
def input_embeddings(lm: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's input embeddings ``[pos, d_model]`` of token ids ``[pos]`` (what ``inputs_embeds`` takes)."""
    return lm.model.get_input_embeddings()(ids[None].to(lm.device))[0]


class _HeadInput:
    """The input of the LM head ``[batch, n or pos, d_model]`` seen during one forward pass."""

    value: torch.Tensor | None = None


@contextmanager
def _head_input(lm: LoadedModel) -> Iterator[_HeadInput]:
    box = _HeadInput()

    def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        box.value = args[0]

    handle = lm.arch.lm_head.register_forward_pre_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def _vjps(lm: LoadedModel, x: torch.Tensor, chunk: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∂f_i/∂x [n, *x.shape], f [batch, n])`` for input embeddings ``x [batch, pos, d_model]``.

    Two stages. The head is row-wise (``f_i`` depends only on the final hidden state ``h_i`` at
    its predicting position), so one ordinary backward pass of ``Σ f`` gives every ``∂f_i/∂h_i``.
    These become ``n`` cotangents of ``h`` (target ``i``'s is zero except at its own row), pulled
    back to ``x`` in one batched backward pass: the vocabulary-sized head is never differentiated
    ``n`` times.
    """
    n = len(chunk)

    def run() -> tuple[torch.Tensor, torch.Tensor]:  # the whole pass, as a routing trial runs it thrice
        with _head_input(lm) as head:
            values = scores(lm, x, chunk)  # [batch, n]
        h = head.value  # [batch, n, d_model] (or [batch, pos, d_model] without logits_to_keep)
        (dh,) = torch.autograd.grad(values.sum(), h, retain_graph=True)  # [batch, n or pos, d_model]
        rows = torch.arange(n, device=h.device)
        index = rows if h.shape[1] == n else (chunk.positions - 1).to(h.device)
        cotangents = torch.zeros((n, *h.shape), dtype=h.dtype, device=h.device)  # [n, batch, n or pos, d_model]
        cotangents[rows, :, index] = dh[:, index].transpose(0, 1)
        (grads,) = torch.autograd.grad(h, x, grad_outputs=cotangents, is_grads_batched=True)  # [n, *x.shape]
        return grads, values.detach()

    rows = _zero_rows(chunk.positions, x.shape[0], x.shape[1])
    return routed(run, _workload(lm, n * x.shape[0] * x.shape[1]), lm.device, lm.dtype, rows)


def _zero_rows(positions: torch.Tensor, batch: int, length: int) -> ZeroRows | None:
    """The rows of a batched backward's products that are zero under the causal mask.

    The products of the pass behind :func:`_vjps` have ``n × batch × length`` rows (target,
    sequence, position, in that order); target ``i``'s rows at positions ``s ≥ t_i`` are exactly
    zero, as nothing at or after ``t_i`` influences the logits that predict ``t_i``. ``None`` where
    no row is zero (every target at the end of the sequence).
    """
    s = torch.arange(length)
    keep = s[None, None, :] < positions.cpu()[:, None, None]  # [n, 1, length]
    return ZeroRows.of(keep.expand(len(positions), batch, length).reshape(-1))


def _workload(lm: LoadedModel, rows: int) -> tuple[object, ...]:
    """The class of a batched backward pass for the matmul routing: the model's shape, the rows
    (rounded up to a power of two) and the thread count."""
    config = lm.model.config
    shape = tuple(getattr(config, name, None) for name in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    return (
        "batched backward",
        type(lm.model).__name__,
        shape,
        1 << max(rows - 1, 0).bit_length(),
        torch.get_num_threads(),
    )


@cache
def _keeps_logits(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


def scores(lm: LoadedModel, embeds: torch.Tensor, targets: Targets) -> torch.Tensor:
    """``f_t`` for every target, ``[batch, n]`` (float32), from ``embeds [batch, pos, d_model]``.

    Only the ``n`` predicting positions go through the LM head (``logits_to_keep``), so the head's
    cost does not grow with the sequence.
    """
    model = lm.model
    prev = (targets.positions - 1).to(embeds.device)  # [n] the positions that predict the targets
    if _keeps_logits(type(model)):
        logits = model(inputs_embeds=embeds, logits_to_keep=prev, use_cache=False).logits  # [batch, n, vocab]
    else:
        logits = model(inputs_embeds=embeds, use_cache=False).logits[:, prev]
    logits = logits.float()
    rows = torch.arange(len(targets), device=logits.device)
    token = targets.token.to(logits.device)
    if targets.foil is not None:
        return logits[:, rows, token] - logits[:, rows, targets.foil.to(logits.device)]
    if targets.kind == "logit":
        return logits[:, rows, token]
    return torch.log_softmax(logits, dim=-1)[:, rows, token].exp()


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


_FALLBACK_CACHE = 32 * 2**20  # bytes, where the cache size cannot be read
_CACHE_SHARE = 4  # the widest activation of a pass takes at most this fraction (1/4) of the cache
_MIN_ROWS, _MAX_ROWS = 256, 4096
_GPU_ROWS = 2048


def _size(text: str) -> int:
    """Bytes of a sysfs cache size such as ``"32768K"``."""
    text = text.strip().upper()
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)


@cache
def last_level_cache() -> int:
    """Bytes of the CPU's last-level data cache (from Linux sysfs; 32 MiB where it cannot be read)."""
    found = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            found.append((int((index / "level").read_text()), _size((index / "size").read_text())))
        except (OSError, ValueError):
            continue
    return max(found)[1] if found else _FALLBACK_CACHE


def default_rows(lm: LoadedModel) -> int:
    """The most token positions in one batched backward pass, chosen for this machine and model.

    On a CPU: as many rows as keep the widest activation (``[rows, max(d_model, d_ff)]`` float32)
    within a quarter of the last-level cache (see the module docstring), between 256 and 4,096.
    On other devices: 2,048.
    """
    if lm.device.type != "cpu":
        return _GPU_ROWS
    config = lm.model.config
    d_model = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1)
    widest = max(d_model, int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * d_model))
    return int(min(max(last_level_cache() // (_CACHE_SHARE * 4 * widest), _MIN_ROWS), _MAX_ROWS))


def gradients(
    lm: LoadedModel, embeds: torch.Tensor, targets: Targets, rows: int = 2048
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(chunk, grads [n, pos', d_model], values [n])`` over chunks of the targets.

    ``grads[i, s] = ∂f_t/∂e_s`` for the chunk's ``i``-th target ``t``; ``pos'`` is the chunk's
    longest prefix (positions beyond it cannot influence the chunk's targets), and rows at
    ``s ≥ t`` are exactly zero. One forward pass and one batched backward pass per chunk.
    """
    size = max(1, rows // len(embeds))
    for sl in _chunks(len(targets), size):
        chunk = targets.chunk(sl)
        length = int(chunk.positions.max())  # the last predicting position is length - 1
        with torch.enable_grad():
            e = embeds[None, :length].detach().clone().requires_grad_(True)  # [1, pos', d_model]
            grads, values = _vjps(lm, e, chunk)  # [n, 1, pos', d_model], [1, n]
        yield sl, grads[:, 0].float(), values[0]


def gauss_legendre(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Points ``α_k ∈ (0, 1)`` and weights ``w_k`` (summing to 1) of ``steps``-point Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1) / 2, weights / 2


def integrated_gradients(
    lm: LoadedModel,
    embeds: torch.Tensor,
    baseline: torch.Tensor,
    targets: Targets,
    steps: int,
    rows: int = 2048,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(chunk, path_grads [n, pos', d_model])``: ``∫₀¹ ∂f_t/∂e (b + α(e − b)) dα`` for each target.

    The integral is approximated by ``steps``-point Gauss-Legendre quadrature. The interpolated
    sequences of several steps form one batch; each batch is one forward pass and one backward
    pass batched over the chunk's targets, with at most ``rows`` positions per backward.
    """
    alphas, weights = gauss_legendre(steps)
    n_chunk = max(1, min(len(targets), rows // len(embeds)))
    for sl in _chunks(len(targets), n_chunk):
        chunk = targets.chunk(sl)
        n, length = len(chunk), int(chunk.positions.max())
        e, b = embeds[:length].detach(), baseline[:length].detach()  # [pos', d_model]
        per_batch = max(1, rows // (n * length))
        total = torch.zeros(n, length, e.shape[-1], dtype=torch.float32, device=e.device)
        for steps_sl in _chunks(steps, per_batch):
            alpha = torch.as_tensor(alphas[steps_sl], dtype=e.dtype, device=e.device)  # [batch]
            weight = torch.as_tensor(weights[steps_sl], dtype=torch.float32, device=e.device)  # [batch]
            with torch.enable_grad():
                # The sequences in a batch are independent, so target i's cotangent, spread over
                # the batch, gives its gradient at every step in the same batched backward.
                x = (b + alpha[:, None, None] * (e - b)).requires_grad_(True)  # [batch, pos', d_model]
                grads, _ = _vjps(lm, x, chunk)  # [n, batch, pos', d_model]
            total += torch.einsum("b,nbpd->npd", weight, grads.float())  # [n, pos', d_model]
        yield sl, total
