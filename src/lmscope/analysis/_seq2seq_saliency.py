"""Saliency of an encoder-decoder model's target tokens over the source tokens and the decoder prefix.

Target token ``y_t`` (decoder position ``t ≥ 1``) is explained by every source token ``x_s`` (the
encoder's input) and every decoder token ``y_s`` with ``s < t`` (the start token and the target
prefix), with the methods of :mod:`lmscope.analysis.saliency` applied to both embeddings:

- ``grad_x_input``: ``‖g_s ⊙ e_s‖₂`` and ``gradient``: ``‖g_s‖₂``, each normalized to sum to 1
  over the source and the decoder prefix *together*, one normalization over the two, as inseq and
  Ecco do for encoder-decoder models, so that a target that leans on its own prefix rather than
  on the source shows it;
- ``input_x_gradient``, ``integrated_gradients`` (one straight path for source and decoder
  together: completeness ``Σ_src a + Σ_dec a = f(e) − f(b)``) and ``occlusion``: signed, not
  normalized. A zero baseline is degenerate for T5: with no position embedding and a
  scale-invariant RMS norm, ``f`` is nearly constant along the path and jumps at the baseline
  itself, so the attributions miss the jump (the reported completeness error shows it); use a
  token's embedding (``baseline=<token>``) there. BART-like models add learned or sinusoidal
  positions and stay smooth at zero.

``contrast`` explains ``logit(y_t) − logit(foil)`` (Yin & Neubig 2022). Every target comes from
one forward pass and one batched backward pass (:mod:`lmscope.analysis._seq2seq_gradients`):
the encoder runs once, not once per target. Teacher forcing is implicit: the targets are the
decoder tokens the trace holds, given or generated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._gradients import Targets, frozen_parameters
from lmscope.analysis._seq2seq_gradients import (
    embedding_modules,
    seq2seq_embeddings,
    seq2seq_gradients,
    seq2seq_integrated_gradients,
    seq2seq_occlusion,
    seq2seq_rows,
    seq2seq_scores,
)
from lmscope.analysis.saliency import _SIGNED, Saliency, _foils, _output_positions, _strings, _token_id
from lmscope.errors import LmscopeError

__all__ = ["Seq2SeqSaliency", "is_seq2seq_trace", "seq2seq_attributions"]


@dataclass(frozen=True)
class Seq2SeqSaliency(Saliency):
    """:class:`~lmscope.analysis.saliency.Saliency` of decoder tokens, plus their source attributions.

    ``tokens``/``attributions`` are the decoder side (``attributions[i]`` over decoder positions
    ``s < positions[i]``); ``source_attributions[i]`` is over every source token. For normalized
    methods the two rows of one output sum to 1 together.
    """

    source_tokens: tuple[str, ...] = ()  # [src_pos]
    source_token_ids: np.ndarray | None = None  # [src_pos]
    source_attributions: tuple[np.ndarray, ...] = ()  # [output][src_pos]

    def source_matrix(self) -> np.ndarray:
        """Source attributions as ``[output, src_pos]``."""
        return np.stack(self.source_attributions) if self.source_attributions else np.zeros((0, 0), np.float32)

    def source_share(self) -> np.ndarray:
        """Per output, the source's share of the attribution magnitude ``Σ|a_src| / (Σ|a_src| + Σ|a_dec|)``."""
        src = np.array([np.abs(r).sum() for r in self.source_attributions])
        dec = np.array([np.abs(r).sum() for r in self.attributions])
        total = src + dec
        return np.divide(src, total, out=np.zeros_like(total), where=total > 0)

    def top_source(self, index: int, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` source positions with the largest attribution (by magnitude) for output ``index``."""
        row = self.source_attributions[index]
        order = np.argsort(-np.abs(row), kind="stable")[:k]
        return [(int(s), float(row[s])) for s in order]


def _baselines(
    lm: Any, baseline: str | int | torch.Tensor, src: torch.Tensor, dec: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(source [src_pos, d_model], decoder [dec_pos, d_model])`` baselines: zeros, a token's embedding
    (each stack's), or a ``[d_model]`` tensor at every position."""
    if isinstance(baseline, torch.Tensor):
        if baseline.shape[-1:] != src.shape[-1:] or baseline.dim() != 1:
            raise LmscopeError(
                f"a baseline tensor for an encoder-decoder model must be [d_model] = [{src.shape[-1]}], "
                f"not {list(baseline.shape)}"
            )
        return baseline.to(src).expand_as(src), baseline.to(dec).expand_as(dec)
    if baseline in ("zero", "zeros"):
        return torch.zeros_like(src), torch.zeros_like(dec)
    token = torch.tensor([_token_id(lm, baseline, "the baseline token")])
    enc_embed, dec_embed = embedding_modules(lm.model)
    with torch.no_grad():
        return enc_embed(token.to(src.device)).expand_as(src), dec_embed(token.to(dec.device)).expand_as(dec)


def seq2seq_attributions(
    trace: Any,
    lm: Any,
    method: str,
    *,
    style: str,
    positions: Any,
    target: str,
    contrast: Any,
    steps: int,
    baseline: str | int | torch.Tensor,
    batch_size: int | None,
) -> Seq2SeqSaliency:
    """Attribute decoder tokens of a seq2seq ``trace`` to the source and the decoder prefix.

    ``trace`` is the decoder Trace (``trace.encoder`` holds the source tokens); the arguments are
    those of :func:`lmscope.analysis.primary_attributions`, already checked there.
    """
    model = lm.model
    out_pos = _output_positions(trace, positions)
    ids = trace.token_ids
    src_ids = trace.encoder.token_ids
    next_id = trace.logits[-1].argmax().reshape(1).to(ids)  # [1] the top prediction after the last token
    foil = None if contrast is None else torch.tensor(_foils(lm, contrast, len(out_pos)))
    kind = "contrast" if foil is not None else target
    targets = Targets(torch.tensor(out_pos), torch.cat([ids, next_id])[out_pos], foil, kind)

    src, dec = seq2seq_embeddings(model, src_ids, ids)  # [src_pos, d_model], [dec_pos, d_model]
    s32, d32 = src.float(), dec.float()
    n = len(out_pos)
    src_rows = torch.zeros(n, len(src))
    dec_rows = torch.zeros(n, len(dec))
    values = np.zeros(n, dtype=np.float32)
    base_values = errors = None
    rows = seq2seq_rows(lm) if batch_size is None else batch_size
    with frozen_parameters(model):
        if method == "occlusion":
            bases = _baselines(lm, baseline, src, dec)
            drop_s, drop_d, vals = seq2seq_occlusion(model, src, dec, bases, targets, rows)
            src_rows[:], dec_rows[:, : drop_d.shape[0]] = drop_s.t().cpu(), drop_d.t().cpu()
            values[:] = vals.cpu().numpy()
        elif method == "integrated_gradients":
            bases = _baselines(lm, baseline, src, dec)
            base_values, errors = np.zeros_like(values), np.zeros_like(values)
            for sl, path_s, path_d in seq2seq_integrated_gradients(model, src, dec, bases, targets, steps, rows):
                length = path_d.shape[1]
                per_s = (path_s * (s32 - bases[0].float())).sum(-1)  # [n, src_pos]
                per_d = (path_d * (d32[:length] - bases[1][:length].float())).sum(-1)  # [n, dec_pos']
                chunk = targets.chunk(sl)
                with torch.no_grad():
                    ends = seq2seq_scores(
                        model, torch.stack([src, bases[0]]), torch.stack([dec[:length], bases[1][:length]]), chunk
                    )  # [2, n]
                values[sl], base_values[sl] = ends[0].cpu().numpy(), ends[1].cpu().numpy()
                total = per_s.sum(-1) + per_d.sum(-1)
                errors[sl] = (total - (ends[0] - ends[1])).abs().cpu().numpy()
                src_rows[sl], dec_rows[sl, :length] = per_s.cpu(), per_d.cpu()
        else:
            for sl, g_s, g_d, vals in seq2seq_gradients(model, src, dec, targets, rows):
                length = g_d.shape[1]
                if method == "grad_x_input":
                    per_s, per_d = (g_s * s32).norm(dim=-1), (g_d * d32[:length]).norm(dim=-1)
                elif method == "gradient":
                    per_s, per_d = g_s.norm(dim=-1), g_d.norm(dim=-1)
                else:
                    per_s, per_d = (g_s * s32).sum(-1), (g_d * d32[:length]).sum(-1)
                values[sl] = vals.cpu().numpy()
                src_rows[sl], dec_rows[sl, :length] = per_s.detach().cpu(), per_d.detach().cpu()
    src_np, dec_np = src_rows.numpy(), dec_rows.numpy()
    normalized = method not in _SIGNED
    src_out, dec_out = [], []
    for i, t in enumerate(out_pos):
        s_row, d_row = src_np[i].astype(np.float32), dec_np[i, :t].astype(np.float32)
        total = float(s_row.sum() + d_row.sum())
        if normalized and total > 0:
            s_row, d_row = s_row / total, d_row / total
        src_out.append(s_row)
        dec_out.append(d_row)
    return Seq2SeqSaliency(
        method=method,
        target=kind,
        style=style,
        tokens=tuple(trace.tokens),
        token_ids=ids.cpu().numpy(),
        n_input=trace.n_input,
        positions=tuple(out_pos),
        attributions=tuple(dec_out),
        values=values,
        signed=method in _SIGNED,
        normalized=normalized,
        contrast=None if foil is None else _strings(lm, foil.tolist()),
        steps=steps if method == "integrated_gradients" else None,
        baseline_values=base_values,
        completeness_error=errors,
        next_token=_strings(lm, next_id.tolist())[0] if out_pos[-1] == trace.n_pos else None,
        source_tokens=tuple(trace.encoder.tokens),
        source_token_ids=src_ids.cpu().numpy(),
        source_attributions=tuple(src_out),
    )


def is_seq2seq_trace(trace: Any) -> bool:
    """Whether ``trace`` is the decoder Trace of an encoder-decoder run (it carries ``trace.encoder``)."""
    return getattr(trace, "encoder", None) is not None
