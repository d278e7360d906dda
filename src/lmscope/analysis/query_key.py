"""The neuron view's data (BertViz): queries, keys, their products, scores and softmax.

For one layer, head ``h`` and query position, BertViz's neuron view unfolds a row of attention:
the post-rotary query ``q``, every key ``k`` (under grouped-query attention the key/value head
``h // (head / kv_head)`` that ``h`` shares), the elementwise products ``q ⊙ k``, the scores
``s = Σ_d q_d·k_d · scaling`` (soft-capped ``tanh(s / c)·c`` where the model does, Gemma 2) and
``softmax(s)`` over the keys the model's mask lets the query see. ``scaling`` is what the model's
attention function applied, recorded at capture: ``d_head^-0.5`` on most families, ``1.0`` on OPT
(whose queries arrive pre-scaled), divided by the layer number on GPT-2 when so configured.

Encoder-decoder models (T5, BART) have three kinds of attention: the encoder's and the decoder's
self-attention, and cross-attention, whose queries are decoder positions and whose keys are the
encoder's output positions (sites ``cross_q``, ``cross_k``, ``cross_attn_probs``). T5 adds a learned
relative position bias ``b[h, q, k]`` (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", §2.1) and does not scale, so its scores are
``s = q·k + b``; the bias is shown as a term of the score, and ``softmax(s)`` over the visible
keys equals the recorded probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmscope.capture import Trace
from lmscope.errors import LmscopeError

__all__ = ["NEURON_BUDGET", "SITES", "NeuronData", "NeuronScores", "neuron_data", "neuron_scores", "unfold"]

NEURON_BUDGET = 4_000_000  # numbers of q and k a neuron view ships at most


@dataclass(frozen=True)
class NeuronData:
    """What the neuron view needs to recompute any weight row of the shipped layers.

    ``band[l, q] = (lo, hi)``: keys ``lo..hi`` are those the model's mask lets query ``q`` see.
    ``bias`` is an additive term of the scores (T5's relative position bias), 0 on masked keys;
    ``None`` where the model adds none.
    """

    q: np.ndarray  # [layer, pos_q, head, d_head], after rotary embedding
    k: np.ndarray  # [layer, pos_k, kv_head, d_head], after rotary embedding
    band: np.ndarray  # [layer, pos_q, 2]
    scaling: tuple[float, ...]  # per layer
    softcap: tuple[float | None, ...]  # per layer
    bias: np.ndarray | None = None  # [layer, head, pos_q, pos_k]


@dataclass(frozen=True)
class NeuronScores:
    """One weight row unfolded: ``probs = softmax(scores)`` over visible keys.

    ``scores = Σ products · scaling (+ bias)``; ``bias`` is ``None`` where the model adds no term.
    """

    layer: int
    head: int
    kv_head: int
    query: int
    scaling: float
    softcap: float | None
    query_vector: np.ndarray  # [d_head]
    keys: np.ndarray  # [pos_k, d_head]
    products: np.ndarray  # [pos_k, d_head]
    scores: np.ndarray  # [pos_k]
    visible: np.ndarray  # [pos_k] bool
    probs: np.ndarray  # [pos_k]
    bias: np.ndarray | None = None  # [pos_k]


# Sites of each kind of attention: queries, keys, probabilities, additive score term.
SITES = {
    "self": ("q", "k", "attn_probs", "position_bias"),
    "cross": ("cross_q", "cross_k", "cross_attn_probs", None),
}


def _visible(probs: torch.Tensor) -> torch.Tensor:  # [pos_q, pos_k] bool
    """Keys the mask lets each query see: masked scores get exactly zero weight in every head.

    ``probs [head, pos_q, pos_k]`` as captured (masked scores are filled with the float32 minimum,
    whose exponential is exactly 0).
    """
    return (probs > 0).any(0)


def unfold(data: NeuronData, index: int, layer: int, head: int, query: int) -> NeuronScores:
    """The row of ``head`` at position ``query`` from the ``index``-th layer of ``data`` (model layer ``layer``)."""
    q = torch.as_tensor(data.q[index])  # [pos, head, d_head]
    k = torch.as_tensor(data.k[index])  # [pos, kv_head, d_head]
    if not 0 <= head < q.shape[1]:
        raise LmscopeError(f"head {head} is out of range: the model has heads 0..{q.shape[1] - 1}")
    kv_head = head // (q.shape[1] // k.shape[1])
    scaling, softcap = data.scaling[index], data.softcap[index]
    query_vector = q[query, head]  # [d_head]
    keys = k[:, kv_head]  # [pos_k, d_head]
    products = query_vector * keys  # [pos_k, d_head]
    scores = products.sum(-1) * scaling  # [pos_k]
    bias = None if data.bias is None else torch.as_tensor(data.bias[index, head, query])  # [pos_k]
    if bias is not None:
        scores = scores + bias
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    lo, hi = (int(x) for x in data.band[index, query])
    keys_at = torch.arange(len(keys))
    visible = (keys_at >= lo) & (keys_at <= hi)  # [pos_k]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return NeuronScores(
        layer=layer,
        head=head,
        kv_head=kv_head,
        query=query,
        scaling=scaling,
        softcap=softcap,
        query_vector=query_vector.numpy(),
        keys=keys.numpy(),
        products=products.numpy(),
        scores=scores.numpy(),
        visible=visible.numpy(),
        probs=probs.numpy(),
        bias=None if bias is None else bias.numpy(),
    )


def neuron_scores(trace: Trace, layer: int, head: int, query: int, *, cross: bool = False) -> NeuronScores:
    """BertViz's neuron view of one row: query, keys, products, scores and softmax, recomputed.

    ``scores[k] = Σ_d q[d]·k[k, d] · scaling (+ bias[k])`` with the scaling the model's attention
    function applied (recorded at capture) and T5's relative position bias where the trace records
    one, soft-capped where the model does, softmax over the keys the model's mask lets the query
    see. ``cross``: the decoder's cross-attention (queries: decoder positions, keys: encoder
    positions) of an encoder-decoder model's decoder trace.
    """
    index = trace.layer_index(layer)
    data = neuron_data(trace, [index], cross=cross)
    return unfold(data, 0, trace.layers[index], head, trace.position(query))


def _bias(trace: Trace, site: str | None, layer_index: list[int], seen: torch.Tensor) -> np.ndarray | None:
    """The recorded additive score term of the layers at ``layer_index`` (0 on masked keys), if any.

    ``seen [layer, pos_q, pos_k]``: the keys each query sees. A bias recorded once ``[head, q, k]``
    (shared by all layers, as T5 shares its first layer's) is repeated per layer.
    """
    if site is None or site not in trace.tensors:
        return None
    bias = trace.get(site).float()
    # recorded once [head, pos_q, pos_k], or per layer [layer, head, pos_q, pos_k]
    bias = bias[None].expand(len(layer_index), *bias.shape) if bias.dim() == 3 else bias[layer_index]
    bias = bias[..., : seen.shape[-2], : seen.shape[-1]]
    # a bias with the mask folded in holds the float32 minimum on masked keys: show 0 there
    return bias.masked_fill(~seen[:, None].to(bias.device), 0.0).cpu().numpy()


def neuron_data(trace: Trace, layer_index: list[int], *, cross: bool = False) -> NeuronData:
    """Queries, keys, scaling, bias and mask bands of the captured layers at ``layer_index`` (stack indices).

    Needs sites ``q``, ``k`` and ``attn_probs`` (``cross``: ``cross_q``, ``cross_k`` and
    ``cross_attn_probs``), and ``position_bias`` where the model adds one (T5): the mask is read
    off the captured probabilities (a key is masked when every head gives it exactly zero weight).
    """
    q_site, k_site, _, bias_site = SITES["cross" if cross else "self"]
    if bias_site is not None and trace.model.family == "t5" and bias_site not in trace.tensors:
        raise LmscopeError(
            "T5 adds a relative position bias to its attention scores: trace again with sites including 'position_bias'"
        )
    q = trace.get(q_site)[layer_index].float()  # [layer, pos_q, head, d_head]
    k = trace.get(k_site)[layer_index].float()  # [layer, pos_k, kv_head, d_head]
    if q.numel() + k.numel() > NEURON_BUDGET:
        raise LmscopeError(
            f"the neuron view of {len(layer_index)} layers × {q.shape[1]} tokens is too large to show: pick one layer"
        )
    if not trace.attn_scaling:
        raise LmscopeError("this trace does not record its attention scaling: trace again with sites 'q' and 'k'")
    bands, seens = [], []
    for i in layer_index:
        seen = _visible(trace.attention(trace.layers[i], cross=cross))  # [pos_q, pos_k]
        seens.append(seen)
        n = seen.shape[-1]
        lo = seen.float().argmax(-1)  # first visible key
        hi = n - 1 - seen.flip(-1).float().argmax(-1)  # last visible key
        if not torch.equal(seen.sum(-1), hi - lo + 1):
            # causal, sliding-window and bidirectional masks of one unpadded sequence are bands
            raise LmscopeError("the neuron view needs each query's visible keys to be one contiguous range")
        bands.append(torch.stack([lo, hi], -1))
    scaling = _scaling(trace, cross)
    return NeuronData(
        q=q.cpu().numpy(),
        k=k.cpu().numpy(),
        band=torch.stack(bands).cpu().numpy(),
        scaling=tuple(scaling[i] for i in layer_index),
        softcap=tuple(trace.attn_softcap[i] for i in layer_index),
        bias=_bias(trace, bias_site, layer_index, torch.stack(seens)),
    )


def _scaling(trace: Trace, cross: bool) -> tuple[float, ...]:
    """Per captured layer, the factor the attention function applied (cross-attention's where recorded)."""
    if cross and getattr(trace, "cross_attn_scaling", ()):
        return tuple(trace.cross_attn_scaling)
    return tuple(trace.attn_scaling)
