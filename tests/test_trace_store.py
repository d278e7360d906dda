"""Disk-backed traces (``store=``): written layer by layer while the model runs, read memory-mapped.

A stored trace must equal the in-memory one tensor for tensor, every analysis must give the same
answer on it, the process must not hold it in memory, and a store that cannot be written, a file
deleted or cut short while in use, or a run interrupted half way are each one clear error that
leaves no file reading as a trace.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import lmscope
from conftest import CAUSAL_FAMILIES, FAMILIES, tiny
from lmscope.capture import ALL_SITES, load_trace
from lmscope.capture._store import parse_size, trace_size
from lmscope.cli import main
from lmscope.errors import LmscopeError

TEXT = "The keys to the cabinet are on the table, and the cat sat on the mat."


def _same_trace(a: lmscope.Trace, b: lmscope.Trace) -> None:
    assert sorted(b.sites) == sorted(a.sites)
    assert set(b.tensors) == set(a.tensors)
    for site in a.tensors:
        assert b.tensors[site].dtype == a.tensors[site].dtype, site
        assert torch.equal(b.tensors[site], a.tensors[site]), site
    for field in ("tokens", "n_input", "layers", "model", "attn_scaling", "attn_softcap", "segment_b"):
        assert getattr(b, field) == getattr(a, field), field
    assert torch.equal(b.token_ids, a.token_ids)
    if "attn_probs" in a.sites:  # computed on demand from q/k, or stored: the same either way
        assert torch.equal(b.get("attn_probs"), a.get("attn_probs"))


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_trace_equals_the_in_memory_one_for_every_site(family: str, tmp_path: Path) -> None:
    lm = tiny(family)
    for sites in (None, ALL_SITES, ["resid_pre", "attn_out"]):
        memory = lm.trace(TEXT, sites=sites).trace
        stored = lm.trace(TEXT, sites=sites, store=tmp_path).trace
        assert stored.stored is not None and stored.stored.parent == tmp_path
        _same_trace(memory, stored)
        _same_trace(memory, load_trace(stored.stored, mmap=True))  # the file is an ordinary trace file
        _same_trace(memory, load_trace(stored.stored, mmap=False))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial file left


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "mixtral", "gemma2", "cohere", "bert"])
def test_stored_logits_written_in_blocks_equal_the_plain_forward(family: str, tmp_path: Path, monkeypatch) -> None:
    """A stored trace takes its logits from the model's own head a block of positions at a time (never
    the whole [pos, vocab] at once), bit for bit those of a plain forward; models that change their head's
    output (soft-capping, logit scale) or take no ``logits_to_keep`` keep the model's logits."""
    from lmscope.capture import _run

    monkeypatch.setattr(_run, "_LOGIT_ROWS", 3)  # blocks of 8 rows (the fewest taken), the last one short
    lm = tiny(family)
    stored = lm.trace(TEXT, store=tmp_path).trace
    with torch.no_grad():
        plain = lm.loaded.model(input_ids=stored.token_ids[None]).logits[0]
    assert stored.tensors["logits"].shape == plain.shape
    assert torch.equal(stored.tensors["logits"], plain)
    assert torch.equal(load_trace(stored.stored, mmap=False).tensors["logits"], plain)  # checksums hold
    if family in ("gemma2", "cohere", "bert"):
        assert not _run._logits_by_blocks(lm.loaded)
    else:
        assert _run._logits_by_blocks(lm.loaded)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_every_analysis_is_unchanged_on_a_stored_trace(family: str, tmp_path: Path) -> None:
    lm = tiny(family)
    memory, stored = lm.trace(TEXT), lm.trace(TEXT, store=tmp_path / "run.safetensors")
    assert stored.trace.stored == tmp_path / "run.safetensors"
    assert str(stored.layer_predictions(position=-1, topk=5)) == str(memory.layer_predictions(position=-1, topk=5))
    assert str(stored.rankings()) == str(memory.rankings())
    watch = [" the", " cat"]
    assert str(stored.rankings_watch(watch, position=-1)) == str(memory.rankings_watch(watch, position=-1))
    assert stored.flow().to_dict() == memory.flow().to_dict()
    assert stored.attention(1).to_dict() == memory.attention(1).to_dict()
    assert str(stored.run_nmf(n_components=2)) == str(memory.run_nmf(n_components=2))


def test_saliency_and_generation_with_a_store(tmp_path: Path) -> None:
    lm = tiny("llama")
    memory = lm.generate(TEXT, generate=3)
    stored = lm.generate(TEXT, generate=3, store=tmp_path)  # generates in memory, then traces to the store
    assert stored.tokens == memory.tokens and stored.n_input == memory.n_input
    _same_trace(memory.trace, stored.trace)
    a = memory.primary_attributions(attr_method="grad_x_input")
    b = stored.primary_attributions(attr_method="grad_x_input")
    for x, y in zip(a.attributions, b.attributions, strict=True):
        assert torch.allclose(torch.as_tensor(x), torch.as_tensor(y))


