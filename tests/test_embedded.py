"""The embedded default model: loads offline from its package, converts once, and behaves."""

from __future__ import annotations

import os

import torch
from transformers import AutoModelForCausalLM

import lmscope
from lmscope.models import _loading


def test_loads_offline_and_second_load_uses_the_converted_copy(tmp_path, monkeypatch) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("LMSCOPE_CACHE", str(tmp_path))
    first = lmscope.from_pretrained()
    converted = list((tmp_path / "models").glob("*/lmscope-converted.json"))
    assert len(converted) == 1

    original = AutoModelForCausalLM.from_pretrained.__func__

    def no_gguf(cls, *args, **kwargs):
        assert "gguf_file" not in kwargs, "the second load must not read the GGUF file"
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(no_gguf))
    monkeypatch.setattr(_loading.AutoTokenizer, "from_pretrained", _no_gguf_tokenizer())
    second = lmscope.from_pretrained()
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def _no_gguf_tokenizer():
    original = _loading.AutoTokenizer.from_pretrained

    def load(*args, **kwargs):
        assert "gguf_file" not in kwargs
        return original(*args, **kwargs)

    return load


def test_embedded_capture_fidelity(embedded: lmscope.LM) -> None:
    text = "The keys to the cabinet"
    out = embedded.trace(text)
    with torch.no_grad():
        plain = embedded.model(embedded.encode(text)[None]).logits[0]
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=0)
    trace = out.trace
    assert trace.model.n_layers == 30 and trace.model.n_kv_heads == 3
    torch.testing.assert_close(trace.get("resid_mid"), trace.get("resid_pre") + trace.get("attn_out"))
    torch.testing.assert_close(trace.get("resid_post"), trace.get("resid_mid") + trace.get("mlp_out"))
    assert trace.get("v").shape == (30, trace.n_pos, 3, 64)


def test_embedded_greedy_generation(embedded: lmscope.LM) -> None:
    out = embedded.generate(" 1, 1, 1,", generate=2)
    # SmolLM2's tokenizer splits digits from the space before them
    assert "".join(out.tokens[out.n_input :]) == " 1"
