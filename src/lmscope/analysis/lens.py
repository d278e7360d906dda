"""Logit lens: what the residual stream would predict if the model stopped at a layer.

nostalgebraist (2020), "interpreting GPT: the logit lens": project a residual state ``h`` through
the model's final norm and unembedding, ``p = softmax(W_U · final_norm(h))``. Ecco calls this
``layer_predictions``. Applied to the last block's output it is exactly the model's own
next-token distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmscope.analysis._predicted import Position, prediction
from lmscope.analysis._result import Result
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Unembed

__all__ = ["LayerPredictions", "layer_predictions", "lens_logits"]

RESIDUAL_SITES = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True)
class LayerPredictions(Result):
    """Top-k predictions of the logit lens for one token, one row per layer.

    ``position`` is the explained token (Ecco's meaning; ``None``: the prediction after the last
    token) and ``state_position`` the residual state the prediction is read from.
    ``tokens[i][j]`` and ``probs[i, j]`` are the ``j``-th most likely token after ``layers[i]``.
    """

    _view = "lmscope.views.lens"

    position: int | None
    state_position: int
    site: str
    norm: bool
    layers: tuple[int, ...]
    tokens: tuple[tuple[str, ...], ...]  # [layer][k]
    token_ids: np.ndarray  # [layer, k]
    probs: np.ndarray  # [layer, k]
    input_tokens: tuple[str, ...]
    n_input: int | None = None  # tokens before generated ones (None: all input)

    def plot(self) -> object:
        """A matplotlib ``Figure``: layers as rows, the top tokens as cells coloured by probability."""
        from lmscope.views._figure import plot_lens

        return plot_lens(self)


def lens_logits(
    trace: Trace,
    unembed: Unembed,
    site: str = "resid_post",
    position: int | slice = slice(None),
    norm: bool = True,
) -> torch.Tensor:
    """Lens logits ``[layer, ..., vocab]`` (float32) of ``site`` at ``position`` for every captured layer."""
    if site not in RESIDUAL_SITES:
        raise LmscopeError(f"the logit lens reads residual states: site must be one of {', '.join(RESIDUAL_SITES)}")
    hidden = trace.get(site)[:, position]  # [layer, (pos,) d_model]
    return unembed(hidden, norm=norm)


def layer_predictions(
    trace: Trace,
    unembed: Unembed,
    position: Position = 1,
    layer: int | None = None,
    topk: int = 10,
    norm: bool = True,
    site: str = "resid_post",
    causal: bool = True,
) -> LayerPredictions:
    """Top-``topk`` lens predictions of the token at ``position`` after every captured layer (or one ``layer``).

    ``position`` names the explained token as in Ecco: ``p`` is read from the state at ``p − 1``,
    ``"next"`` (or ``len(tokens)``, or ``-1``) is the prediction after the last token, and the
    default ``1`` is Ecco's (see :mod:`lmscope.analysis._predicted`). ``causal=False`` for a masked
    LM, which predicts the token at ``p`` from the state at ``p``.
    """
    explained = prediction(trace, position, causal)
    pos = explained.state
    if topk < 1:
        raise LmscopeError(f"topk must be at least 1, not {topk}")
    logits = lens_logits(trace, unembed, site, pos, norm)  # [layer, vocab]
    layers = trace.layers
    if layer is not None:
        index = trace.layer_index(layer)
        logits, layers = logits[index : index + 1], (trace.layers[index],)
    probs = torch.softmax(logits, dim=-1)
    top = probs.topk(min(topk, probs.shape[-1]), dim=-1)
    ids = top.indices.cpu().numpy()
    return LayerPredictions(
        position=explained.token,
        state_position=pos,
        site=site,
        norm=norm,
        layers=tuple(layers),
        tokens=tuple(unembed.token_strings(row) for row in ids),
        token_ids=ids,
        probs=top.values.cpu().numpy(),
        input_tokens=trace.tokens,
        n_input=trace.n_input,
    )
