"""Run a model with scoped hooks and record a :class:`Trace` (axis vocabulary in ``Trace``'s module)."""

from lmscope.capture._hooks import Recorder, recording, resolve_layers, resolve_sites
from lmscope.capture._interventions import INTERVENTION_OPS, INTERVENTION_SITES, Intervention
from lmscope.capture._run import (
    check_length,
    context_length,
    encode,
    encode_pair,
    generate_ids,
    model_info,
    token_strings,
    trace_ids,
)
from lmscope.capture._trace import ALL_SITES, DEFAULT_SITES, ModelInfo, Trace
from lmscope.capture._trace_file import load_trace

__all__ = [
    "ALL_SITES",
    "DEFAULT_SITES",
    "INTERVENTION_OPS",
    "INTERVENTION_SITES",
    "Intervention",
    "ModelInfo",
    "Recorder",
    "Trace",
    "check_length",
    "context_length",
    "encode",
    "encode_pair",
    "generate_ids",
    "load_trace",
    "model_info",
    "recording",
    "resolve_layers",
    "resolve_sites",
    "token_strings",
    "trace_ids",
]
