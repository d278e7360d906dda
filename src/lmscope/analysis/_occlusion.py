"""Occlusion: how much each output's target falls when one input token is erased or replaced.

For an output ``t`` with target ``f_t`` (see :mod:`lmscope.analysis._gradients`) and an input
position ``s < t``, the occlusion attribution is ``a_s = f_t(e) − f_t(e with e_s := b_s)``: the
drop of ``f_t`` when the embedding of token ``s`` is replaced by a baseline ``b_s`` (Zeiler &
Fergus 2014, "Visualizing and Understanding Convolutional Networks", with a window of one token).
A zero baseline erases the token's embedding; a token's embedding replaces it by that token.

Unlike a gradient, which measures the target's sensitivity to an infinitesimal change around the
actual input, occlusion measures the effect of removing the token outright, so a token on which
the prediction depends decisively but locally flatly still gets its full credit.

Every variant (one per occluded position) is an independent sequence, and the causal mask makes
one forward pass over ``[0, max t)`` give every target at once, so all attributions come from
batched forward passes without gradients: ``max t`` sequences, batched so that a pass carries at
most ``rows`` token positions.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmscope.analysis._gradients import Targets, scores
from lmscope.models import LoadedModel

__all__ = ["occlusion"]

_LOGIT_ELEMENTS = 2**25  # the most vocabulary-sized logits one pass keeps (128 MiB in float32)


@torch.no_grad()
def occlusion(
    lm: LoadedModel, embeds: torch.Tensor, baseline: torch.Tensor, targets: Targets, rows: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(variants, drops [variant, n], values [n])``: ``drops[j, i] = f_i(e) − f_i(e with row s := b_s)``
    for the occluded positions ``s`` in ``variants``, every target ``i`` at once.

    ``embeds`` and ``baseline`` are ``[pos, d_model]``; entries with ``s ≥ t_i`` are exactly zero
    (the causal mask: occluding a later token changes nothing).
    """
    length = int(targets.positions.max())  # the last predicting position is length - 1
    e, b = embeds[:length], baseline[:length].to(embeds)  # [pos', d_model]
    values = scores(lm, e[None], targets)[0]  # [n]
    vocab = int(lm.model.config.vocab_size)
    per_pass = max(1, min(rows // length, _LOGIT_ELEMENTS // (len(targets) * vocab)))
    for start in range(0, length, per_pass):
        sl = slice(start, min(start + per_pass, length))
        occluded = torch.arange(sl.start, sl.stop, device=e.device)  # [batch] the position each variant occludes
        x = e.expand(len(occluded), -1, -1).clone()  # [batch, pos', d_model]
        x[torch.arange(len(occluded)), occluded] = b[occluded]
        drops = values - scores(lm, x, targets)  # [batch, n]
        later = occluded[:, None] >= targets.positions.to(e.device)[None]  # [batch, n] occluded at or after t
        yield sl, drops.masked_fill(later, 0.0).float(), values.float()
