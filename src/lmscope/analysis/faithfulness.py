"""Faithfulness of the information-flow graph: ablate its strongest edges, against random edges.

An attribution is faithful to the extent that removing what it ranks highest hurts the
prediction more than removing as many components at random (the deletion test of Samek et al.
2017; ERASER's comprehensiveness, DeYoung et al. 2020; the MIB circuit benchmark's scoring of
Information Flow Routes, Mueller et al. 2025). For the flow graph (Ferrando & Voita 2024) an
attention edge ``source → target`` at layer ``l`` is ablated by zeroing the attention
probability of ``target`` on ``source`` in every head of that layer (``attn_probs``, not
renormalized), an FFN edge by zeroing that layer's MLP output at that position.

The curves are the target token's logit (and probability) at the explained position after
ablating the top-``k`` edges by weight, and after ablating ``k`` edges drawn at random from the
same graph (mean over ``draws``), for each ``k`` in ``ks``; the areas are the mean drop of the
logit below the intact run over those ``k`` (larger: the ablated edges mattered more).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._result import Result
from lmscope.capture._interventions import Intervention
from lmscope.errors import LmscopeError

__all__ = ["Faithfulness", "flow_faithfulness"]


@dataclass(frozen=True)
class Faithfulness(Result):
    """Target logit after ablating the top-``k`` and random ``k`` graph edges, for each ``k``."""

    _view = "lmscope.views.faithfulness"

    tokens: tuple[str, ...]
    position: int
    target: str
    n_edges: int
    ks: tuple[int, ...]
    base_logit: float
    top_logit: np.ndarray  # [k]
    random_logit: np.ndarray  # [k], mean over draws
    top_prob: np.ndarray  # [k]
    random_prob: np.ndarray  # [k]
    top_auc: float  # mean logit drop over ks
    random_auc: float
    draws: int

    @property
    def beats_random(self) -> bool:
        return self.top_auc > self.random_auc


def _ablation(edge: Any) -> Intervention:
    if edge.kind == "attention":
        return Intervention.zero("attn_probs", layers=edge.layer, positions=edge.target.pos, keys=edge.source.pos)
    return Intervention.zero("mlp_out", layers=edge.layer, positions=edge.target.pos)


@torch.no_grad()
def flow_faithfulness(
    lm: Any, text: str, *, threshold: float = 0.04, ks: tuple[int, ...] | None = None, draws: int = 3, seed: int = 0
) -> Faithfulness:
    """Ablate the flow graph's top-``k`` edges (attention and FFN) vs random ``k`` edges of the same graph."""
    out = lm.trace(text)
    graph = out.flow(threshold=threshold)
    edges = sorted((e for e in graph.edges if e.kind in ("attention", "ffn")), key=lambda e: -e.weight)
    if not edges:
        raise LmscopeError("the flow graph has no attention or FFN edges at this threshold: lower it")
    position = out.trace.n_pos - 1
    target_id = int(out.logits[position].argmax())
    if ks is None:
        ks = tuple(k for k in (1, 2, 4, 8, 16, 32) if k <= len(edges)) or (len(edges),)
    if any(k < 1 or k > len(edges) for k in ks):
        raise LmscopeError(f"ks must lie in 1..{len(edges)} (the graph's attention and FFN edges)")

    def score(chosen: list[Any]) -> tuple[float, float]:
        logits = lm.trace(text, sites=(), interventions=[_ablation(e) for e in chosen]).logits[position].float()
        return float(logits[target_id]), float(torch.softmax(logits, -1)[target_id])

    draw = random.Random(seed)
    top = np.array([score(edges[:k]) for k in ks])  # [k, (logit, prob)]
    rand = np.array([[score(draw.sample(edges, k)) for k in ks] for _ in range(draws)]).mean(0)
    base = float(out.logits[position, target_id])
    return Faithfulness(
        tokens=out.tokens,
        position=position,
        target=lm.unembed.token_strings([target_id])[0],
        n_edges=len(edges),
        ks=tuple(ks),
        base_logit=base,
        top_logit=top[:, 0],
        random_logit=rand[:, 0],
        top_prob=top[:, 1],
        random_prob=rand[:, 1],
        top_auc=float(np.mean(base - top[:, 0])),
        random_auc=float(np.mean(base - rand[:, 0])),
        draws=draws,
    )
