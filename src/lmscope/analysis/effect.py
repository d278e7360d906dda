"""What an intervention changes: a run against the same input run with interventions.

:func:`intervention_effect` runs the input again under interventions (one forward pass, plus one
per patch source) and compares the prediction at one position with the plain run's: the plain
top token's logit and probability before and after (their difference is the intervention's
effect on it), the top tokens before and after, and ``KL(before ‖ after)`` of the next-token
distributions.

:func:`flow_element_interventions` turns a node or an edge of the information-flow graph (its id
as :class:`~lmscope.analysis.flow.FlowGraph` and the flow view name it) into the intervention that
removes it (``"ablate"``) or replaces it by its value in a run of another text of the same length
(``"patch"``, clean → corrupted in the sense of Meng et al. 2022 and of activation patching):

- a residual node ``x{l}.{p}`` (the input of block ``l``; ``l = n_layers``: the final state) or
  ``m{l}.{p}`` (after attention): the residual state at that position (``resid_pre`` /
  ``resid_post`` / ``resid_mid``);
- an FFN node ``f{l}.{p}`` or FFN edge ``f{l}.{p}.{p}.*``: block ``l``'s MLP output at ``p``;
- an attention edge ``a{l}.{s}.{t}.*``: the attention probability of query ``t`` on key ``s`` in
  every head of layer ``l`` (``attn_probs``, not renormalized, as the faithfulness test ablates it);
- a residual edge ``r{l}.{p}.{p}.{state}``: the residual connection into that state. Ablating it
  subtracts the source state (``resid_pre``, or ``resid_mid`` before an MLP) from the target state,
  leaving only the sublayer's update; patching adds the source run's state minus this run's. No
  other intervention runs, so the source state of this run is the plain run's, read once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._result import Result
from lmscope.capture._interventions import Intervention, site_values
from lmscope.errors import LmscopeError

__all__ = ["InterventionEffect", "flow_element_interventions", "intervention_effect"]

_NODE = re.compile(r"([xmf])(\d+)\.(\d+)")
_EDGE = re.compile(r"([afr])(\d+)\.(\d+)\.(\d+)\.(pre|mid|post)")
OPS = ("ablate", "patch")


@dataclass(frozen=True)
class InterventionEffect(Result):
    """The prediction at ``position`` before and after interventions (see the module docstring)."""

    _view = "lmscope.views.effect"

    tokens: tuple[str, ...]
    position: int  # the residual position whose next-token prediction is compared
    description: str
    interventions: tuple[dict[str, Any], ...]  # as the intervened Trace records them
    target: str  # the plain run's top token at ``position``
    target_id: int
    logit_before: float
    logit_after: float
    prob_before: float
    prob_after: float
    top_before: tuple[str, ...]  # [k]
    top_before_probs: np.ndarray  # [k]
    top_after: tuple[str, ...]  # [k]
    top_after_probs: np.ndarray  # [k]
    kl: float  # KL(before ‖ after) of the next-token distributions, in nats

    @property
    def logit_diff(self) -> float:
        """``logit_after − logit_before`` of the plain run's top token (negative: the intervention hurt it)."""
        return self.logit_after - self.logit_before

    @property
    def changed_top(self) -> bool:
        return self.top_after[0] != self.top_before[0]


def _ids(lm: Any, text: Any) -> torch.Tensor:
    trace = getattr(text, "trace", text)
    return trace.token_ids if hasattr(trace, "token_ids") else lm.encode(text)