@pytest.mark.embedded
def test_embedded_model_stored_trace_and_analyses(embedded, tmp_path: Path) -> None:
    memory, stored = embedded.trace(TEXT), embedded.trace(TEXT, store=tmp_path)
    _same_trace(memory.trace, stored.trace)
    assert str(stored.layer_predictions(position=-1)) == str(memory.layer_predictions(position=-1))
    assert str(stored.rankings_watch([" the"], position=-1)) == str(memory.rankings_watch([" the"], position=-1))
    assert stored.flow().to_dict() == memory.flow().to_dict()
    assert stored.attention(5).to_dict() == memory.attention(5).to_dict()
    reloaded = embedded.load_trace(stored.trace.stored)  # with the model attached
    assert str(reloaded.rankings()) == str(memory.rankings())


def test_saving_a_stored_trace_copies_its_file(tmp_path: Path) -> None:
    out = tiny("gpt2").trace(TEXT, store=tmp_path / "a.safetensors")
    copy = out.trace.save(tmp_path / "b.safetensors")
    assert copy.read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    _same_trace(out.trace, load_trace(copy))
    assert out.trace.save(tmp_path / "a.safetensors") == tmp_path / "a.safetensors"  # onto itself: kept as it is
    assert str(out.rankings()) == str(tiny("gpt2").trace(TEXT).rankings())


def test_a_stored_trace_copied_or_pickled_maps_its_file_again(tmp_path: Path) -> None:
    trace = tiny("llama").trace(TEXT, store=tmp_path).trace
    pickled = pickle.dumps(trace)
    assert len(pickled) < 10_000  # the file's path, not its tensors
    for other in (copy.deepcopy(trace), pickle.loads(pickled)):
        assert other.stored == trace.stored and other.tensors is not trace.tensors
        _same_trace(trace, other)


def test_the_estimate_is_close_to_what_a_trace_holds() -> None:
    lm = tiny("llama")
    for sites in (None, ["resid_post"], ALL_SITES, ["attn_probs_stored", "v"]):
        trace = lm.trace(TEXT, sites=sites).trace
        n_bytes = sum(t.numel() * t.element_size() for t in trace.tensors.values())
        assert abs(trace_size(lm, trace.n_pos, sites) - n_bytes) <= 0.1 * n_bytes, sites


def test_sizes_are_read_with_their_units() -> None:
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size("2G") == 2 * 2**30
    assert parse_size(" 1.5 kb") == 1500 and parse_size(1024) == 1024
    for bad in ("", "GiB", "12XB", "-1GB", "0", "nan"):
        with pytest.raises(LmscopeError, match="is not a size"):
            parse_size(bad)


# -- bad input ----------------------------------------------------------------------------------


def test_a_store_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    lm = tiny("gpt2")
    (tmp_path / "file").write_text("x")
    for where in (tmp_path / "missing" / "t.safetensors", tmp_path / "file" / "t.safetensors"):
        with pytest.raises(LmscopeError, match=r"cannot store the trace at .*does not exist"):
            lm.trace(TEXT, store=where)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(LmscopeError, match=r"cannot store the trace at .*[Pp]ermission denied"):
            lm.trace(TEXT, store=locked)
    with pytest.raises(LmscopeError, match="encoder-decoder model: store= does not support"):
        tiny("t5").trace("translate: hello", store=tmp_path)


def test_a_file_deleted_or_cut_short_in_use_is_a_clear_error(tmp_path: Path) -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT, store=tmp_path / "cut.safetensors")
    out.layer_predictions(position=-1)
    os.truncate(out.trace.stored, 4096)  # a bus error if a mapped page past the end were read
    with pytest.raises(LmscopeError, match=r"cut\.safetensors was truncated to 4096 bytes while in use"):
        out.layer_predictions(position=-1)
    with pytest.raises(LmscopeError, match="truncated"):
        out.flow()
    with pytest.raises(LmscopeError, match="truncated: 4096 bytes"):
        load_trace(out.trace.stored, mmap=True)
    out = lm.trace(TEXT, store=tmp_path / "gone.safetensors")
    out.trace.stored.unlink()
    with pytest.raises(LmscopeError, match=r"gone\.safetensors was deleted or replaced while in use"):
        out.rankings()


def test_a_damaged_stored_file_is_refused_when_mapped(tmp_path: Path) -> None:
    path = tiny("gpt2").trace(TEXT, store=tmp_path / "t.safetensors").trace.stored
    data = bytearray(path.read_bytes())
    data[-9] ^= 0x01  # a bit of the logits
    path.write_bytes(bytes(data))
    with pytest.raises(LmscopeError, match="is damaged: tensor 'logits' does not match its checksum"):
        load_trace(path, mmap=True)
    with pytest.raises(LmscopeError, match="is damaged: tensor 'logits' does not match its checksum"):
        load_trace(path, mmap=False)


