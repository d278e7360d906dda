"""The map from a residual state to logits: final norm, then the model's LM head.

Used by the logit lens (nostalgebraist 2020): ``logits = W_U · final_norm(h)``, applied to any
residual state ``h``. Applied to the last block's output it reproduces the model's own logits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lmscope.errors import LmscopeError
from lmscope.models._loading import LoadedModel
from lmscope.models._placement import execution_device, tensor_of

__all__ = ["Unembed"]


@dataclass(frozen=True)
class Unembed:
    """Final norm + LM head (+ logit soft-capping where the model has it) of one model."""

    final_norm: nn.Module | None
    lm_head: nn.Module
    tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)
    softcap: float | None = None
    scale: float = 1.0  # what the model multiplies its logits by (Cohere, Granite)
    rescale: float = 1.0  # what the model multiplies final-normed states by before its head (T5: d_model ** -0.5)
    bias: torch.Tensor | None = field(default=None, repr=False)  # [vocab] added to the logits (BART)

    @classmethod
    def from_model(cls, lm: LoadedModel) -> Unembed:
        if lm.arch.lm_head is None:
            raise LmscopeError(
                f"{lm.name} has no language-model head, so it cannot map hidden states to tokens "
                "(logit lens, rankings and flow need one): use a causal or masked LM"
            )
        softcap = getattr(lm.model.config, "final_logit_softcapping", None)
        return cls(
            final_norm=lm.arch.final_norm,
            lm_head=lm.arch.lm_head,
            tokenizer=lm.tokenizer,
            softcap=softcap,
            scale=lm.arch.logit_scale,
            rescale=lm.arch.unembed_scale,
            bias=lm.arch.logits_bias,
        )

    def token_strings(self, ids: Iterable[int]) -> tuple[str, ...]:
        """Each vocabulary id decoded on its own (`` keys``, not ``Ġkeys``)."""
        ids = [[int(i)] for i in ids]
        if self.tokenizer is None:
            return tuple(f"<{i[0]}>" for i in ids)
        return tuple(self.tokenizer.batch_decode(ids, clean_up_tokenization_spaces=False))

    @property
    def weight(self) -> torch.Tensor:
        """``W_U`` as ``[vocab, d_model]`` when the head is one linear map."""
        weight = tensor_of(self.lm_head)  # where accelerate offloaded it, too
        if weight is None:
            raise LmscopeError("this model's LM head is not a single linear map")
        return weight

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, norm: bool = True) -> torch.Tensor:
        """Logits ``[..., vocab]`` in float32 for residual states ``h [..., d_model]``."""
        param = next(self.lm_head.parameters())  # a meta placeholder where accelerate offloaded the head
        h = h.to(device=execution_device(self.lm_head), dtype=param.dtype)
        if norm and self.final_norm is not None:
            h = self.final_norm(h)
        if self.rescale != 1.0:
            h = h * self.rescale
        logits = self.lm_head(h).float()
        if self.bias is not None:
            logits = logits + self.bias.to(logits.device).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