def flow_element_interventions(
    lm: Any, text: Any, element: str, op: str = "ablate", source: Any = None
) -> tuple[list[Intervention], str]:
    """The interventions that ablate or patch a flow-graph node or edge of ``text``'s run, and a description."""
    if op not in OPS:
        raise LmscopeError(f"unknown operation {op!r}: use ablate or patch")
    if op == "patch" and (source is None or (isinstance(source, str) and not source.strip())):
        raise LmscopeError("patch needs a source: a text of the same number of tokens to patch from")
    if op == "ablate" and source is not None:
        raise LmscopeError("ablate takes no source (patch does)")
    node, edge = _NODE.fullmatch(element or ""), _EDGE.fullmatch(element or "")
    if node is None and edge is None:
        raise LmscopeError(
            f"unknown flow element {element!r}: a node x<layer>.<pos>, m<layer>.<pos> or f<layer>.<pos>, "
            "or an edge <a|f|r><layer>.<source>.<target>.<pre|mid|post>"
        )
    arch = lm.arch
    ids = _ids(lm, text)
    n_pos, n_layers = len(ids), arch.n_layers
    match = node or edge
    kind, layer = match[1], int(match[2])
    pos = int(match[3]) if node else int(match[4])
    src = int(match[3]) if edge else pos
    top_layer = n_layers if kind == "x" and node else n_layers - 1
    if layer > top_layer:
        raise LmscopeError(f"layer {layer} of {element!r} does not exist: the model has {n_layers} layers")
    for p in {pos, src}:
        if p >= n_pos:
            raise LmscopeError(f"position {p} of {element!r} does not exist: the input has {n_pos} tokens")
    if edge and kind != "a" and src != pos:
        raise LmscopeError(f"an {'FFN' if kind == 'f' else 'residual'} edge stays at one position: {element!r}")
    if kind == "m" and arch.parallel:
        raise LmscopeError(f"{lm.name}'s blocks are parallel: there is no state after attention alone ({element!r})")
    patch = op == "patch"

    def simple(site: str, at: int, what: str, **where: Any) -> tuple[list[Intervention], str]:
        made = (
            Intervention.patch(site, source, at, pos, **where) if patch else Intervention.zero(site, at, pos, **where)
        )
        verb = "patch" if patch else "ablate"
        return [made], f"{verb} {what} (site {site}, layer {at}, position {pos})"

    if kind == "x":
        if layer == n_layers:
            return simple("resid_post", n_layers - 1, f"the final residual state at {pos}")
        return simple("resid_pre", layer, f"the residual state entering layer {layer} at {pos}")
    if kind == "m":
        return simple("resid_mid", layer, f"the residual state after layer {layer}'s attention at {pos}")
    if kind == "f":
        return simple("mlp_out", layer, f"layer {layer}'s FFN output at {pos}")
    if kind == "a":
        verb = "patch" if patch else "ablate"
        made = (
            Intervention.patch("attn_probs", source, layer, pos, keys=src)
            if patch
            else Intervention.zero("attn_probs", layer, pos, keys=src)
        )
        return [made], f"{verb} the attention edge {src} → {pos} at layer {layer}, every head (attn_probs)"
    state = edge[5]
    if state == "pre":
        raise LmscopeError(f"a residual edge ends after attention (mid) or after the block (post): {element!r}")
    from_site = "resid_pre" if state == "mid" or arch.parallel else "resid_mid"
    to_site = "resid_mid" if state == "mid" else "resid_post"
    here = site_values(lm.loaded, ids, from_site, (layer,))[layer][pos].float()  # [d_model]
    if patch:
        there_ids = _ids(lm, source)
        if len(there_ids) != n_pos:
            raise LmscopeError(
                f"the patch source has {len(there_ids)} tokens, the input {n_pos}: patch between runs of equal length"
            )
        there = site_values(lm.loaded, there_ids, from_site, (layer,))[layer][pos].float()
        vector, verb = there - here, "patch"
    else:
        vector, verb = -here, "ablate"
    made = Intervention.steer(to_site, vector, layers=layer, positions=pos)
    return [made], f"{verb} the residual edge into {to_site} at layer {layer}, position {pos} (from {from_site})"


@torch.no_grad()
def intervention_effect(
    lm: Any,
    text: Any,
    interventions: list[Intervention],
    *,
    position: int = -1,
    topk: int = 10,
    description: str | None = None,
) -> InterventionEffect:
    """The prediction at ``position`` of ``text`` (a text, ids or an Output) before and after ``interventions``."""
    if lm.arch.lm_head is None:
        raise LmscopeError(f"{lm.name} has no LM head: there is no prediction for an intervention to change")
    if not 1 <= topk <= 100:
        raise LmscopeError(f"topk must be between 1 and 100, not {topk}")
    ids = _ids(lm, text)
    if not -len(ids) <= position < len(ids):
        raise LmscopeError(f"position {position} does not exist: the input has {len(ids)} tokens")
    position %= len(ids)
    before = getattr(text, "logits", None)
    if before is None or len(before) != len(ids):
        before = lm.trace(ids, sites=()).logits
    after_out = lm.trace(ids, sites=(), interventions=interventions)
    b, a = before[position].float(), after_out.logits[position].float()  # [vocab]
    logp_b, logp_a = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    target = int(b.argmax())
    kl = float((logp_b.exp() * (logp_b - logp_a)).sum().clamp_min(0))
    top_b, top_a = logp_b.topk(topk), logp_a.topk(topk)
    strings = lm.unembed.token_strings
    records = after_out.trace.interventions
    return InterventionEffect(
        tokens=after_out.tokens,
        position=position,
        description=description or "; ".join(f"{r['op']} {r['site']}" for r in records),
        interventions=tuple(records),
        target=strings([target])[0],
        target_id=target,
        logit_before=float(b[target]),
        logit_after=float(a[target]),
        prob_before=float(logp_b[target].exp()),
        prob_after=float(logp_a[target].exp()),
        top_before=tuple(strings(top_b.indices.tolist())),
        top_before_probs=top_b.values.exp().cpu().numpy(),
        top_after=tuple(strings(top_a.indices.tolist())),
        top_after_probs=top_a.values.exp().cpu().numpy(),
        kl=kl,
    )
