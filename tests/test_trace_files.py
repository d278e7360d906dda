"""Trace files: bit-exact round trips and clear errors for corrupt or foreign files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import lmscope
from conftest import tiny
from lmscope import LmscopeError


def test_round_trip_is_bit_exact(tmp_path) -> None:
    lm = tiny("gemma")
    out = lm.generate("Saved traces", generate=3, sites=lmscope.capture.ALL_SITES)
    path = out.save(tmp_path / "run.safetensors")
    loaded = lmscope.load_trace(path)
    assert loaded.tokens == out.tokens
    assert loaded.n_input == out.n_input
    assert loaded.trace.layers == out.trace.layers
    assert loaded.trace.model == out.trace.model
    assert torch.equal(loaded.token_ids, out.token_ids)
    assert set(loaded.trace.tensors) == set(out.trace.tensors)
    for name, tensor in out.trace.tensors.items():
        assert torch.equal(loaded.trace.tensors[name], tensor), name
        assert loaded.trace.tensors[name].dtype == tensor.dtype


def test_loaded_trace_without_model_asks_for_one(tmp_path) -> None:
    path = tiny("llama").trace("no model here").save(tmp_path / "t.safetensors")
    loaded = lmscope.load_trace(path)
    with pytest.raises(LmscopeError, match="needs the model's weights"):
        loaded.layer_predictions()
    with_model = tiny("llama").load_trace(path)
    assert with_model.layer_predictions(topk=2).layers == (0, 1, 2)


def test_trace_from_another_model_is_refused(tmp_path) -> None:
    path = tiny("gpt2").trace("from gpt2").save(tmp_path / "gpt2.safetensors")
    with pytest.raises(LmscopeError, match="was traced with 'tiny-gpt2', not 'tiny-llama'"):
        tiny("llama").load_trace(path)


def test_corrupt_and_foreign_files(tmp_path) -> None:
    path = tiny("llama").trace("to be damaged").save(tmp_path / "t.safetensors")
    data = path.read_bytes()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(data[: len(data) // 2])
    with pytest.raises(LmscopeError, match="not a readable lmscope trace"):
        lmscope.load_trace(damaged)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(LmscopeError, match="not a readable lmscope trace"):
        lmscope.load_trace(garbage)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(LmscopeError, match="not an lmscope trace"):
        lmscope.load_trace(foreign)
    with pytest.raises(LmscopeError, match="not found"):
        lmscope.load_trace(tmp_path / "missing.safetensors")
