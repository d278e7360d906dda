"""lmscope: see inside Transformer language models.

>>> import lmscope
>>> lm = lmscope.from_pretrained("tiny-llama")
>>> out = lm.trace("The keys to the cabinet")
>>> out.layer_predictions(position=-1, topk=3).layers
(0, 1, 2)
"""

from lmscope import probing
from lmscope._lm import LM, from_pretrained, load_trace, wrap
from lmscope._output import Output
from lmscope.analysis.collect import Collection, collect, load_collection
from lmscope.analysis.verify import VerifyReport, verify
from lmscope.capture import Intervention, Trace
from lmscope.errors import LmscopeError, TraceFileError
from lmscope.models import available_models

__all__ = [
    "LM",
    "Collection",
    "Intervention",
    "LmscopeError",
    "Output",
    "Trace",
    "TraceFileError",
    "VerifyReport",
    "available_models",
    "collect",
    "from_pretrained",
    "load_collection",
    "load_trace",
    "probing",
    "verify",
    "wrap",
]
