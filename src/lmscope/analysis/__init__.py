"""Pure functions of a Trace (and model weights) that return results."""

from lmscope.analysis._result import Result
from lmscope.analysis.lens import LayerPredictions, layer_predictions, lens_logits

__all__ = ["LayerPredictions", "Result", "layer_predictions", "lens_logits"]
