"""``Output``: a Trace plus the model it came from (if any), with every analysis as a method."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmscope.analysis import (
    Activations,
    Factors,
    LayerPredictions,
    LayerSimilarity,
    activations,
    factorize,
    layer_predictions,
    layer_similarity,
)
from lmscope.analysis._predicted import Position, position_of_state, prediction
from lmscope.analysis.attention import Attention, EncoderDecoderAttention, attention, recapture_sites
from lmscope.analysis.components import (
    ContributionMap,
    HeadShares,
    Promoted,
    TopNeurons,
    contribution_map,
    head_shares,
    promoted,
    top_neurons,
)
from lmscope.analysis.flow import FlowGraph, flow
from lmscope.analysis.rankings import Rankings, RankingsWatch, rankings, rankings_watch
from lmscope.analysis.saliency import Saliency, primary_attributions
from lmscope.capture import Trace, trace_ids
from lmscope.capture._interventions import Plan
from lmscope.errors import LmscopeError

if TYPE_CHECKING:
    from lmscope._lm import LM

__all__ = ["Output"]


class Output:
    """The result of ``lm.trace`` / ``lm.generate`` / ``lmscope.load_trace``."""

    def __init__(self, trace: Trace, lm: LM | None = None, plan: Plan | None = None):
        self.trace = trace
        self.lm = lm
        self.plan = plan  # the interventions of the run, prepared: analyses that run the model again apply them

    def _plan(self, what: str) -> Plan | None:
        if self.trace.interventions and not self.plan:
            raise LmscopeError(
                f"{what} runs the model again, and this trace was recorded under interventions whose values a "
                "saved trace does not keep: trace it again with lm.trace(..., interventions=[...])"
            )
        return self.plan

    def __repr__(self) -> str:
        model = self.trace.model.name
        source = f"{self.trace.encoder.n_pos} source tokens, " if self.trace.encoder is not None else ""
        return (
            f"Output({model!r}, {source}{self.trace.n_pos} tokens, {self.trace.n_input} input, "
            f"sites={list(self.trace.sites)})"
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

    def _causal(self, lm: LM) -> bool:
        return bool(lm.model.can_generate())

    def position_of_state(self, state: int) -> int:
        """The ``position`` (Ecco's meaning) of the prediction read from the residual state at ``state``.

        ``state + 1`` for a causal LM, which is ``len(out.tokens)`` (the next token) for the last
        state; ``state`` for a masked LM. For callers that pick a state, such as a clicked token.
        """
        causal = self.lm is None or self._causal(self.lm)
        return position_of_state(self.trace, state, causal)

    def layer_predictions(
        self,
        position: Position = 1,
        layer: int | None = None,
        topk: int = 10,
        norm: bool = True,
        site: str = "resid_post",
    ) -> LayerPredictions:
        """Logit lens: top-``topk`` tokens after every layer for the token at ``position`` (Ecco's names).

        As in Ecco, ``position=p`` names the token being explained, read from the state at
        ``p − 1`` (Ecco's default ``1``: the second token, from the first state). ``"next"`` (also
        ``len(out.tokens)`` or ``-1``) is the prediction after the last token.
        """
        lm = self._require_lm("the logit lens")
        return layer_predictions(self.trace, lm.unembed, position, layer, topk, norm, site, causal=self._causal(lm))

    def primary_attributions(
        self, attr_method: str = "grad_x_input", style: str = "minimal", **options: Any
    ) -> Saliency:
        """Input saliency of each generated (else every next) token (Ecco's name).

        ``options``: ``positions``, ``target``, ``contrast``, ``steps``, ``baseline``, ``batch_size``
        (see :func:`lmscope.analysis.primary_attributions`).
        """
        lm = self._require_lm("saliency")
        plan = self._plan("saliency")
        return primary_attributions(self.trace, lm.loaded, attr_method, style=style, plan=plan, **options)

    def saliency(self, attr_method: str = "grad_x_input", style: str = "minimal", **options: Any) -> Saliency:
        """Alias of :meth:`primary_attributions`."""
        return self.primary_attributions(attr_method, style, **options)

    def rankings(self, site: str = "resid_post", norm: bool = True) -> Rankings:
        """Rank of each generated (else every next) token after every layer (Ecco's name); 1 = top."""
        lm = self._require_lm("rankings")
        return rankings(self.trace, lm.unembed, site, norm, next_token=lm.model.can_generate())

    def rankings_watch(
        self, watch: list[str | int], position: Position = -1, site: str = "resid_post", norm: bool = True
    ) -> RankingsWatch:
        """Rank of the ``watch`` words (or token ids) among the predictions of the token at ``position``, per layer.

        ``position`` as in Ecco: ``p`` is read from the state at ``p − 1``; the default ``-1``
        (Ecco's), ``"next"`` and ``len(out.tokens)`` rank candidates for the token after the last.
        A word typed without its leading space is ranked as the word mid-sentence, with a note
        (see :mod:`lmscope.analysis.rankings`).
        """
        lm = self._require_lm("rankings_watch")
        return rankings_watch(self.trace, lm.unembed, watch, position, site, norm, causal=self._causal(lm))

    def activations(
        self, layers: Any = None, site: str = "mlp_act", *, stack: str | None = None, **options: Any
    ) -> Activations:
        """Activations ``[layer, neuron, pos]`` of ``site`` (``mlp_act`` or a residual site) with the tokens.

        ``options``: ``positions`` or ``skip_first`` (see ``analysis.activations``). ``stack``:
        ``"encoder"`` or ``"decoder"`` (the default) of an encoder-decoder model.
        """
        return activations(self.trace.stack(stack), layers, site, **options)

    def run_nmf(
        self,
        n_components: int = 8,
        from_layer: int | None = None,
        to_layer: int | None = None,
        *,
        stack: str | None = None,
        **options: Any,
    ) -> Factors:
        """NMF of ``mlp_act`` over layers ``from_layer:to_layer`` (Ecco's signature; see ``analysis.factorize``).

        ``stack``: ``"encoder"`` or ``"decoder"`` (the default) of an encoder-decoder model.
        """
        return factorize(self.trace.stack(stack), n_components, from_layer, to_layer, **options)

    def factorize(
        self,
        method: str = "nmf",
        n_components: int = 8,
        from_layer: int | None = None,
        to_layer: int | None = None,
        *,
        stack: str | None = None,
        **options: Any,
    ) -> Factors:
        """NMF, PCA or ICA of activations (``method``); ``options`` as in ``analysis.factorize``; ``stack`` as above."""
        return factorize(self.trace.stack(stack), n_components, from_layer, to_layer, method=method, **options)

    def layer_similarity(self, method: str = "cka", *, stack: str | None = None, **options: Any) -> LayerSimilarity:
        """Similarity of every layer pair (``site_a`` vs ``site_b``), e.g. hidden states vs FFN activations.

        ``stack``: ``"encoder"`` or ``"decoder"`` (the default) of an encoder-decoder model.
        """
        return layer_similarity(self.trace.stack(stack), method, **options)

    def attention(
        self,
        layer: int | None = None,
        view: str = "head",
        kind: str = "weights",
        head: int = 0,
        query: int = -1,
        top_k: int | None = None,
        part: str | None = None,
    ) -> Attention | EncoderDecoderAttention:
        """BertViz's head, model or neuron view; ``kind`` ``"rollout"`` or ``"value_norm"`` for other maps.

        Sites the view needs and this trace lacks (``q``/``k`` for the neuron view, ``v`` for value
        norms) are captured by running the model again on the same tokens. Encoder-decoder models:
        encoder, decoder and cross-attention as BertViz offers them, or the one ``part``.
        """
        trace, sites = self.trace, recapture_sites(self.trace, view, kind, part)
        if self.lm is not None and sites:
            layers = trace.layers if layer is None or kind == "rollout" else [layer]
            trace = trace_ids(
                self.lm.loaded,
                trace.token_ids,
                n_input=trace.n_input,
                sites=sites,
                layers=layers,
                segment_b=trace.segment_b,
                plan=self._plan("this attention view"),
                source_ids=trace.encoder.token_ids if trace.encoder is not None else None,
            )
        arch = self._require_lm("attention × value norm").arch if kind == "value_norm" else None
        return attention(
            trace, layer=layer, view=view, kind=kind, head=head, query=query, top_k=top_k, arch=arch, part=part
        )

    def flow(
        self,
        threshold: float = 0.04,
        position: Position | list[Position] | None = -1,
        *,
        mode: str = "prune",
        tolerance: float = 0.0,
        details: bool = True,
        topk: int = 5,
        stack: str | None = None,
    ) -> FlowGraph:
        """Information-flow graph of the prediction of the token at ``position`` (``None``: all), as in LM-TT.

        ``position`` as in :meth:`layer_predictions`: ``p`` starts the graph at the state ``p − 1``
        that predicts token ``p``; the default ``-1`` (also ``"next"``) explains the prediction after
        the last token. The graph's own ``positions`` are those states. Encoder-decoder models:
        the decoder's graph (with cross-attention edges from the encoder's output positions), or
        with ``stack="encoder"`` the encoder's own, whose ``position`` is a source position
        (``None``: all); see :mod:`lmscope.analysis._seq2seq_flow`.
        """
        lm = self._require_lm("the flow graph")
        if self.trace.encoder is not None or stack not in (None, "decoder"):
            from lmscope.analysis._seq2seq_flow import seq2seq_flow_of

            return seq2seq_flow_of(self.trace, lm, position, stack=stack or "decoder", threshold=threshold,
                                   mode=mode, tolerance=tolerance, details=details, topk=topk)  # fmt: skip
        unembed = lm.unembed if lm.arch.has_lm_head else None
        causal = self._causal(lm)
        if position is None:
            states = None
        elif isinstance(position, (int, str)):
            states = prediction(self.trace, position, causal).state
        else:
            states = [prediction(self.trace, p, causal).state for p in position]
        return flow(self.trace, lm.arch, unembed, threshold=threshold, position=states, mode=mode,
                    tolerance=tolerance, details=details, topk=topk)  # fmt: skip

    def contribution_map(self, layer: int, tolerance: float = 0.0) -> ContributionMap:
        """Every head's attention map and contribution map at ``layer``."""
        return contribution_map(self.trace, self._require_lm("contribution maps").arch, layer, tolerance)

    def head_shares(self, layer: int, position: int = -1, source: int | None = None) -> HeadShares:
        """Each head's share of the attention edge ``source -> position`` (of the whole block without ``source``).

        Here and in :meth:`top_neurons` and :meth:`promoted_tokens`, ``position`` is the residual
        position whose update is examined (a node of the flow graph), not an explained token.
        """
        return head_shares(self.trace, self._require_lm("head shares").arch, layer, position, source)

    def top_neurons(self, layer: int, position: int = -1, topk: int = 10) -> TopNeurons:
        """The FFN neurons contributing most to the block output at ``position``."""
        return top_neurons(self.trace, self._require_lm("top neurons").arch, layer, position, topk)

    def promoted_tokens(
        self,
        layer: int,
        position: int = -1,
        component: str = "ffn",
        *,
        head: int | None = None,
        neuron: int | None = None,
        source: int | None = None,
        expert: int | None = None,
        topk: int = 10,
        norm: bool = True,
    ) -> Promoted:
        """Tokens promoted and suppressed by an update: attention block/head/edge, FFN block/expert/neuron."""
        lm = self._require_lm("promoted tokens")
        return promoted(self.trace, lm.arch, lm.unembed, layer, position, component, head=head, neuron=neuron,
                        source=source, expert=expert, topk=topk, norm=norm)  # fmt: skip
