"""Trace files: bit-exact round trips, clear errors for corrupt or foreign files, and a generated corpus of
forged and damaged files that the reader (and the web app's upload) must refuse, each naming its problem."""

from __future__ import annotations

import copy
import json
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lmscope
from conftest import tiny
from lmscope import LmscopeError, TraceFileError
from lmscope.capture._trace_file import tensor_checksum
from lmscope.models._tiny import TINY_FAMILIES


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


# --- Forged and damaged files -----------------------------------------------------------------
# A corpus generated from one real trace: each metadata field and each tensor corrupted in turn,
# written with fresh checksums (so the checks of meaning, not the checksums, must catch it), and
# single-byte flips of the real file (which the checksums must catch).

WRONG_TYPES: dict[str, Any] = {
    "null": None,
    "bool": True,
    "float": 1.5,
    "string": "3",
    "list": [3],
    "object": {"a": 3},
}
META_TYPES = {
    "format": "string",
    "version": "int",
    "tokens": "list",
    "n_input": "int",
    "layers": "list",
    "model": "object",
    "attn_scaling": "list",
    "attn_softcap": "list",
    "segment_b": "int null",
    "checksums": "object",
}
MODEL_TYPES = {
    "name": "string",
    "model_type": "string",
    "family": "string",
    "n_layers": "int",
    "n_heads": "int",
    "n_kv_heads": "int",
    "d_model": "int",
    "d_head": "int",
    "vocab_size": "int",
    "parallel": "bool",
    "post_norm": "bool",
    "dtype": "string",
    "n_neurons": "int null",
}


MISSING = object()  # a field's value in a forgery that deletes the field


@dataclass
class Forgery:
    label: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    expected: str  # a regular expression the error message must match
    checksums: bool = True  # write fresh checksums of the forged contents


def read_parts(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["lmscope"])
        tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}  # noqa: SIM118
    return meta, tensors


def write_parts(path: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor], checksums: bool = True) -> Path:
    meta = copy.deepcopy(meta)
    if checksums:
        meta["checksums"] = {name: tensor_checksum(t.contiguous()) for name, t in tensors.items()}
    text = json.dumps(meta)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path),
              metadata={"lmscope": text, "lmscope_crc32": f"{zlib.crc32(text.encode()):08x}"})  # fmt: skip
    return path


