"""Pure functions of a Trace (and model weights) that return results."""

from lmscope.analysis import streaming
from lmscope.analysis._result import Result
from lmscope.analysis.attention import Attention, EncoderDecoderAttention, attention
from lmscope.analysis.collect import Collection, collect, load_collection
from lmscope.analysis.components import ContributionMap, HeadShares, Promoted, TopNeurons
from lmscope.analysis.flow import FlowGraph, flow
from lmscope.analysis.layer_similarity import LayerSimilarity, layer_similarity, stack_similarity
from lmscope.analysis.lens import LayerPredictions, layer_predictions, lens_logits
from lmscope.analysis.neurons import Activations, Factors, activations, factorize
from lmscope.analysis.rankings import Rankings, RankingsWatch, rankings, rankings_watch
from lmscope.analysis.saliency import Saliency, primary_attributions
from lmscope.analysis.similarity import cca, cca_correlations, cka, pwcca, svcca

__all__ = [
    "Activations",
    "Attention",
    "Collection",
    "ContributionMap",
    "EncoderDecoderAttention",
    "Factors",
    "FlowGraph",
    "HeadShares",
    "LayerPredictions",
    "LayerSimilarity",
    "Promoted",
    "Rankings",
    "RankingsWatch",
    "Result",
    "Saliency",
    "TopNeurons",
    "activations",
    "attention",
    "cca",
    "cca_correlations",
    "cka",
    "collect",
    "factorize",
    "flow",
    "layer_predictions",
    "layer_similarity",
    "lens_logits",
    "load_collection",
    "primary_attributions",
    "pwcca",
    "rankings",
    "rankings_watch",
    "stack_similarity",
    "streaming",
    "svcca",
]
