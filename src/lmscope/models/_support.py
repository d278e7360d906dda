"""What lmscope can do with each text model type of the installed transformers (``lmscope models --all``).

A type is one of:

* ``table``: in the architecture table; its tiny model passes the fidelity suite in CI;
* ``fallback``: not in the table, but the structural fallback's guessed layout passes
  ``lmscope verify`` on a tiny model of it in CI (``tests/test_fallback.py`` checks this list);
* ``unsupported``: known not to work, with the reason;
* ``untried``: not in the table and not tried in CI: the fallback guesses its layout when it loads
  and keeps it only if ``lmscope verify`` passes, else the error says what could not be found.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmscope.models._architectures import FAMILIES

__all__ = ["FALLBACK_VERIFIED", "ModelSupport", "model_support"]

# Types the structural fallback is verified on in CI (tests/test_fallback.py builds a tiny model of each);
# a type that is also in the table is listed as "table", and the fallback's guess is still checked on it.
FALLBACK_VERIFIED: tuple[str, ...] = (
    "apertus1p5_text",
    "cwm",
    "doge",
    "exaone",
    "hyperclovax",
    "internlm3",
    "iquestcoder",
    "jais2",
)

_NO_ATTENTION = (
    "a recurrent model without attention: the logit lens, saliency and activations would apply to it, attention "
    "views, the flow graph and head importances cannot; lmscope has no table entry for its blocks yet"
)
_STATE_SPACE = (
    "in the architecture table (verified in CI), a state-space model without attention: the logit lens, "
    "rankings, saliency and activations apply; attention views, the flow graph and head importances do not"
)
_HYBRID = (
    "mixes attention with state-space or linear-attention layers, so its blocks differ: lmscope does not load it yet"
)
_SEQ2SEQ = (
    "an encoder-decoder (or speech/music) model outside the table: lmscope knows the T5 and BART layouts "
    "(t5, mt5, umt5, bart, mbart, marian, pegasus)"
)
_MOE = "a mixture of experts: the fallback needs one MLP per block; it needs a table entry with its experts"

_KNOWN: dict[str, str] = {
    **dict.fromkeys(("rwkv", "xlstm"), _NO_ATTENTION),
    **dict.fromkeys(
        (
            "bamba",
            "bailing_hybrid",
            "falcon_h1",
            "granitemoehybrid",
            "jamba",
            "kimi_linear",
            "lara_mini",
            "lfm2",
            "lfm2_moe",
            "minimax",
            "nemotron_h",
            "olmo_hybrid",
            "qwen3_5",
            "qwen3_5_moe",
            "qwen3_5_moe_text",
            "qwen3_5_text",
            "qwen3_next",
            "qwen4_exp_text",
            "recurrent_gemma",
            "zamba",
            "zamba2",
        ),
        _HYBRID,
    ),
    **dict.fromkeys(
        (
            "bart",
            "bigbird_pegasus",
            "blenderbot",
            "blenderbot-small",
            "marian",
            "mbart",
            "moshi",
            "musicgen",
            "musicgen_melody",
            "mvp",
            "pegasus",
            "plbart",
            "prophetnet",
            "trocr",
            "whisper",
        ),
        _SEQ2SEQ,
    ),
    **dict.fromkeys(
        ("dbrx", "jetmoe", "kolibri1", "mellum", "inkling_text", "solar_open", "zaya", "laguna", "flint"), _MOE
    ),
}


@dataclass(frozen=True)
class ModelSupport:
    """One model type: its kind (``causal``/``masked``/``seq2seq``), status and, where it is not in the table, why."""

    model_type: str
    kind: str
    status: str
    note: str


def _unsupported() -> dict[str, str]:
    from lmscope.models import _architectures

    return getattr(_architectures, "UNSUPPORTED", {})


def model_support() -> tuple[ModelSupport, ...]:
    """Every causal-LM and masked-LM model type of the installed transformers, with its status."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    table = {t for family in FAMILIES for t in family.model_types}
    state_space = {t for family in FAMILIES if family.attn is None for t in family.model_types}
    refused = _unsupported()
    kinds = dict.fromkeys(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal")
    kinds.update(dict.fromkeys(MODEL_FOR_MASKED_LM_MAPPING_NAMES, "masked"))  # BERT-style types have both
    kinds.update(dict.fromkeys(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, "seq2seq"))  # BART has all three
    rows = []
    for model_type in sorted(kinds):
        if model_type in state_space:
            row = ModelSupport(model_type, kinds[model_type], "table", _STATE_SPACE)
        elif model_type in table:
            row = ModelSupport(model_type, kinds[model_type], "table", "in the architecture table (verified in CI)")
        elif model_type in FALLBACK_VERIFIED:
            note = "works by the structural fallback (verified in CI on a tiny model)"
            row = ModelSupport(model_type, kinds[model_type], "fallback", note)
        elif kinds[model_type] == "seq2seq":  # the structural fallback guesses no encoder-decoder layout
            row = ModelSupport(model_type, "seq2seq", "unsupported", refused.get(model_type) or _SEQ2SEQ)
        elif model_type in refused or model_type in _KNOWN:
            why = refused.get(model_type) or _KNOWN[model_type]
            row = ModelSupport(model_type, kinds[model_type], "unsupported", why)
        elif "moe" in model_type:
            row = ModelSupport(model_type, kinds[model_type], "unsupported", _MOE)
        else:
            note = "not tried in CI: the fallback guesses its layout at load time and keeps it only if verify passes"
            if kinds[model_type] == "masked":
                note += " (it knows pre-norm blocks only: a post-norm encoder needs a table entry)"
            row = ModelSupport(model_type, kinds[model_type], "untried", note)
        rows.append(row)
    return tuple(rows)
