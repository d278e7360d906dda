"""Run a model with scoped hooks and record a :class:`Trace` (axis vocabulary in ``Trace``'s module)."""

from lmscope.capture._hooks import Recorder, recording, resolve_layers, resolve_sites
from lmscope.capture._interventions import INTERVENTION_OPS, INTERVENTION_SITES, Intervention
from lmscope.capture._run import (
    check_length,
    context_length,
    decoder_start,
    encode,
    encode_pair,
    encode_target,
    generate_ids,
    generate_seq2seq,
    model_info,
    token_strings,
    trace_ids,
)
from lmscope.capture._trace import ALL_SITES, CROSS_SITES, DEFAULT_SITES, SEQ2SEQ_SITES, ModelInfo, Trace
from lmscope.capture._trace_file import load_trace

__all__ = [
    "ALL_SITES",
    "CROSS_SITES",
    "DEFAULT_SITES",
    "INTERVENTION_OPS",
    "INTERVENTION_SITES",
    "SEQ2SEQ_SITES",
    "Intervention",
    "ModelInfo",
    "Recorder",
    "Trace",
    "check_length",
    "context_length",
    "decoder_start",
    "encode",
    "encode_pair",
    "encode_target",
    "generate_ids",
    "generate_seq2seq",
    "load_trace",
    "model_info",
    "recording",
    "resolve_layers",
    "resolve_sites",
    "token_strings",
    "trace_ids",
]
