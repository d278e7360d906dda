"""Faithfulness of attributions: remove what a method ranks highest, against as much at random.

An attribution is faithful to the extent that removing what it ranks highest hurts the
prediction more than removing as many units at random (the deletion test of Samek et al. 2017;
ERASER's comprehensiveness and sufficiency, DeYoung et al. 2020; the MIB circuit benchmark's
scoring of Information Flow Routes, Mueller et al. 2025). One function, :func:`faithfulness`,
scores every method lmscope has; the prediction explained is always the top token after the last
input token.

The flow graph (``method="flow"``, Ferrando & Voita 2024): the units are its attention and FFN
edges. An attention edge ``source → target`` at layer ``l`` is ablated by zeroing the attention
probability of ``target`` on ``source`` in every head of that layer (``attn_probs``, not
renormalized), an FFN edge by zeroing that layer's MLP output at that position.

Saliency (``method`` one of :data:`lmscope.analysis.saliency.METHODS`): the units are the input
tokens, ranked by their attribution to the prediction (signed methods by signed value, so the
tokens that speak *for* the prediction come first). **Deleting a token** replaces its input
embedding (``inputs_embeds``) by a baseline and keeps its position: the positional encoding, the
sequence length and every other token stay as they were, so the curve measures the token's
content, not a shift of positions. Baselines: ``"zero"`` (the default; the zero embedding, as in
the deletion curves of Petsiuk et al. 2018, "RISE", and the zero baseline of integrated gradients,
Sundararajan et al. 2017), ``"mean"`` (the mean of the vocabulary's input embeddings: closer to the
embeddings the model was trained on, the concern of Hooker et al. 2019, "ROAR"), or a token (string
or id, e.g. the tokenizer's pad or unk token) whose embedding fills the deleted position. Occlusion
and integrated gradients are computed against the same baseline, so occlusion scores exactly the
one-token deletions. ERASER removes the tokens from the text instead; with positions kept, deletion
needs no re-tokenization and stays comparable across ``k``.

The curves, for each ``k`` in ``ks``: the target's logit and probability after removing the top-``k``
units (**deletion**, ERASER's comprehensiveness), after removing ``k`` units drawn at random
(mean over ``draws``), and for tokens after removing all *but* the top-``k`` (**insertion**:
only the top-``k`` kept, ERASER's sufficiency). Areas, as means over ``ks`` (ERASER's AOPC, over
``k`` rather than percentage bins): ``top_auc`` and ``random_auc``, the mean drop of the logit below
the intact run (larger: the removed units mattered more); ``comprehensiveness``
``= mean_k p − p(without top-k)`` (larger is more faithful), ``sufficiency``
``= mean_k p − p(only top-k)`` (smaller is more faithful).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._gradients import _keeps_logits, default_rows, input_embeddings
from lmscope.analysis._result import Result
from lmscope.analysis.saliency import _ALIASES, METHODS, _method, _token_id
from lmscope.capture._interventions import Intervention
from lmscope.errors import LmscopeError

__all__ = [
    "FAITHFULNESS_METHODS",
    "Faithfulness",
    "deletion_baseline",
    "faithfulness",
    "flow_faithfulness",
    "saliency_faithfulness",
]

FAITHFULNESS_METHODS: tuple[str, ...] = ("flow", *METHODS)


@dataclass(frozen=True)
class Faithfulness(Result):
    """The target after removing the top-``k`` and random ``k`` units of a method, for each ``k``.

    ``unit`` is ``"edge"`` (the flow graph) or ``"token"`` (saliency). Insertion curves
    (``insert_logit``, ``insert_prob``), ``comprehensiveness``, ``sufficiency`` and ``scores`` (each
    token's attribution, ``[pos]``) exist for tokens only.
    """

    _view = "lmscope.views.faithfulness"

    tokens: tuple[str, ...]
    position: int
    target: str
    method: str
    unit: str
    n_units: int
    ks: tuple[int, ...]
    base_logit: float
    base_prob: float
    top_logit: np.ndarray  # [k]
    random_logit: np.ndarray  # [k], mean over draws
    top_prob: np.ndarray  # [k]
    random_prob: np.ndarray  # [k]
    top_auc: float  # mean logit drop over ks
    random_auc: float
    draws: int
    insert_logit: np.ndarray | None = None  # [k]: only the top-k tokens kept
    insert_prob: np.ndarray | None = None  # [k]
    comprehensiveness: float | None = None  # mean_k p − p(without top-k)
    random_comprehensiveness: float | None = None
    sufficiency: float | None = None  # mean_k p − p(only top-k)
    scores: np.ndarray | None = None  # [pos] the attribution of each token
    baseline: str | None = None  # what a deleted token's embedding becomes

    @property
    def beats_random(self) -> bool:
        return self.top_auc > self.random_auc

    @property
    def n_edges(self) -> int:
        return self.n_units

    def plot(self) -> Any:
        """A matplotlib ``Figure`` of the curves."""
        return self._view_module().plot(self)


def faithfulness(lm: Any, text: str, method: str = "flow", **options: Any) -> Faithfulness:
    """Score ``method``'s attribution of the prediction after ``text`` by removal (module docstring).

    ``method``: ``"flow"`` (options ``threshold``, ``ks``, ``draws``, ``seed``) or a saliency method
    (options ``ks``, ``draws``, ``seed``, ``baseline``, ``steps``).
    """
    if method == "flow":
        extra = sorted(set(options) & {"baseline", "steps"})
        if extra:
            raise LmscopeError(f"{', '.join(extra)} applies to saliency methods, not to the flow graph")
        return flow_faithfulness(lm, text, **options)
    if method not in METHODS and method not in _ALIASES:
        raise LmscopeError(f"unknown faithfulness method {method!r}: use one of {', '.join(FAITHFULNESS_METHODS)}")
    if "threshold" in options:
        raise LmscopeError("threshold applies to the flow graph (method='flow'), not to saliency")
    return saliency_faithfulness(lm, text, _method(method), **options)


def _check_ks(ks: Any, n: int, what: str, zero: bool = False) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    low = 0 if zero else 1
    if not ks or any(k < low or k > n for k in ks):
        raise LmscopeError(f"ks must lie in {low}..{n} ({what})")
    return ks


def _check_draws(draws: int) -> None:
    if int(draws) < 1:
        raise LmscopeError(f"draws must be at least 1, not {draws}")


def _ablation(edge: Any) -> Intervention:
    if edge.kind == "attention":
        return Intervention.zero("attn_probs", layers=edge.layer, positions=edge.target.pos, keys=edge.source.pos)
    return Intervention.zero("mlp_out", layers=edge.layer, positions=edge.target.pos)


@torch.no_grad()
def flow_faithfulness(
    lm: Any, text: str, *, threshold: float = 0.04, ks: tuple[int, ...] | None = None, draws: int = 3, seed: int = 0
) -> Faithfulness:
    """Ablate the flow graph's top-``k`` edges (attention and FFN) vs random ``k`` edges of the same graph."""
    _check_draws(draws)
    out = lm.trace(text)
    graph = out.flow(threshold=threshold, details=False)
    edges = sorted((e for e in graph.edges if e.kind in ("attention", "ffn")), key=lambda e: -e.weight)
    if not edges:
        raise LmscopeError("the flow graph has no attention or FFN edges at this threshold: lower it")
    position = out.trace.n_pos - 1
    target_id = int(out.logits[position].argmax())
    if ks is None:
        ks = tuple(k for k in (1, 2, 4, 8, 16, 32) if k <= len(edges)) or (len(edges),)
    ks = _check_ks(ks, len(edges), "the graph's attention and FFN edges")

    def score(chosen: list[Any]) -> tuple[float, float]:
        logits = lm.trace(text, sites=(), interventions=[_ablation(e) for e in chosen]).logits[position].float()
        return float(logits[target_id]), float(torch.softmax(logits, -1)[target_id])

    draw = random.Random(seed)
    top = np.array([score(edges[:k]) for k in ks])  # [k, (logit, prob)]
    rand = np.array([[score(draw.sample(edges, k)) for k in ks] for _ in range(draws)]).mean(0)
    logits = out.logits[position].float()
    base = float(logits[target_id])
    return Faithfulness(
        tokens=out.tokens,
        position=position,
        target=lm.unembed.token_strings([target_id])[0],
        method="flow",
        unit="edge",
        n_units=len(edges),
        ks=tuple(ks),
        base_logit=base,
        base_prob=float(torch.softmax(logits, -1)[target_id]),
        top_logit=top[:, 0],
        random_logit=rand[:, 0],
        top_prob=top[:, 1],
        random_prob=rand[:, 1],
        top_auc=float(np.mean(base - top[:, 0])),
        random_auc=float(np.mean(base - rand[:, 0])),
        draws=draws,
    )


def deletion_baseline(lm: Any, baseline: str | int, embeds: torch.Tensor) -> tuple[torch.Tensor, str]:
    """What a deleted token's embedding becomes, ``[d_model]``, and its description."""
    if baseline == "zero":
        return torch.zeros_like(embeds[0]), "zero embedding"
    if baseline == "mean":
        table = lm.model.get_input_embeddings().weight  # [vocab, d_model]
        return table.float().mean(0).to(embeds), "mean input embedding"
    if isinstance(baseline, str) and not baseline:
        raise LmscopeError("a deletion baseline must be 'zero', 'mean' or a token, not an empty string")
    token = _token_id(lm.loaded, baseline, "the deletion baseline token")
    vector = input_embeddings(lm.loaded, torch.tensor([token]))[0]
    return vector.to(embeds), f"embedding of {lm.unembed.token_strings([token])[0]!r}"


def _ranked(scores: np.ndarray) -> np.ndarray:
    """Positions by decreasing score (ties by position), the ranking every curve uses."""
    return np.argsort(-scores, kind="stable")


def _default_ks(n: int) -> tuple[int, ...]:
    if n <= 16:
        return tuple(range(1, n + 1))
    return tuple(sorted({max(1, round(n * f / 16)) for f in range(1, 17)}))


@torch.no_grad()
def _target_after(lm: Any, embeds: torch.Tensor, masks: torch.Tensor, base: torch.Tensor, target_id: int):
    """Logit and probability of ``target_id`` after the last token, for each deletion mask ``[variant, pos]``
    (True: deleted), in batched forward passes of at most :func:`default_rows` positions."""
    n_pos = embeds.shape[0]
    per_pass = max(1, default_rows(lm.loaded) // n_pos)
    logits_out, probs_out = [], []
    model = lm.model
    keep = {"logits_to_keep": 1} if _keeps_logits(type(model)) else {}
    for start in range(0, len(masks), per_pass):
        mask = masks[start : start + per_pass].to(embeds.device)[..., None]  # [batch, pos, 1]
        x = torch.where(mask, base, embeds)  # [batch, pos, d_model]
        logits = model(inputs_embeds=x, use_cache=False, **keep).logits[:, -1].float()  # [batch, vocab]
        logits_out.append(logits[:, target_id].cpu())
        probs_out.append(torch.log_softmax(logits, -1)[:, target_id].exp().cpu())
    return torch.cat(logits_out).numpy(), torch.cat(probs_out).numpy()


def saliency_faithfulness(
    lm: Any,
    text: str,
    method: str = "grad_x_input",
    *,
    ks: tuple[int, ...] | None = None,
    draws: int = 8,
    seed: int = 0,
    baseline: str | int = "zero",
    steps: int = 20,
) -> Faithfulness:
    """Deletion, insertion and random-deletion curves of a saliency method (module docstring).

    The explained prediction is the top token after the last token of ``text`` (saliency's
    position ``"next"``); every input token is a unit. All curves come from batched forward passes
    over ``inputs_embeds``, one variant per (curve, ``k``, draw).
    """
    _check_draws(draws)
    if lm.arch.lm_head is None or not lm.model.can_generate():
        raise LmscopeError(f"{lm.name} is not a causal language model: saliency faithfulness explains a next token")
    out = lm.trace(text, sites=())
    n = out.trace.n_pos
    ks = _default_ks(n) if ks is None else _check_ks(ks, n, "the input's tokens", zero=True)
    embeds = input_embeddings(lm.loaded, out.token_ids)  # [pos, d_model]
    base, described = deletion_baseline(lm, baseline, embeds)
    options: dict[str, Any] = {"positions": "next"}
    if method in ("occlusion", "integrated_gradients"):
        options["baseline"] = base.expand_as(embeds)
    if method == "integrated_gradients":
        options["steps"] = steps
    saliency = out.primary_attributions(method, **options)
    scores = np.asarray(saliency.attributions[0], dtype=np.float64)  # [pos]
    order = torch.as_tensor(_ranked(scores).copy())
    draw = np.random.default_rng(seed)
    perms = [torch.as_tensor(draw.permutation(n)) for _ in range(draws)]

    def firsts(ranking: torch.Tensor, k: int) -> torch.Tensor:
        mask = torch.zeros(n, dtype=torch.bool)
        mask[ranking[:k]] = True
        return mask

    masks = [firsts(order, k) for k in ks] + [~firsts(order, k) for k in ks]
    masks += [firsts(perm, k) for perm in perms for k in ks]
    logit, prob = _target_after(lm, embeds, torch.stack(masks), base, int(out.trace.logits[-1].argmax()))
    m = len(ks)
    top_logit, insert_logit, rand_logit = logit[:m], logit[m : 2 * m], logit[2 * m :].reshape(draws, m).mean(0)
    top_prob, insert_prob, rand_prob = prob[:m], prob[m : 2 * m], prob[2 * m :].reshape(draws, m).mean(0)
    last = out.trace.logits[-1].float()
    target_id = int(last.argmax())
    base_logit, base_prob = float(last[target_id]), float(torch.softmax(last, -1)[target_id])
    return Faithfulness(
        tokens=out.tokens,
        position=n - 1,
        target=lm.unembed.token_strings([target_id])[0],
        method=method,
        unit="token",
        n_units=n,
        ks=ks,
        base_logit=base_logit,
        base_prob=base_prob,
        top_logit=top_logit,
        random_logit=rand_logit,
        top_prob=top_prob,
        random_prob=rand_prob,
        top_auc=float(np.mean(base_logit - top_logit)),
        random_auc=float(np.mean(base_logit - rand_logit)),
        draws=draws,
        insert_logit=insert_logit,
        insert_prob=insert_prob,
        comprehensiveness=float(np.mean(base_prob - top_prob)),
        random_comprehensiveness=float(np.mean(base_prob - rand_prob)),
        sufficiency=float(np.mean(base_prob - insert_prob)),
        scores=scores.astype(np.float32),
        baseline=described,
    )
