"""Models from anywhere, the architecture table, and clear errors for what does not fit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import lmscope
from lmscope import LmscopeError
from lmscope.models import FAMILIES, architecture_of, available_models, family_of


def test_available_models_lists_embedded_minilm_and_every_tiny_family() -> None:
    names = available_models()
    assert "smollm2-135m" in names and "minilm-l6" in names
    for family in ("gpt2", "gpt-neox", "opt", "llama", "qwen2", "mistral", "gemma", "phi", "bert", "roberta"):
        assert f"tiny-{family}" in names


def test_tiny_models_are_seeded() -> None:
    a = lmscope.from_pretrained("tiny-phi").model.state_dict()
    b = lmscope.from_pretrained("tiny-phi").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_table_paths_resolve_for_every_tiny_family(any_family: lmscope.LM) -> None:
    arch = any_family.arch
    assert arch.n_layers == 3 and arch.d_model == 64
    assert arch.o_proj(0) is not None and arch.mlp_down(0) is not None
    assert arch.lm_head is not None


def test_families_are_data() -> None:
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    assert family_of("mistral").blocks == "layers"
    assert family_of("gpt_neox").parallel == "use_parallel_residual"


def test_unknown_model_lists_what_is_available() -> None:
    with pytest.raises(LmscopeError, match=r"unknown model 'no-such-model'.*tiny-llama"):
        lmscope.from_pretrained("no-such-model")
    with pytest.raises(LmscopeError, match="no tiny model for family 'rwkv'"):
        lmscope.from_pretrained("tiny-rwkv")


def test_missing_and_non_model_files(tmp_path) -> None:
    with pytest.raises(LmscopeError, match="not found"):
        lmscope.from_pretrained(str(tmp_path / "missing.gguf"))
    with pytest.raises(LmscopeError, match="not found"):
        lmscope.from_pretrained("./no/such/dir")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(LmscopeError, match=r"not a \.gguf model"):
        lmscope.from_pretrained(str(text))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(LmscopeError, match="not a readable GGUF model"):
        lmscope.from_pretrained(str(fake))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(LmscopeError, match="holds no model"):
        lmscope.from_pretrained(str(empty))


def test_unsupported_architecture_is_named() -> None:
    config = AutoConfig.for_model("ctrl", n_embd=32, n_layer=1, n_head=2, dff=64, vocab_size=100)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(LmscopeError, match="unsupported architecture 'ctrl': it scales its input embeddings in place"):
        architecture_of(model)


def test_model_that_does_not_match_its_family_names_the_missing_parts() -> None:
    lm = lmscope.from_pretrained("tiny-llama")
    model = lm.model
    saved = model.model.layers[0].mlp.down_proj
    try:
        del model.model.layers[0].mlp.down_proj
        with pytest.raises(LmscopeError, match=r"could not find <block>\.mlp\.down_proj"):
            architecture_of(model)
    finally:
        model.model.layers[0].mlp.down_proj = saved


def test_local_directory_round_trip(tmp_path) -> None:
    lm = lmscope.from_pretrained("tiny-gpt2")
    lm.model.save_pretrained(tmp_path)
    lm.tokenizer.save_pretrained(tmp_path)
    again = lmscope.from_pretrained(str(tmp_path))
    text = "A local directory loads like any model."
    torch.testing.assert_close(again.trace(text).logits, lm.trace(text).logits, atol=1e-6, rtol=0)


def test_wrap_uses_the_callers_model_object() -> None:
    lm = lmscope.from_pretrained("tiny-mistral")
    wrapped = lmscope.wrap(lm.model, lm.tokenizer, name="mine")
    assert wrapped.model is lm.model
    assert wrapped.trace("hello there").trace.model.name == "mine"


def test_dtype_passes_through() -> None:
    lm = lmscope.from_pretrained("tiny-llama", dtype="bfloat16")
    assert lm.loaded.dtype == torch.bfloat16
    out = lm.trace("half precision works")
    assert out.trace.get("resid_post").dtype == torch.bfloat16
    with pytest.raises(LmscopeError, match="unknown dtype"):
        lmscope.from_pretrained("tiny-llama", dtype="float8")