def test_an_interrupted_run_leaves_no_trace_file(tmp_path: Path) -> None:
    lm = tiny("llama")

    def fail(module, args, output):
        raise RuntimeError("stopped half way")

    handle = lm.arch.blocks[1].register_forward_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="stopped half way"):
            lm.trace(TEXT, store=tmp_path / "t.safetensors")
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []  # neither the file nor its partial twin


# -- memory -------------------------------------------------------------------------------------

_PEAK = textwrap.dedent(
    """
    import gc, json, sys, lmscope

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    lm = lmscope.from_pretrained(sys.argv[1] or None)
    text, store = " ".join(["The keys to the cabinet are on the table."] * int(sys.argv[2])), sys.argv[3]
    lm.trace(text[:200], store=store)  # warm up
    runs = {}
    for name, sites, where in (("one site", ["resid_post"], store), ("stored", None, store), ("memory", None, None)):
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak so far is forgotten: VmHWM restarts from the current RSS
        out = lm.trace(text, sites=sites, store=where)
        out.layer_predictions(position=-1)
        runs[name] = {"growth": status("VmHWM") - before, "nbytes": out.trace.nbytes()}
        del out
        gc.collect()
    print(json.dumps(runs))
    """
)


@pytest.mark.embedded
def test_a_stored_trace_is_not_held_in_memory(tmp_path: Path) -> None:
    """The memory a stored run takes does not grow with what it captures (about 300 tokens, embedded model)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _PEAK, "", "30", str(tmp_path)], stdout=subprocess.PIPE, text=True,
                          env=env, timeout=900, check=True)  # fmt: skip
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    base, stored, memory = runs["one site"]["growth"], runs["stored"], runs["memory"]
    n_bytes = memory["nbytes"]  # in memory resid_pre and resid_post share a buffer; the file holds both
    assert stored["nbytes"] >= n_bytes > 200 * 2**20
    assert memory["growth"] > base + 0.5 * n_bytes  # in memory: the trace (some of it in the forward's freed space)
    assert stored["growth"] < base + 0.1 * n_bytes, runs  # about one layer's tensors more


# -- command line -------------------------------------------------------------------------------


def test_the_command_line_traces_to_disk_over_max_memory(capsys, tmp_path: Path) -> None:
    base = ["flow", TEXT, "--model", "tiny-llama", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*base, "--max-memory", "1GiB"]) == 0  # under the limit: in memory, nothing said
    captured = capsys.readouterr()
    assert json.loads(captured.out) == plain and captured.err == ""
    assert main([*base, "--max-memory", "10KB", "--store", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == plain
    (line,) = captured.err.splitlines()
    assert line.startswith("lmscope: the trace of 18 tokens would take about ") and str(tmp_path) in line
    assert len(list(tmp_path.glob("trace-*.safetensors"))) == 1
    assert main(["lens", TEXT, "--model", "tiny-llama", "--max-memory", "12XB"]) == 2
    assert "'12XB' is not a size" in capsys.readouterr().err


# -- web app ------------------------------------------------------------------------------------


def test_the_app_stores_runs_over_max_trace_mb(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lmscope.app import create_app

    (tmp_path / "traces").mkdir()
    config = {"models": {"tiny-llama": "tiny-llama"}, "run_cache_size": 2, "max_trace_mb": 0.01,
              "trace_dir": "traces"}  # fmt: skip
    (tmp_path / "app.json").write_text(json.dumps(config))
    client = TestClient(create_app(tmp_path / "app.json"))
    runs = []
    for text in (TEXT, "The cat sat on the mat", "Hello there, my friend"):
        reply = client.post("/api/runs", json={"text": text})
        assert reply.status_code == 200, reply.text
        runs.append(reply.json())
        want = tiny("llama").trace(text).layer_predictions(position=-1)
        lens = client.get(f"/api/runs/{runs[-1]['id']}/lens", params={"position": -1}).json()
        assert lens["text"] == str(want)
        flow = client.get(f"/api/runs/{runs[-1]['id']}/flow").json()
        assert flow["text"] == str(tiny("llama").trace(text).flow())
    # two runs are kept: the first one's file went with it
    assert len(list((tmp_path / "traces").glob("trace-*.safetensors"))) == 2
    with pytest.raises(LmscopeError, match="max_trace_mb"):
        from lmscope.app import load_config

        (tmp_path / "bad.json").write_text(json.dumps({**config, "max_trace_mb": -1}))
        load_config(tmp_path / "bad.json")