def forgeries(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[Forgery]:
    """Every corruption of one field or one tensor that a checked reader must refuse."""
    out: list[Forgery] = []
    n_pos, n_layers, model = len(meta["tokens"]), meta["model"]["n_layers"], meta["model"]
    tokens, n_attn = meta["tokens"], len(meta["attn_scaling"])

    def field(label: str, expected: str, key: str, value: Any, checksums: bool = True) -> None:
        """``key`` ("n_input", or "model.d_head") set to ``value`` (or deleted)."""
        forged = copy.deepcopy(meta)
        *outer, last = key.split(".")
        target = forged[outer[0]] if outer else forged
        if value is MISSING:
            del target[last]
        else:
            target[last] = value
        out.append(Forgery(label, forged, dict(tensors), expected, checksums and key != "checksums"))

    def tensor(label: str, name: str, value: torch.Tensor | None, expected: str) -> None:
        forged = dict(tensors)
        if value is None:
            del forged[name]
        else:
            forged[name] = value
        out.append(Forgery(label, copy.deepcopy(meta), forged, expected))

    # Each field with a value of each wrong JSON type, and each field missing.
    fields = {**META_TYPES, **{f"model.{k}": kind for k, kind in MODEL_TYPES.items()}}
    for key, kind in fields.items():
        name = key.split(".")[-1]
        for wrong, value in WRONG_TYPES.items():
            if wrong not in kind.split():
                field(f"{key} = {wrong}", name, key, value)
        if key not in ("attn_scaling", "attn_softcap", "segment_b"):  # optional in early files
            field(f"{key} missing", name, key, MISSING)
    field("unknown key", "unknown key 'extra'", "extra", 1)
    field("model unknown key", "unknown key 'extra'", "model.extra", 1)
    # Values out of range; lists of the wrong length or content.
    field("format other", "format", "format", "other-trace")
    for value in (0, -1):
        field(f"version {value}", "version", "version", value)
    field("version newer", "newer lmscope", "version", 99)
    field("tokens one short", "token_ids", "tokens", tokens[:-1])
    field("tokens one long", "token_ids", "tokens", [*tokens, "x"])
    field("tokens empty", "tokens", "tokens", [])
    field("tokens entry number", "tokens' entry 1", "tokens", [tokens[0], 7, *tokens[2:]])
    field("tokens entry list", "tokens' entry 0", "tokens", [["a"], *tokens[1:]])
    field("tokens lone surrogate", "surrogate", "tokens", ["\ud800", *tokens[1:]])
    for value in (-1, 0, n_pos + 1, 10**30):
        field(f"n_input {value}", "n_input", "n_input", value)
    for value in ([], [0, 0, 1], [2, 1, 0], [0, 1, n_layers], [-1, 0, 1], [0, 1], [0, 1, 2, 3], [0, 1, 2.0],
                  [0, 1, True], [0, 1, "2"], [0, 1, None]):  # fmt: skip
        field(f"layers {value}", "layers|shape", "layers", value)
    for key in ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "vocab_size", "n_neurons"):
        for value in (0, -1, 2**40):
            field(f"model.{key} {value}", key, f"model.{key}", value)
    for key, value, expected in (
        ("n_layers", 2, "layers"),
        ("n_heads", 2, "shape"),
        ("n_heads", 3, "'n_kv_heads' 2 does not divide"),
        ("n_kv_heads", 1, "shape"),
        ("d_model", model["d_model"] + 1, "shape"),
        ("d_head", model["d_head"] * 2, "shape"),
        ("vocab_size", model["vocab_size"] + 1, "shape"),
        ("vocab_size", 3, "outside the vocabulary"),
        ("n_neurons", model["n_neurons"] - 1, "shape"),
        ("dtype", "float16", "not the model's float16"),
        ("dtype", "int64", "dtype"),
        ("name", "x\udcff", "surrogate"),
    ):
        field(f"model.{key} {value}", expected, f"model.{key}", value)
    for key in ("attn_scaling", "attn_softcap"):
        field(f"{key} one short", key, key, meta[key][:-1])
        field(f"{key} one long", key, key, [*meta[key], 1.0])
        for value in (-0.25, 0, float("nan"), float("inf"), "x", [1.0]):
            field(f"{key} {value}", key, key, [value] * n_attn)
    for value in (0, -1, n_pos, n_pos + 5):
        field(f"segment_b {value}", "segment_b", "segment_b", value)
    # Checksums that do not name the tensors there are, or do not match them.
    names = list(tensors)
    field("checksums lack one", "no checksum", "checksums", dict.fromkeys(names[1:], "0"), checksums=False)
    field("checksums extra", "missing", "checksums", dict.fromkeys([*names, "q2"], "0"), checksums=False)
    field("checksums stale", "is damaged: tensor", "checksums", dict.fromkeys(names, "00000000"), checksums=False)

    # Each tensor: wrong shape, wrong dtype, NaN and infinities.
    for name, value in tensors.items():
        if name == "token_ids":
            continue
        tensor(f"{name} one short", name, value[..., :-1], "shape")
        tensor(f"{name} extra axis", name, value[None], "shape")
        tensor(f"{name} flattened", name, value.flatten(), "shape")
        tensor(f"{name} transposed", name, value.transpose(0, 1).contiguous(), "shape")
        not_float = "floating point" if name == "logits" else "not the model's float32"
        tensor(f"{name} int32", name, value.to(torch.int32), not_float)
        tensor(f"{name} bool", name, value > 0, not_float)
        if name != "logits":  # logits of another float dtype are fine
            tensor(f"{name} float64", name, value.double(), "is float64, not the model's float32")
            tensor(f"{name} bfloat16", name, value.bfloat16(), "is bfloat16, not the model's float32")
        for bad in (float("nan"), float("inf"), float("-inf")):
            damaged = value.clone()
            damaged.view(-1)[damaged.numel() // 2] = bad
            tensor(f"{name} {bad}", name, damaged, f"'{name}' holds NaN or infinite values")
    for bad in (-0.01, 1.01):
        damaged = tensors["attn_probs"].clone()
        damaged.view(-1)[7] = bad
        tensor(f"attn_probs {bad}", "attn_probs", damaged, r"outside \[0, 1\]")
    tensor("unknown tensor", "weights", torch.zeros(3), "'weights' is no site")
    # Token ids: out of the vocabulary, not integers, of the wrong shape, missing.
    ids, vocab = tensors["token_ids"], model["vocab_size"]
    for label, bad, expected in (
        ("negative", torch.cat([ids[:-1], ids.new_tensor([-1])]), "-1, outside the vocabulary"),
        ("= vocab", torch.cat([ids[:-1], ids.new_tensor([vocab])]), f"{vocab}, outside the vocabulary"),
        ("huge", torch.cat([ids[:-1], ids.new_tensor([2**62])]), "outside the vocabulary"),
        ("float", ids.float(), "integers"),
        ("float64", ids.double(), "integers"),
        ("bool", ids > 0, "integers"),
        ("2-D", ids[None], "shape"),
        ("one short", ids[:-1], "shape"),
        ("one long", torch.cat([ids, ids[:1]]), "shape"),
        ("empty", ids[:0], "shape"),
        ("missing", None, "'token_ids' is missing"),
    ):
        tensor(f"token_ids {label}", "token_ids", bad, expected)
    return out


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated trace (prompt and continuation) of a grouped-query model with every site (probabilities stored,
    as every file before format 4 holds them; tests/test_lazy_attention.py checks files of q/k and recipes)."""
    out = tiny("llama").generate("Saved traces", generate=2, sites=[*lmscope.capture.ALL_SITES, "attn_probs_stored"])
    return out.save(tmp_path_factory.mktemp("traces") / "original.safetensors")


@pytest.fixture(scope="module")
def corpus(original: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Forgery, Path]]:
    meta, tensors = read_parts(original)
    folder = tmp_path_factory.mktemp("forged")
    cases = forgeries(meta, tensors)
    return [(case, write_parts(folder / f"{i}.safetensors", case.meta, case.tensors, case.checksums))
            for i, case in enumerate(cases)]  # fmt: skip


def one_line(error: pytest.ExceptionInfo[TraceFileError], path: Path) -> str:
    message = str(error.value)
    assert message.startswith(f"{path} ") and "\n" not in message and "Traceback" not in message
    assert message == f"{path} {error.value.problem}"
    return message


def test_forged_files_are_refused_naming_the_problem(corpus: list[tuple[Forgery, Path]]) -> None:
    assert len(corpus) > 250
    labels = [case.label for case, _ in corpus]
    assert len(set(labels)) == len(labels)
    for case, path in corpus:
        with pytest.raises(TraceFileError) as error:
            lmscope.load_trace(path)
        message = one_line(error, path)
        assert re.search(case.expected, message), (case.label, message)


def test_forgery_writer_writes_valid_files(original: Path, tmp_path: Path) -> None:
    """The corpus's writer, given the real contents, writes a file that loads equal to the real one."""
    meta, tensors = read_parts(original)
    again = lmscope.load_trace(write_parts(tmp_path / "again.safetensors", meta, tensors)).trace
    real = lmscope.load_trace(original).trace
    assert again.tokens == real.tokens and again.model == real.model and again.layers == real.layers
    assert all(torch.equal(again.tensors[name], real.tensors[name]) for name in real.tensors)


def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Where each tensor's bytes lie in a safetensors file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    start = 8 + size
    return {
        k: (start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def flipped(path: Path, offset: int, out: Path, mask: int = 0xFF) -> Path:
    """A copy of ``path`` with the byte at ``offset`` XOR ``mask``."""
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    out.write_bytes(bytes(data))
    return out


def test_single_byte_flips_in_tensor_data_are_caught(original: Path, tmp_path: Path) -> None:
    spans = tensor_spans(original)
    assert set(spans) == set(read_parts(original)[1])
    for name, (start, end) in spans.items():
        for offset in (start, (start + end) // 2, end - 1):
            path = flipped(original, offset, tmp_path / "flipped.safetensors")
            with pytest.raises(TraceFileError, match=f"is damaged: tensor '{name}' does not match its checksum"):
                lmscope.load_trace(path)


def test_byte_flips_in_the_header_are_caught(original: Path, tmp_path: Path) -> None:
    data = original.read_bytes()
    size = int.from_bytes(data[:8], "little")
    text = data[8 : 8 + size]
    # The metadata are JSON inside the header's JSON; a flip of the lowest bit keeps both valid.
    token = text.index(b'\\"tokens\\": [\\"') + len(b'\\"tokens\\": [\\"')  # the first token's first letter
    digit = text.index(b'\\"n_input\\": ') + len(b'\\"n_input\\": ')
    for offset in (token, digit):
        path = flipped(original, 8 + offset, tmp_path / "meta.safetensors", mask=0x01)
        with pytest.raises(TraceFileError, match="is damaged: its lmscope metadata do not match their checksum"):
            lmscope.load_trace(path)
    for offset in range(0, 8 + size, 7):  # every 7th byte of the length and the header
        with pytest.raises(TraceFileError):
            lmscope.load_trace(flipped(original, offset, tmp_path / "header.safetensors"))


def test_random_byte_changes_never_load_changed_values(original: Path, tmp_path: Path) -> None:
    """258 seeded changes of one byte anywhere in the file: each is refused, or reads exactly as before
    (as a space of the header's padding turned into another space does)."""
    real = lmscope.load_trace(original).trace
    size = original.stat().st_size
    generator = torch.Generator().manual_seed(20)
    offsets = torch.randint(0, size, (258,), generator=generator).tolist()
    masks = torch.randint(1, 256, (258,), generator=generator).tolist()
    refused = 0
    for offset, mask in zip(offsets, masks, strict=True):
        try:
            trace = lmscope.load_trace(flipped(original, offset, tmp_path / "changed.safetensors", mask)).trace
        except TraceFileError:
            refused += 1
            continue
        assert trace.tokens == real.tokens and trace.model == real.model and trace.n_input == real.n_input
        assert all(torch.equal(trace.tensors[name], real.tensors[name]) for name in real.tensors), (offset, mask)
    assert refused >= 250


def as_format_1(meta: dict[str, Any], early: bool = False) -> dict[str, Any]:
    """Metadata as lmscope wrote it before checksums (``early``: before attention factors too)."""
    meta = copy.deepcopy(meta)
    meta["version"] = 1
    del meta["checksums"], meta["model"]["n_neurons"]
    if early:
        del meta["attn_scaling"], meta["attn_softcap"], meta["segment_b"]
    return meta


def test_files_without_checksums_load_unchecked(original: Path, tmp_path: Path) -> None:
    meta, tensors = read_parts(original)
    real = lmscope.load_trace(original).trace
    for early in (False, True):
        path = tmp_path / f"format1-{early}.safetensors"
        with safe_open(str(original), framework="pt"):
            pass
        save_file(tensors, str(path), metadata={"lmscope": json.dumps(as_format_1(meta, early))})
        old = lmscope.load_trace(path).trace
        assert old.tokens == real.tokens and old.layers == real.layers and old.model.n_neurons is None
        assert old.attn_scaling == (() if early else real.attn_scaling)
        assert all(torch.equal(old.tensors[name], real.tensors[name]) for name in real.tensors)
        # The low byte of a float's mantissa changes a value a little, which nothing can notice.
        start, _ = tensor_spans(path)["resid_post"]
        changed = lmscope.load_trace(flipped(path, start, tmp_path / "changed.safetensors")).trace
        assert not torch.equal(changed.get("resid_post"), real.get("resid_post"))
        # Still checked for everything but the checksums: a model of other dimensions is refused.
        forged = as_format_1(meta, early)
        forged["model"]["d_model"] += 1
        save_file(tensors, str(path), metadata={"lmscope": json.dumps(forged)})
        with pytest.raises(TraceFileError, match="shape"):
            lmscope.load_trace(path)
    # A format 2 file must carry its checksums: one without them is refused.
    stripped = copy.deepcopy(meta)
    del stripped["checksums"]
    save_file(tensors, str(path), metadata={"lmscope": json.dumps(stripped)})
    with pytest.raises(TraceFileError, match="checksum"):
        lmscope.load_trace(path)


def test_every_family_and_dtype_writes_files_that_pass_the_checks(tmp_path: Path) -> None:
    """The checks accept what lmscope itself writes: every tiny family, bfloat16, pairs, no LM head."""
    for family in TINY_FAMILIES:
        out = tiny(family).trace("The keys to the cabinet", sites=lmscope.capture.ALL_SITES)
        loaded = lmscope.load_trace(out.save(tmp_path / f"{family}.safetensors")).trace
        assert loaded.model == out.trace.model and loaded.model.n_neurons == out.trace.get("mlp_act").shape[-1]
    half = lmscope.from_pretrained("tiny-llama", dtype="bfloat16").generate("Half", generate=2)
    assert lmscope.load_trace(half.save(tmp_path / "half.safetensors")).trace.model.dtype == "bfloat16"
    pair = tiny("bert").trace("The keys", text_pair="to the cabinet", sites=["attn_probs"])
    assert lmscope.load_trace(pair.save(tmp_path / "pair.safetensors")).trace.segment_b == pair.trace.segment_b
    headless = lmscope.from_pretrained("minilm-l6").trace("No head", sites=lmscope.capture.ALL_SITES)
    assert "logits" not in lmscope.load_trace(headless.save(tmp_path / "headless.safetensors")).trace.tensors
    few = tiny("gpt2").trace("Few layers", sites=["resid_post", "attn_probs"], layers=[0, 2])
    assert lmscope.load_trace(few.save(tmp_path / "few.safetensors")).trace.layers == (0, 2)


def test_saving_is_atomic_and_refusals_are_clear(tmp_path: Path) -> None:
    out = tiny("llama").trace("Written whole")
    with pytest.raises(LmscopeError, match="cannot write the trace"):
        out.save(tmp_path / "missing" / "t.safetensors")
    (tmp_path / "folder.safetensors").mkdir()
    with pytest.raises(LmscopeError, match="cannot write the trace"):
        out.save(tmp_path / "folder.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.safetensors"]  # no partial file left


def test_attach_compares_every_dimension(original: Path, tmp_path: Path) -> None:
    meta, tensors = read_parts(original)
    meta["model"]["n_neurons"] = 64
    tensors["mlp_act"] = tensors["mlp_act"][..., :64].contiguous()
    path = write_parts(tmp_path / "narrow.safetensors", meta, tensors)
    assert lmscope.load_trace(path).trace.get("mlp_act").shape[-1] == 64  # consistent in itself
    with pytest.raises(LmscopeError, match="n_neurons 128 vs 64"):
        tiny("llama").load_trace(path)


# --- The same corpus through the web app ------------------------------------------------------

OCTETS = {"Content-Type": "application/octet-stream"}


def test_app_refuses_every_forgery_and_keeps_working(corpus: list[tuple[Forgery, Path]], original: Path,
                                                     tmp_path: Path) -> None:  # fmt: skip
    from fastapi.testclient import TestClient

    from lmscope.app import create_app

    config = tmp_path / "app.json"
    folder = corpus[0][1].parent
    config.write_text(json.dumps({"default_model": "tiny-llama", "models": {"tiny-llama": "tiny-llama"},
                                  "max_input_tokens": 24, "max_generate": 4, "devices": ["cpu"],
                                  "allow_paths": True, "allowed_dirs": [str(folder)]}))  # fmt: skip
    client = TestClient(create_app(config), raise_server_exceptions=False)
    for case, path in corpus:
        response = client.post("/api/traces", headers=OCTETS, content=path.read_bytes())
        assert 400 <= response.status_code < 500, (case.label, response.status_code, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and tempfile.gettempdir() not in detail, detail
        assert re.search(case.expected, detail), (case.label, detail)
    for case, path in corpus[::10]:  # files opened by path on the server go through the same checks
        response = client.post("/api/traces/open", json={"path": str(path)})
        assert response.status_code == 400 and re.search(case.expected, response.json()["detail"]), case.label
    for name, (start, end) in tensor_spans(original).items():
        damaged = flipped(original, (start + end) // 2, tmp_path / "flipped.safetensors")
        response = client.post("/api/traces", headers=OCTETS, content=damaged.read_bytes())
        assert response.status_code == 400 and name in response.json()["detail"]
    # Afterwards every route still answers: a real trace uploads, and no route gives a 500.
    run = client.post("/api/traces", headers=OCTETS, content=original.read_bytes())
    assert run.status_code == 200, run.text
    run_id = run.json()["id"]
    fresh = client.post("/api/runs", json={"text": "Still working"})
    assert fresh.status_code == 200, fresh.text
    routes = [path for path, methods in client.app.openapi()["paths"].items() if "get" in methods]
    answers = {}
    for route in routes:
        url = route.replace("{run_id}", run_id).replace("{node_id}", "x").replace("{edge_id}", "x")
        answers[route] = client.get(url, params={"layer": 1, "watch": "the"}).status_code  # what some routes need
    assert all(status < 500 for status in answers.values()), answers
    assert sum(status == 200 for status in answers.values()) >= 12, answers
