"""``Output``: a Trace plus the model it came from (if any), with every analysis as a method."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmscope.analysis import LayerPredictions, layer_predictions
from lmscope.capture import Trace
from lmscope.errors import LmscopeError

if TYPE_CHECKING:
    from lmscope._lm import LM

__all__ = ["Output"]


class Output:
    """The result of ``lm.trace`` / ``lm.generate`` / ``lmscope.load_trace``."""

    def __init__(self, trace: Trace, lm: LM | None = None):
        self.trace = trace
        self.lm = lm

    def __repr__(self) -> str:
        model = self.trace.model.name
        return (
            f"Output({model!r}, {self.trace.n_pos} tokens, {self.trace.n_input} input, sites={list(self.trace.sites)})"
        )

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.trace.tokens

    @property
    def token_ids(self) -> torch.Tensor:
        return self.trace.token_ids

    @property
    def n_input(self) -> int:
        return self.trace.n_input

    @property
    def logits(self) -> torch.Tensor:
        """Final logits ``[pos, vocab]``."""
        return self.trace.logits

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the trace to one safetensors file (see :func:`lmscope.load_trace`)."""
        return self.trace.save(path)

    def _require_lm(self, what: str) -> LM:
        if self.lm is None:
            raise LmscopeError(
                f"{what} needs the model's weights, and this trace was loaded without a model: use lm.load_trace(path)"
            )
        return self.lm

    def layer_predictions(
        self,
        position: int = -1,
        layer: int | None = None,
        topk: int = 10,
        norm: bool = True,
        site: str = "resid_post",
    ) -> LayerPredictions:
        """Logit lens: top-``topk`` tokens after every layer at ``position`` (Ecco's name)."""
        lm = self._require_lm("the logit lens")
        return layer_predictions(self.trace, lm.unembed, position, layer, topk, norm, site)
