"""Collections on disk: atomic files, the manifest last, resuming a stopped run, restarting it cleanly."""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import lmscope
import lmscope.analysis.collect  # the module (the package re-exports the function under the same name)
from conftest import tiny
from lmscope.errors import LmscopeError

COLLECT = sys.modules["lmscope.analysis.collect"]
STORAGE = sys.modules["lmscope.analysis._collection"]

TEXTS = [f"Sentence number {i} says {'more and ' * (i % 5)}something." for i in range(24)]
# shard_mb so small that every batch of 4 texts becomes its own shard: 6 shards
OPTIONS = dict(sites=("resid_post", "mlp_act"), layers=[0, 2], batch_size=4, progress=False, shard_mb=0.001)


def files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def fail_after(monkeypatch: pytest.MonkeyPatch, target: object, name: str, calls: int, error: BaseException) -> None:
    """Make ``target.name`` raise ``error`` on its call number ``calls + 1``."""
    real, count = getattr(target, name), [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    real, count = COLLECT._run_batch, [0]

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(COLLECT, "_run_batch", counting)
    return count


def assert_same(a: lmscope.Collection, b: lmscope.Collection) -> None:
    assert a.tokens == b.tokens and a.offsets == b.offsets and a.layers == b.layers
    for site in a.sites:
        for layer in a.layers:
            np.testing.assert_array_equal(a.get(site, layer), b.get(site, layer))


def test_a_stopped_collection_resumes_after_its_last_finished_shard(tmp_path: Path, monkeypatch) -> None:
    lm = tiny("llama")
    reference = lmscope.collect(lm, TEXTS, **OPTIONS)
    out = tmp_path / "acts"
    with monkeypatch.context() as patch:  # the fourth batch dies (an error, Ctrl+C, a killed process)
        fail_after(patch, COLLECT, "_run_batch", 3, KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    # three finished shards and the record of the run; no manifest, no temporary file
    assert files(out) == ["collection.partial.json", *(f"shard-{i:05d}.safetensors" for i in range(3))]
    assert json.loads((out / "collection.partial.json").read_text())["batches"] == 3
    with pytest.raises(LmscopeError, match=r"holds an unfinished collection: run lmscope\.collect again"):
        lmscope.load_collection(out)

    batches = count_batches(monkeypatch)
    resumed = lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    assert batches[0] == 3  # only the three batches not yet on disk ran
    assert files(out) == ["collection.json", *(f"shard-{i:05d}.safetensors" for i in range(6))]
    assert_same(resumed, reference)
    assert_same(lmscope.load_collection(out), reference)
    with pytest.raises(LmscopeError, match="already holds a collection"):
        lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)


def test_other_texts_or_settings_do_not_resume_but_can_restart(tmp_path: Path, monkeypatch) -> None:
    lm = tiny("llama")
    out = tmp_path / "acts"
    with monkeypatch.context() as patch:
        fail_after(patch, COLLECT, "_run_batch", 2, RuntimeError("stopped"))
        with pytest.raises(RuntimeError):
            lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    other = dict(OPTIONS, layers=[1])
    for texts, options in ((TEXTS[:-1], OPTIONS), (TEXTS, other)):
        with pytest.raises(LmscopeError, match=r"unfinished collection of other texts or settings.*restart"):
            lmscope.collect(lm, texts, out_dir=out, **options)
    batches = count_batches(monkeypatch)
    col = lmscope.collect(lm, TEXTS, out_dir=out, restart=True, **other)
    assert batches[0] == 6  # started over
    assert files(out) == ["collection.json", *(f"shard-{i:05d}.safetensors" for i in range(6))]
    assert_same(lmscope.load_collection(out), col)
    assert col.layers == (1,)


def test_shard_files_without_a_record_are_not_mixed_in(tmp_path: Path) -> None:
    lm = tiny("llama")
    (tmp_path / "shard-00000.safetensors").write_bytes(b"left over")
    with pytest.raises(LmscopeError, match="holds shard files but no collection"):
        lmscope.collect(lm, TEXTS, out_dir=tmp_path, **OPTIONS)
    lmscope.collect(lm, TEXTS, out_dir=tmp_path, restart=True, **OPTIONS)
    assert lmscope.load_collection(tmp_path).n_tokens > 0


def test_a_full_disk_leaves_no_truncated_shard_and_the_run_resumes(tmp_path: Path, monkeypatch) -> None:
    lm = tiny("llama")
    reference = lmscope.collect(lm, TEXTS, **OPTIONS)
    real = STORAGE._stream_safetensors
    calls = [0]

    def disk_fills(parts, file):  # the third shard gets half written, then the disk is full
        calls[0] += 1
        if calls[0] == 3:
            file.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(parts, file)

    monkeypatch.setattr(STORAGE, "_stream_safetensors", disk_fills)
    out = tmp_path / "acts"
    with pytest.raises(LmscopeError, match=r"shard-00002.safetensors: no space left on the device"):
        lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    assert files(out) == ["collection.partial.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    monkeypatch.setattr(STORAGE, "_stream_safetensors", real)  # space was freed
    assert_same(lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS), reference)


def test_a_full_disk_while_writing_the_manifest_leaves_a_resumable_run(tmp_path: Path, monkeypatch) -> None:
    lm = tiny("llama")
    out = tmp_path / "acts"
    real = STORAGE.write_json

    def manifest_fails(path, data):
        if path.name == "collection.json":
            raise LmscopeError(f"cannot write {path}: no space left on the device")
        return real(path, data)

    monkeypatch.setattr(COLLECT, "write_json", manifest_fails)
    with pytest.raises(LmscopeError, match="no space left"):
        lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    monkeypatch.setattr(COLLECT, "write_json", real)
    batches = count_batches(monkeypatch)
    lmscope.collect(lm, TEXTS, out_dir=out, **OPTIONS)
    assert batches[0] == 0  # every shard was on disk: only the manifest was written
    assert lmscope.load_collection(out).n_tokens == sum(len(lm.tokenizer(t)["input_ids"]) for t in TEXTS)


def test_out_dir_that_is_a_file_or_unwritable_is_one_clear_error(tmp_path: Path) -> None:
    lm = tiny("llama")
    a_file = tmp_path / "acts"
    a_file.write_text("not a folder")
    with pytest.raises(LmscopeError, match="is a file, not a folder"):
        lmscope.collect(lm, TEXTS, out_dir=a_file, **OPTIONS)
    with pytest.raises(LmscopeError, match="cannot create the folder"):
        lmscope.collect(lm, TEXTS, out_dir=a_file / "below", **OPTIONS)


def test_an_unwritable_out_dir_is_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    lm = tiny("llama")

    def refused(self, *args, **kwargs):  # as for a folder the user may not write to (tests may run as root)
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refused)
    with pytest.raises(LmscopeError, match=r"cannot create the folder .*acts: permission denied: choose a folder"):
        lmscope.collect(lm, TEXTS, out_dir=tmp_path / "acts", **OPTIONS)
    monkeypatch.undo()
    monkeypatch.setattr(COLLECT.os, "access", lambda path, mode: False)
    with pytest.raises(LmscopeError, match=r"cannot write into .*: permission denied"):
        lmscope.collect(lm, TEXTS, out_dir=tmp_path, **OPTIONS)


def test_shards_are_standard_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    lm = tiny("llama")
    col = lmscope.collect(lm, TEXTS, out_dir=tmp_path, **dict(OPTIONS, shard_mb=64))
    shard = load_file(str(tmp_path / "shard-00000.safetensors"))  # one shard holds everything
    assert sorted(shard) == ["dest", "mlp_act.0", "mlp_act.2", "resid_post.0", "resid_post.2"]
    order = np.argsort(shard["dest"])
    np.testing.assert_array_equal(shard["resid_post.2"][order], col.get("resid_post", 2))
    assert shard["dest"].dtype == np.int64 and shard["mlp_act.0"].dtype == np.float32
