"""The structural fallback: model types missing from the table run on a verified guessed layout, or are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis.verify import accept_guessed, verify
from lmscope.models import FAMILIES, LoadedModel
from lmscope.models._fallback import GuessedLayoutWarning, check_weights_readable, discover, is_guessed
from lmscope.models._support import FALLBACK_VERIFIED, model_support

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."
TABLE = {t for family in FAMILIES for t in family.model_types}


def tiny_of(model_type: str, **changes) -> nn.Module:
    """A seeded random model of ``model_type`` sized like the tiny families."""
    settings = dict(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        initializer_range=0.1,
        vocab_size=len(tiny("llama").tokenizer),
    )
    config = AutoConfig.for_model(model_type, **{**settings, **changes})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def test_at_least_five_types_without_a_table_entry_are_verified() -> None:
    assert len(set(FALLBACK_VERIFIED) - TABLE) >= 5


def _guessed(model: nn.Module) -> lmscope.LM:
    """The fallback's LM for ``model``: through ``wrap`` (warning included) unless the table has the type."""
    model_type = model.config.model_type
    tokenizer = tiny("llama").tokenizer
    if model_type in TABLE:  # the table caught up with this type: exercise the fallback directly
        loaded = LoadedModel(model_type, model, tokenizer, discover(model))
        lm = lmscope.LM(loaded)
        with pytest.warns(GuessedLayoutWarning):
            accept_guessed(lm)
        return lm
    with pytest.warns(GuessedLayoutWarning, match=rf"model type '{model_type}' is not in the architecture table"):
        return lmscope.wrap(model, tokenizer)


@pytest.mark.parametrize("model_type", FALLBACK_VERIFIED)
def test_fallback_accepts_a_model_type_the_table_lacks(model_type: str) -> None:
    model = tiny_of(model_type)
    lm = _guessed(model)
    assert is_guessed(lm.arch) and lm.arch.family.name == model_type
    out = lm.trace(TEXT)
    with torch.no_grad():
        plain = model(lm.encode(TEXT)[None]).logits[0]
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=0)
    report = verify(lm, generate=2)
    assert report.passed and report.layout.startswith("guessed: blocks=layers")
    assert out.layer_predictions(position=-1, topk=3).tokens  # analyses run on the guessed layout
    family = lm.arch.family
    if family.attn_out == family.attn and family.mlp_out == "mlp":
        assert out.flow(threshold=0.04).edges
    else:  # norms on the updates ("sandwich" norms): no per-head parts, said plainly
        with pytest.raises(LmscopeError, match="cannot be split into per-head and per-neuron parts"):
            out.flow()


class _Squashed(nn.Module):
    """An output projection followed by a non-linearity: the attention update is no longer linear in the values."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def test_a_layout_that_does_not_verify_is_refused_with_the_documented_error() -> None:
    model = tiny_of("exaone")
    for block in model.model.layers:
        block.self_attn.o_proj = _Squashed(block.self_attn.o_proj)
    with pytest.raises(LmscopeError) as caught:
        lmscope.wrap(model, tiny("llama").tokenizer)
    message = str(caught.value)
    assert "model type 'exaone' is not in lmscope's architecture table" in message
    assert "failed lmscope verify (blocks: attention updates vs Σ (source, head) terms" in message
    assert "attn=self_attn (out self_attn.o_proj.linear)" in message
    assert message.endswith(
        "add an entry for it to lmscope's architecture table (README: 'Models the table does not know')"
    )
    assert "\n" not in message


def test_a_model_without_attention_names_what_is_missing() -> None:
    config = AutoConfig.for_model("mamba", hidden_size=32, num_hidden_layers=2, vocab_size=100, state_size=4)
    model = AutoModelForCausalLM.from_config(config)  # the table has Mamba (tests/test_mamba.py): guess directly
    with pytest.raises(LmscopeError, match=r"could not find an attention module in each block \(MambaBlock has none\)"):
        discover(model)


def test_an_attention_implementation_that_cannot_be_hooked_is_named() -> None:
    model = tiny_of("exaone")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(LmscopeError, match=r"uses the 'flex_attention' attention implementation, which lmscope cannot"):
        lmscope.wrap(model, tiny("llama").tokenizer)


def test_quantized_weights_are_named_and_other_analyses_offered() -> None:
    lm = lmscope.from_pretrained("tiny-llama")  # a fresh copy: its weights are changed below
    out = lm.trace(TEXT)
    o_proj = lm.arch.o_proj(0)
    o_proj.weight = nn.Parameter(o_proj.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(LmscopeError, match=r"weights are quantized .* the logit lens, rankings, saliency"):
        check_weights_readable(lm.arch)
    with pytest.raises(LmscopeError, match="flow graph, components and neuron contributions cannot read them"):
        out.flow()
    assert out.layer_predictions(position=-1).tokens  # the lens does not need those weights


def test_remote_code_is_refused_in_one_line(tmp_path) -> None:
    (tmp_path / "config.json").write_text(
        '{"model_type": "my_custom_lm", "architectures": ["MyLM"], '
        '"auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"}}'
    )
    with pytest.raises(
        LmscopeError, match=r"needs its own modeling code \(remote code\).* trust_remote_code=True"
    ) as e:
        lmscope.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)


def test_models_all_lists_every_type_with_an_honest_status() -> None:
    rows = {row.model_type: row for row in model_support()}
    assert len(rows) > 200
    assert {row.status for row in rows.values()} <= {"table", "fallback", "unsupported", "untried"}
    assert all(rows[t].status == "table" for t in TABLE if t in rows)
    assert all(rows[t].status == "fallback" for t in set(FALLBACK_VERIFIED) - TABLE)
    assert rows["mamba"].status == "table" and "lens, rankings, saliency and activations apply" in rows["mamba"].note
    assert "attention views, the flow graph and head importances do not" in rows["mamba2"].note
    assert rows["jamba"].status == "unsupported"
    assert rows["whisper"].status == "unsupported"
    assert sum(row.status == "fallback" for row in rows.values()) == len(set(FALLBACK_VERIFIED) - TABLE)


def test_models_all_on_the_command_line(capsys) -> None:
    from lmscope.cli import main

    assert main(["models", "--all"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:3] == ["mamba", "causal", "table"] and "saliency" in line for line in lines)
    assert any(line.split()[:3] == ["exaone", "causal", "fallback"] for line in lines)
    assert lines[-1].endswith("model types") and "fallback" in lines[-1]


def test_attention_outside_the_attention_interface_is_named() -> None:
    model = tiny_of("gpt_neox_japanese")
    with pytest.raises(LmscopeError, match=r"(?i)attention.?interface") as caught:
        lmscope.wrap(model, tiny("llama").tokenizer)
    assert "\n" not in str(caught.value)
