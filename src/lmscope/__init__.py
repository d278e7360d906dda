"""lmscope: see inside Transformer language models.

>>> import lmscope
>>> lm = lmscope.from_pretrained("tiny-llama")
>>> out = lm.trace("The keys to the cabinet")
>>> out.layer_predictions(position=-1, topk=3).layers
(0, 1, 2)
"""

from lmscope._lm import LM, from_pretrained, load_trace, wrap
from lmscope._output import Output
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import available_models

__all__ = [
    "LM",
    "LmscopeError",
    "Output",
    "Trace",
    "available_models",
    "from_pretrained",
    "load_trace",
    "wrap",
]
