"""Block outputs as sums of parts, and each part's contribution by L1 proximity.

Ferrando & Voita (2024), "Information flow routes", and the LM Transparency Tool (Tufanov et al.
2024): a block output ``y = Σ_i z_i`` (the residual counted as one part) is attributed by the
proximity of each part to the whole,

    p_i = max(‖y‖₁ − ‖y − z_i‖₁, 0),        c_i = p_i / Σ_j p_j.

Attention at layer ``l``, query position ``q``: the parts are every (source ``k``, head ``h``) term
``A[h, q, k] · u[k, h]`` with ``u[k, h] = W_O[:, h] · v[k, kv(h)]`` (the value bias is inside the
captured ``v``), the output-projection bias as its own part, and the residual ``resid_pre[q]``;
they sum exactly to ``resid_pre[q] + attn_out[q]``. Parallel blocks (GPT-NeoX, Phi) add the MLP
output to the same sum. The FFN block's parts are ``mlp_out[q]`` and the residual; in a
mixture-of-experts layer they are each routed expert's update (router weight × expert output),
the shared expert's, and the residual (``lmscope.analysis._experts``).

Computing every (q, k, h) proximity directly touches ``pos² · head · d_model`` numbers per layer.
Two exact facts make it cheap (``s = sign(y)`` with ``s_d = +1`` where ``y_d = 0``):

* per coordinate, ``|y_d| − |y_d − z_d| = s_d z_d − 2·relu(s_d z_d − |y_d|)``, so
  ``‖y‖₁ − ‖y − z‖₁ = s·z − 2 Σ_d relu(s_d z_d − |y_d|)``: the linear term for all (q, k, h) is
  one matmul ``A[h,q,k] · (s_q · u[k,h])``; the correction is non-zero only on coordinates with
  ``|y_qd| < A[h,q,k] · max_d |u[k,h,d]|``, which for most terms are none or a handful of the
  smallest ``|y_q|`` coordinates, so it is summed over just those (sorted once per ``q``);
* the triangle inequality bounds every proximity by ``A[h,q,k] · ‖u[k,h]‖₁``; with
  ``tolerance > 0``, terms whose bound is below ``tolerance · ‖y_q‖₁`` keep the linear term
  (clipped to the bound) and the largest possible resulting error is reported.

Degenerate sums: when the whole is nearly cancelled (``‖y‖₁`` smaller than ``‖y − z_i‖₁`` for
every part, e.g. an FFN output that undoes most of its residual), every proximity is 0 and the
shares would be 0/0. The LM Transparency Tool clips proximities at a tiny epsilon, which splits
such a sum evenly among its parts; lmscope does the same explicitly: each part that is not
identically zero (a source the query attends to through a non-zero head update, the bias if
there is one, the residual, the MLP output) gets an equal share, so every sum stays 1 and the
graph is not cut below such a node.

Norms and sums are accumulated in float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from lmscope.analysis._experts import expert_parts
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Architecture
from lmscope.models._architectures import NO_ATTENTION
from lmscope.models._fallback import check_weights_readable
from lmscope.models._placement import tensor_of

__all__ = [
    "BlockContributions",
    "attention_parts",
    "attention_proximity",
    "block_contributions",
    "check_decomposable",
    "head_updates",
    "proximity",
]

_CHUNK_ELEMENTS = 1 << 22


def proximity(parts: torch.Tensor, whole: torch.Tensor, norm: float = 1) -> torch.Tensor:
    """Contributions ``[part, ...]`` of ``parts [part, ..., d]`` to ``whole [..., d]``, summing to 1.

    ``p_i = max(‖whole‖ − ‖whole − part_i‖, 0)`` normalized over the parts (Ferrando & Voita 2024),
    in float32, with the norm's order ``norm`` (1 for the flow graph; LM-TT's test uses 2).

    When every proximity is 0 (a degenerate sum), the parts that are not identically zero share
    it evenly (LM-TT's epsilon clipping does the same; see the module docstring).
    """
    parts, whole = parts.float(), whole.float()
    size = torch.linalg.vector_norm(whole, ord=norm, dim=-1)
    prox = (size - torch.linalg.vector_norm(whole - parts, ord=norm, dim=-1)).clamp_min(0)
    total = prox.sum(0)
    if bool((total > 0).all()):  # no degenerate sum: the even split is not needed (and not computed)
        return prox / total.clamp_min(torch.finfo(prox.dtype).tiny)
    present = (parts != 0).any(-1)  # [part, ...]
    present = present | ~present.any(0)  # all parts zero: every part counts
    even = present / present.sum(0)
    return torch.where(total > 0, prox / total.clamp_min(torch.finfo(prox.dtype).tiny), even)


def check_decomposable(arch: Architecture) -> None:
    """Raise unless attention and MLP outputs are linear maps added straight to the residual."""
    family = arch.family
    if family.attn is None:
        raise LmscopeError(f"{type(arch.model).__name__} {NO_ATTENTION}")
    check_weights_readable(arch)
    if family.post_norm:
        raise LmscopeError(
            f"the {family.name!r} family normalizes the residual stream after each block (post-norm), so block "
            "outputs are not sums of parts and the flow graph does not apply: use a pre-norm causal LM"
        )
    ffn = family.mlp_down.rpartition(".")[0]  # the FFN module whose output is its down projection's (T5)
    if family.attn_out not in (family.attn, family.o_proj) or family.mlp_out not in (family.mlp_down, "mlp", ffn):
        raise LmscopeError(
            f"the {family.name!r} family transforms attention or MLP outputs before adding them to the residual "
            "stream (e.g. post-block norms), so they cannot be split into per-head and per-neuron parts"
        )


def _output_projection(arch: Architecture, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    module = arch.o_proj(layer)
    scale = arch.residual_scale  # what the block multiplies the attention output by (Granite)
    weight = arch.linear_weight(module).detach().float() * scale  # [d_model, head·d_head]
    bias = tensor_of(module, "bias")  # where accelerate offloaded it, too
    return weight, None if bias is None else bias.detach().float() * scale  # [d_model]


def head_updates(trace: Trace, arch: Architecture, layer: int) -> torch.Tensor:
    """``u[k, h] = W_O[:, h] · v[k, kv(h)]`` as ``[pos, head, d_model]`` (float32)."""
    check_decomposable(arch)
    weight, _ = _output_projection(arch, layer)
    v = trace.at("v", layer).float()  # [pos, kv_head, d_head]
    n_heads, n_kv = arch.n_heads, v.shape[1]
    v = v.repeat_interleave(n_heads // n_kv, dim=1)  # [pos, head, d_head]
    weight = weight.to(v.device).view(weight.shape[0], n_heads, -1)  # [d_model, head, d_head]
    return torch.einsum("khe,dhe->khd", v, weight).contiguous()  # contiguous: later reshapes are views, not copies


@dataclass(frozen=True)
class AttentionParts:
    """The exact parts of one attention block output at one position (float32)."""

    terms: torch.Tensor  # [pos_k, head, d_model]: A[h, q, k] · u[k, h]
    bias: torch.Tensor  # [d_model] (zeros when the projection has no bias)
    residual: torch.Tensor  # [d_model]: resid_pre[q]
    whole: torch.Tensor  # [d_model]: resid_pre[q] + attn_out[q]


def attention_parts(trace: Trace, arch: Architecture, layer: int, position: int) -> AttentionParts:
    """The (source, head) terms, bias and residual that sum to the attention block output at ``position``."""
    q = trace.position(position)
    updates = head_updates(trace, arch, layer)  # [pos, head, d_model]
    probs = trace.attention(layer, rows=[q])[:, 0]  # [head, pos_k]
    _, bias = _output_projection(arch, layer)
    residual = trace.at("resid_pre", layer)[q].float()
    whole = residual + trace.at("attn_out", layer)[q].float()
    bias = torch.zeros_like(whole) if bias is None else bias.to(whole.device)
    return AttentionParts(probs.T[:, :, None] * updates, bias, residual, whole)


def _direct(part: torch.Tensor, whole: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Clamped proximities ``[pos]`` of one part per position, computed directly."""
    return (size - (whole - part).abs().sum(-1)).clamp_min(0)


def attention_proximity(
    probs: torch.Tensor,  # [head, pos_q, pos_k]
    updates: torch.Tensor,  # [pos_k, head, d_model]
    whole: torch.Tensor,  # [pos_q, d_model]
    tolerance: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proximities ``[pos_q, pos_k, head]`` of every attention term, and the bounded slack ``[pos_q]``.

    Exact for every term unless ``tolerance > 0``; then terms whose triangle bound is below
    ``tolerance · ‖y_q‖₁`` and that could need a correction are clipped linear estimates, whose
    true value lies in ``[0, estimate]``: the slack is the sum of those estimates per query.
    """
    probs, updates, whole = probs.float(), updates.float(), whole.float()
    n_q, d_model = whole.shape
    n_k, n_heads = updates.shape[:2]
    sign = torch.where(whole >= 0, 1.0, -1.0)  # [pos_q, d_model]
    magnitude, order = whole.abs().sort(dim=-1)  # [pos_q, d_model], ascending
    ordered = whole.gather(1, order)  # [pos_q, d_model]: y sorted by |y|
    flat = updates.reshape(n_k * n_heads, d_model)  # [pos_k·head, d_model]
    peak = torch.maximum(updates.amax(-1), -updates.amin(-1))  # [pos_k, head]: max |u|, with no |u| made
    bound = updates.abs().sum(-1)  # [pos_k, head]
    size = magnitude.sum(-1)  # [pos_q]
    weights = probs.permute(1, 2, 0)  # [pos_q, pos_k, head]
    out = torch.zeros(n_q, n_k, n_heads, device=whole.device)
    slack = torch.zeros(n_q, device=whole.device)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n_k * n_heads * 4))
    for q0 in range(0, n_q, rows):
        q1 = min(n_q, q0 + rows)
        seen = (weights[q0:q1] > 0).any(-1).any(0).nonzero()
        if len(seen) == 0:
            continue
        k1 = int(seen.max()) + 1  # causal: sources past the chunk's last query carry no weight
        a = weights[q0:q1, :k1].contiguous()  # [chunk, pos_k, head]
        prox = a * (sign[q0:q1] @ flat[: k1 * n_heads].T).view(q1 - q0, k1, n_heads)  # the linear term
        reach = (a * peak[:k1]).view(q1 - q0, -1)  # each term's largest coordinate
        need = torch.searchsorted(magnitude[q0:q1], reach).view(-1)  # how many coordinates it can flip
        if tolerance > 0:
            negligible = ((a * bound[:k1]) <= tolerance * size[q0:q1, None, None]).view(-1)
            estimate = torch.minimum(prox.clamp_min(0), a * bound[:k1]).view(-1)
            slack[q0:q1] = (estimate * (negligible & (need > 0))).view(q1 - q0, -1).sum(-1)
            need = need.masked_fill(negligible, 0)
        terms = need.nonzero().squeeze(1)  # flat indices into [chunk, pos_k·head]
        if len(terms):
            corr = _corrections(terms, need[terms], a.view(-1), flat, ordered[q0:q1], order[q0:q1], k1 * n_heads)
            prox.view(-1).index_add_(0, terms, corr, alpha=-2)
        out[q0:q1, :k1] = prox.clamp_min(0)
    return out, slack


def _corrections(
    terms: torch.Tensor,  # [term]: flat index q·(pos_k·head) + k·head + h
    need: torch.Tensor,  # [term]: how many of the smallest |y_q| coordinates the term reaches
    a: torch.Tensor,  # [chunk·pos_k·head]: attention weights
    flat: torch.Tensor,  # [pos_k·head, d_model]: head updates u
    ordered: torch.Tensor,  # [chunk, d_model]: y sorted by |y|
    order: torch.Tensor,  # [chunk, d_model]: the coordinates in that order
    row: int,  # pos_k·head
) -> torch.Tensor:
    """``Σ_d relu(s_d A u_d − |y_d|)`` per term, summed only over the coordinates it can reach.

    Terms are grouped by reach into power-of-two widths, so each is summed over at most twice the
    coordinates it needs, gathered with one flat index per element.
    """
    d_model = ordered.shape[1]
    out = torch.empty(len(terms), device=ordered.device)
    width = 1 << max(0, int(need.min()) - 1).bit_length()
    values = flat.reshape(-1)
    while True:
        width = min(width, d_model)
        low = width // 2 if width < d_model else (1 << (d_model - 1).bit_length()) // 2
        pick = ((need > low) & (need <= width)).nonzero().squeeze(1)
        for i in range(0, len(pick), max(1, _CHUNK_ELEMENTS // width)):
            sel = pick[i : i + _CHUNK_ELEMENTS // width]
            index = terms[sel]
            q, kh = index // row, index % row
            y = ordered[:, :width][q]  # [term, width]
            u = values.take((kh * d_model)[:, None] + order[:, :width][q])  # [term, width]
            z = a[index][:, None] * u - y
            out[sel] = torch.where(y >= 0, z, -z).clamp_min(0).sum(-1)
        if width >= d_model:
            return out
        width *= 2


def _split_evenly(
    degenerate: torch.Tensor,  # [pos_q] bool
    probs: torch.Tensor,  # [head, pos_q, pos_k]
    updates: torch.Tensor,  # [pos_k, head, d_model]
    prox: tuple[torch.Tensor, ...],  # attention [pos_q, pos_k, head], residual, bias, mlp [pos_q]
    vectors: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None],  # resid_pre, bias [d], parallel mlp_out
) -> tuple[torch.Tensor, ...]:
    """Proximities with every degenerate query's non-zero parts set to 1, and the new totals."""
    attention, resid, bias, mlp = (t.clone() for t in prox)
    pre, bias_vector, mlp_out = vectors
    rows = degenerate.nonzero().squeeze(1)
    nonzero_update = (updates != 0).any(-1)  # [pos_k, head]
    terms = (probs.float()[:, rows].permute(1, 2, 0) > 0) & nonzero_update  # [row, pos_k, head]
    attention[rows] = terms.float()
    resid[rows] = (pre[rows] != 0).any(-1).float()
    if bias_vector is not None:
        bias[rows] = float(bool((bias_vector != 0).any()))
    if mlp_out is not None:  # parallel blocks: the MLP output is a part of the same sum
        mlp[rows] = (mlp_out[rows] != 0).any(-1).float()
    return attention, resid, bias, mlp, attention.sum((1, 2)) + resid + bias + mlp


@dataclass(frozen=True)
class BlockContributions:
    """Normalized contributions of every part of one layer's block outputs, per query position.

    Sequential blocks have two sums (attention: ``attention + attn_residual + bias = 1``; FFN:
    ``mlp + mlp_residual = 1``); parallel blocks have one (``attention + attn_residual + bias + mlp
    = 1``, ``mlp_residual`` all zero). ``error[q]`` bounds how far any contribution at ``q`` can be
    from the exact value (0 when computed with ``tolerance = 0``).

    In a mixture-of-experts layer (sequential blocks), ``experts [pos_q, part]`` holds each
    expert's contribution to the FFN block output (``mlp`` is their sum, so ``experts.sum(-1) +
    mlp_residual = 1``); ``expert_ids`` names the routed expert of each slot (``-1``: the shared
    expert) and ``expert_weights`` its router weight (the shared expert's gate).
    """

    layer: int
    parallel: bool
    attention: torch.Tensor  # [pos_q, pos_k, head]
    attn_residual: torch.Tensor  # [pos_q]
    bias: torch.Tensor  # [pos_q]
    mlp: torch.Tensor  # [pos_q]
    mlp_residual: torch.Tensor  # [pos_q]
    error: torch.Tensor  # [pos_q]
    experts: torch.Tensor | None = None  # [pos_q, part]
    expert_ids: torch.Tensor | None = None  # [pos_q, part] long
    expert_weights: torch.Tensor | None = None  # [pos_q, part]


def block_contributions(
    trace: Trace, arch: Architecture, layer: int, tolerance: float = 0.0, rows: Sequence[int] | None = None
) -> BlockContributions:
    """Contributions of the attention terms, bias, residual and MLP to layer ``layer``'s outputs.

    ``rows``: only the outputs at these positions (the results' query axis runs over them), with
    only those rows of the attention probabilities computed.
    """
    check_decomposable(arch)
    index = slice(None) if rows is None else torch.as_tensor(list(rows), dtype=torch.long)
    pre = trace.at("resid_pre", layer)[index].float()  # [pos, d_model]
    attn = trace.at("attn_out", layer)[index].float()
    mlp = trace.at("mlp_out", layer)[index].float()
    mid = pre + attn
    whole = mid + mlp if arch.parallel else mid  # the sum the attention terms belong to
    size = whole.abs().sum(-1)  # [pos]
    _, bias_vector = _output_projection(arch, layer)
    updates = head_updates(trace, arch, layer)
    probs = trace.attention(layer, rows=rows)  # [head, pos_q, pos_k]: one layer at a time
    prox, slack = attention_proximity(probs, updates, whole, tolerance)
    resid = _direct(pre, whole, size)
    bias = torch.zeros_like(resid) if bias_vector is None else _direct(bias_vector.to(whole.device), whole, size)
    mlp_prox = _direct(mlp, whole, size) if arch.parallel else torch.zeros_like(resid)
    total = prox.sum((1, 2)) + resid + bias + mlp_prox
    degenerate = total == 0  # [pos]: every part farther from the whole than the whole from 0
    if degenerate.any():
        prox, resid, bias, mlp_prox, total = _split_evenly(
            degenerate,
            probs,
            updates,
            (prox, resid, bias, mlp_prox),
            (pre, bias_vector, mlp if arch.parallel else None),
        )
    scale = 1 / total.clamp_min(torch.finfo(total.dtype).tiny)
    error = torch.where(total > slack, 2 * slack / (total - slack).clamp_min(1e-30), torch.ones_like(slack))
    error = error.masked_fill(slack == 0, 0.0)
    moe = None if arch.parallel else expert_parts(trace, arch, layer)
    if moe is not None and rows is not None:
        moe = replace(
            moe, ids=moe.ids[index], weights=moe.weights[index], updates=moe.updates[index], rest=moe.rest[index]
        )
    experts = None
    if arch.parallel:
        mlp_share, mlp_resid = mlp_prox * scale, torch.zeros_like(resid)
    elif moe is not None:  # each expert is a part; the residual part takes the float rounding of their sum
        post = mid + mlp
        parts = torch.cat([moe.updates.transpose(0, 1), (post - moe.updates.sum(1))[None]])  # [part + 1, pos, d]
        shares = proximity(parts, post)  # [part + 1, pos]
        experts, mlp_resid = shares[:-1].T.contiguous(), shares[-1]
        mlp_share = experts.sum(-1)
    else:
        post = mid + mlp
        post_size = post.abs().sum(-1)
        ffn = _direct(mlp, post, post_size)
        keep = _direct(mid, post, post_size)
        stuck = (ffn + keep) == 0  # degenerate: split evenly between the non-zero parts
        ffn = torch.where(stuck, (mlp != 0).any(-1).float(), ffn)
        keep = torch.where(stuck, (mid != 0).any(-1).float(), keep)
        ffn_total = (ffn + keep).clamp_min(torch.finfo(post.dtype).tiny)
        mlp_share, mlp_resid = ffn / ffn_total, keep / ffn_total
    return BlockContributions(
        layer=layer,
        parallel=arch.parallel,
        attention=prox * scale[:, None, None],
        attn_residual=resid * scale,
        bias=bias * scale,
        mlp=mlp_share,
        mlp_residual=mlp_resid,
        error=error,
        experts=experts,
        expert_ids=None if moe is None else moe.ids,
        expert_weights=None if moe is None else moe.weights,
    )
