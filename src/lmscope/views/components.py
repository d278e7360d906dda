"""Views of flow components: contribution maps, head shares, top neurons, promoted/suppressed tokens."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmscope.analysis.components import ContributionMap, HeadShares, Promoted, TopNeurons
from lmscope.views._figure import heatmap_grid, token_labels
from lmscope.views._html import fragment
from lmscope.views._text import percent, table, visible

__all__ = ["plot", "to_html", "to_text"]

Component = ContributionMap | HeadShares | TopNeurons | Promoted


def _at(tokens: tuple[str, ...], pos: int) -> str:
    return f"{pos} ({visible(tokens[pos])!r})"


def to_text(result: Component) -> str:
    if isinstance(result, ContributionMap):
        n_heads = result.contributions.shape[0]
        rows = []
        for h in range(n_heads):
            c = result.contributions[h]
            q, k = np.unravel_index(int(np.argmax(c)), c.shape)
            rows.append([str(h), f"{c.sum(1).mean():.3f}", f"{_at(result.tokens, k)} → {_at(result.tokens, q)}"])
        head = f"Contribution maps, layer {result.layer} ({n_heads} heads, {len(result.tokens)} positions)"
        return head + "\n" + table(["head", "mean contribution", "strongest term (source → target)"], rows)
    if isinstance(result, HeadShares):
        edge = "the whole block output" if result.source is None else f"edge from {_at(result.tokens, result.source)}"
        head = f"Head shares, layer {result.layer}, position {_at(result.tokens, result.position)}, {edge}"
        rows = [
            [str(h), f"{c:.4f}", percent(float(s))]
            for h, (c, s) in enumerate(zip(result.contributions, result.shares, strict=True))
        ]
        return head + "\n" + table(["head", "contribution", "share"], rows)
    if isinstance(result, TopNeurons):
        head = f"Top FFN neurons, layer {result.layer}, position {_at(result.tokens, result.position)}"
        rows = [
            [str(n), f"{c:.4f}", f"{a:+.3f}"]
            for n, c, a in zip(result.neurons, result.contributions, result.activations, strict=True)
        ]
        if result.experts is not None:  # mixture of experts: neurons per expert
            for row, expert in zip(rows, result.experts, strict=True):
                row.insert(0, "shared" if expert < 0 else str(expert))
            return head + "\n" + table(["expert", "neuron", "contribution", "activation"], rows)
        return head + "\n" + table(["neuron", "contribution", "activation"], rows)
    norm = "" if result.norm else ", no final norm"
    head = f"Tokens promoted/suppressed by {result.component}, layer {result.layer}, position "
    head += f"{_at(result.tokens, result.position)}{norm}"
    rows = [
        [visible(p), f"{pl:+.2f}", visible(s), f"{sl:+.2f}"]
        for p, pl, s, sl in zip(
            result.promoted, result.promoted_logits, result.suppressed, result.suppressed_logits, strict=True
        )
    ]
    return head + "\n" + table(["promoted", "logit", "suppressed", "logit"], rows)


def _data(result: Component) -> tuple[str, dict[str, Any]]:
    base: dict[str, Any] = {"tokens": list(result.tokens), "layer": result.layer}
    if isinstance(result, ContributionMap):
        base.update(
            attention=np.round(result.attention, 4).tolist(), contributions=np.round(result.contributions, 4).tolist()
        )
        return "contribution_map", base
    if isinstance(result, HeadShares):
        base.update(
            position=result.position, source=result.source, shares=result.shares.tolist(),
            contributions=result.contributions.tolist(),
        )  # fmt: skip
        return "head_shares", base
    if isinstance(result, TopNeurons):
        base.update(
            position=result.position, neurons=result.neurons.tolist(), contributions=result.contributions.tolist(),
            activations=result.activations.tolist(),
            experts=None if result.experts is None else result.experts.tolist(),
        )  # fmt: skip
        return "top_neurons", base
    base.update(
        position=result.position, component=result.component, promoted=list(result.promoted),
        promoted_logits=result.promoted_logits.tolist(), suppressed=list(result.suppressed),
        suppressed_logits=result.suppressed_logits.tolist(),
    )  # fmt: skip
    return "promoted", base


def to_html(result: Component) -> str:
    view, data = _data(result)
    return fragment(view, data, scripts=("components.js",), styles=("flow.css",), text=to_text(result))


def plot(result: ContributionMap, head: int | None = None) -> Any:
    """Attention maps (top) next to contribution maps (bottom), query rows and key columns.

    Every head, or only ``head``: its attention map beside its contribution map.
    """
    if not isinstance(result, ContributionMap):
        raise TypeError(f"only contribution maps have a figure, not {type(result).__name__}")
    n_heads = result.contributions.shape[0]
    heads = list(range(n_heads)) if head is None else [head % n_heads]
    if head is not None and not -n_heads <= head < n_heads:
        raise ValueError(f"head {head} is out of range: layer {result.layer} has heads 0..{n_heads - 1}")
    panels = [(result.attention[h], f"attention, head {h}") for h in heads]
    peak = max(float(result.contributions[heads].max()), 1e-12)  # one scale for every head: heads compare
    panels += [(result.contributions[h] / peak, f"contribution, head {h}") for h in heads]
    labels = token_labels(result.tokens)
    return heatmap_grid(
        panels,
        rows=labels,
        columns=labels,
        title=f"Layer {result.layer}: attention maps and contribution maps (scaled to the largest term, "
        f"{peak:.3f} of the block output); query rows, key columns",
        ncols=len(heads) if len(heads) > 1 else 2,
        vmin=0.0,
        vmax=1.0,
        colorbar="attention weight; contribution / largest term",
    )
