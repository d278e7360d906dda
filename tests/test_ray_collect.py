"""Collection on Ray: a local cluster of 2 worker processes on this machine collects exactly what one process does.

One cluster serves the whole file (Ray takes seconds to start); it is shut down at the end and no Ray
process of it may outlive the tests. The model is a tiny random Llama, the corpus 24 short texts cut into
6 shards (``shard_mb`` so small that every batch of 4 texts is its own shard).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lmscope
import lmscope.distributed._collect  # the module (the package re-exports names from it)
from conftest import tiny
from lmscope.cli import main
from lmscope.distributed._cluster import end_processes
from lmscope.distributed._worker import EXIT_HOOK, check_folder
from lmscope.errors import LmscopeError

ray = pytest.importorskip("ray")
DRIVER = sys.modules["lmscope.distributed._collect"]

TEXTS = [f"Sentence number {i} says {'more and ' * (i % 5)}something." for i in range(24)]
OPTIONS = dict(sites=("resid_post", "mlp_act"), batch_size=4, shard_mb=0.001)
RAY = dict(engine="ray", workers=2)
SHARDS = 6


def env() -> dict[str, str]:
    """This process's environment (after ``ray.init``, which sets the cluster's token mode) for a subprocess."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for probe in sockets:
        probe.bind(("127.0.0.1", 0))
    ports = [probe.getsockname()[1] for probe in sockets]
    for probe in sockets:
        probe.close()
    return ports


@pytest.fixture(scope="module")
def cluster() -> str:
    """A Ray cluster on this machine (``ray start --head``, 2 CPUs, so 2 workers of 1 CPU) that the tests join.

    Its session files go to a temporary folder, and every process of it is ended at the end. Its ports
    are fixed in advance, so its start does not wait on the agents' port files (on a busy machine that
    wait can time out). Token authentication is off: the cluster listens on this machine only for a few
    seconds of tests.
    """
    folder = tempfile.mkdtemp(prefix="lmscope-ray-test-")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        for attempt in range(3):  # a machine busy with other work can make Ray's start time out
            gcs, agent_grpc, agent_listen, runtime_env = free_ports(4)
            command = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--num-cpus", "2"]
            command += ["--num-gpus", "0", "--include-dashboard", "false", "--disable-usage-stats"]
            command += ["--temp-dir", folder, "--port", str(gcs), "--runtime-env-agent-port", str(runtime_env)]
            command += [
                "--dashboard-agent-grpc-port",
                str(agent_grpc),
                "--dashboard-agent-listen-port",
                str(agent_listen),
            ]
            started = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env())
            found = re.search(r"--address='([^']+)'", started.stdout + started.stderr)
            if started.returncode == 0 and found:
                break
            end_processes(folder)
            assert attempt < 2, (started.stdout + started.stderr)[-2000:]
        ray.init(address=found.group(1), log_to_driver=False, logging_level=logging.ERROR)
        yield found.group(1)
    finally:
        ray.shutdown()
        left = end_processes(folder)
        shutil.rmtree(folder, ignore_errors=True)
        if saved is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved
        assert not left, f"Ray processes outlived the tests: {left}"


@pytest.fixture(scope="module")
def lm() -> lmscope.LM:
    lm = tiny("llama")
    # A model that has recorded its outputs once carries transformers' capture hooks (closures,
    # which do not pickle), as a model shared with earlier work does.
    with torch.no_grad():
        lm.model(torch.tensor([[1, 2, 3]]), output_attentions=True)
    return lm


def hook_count(lm: lmscope.LM) -> int:
    return sum(len(m._forward_hooks) for m in lm.model.modules())


@pytest.fixture(scope="module")
def reference(lm: lmscope.LM, tmp_path_factory: pytest.TempPathFactory) -> lmscope.Collection:
    """The single-process collection, on disk, on one torch thread as each Ray worker runs (torch's sums
    can differ in their last bits between thread counts, and the shards are compared byte for byte)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return lmscope.collect(lm, TEXTS, out_dir=tmp_path_factory.mktemp("single") / "acts", progress=False, **OPTIONS)
    finally:
        torch.set_num_threads(threads)


def assert_same(a: lmscope.Collection, b: lmscope.Collection, shards: int = SHARDS) -> None:
    """Same texts, tokens in the same order, equal values, and byte-identical shard files."""
    assert a.texts == b.texts and a.tokens == b.tokens and a.token_ids == b.token_ids and a.offsets == b.offsets
    assert a.sites == b.sites and a.layers == b.layers and a.features == b.features and a.model == b.model
    assert a.stack == b.stack and a.targets == b.targets and a.source_token_ids == b.source_token_ids
    for site in a.sites:
        for layer in a.layers:
            np.testing.assert_array_equal(a.get(site, layer), b.get(site, layer))
    names = sorted(p.name for p in a.root.glob("shard-*"))
    assert names == sorted(p.name for p in b.root.glob("shard-*")) and len(names) == shards
    assert all((a.root / n).read_bytes() == (b.root / n).read_bytes() for n in names)


def manifest(col: lmscope.Collection) -> dict:
    return json.loads((col.root / "collection.json").read_text())


def test_ray_collection_equals_the_single_process_one(cluster, lm, reference, tmp_path, capsys) -> None:
    hooks = hook_count(lm)
    assert hooks > 0
    col = lmscope.collect(lm, TEXTS, out_dir=tmp_path / "acts", progress=True, **OPTIONS, **RAY)
    assert hook_count(lm) == hooks  # the model's own hooks are back after it was sent to the workers
    assert_same(reference, col)
    assert_same(reference, lmscope.load_collection(tmp_path / "acts"))
    meta = manifest(col)
    assert meta["engine"] == "ray" and meta["workers"] == 2 and meta["shards"] == [p.name for p in col._shards]
    assert sum(meta["shard_tokens"]) == col.n_tokens and meta["shard_tokens"] == manifest(reference)["shard_tokens"]
    timings = meta["timings"]
    assert timings["shards_retried"] == 0 and timings["seconds"] > 0 and timings["tokens_per_second"] > 0
    assert [s["attempts"] for s in timings["shards"]] == [1] * SHARDS
    assert manifest(reference)["engine"] == "local"
    err = capsys.readouterr().err  # the progress bar: shards, tokens/s, workers alive, shards retried
    assert f"{SHARDS}/{SHARDS}" in err and "tok/s" in err and "2/2 workers" in err and "0 retried" in err


def test_a_worker_that_dies_mid_shard_has_its_shard_redone(cluster, lm, reference, tmp_path, monkeypatch) -> None:
    died = tmp_path / "died"
    monkeypatch.setenv(EXIT_HOOK, f"2:{died}")  # the first worker to reach shard 2 exits after its first batch
    col = lmscope.collect(lm, TEXTS, out_dir=tmp_path / "acts", progress=False, **OPTIONS, **RAY)
    assert died.is_file()  # a worker process really died
    timings = manifest(col)["timings"]
    assert timings["shards_retried"] == 1
    assert [s["attempts"] for s in timings["shards"]] == [1, 1, 2, 1, 1, 1]
    assert_same(reference, col)


class Stop(Exception):
    pass


def test_a_stopped_job_resumes_after_its_complete_shards(cluster, lm, reference, tmp_path, monkeypatch) -> None:
    finished = []

    def stop_after_two(number: int) -> None:
        finished.append(number)
        if len(finished) == 2:
            raise Stop

    monkeypatch.setattr(DRIVER, "_after_shard", stop_after_two)
    out = tmp_path / "acts"
    with pytest.raises(Stop):
        lmscope.collect(lm, TEXTS, out_dir=out, progress=False, **OPTIONS, **RAY)
    monkeypatch.setattr(DRIVER, "_after_shard", None)
    assert not (out / "collection.json").exists()
    with pytest.raises(LmscopeError, match="unfinished collection"):
        lmscope.load_collection(out)
    complete = {int(p.name[6:11]) for p in out.glob("shard-*")}
    assert set(finished) <= complete and len(complete) < SHARDS
    # what a worker killed while writing leaves: a temporary file, and (a damaged disk) a truncated shard
    (out / ".lmscope-tmp-0000abcd-shard-00005.safetensors").write_bytes(b"half a shard")
    broken = min(set(range(SHARDS)) - complete)
    (out / f"shard-{broken:05d}.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{truncated")
    local = tmp_path / "local"
    shutil.copytree(out, local)

    col = lmscope.collect(lm, TEXTS, out_dir=out, progress=False, **OPTIONS, **RAY)
    redone = {i for i, s in enumerate(manifest(col)["timings"]["shards"]) if not s.get("resumed")}
    assert redone == set(range(SHARDS)) - complete  # complete shards kept, partial and missing ones redone
    assert not list(out.glob(".lmscope-tmp-*")) and not (out / "collection.partial.json").exists()
    assert_same(reference, col)
    # the single-process engine resumes a stopped Ray job too (the same plan, the same shards; on one
    # thread, as the workers ran, so the shards it redoes are equal bit for bit)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert_same(reference, lmscope.collect(lm, TEXTS, out_dir=local, progress=False, **OPTIONS))
    finally:
        torch.set_num_threads(threads)


def test_either_stack_of_an_encoder_decoder_model_on_ray(cluster, tmp_path, monkeypatch) -> None:
    """The encoder over sources, and the decoder over (source, target) pairs, exactly as one process
    collects them: the encoder's job stopped and run again, the decoder's with a worker dying mid-shard."""
    t5, sources = tiny("t5"), TEXTS[:12]
    targets = [f"Satz {i} sagt {'mehr und ' * (i % 3)}etwas." for i in range(12)]
    options = dict(batch_size=4, shard_mb=0.001, progress=False)  # 3 shards
    # the references on one torch thread, as each worker runs (for some of T5's shapes, torch's sums
    # differ in the last bits between thread counts)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder_local = lmscope.collect(t5, sources, out_dir=tmp_path / "enc-local", **options)
        decoder = dict(targets=targets, sites=("resid_post", "cross_attn_out"), **options)
        local = lmscope.collect(t5, sources, out_dir=tmp_path / "dec-local", **decoder)
    finally:
        torch.set_num_threads(threads)

    def stop_after_one(number: int) -> None:
        raise Stop

    out = tmp_path / "enc-ray"
    monkeypatch.setattr(DRIVER, "_after_shard", stop_after_one)
    with pytest.raises(Stop):
        lmscope.collect(t5, sources, out_dir=out, **options, **RAY)
    monkeypatch.setattr(DRIVER, "_after_shard", None)
    complete = {int(p.name[6:11]) for p in out.glob("shard-*")}
    assert 1 <= len(complete) < 3
    encoder_ray = lmscope.collect(t5, sources, out_dir=out, **options, **RAY)
    redone = {i for i, s in enumerate(manifest(encoder_ray)["timings"]["shards"]) if not s.get("resumed")}
    assert redone == {0, 1, 2} - complete  # complete shards kept, the others redone
    assert encoder_ray.stack == "encoder" and encoder_ray.layers == tuple(range(t5.arch.encoder.n_layers))
    assert_same(encoder_local, encoder_ray, shards=3)
    assert manifest(encoder_ray)["stack"] == "encoder"

    died = tmp_path / "died"
    monkeypatch.setenv(EXIT_HOOK, f"1:{died}")  # the first worker to reach shard 1 exits after its first batch
    col = lmscope.collect(t5, sources, out_dir=tmp_path / "dec-ray", **decoder, **RAY)
    assert died.is_file() and manifest(col)["timings"]["shards_retried"] == 1
    assert col.stack == "decoder" and col.layers == tuple(range(t5.arch.n_layers)) and col.targets == tuple(targets)
    assert_same(local, col, shards=3)
    assert_same(local, lmscope.load_collection(tmp_path / "dec-ray"), shards=3)


def test_the_command_line_joins_a_running_cluster(cluster, reference, tmp_path) -> None:
    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "acts"
    argv = [
        "collect",
        "--file",
        str(corpus),
        "--out",
        str(out),
        "--model",
        "tiny-llama",
        "--sites",
        "resid_post,mlp_act",
    ]
    argv += ["--batch-size", "4", "--shard-mb", "0.001", "--engine", "ray", "--address", cluster, "--workers", "2"]
    done = subprocess.run([sys.executable, "-m", "lmscope", *argv, "--json"], capture_output=True, text=True, env=env())
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["texts"] == len(TEXTS) and summary["tokens"] == reference.n_tokens
    assert_same(reference, lmscope.load_collection(out))


def test_bad_input_is_one_clear_error(cluster, lm, tmp_path, capsys) -> None:
    def fails(argv: list[str], message: str) -> None:
        began = time.monotonic()
        assert main(argv) in (1, 2)
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert time.monotonic() - began < 15  # no hang

    corpus = tmp_path / "texts.txt"
    corpus.write_text("A first text.\nA second text.\n")
    common = ["--out", str(tmp_path / "acts"), "--model", "tiny-llama", "--engine", "ray"]
    # an address where no cluster answers (a port nobody listens on), and one that does not parse
    fails(["collect", "--file", str(corpus), *common, "--address", "127.0.0.1:9"], "no Ray cluster answers")
    fails(["collect", "--file", str(corpus), *common, "--address", "somewhere"], "is not HOST:PORT")
    # a corpus file that is empty, or not text
    (tmp_path / "empty.txt").write_text("\n \n")
    fails(["collect", "--file", str(tmp_path / "empty.txt"), *common], "holds no texts: give a file of texts")
    (tmp_path / "binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    fails(["collect", "--file", str(tmp_path / "binary.bin"), *common], "is not UTF-8 text")
    (tmp_path / "nul.txt").write_bytes(b"text\x00with\x00nul bytes\n")
    fails(["collect", "--file", str(tmp_path / "nul.txt"), *common], "is not a text file")
    # Ray options without the Ray engine
    fails(["collect", "--file", str(corpus), "--out", str(tmp_path / "x"), "--workers", "2"], "need --engine ray")
    # a folder that holds another model's collection, finished or not
    other = tmp_path / "other"
    lmscope.collect(tiny("gpt2"), TEXTS[:3], out_dir=other, progress=False)
    with pytest.raises(LmscopeError, match="already holds a collection of tiny-gpt2: choose a new folder"):
        lmscope.collect(lm, TEXTS, out_dir=other, progress=False, **OPTIONS, **RAY)
    (other / "collection.json").rename(other / "collection.partial.json")
    partial = json.loads((other / "collection.partial.json").read_text())
    (other / "collection.partial.json").write_text(json.dumps({**partial, "plan": "another", "batches": 1}))
    with pytest.raises(LmscopeError, match="unfinished collection of other texts or settings"):
        lmscope.collect(lm, TEXTS, out_dir=other, progress=False, **OPTIONS, **RAY)
    # more workers than the cluster holds: a clear error, not actors waiting for ever
    with pytest.raises(LmscopeError, match="has 2 CPUs and 0 GPUs: not enough for 5 workers of 1 CPUs"):
        lmscope.collect(lm, TEXTS, out_dir=tmp_path / "many", progress=False, **OPTIONS, engine="ray", workers=5)
    # a folder a worker cannot write (on another machine it may not exist, or be read-only)
    assert "cannot write into" in check_folder(tmp_path / "missing" / "acts")
    (tmp_path / "a_file").write_text("")
    assert "cannot write into" in check_folder(tmp_path / "a_file" / "acts")
    assert check_folder(tmp_path) is None
    with pytest.raises(LmscopeError, match="give out_dir"):
        lmscope.collect(lm, TEXTS, progress=False, **RAY)
    with pytest.raises(LmscopeError, match="engine='ray' only"):
        lmscope.collect(lm, TEXTS, progress=False, workers=2)
    with pytest.raises(LmscopeError, match="engine must be"):
        lmscope.collect(lm, TEXTS, progress=False, engine="spark")


def test_without_ray_the_engine_names_the_extra_and_nothing_imports_ray(tmp_path, monkeypatch, capsys) -> None:
    code = "import sys, lmscope, lmscope.cli, lmscope.distributed; print('ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env())
    assert done.stdout.strip() == "False", done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(LmscopeError, match=r"pip install 'lmscope\[distributed\]'"):
        lmscope.collect(tiny("llama"), TEXTS, out_dir=tmp_path / "acts", progress=False, engine="ray")
    assert main(["collect", "A text.", "--out", str(tmp_path / "b"), "--model", "tiny-llama", "--engine", "ray"]) == 2
    assert "pip install 'lmscope[distributed]'" in capsys.readouterr().err


class Ref:
    def __init__(self, value: object):
        self.value = value


class FakeRay:
    """Just enough of Ray for the driver's loop: calls run at once, and a script says which ones fail."""

    exceptions = ray.exceptions

    def __init__(self, script: dict[tuple[str, int], list[BaseException | None]]):
        self.script, self.calls = script, []

    def actor(self, index: int) -> object:
        fake = self

        class Method:
            def __init__(self, name: str):
                self.name = name

            def remote(self, *args):
                fake.calls.append((self.name, index, args[0] if args else None))
                failures = fake.script.get((self.name, index), [])
                error = failures.pop(0) if failures else None
                if error is not None:
                    return Ref(error)
                if self.name == "check":
                    return Ref({"error": None})
                return Ref({"number": args[0], "tokens": 10, "seconds": 0.01, "host": "fake"})

        return type("Actor", (), {"run": Method("run"), "check": Method("check")})()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:1], refs[1:]

    def get(self, ref):
        if isinstance(ref.value, BaseException):
            raise ref.value
        return ref.value


def test_the_driver_redoes_a_dead_workers_shard_and_waits_for_its_restart() -> None:
    died = ray.exceptions.ActorDiedError()
    restarting = ray.exceptions.ActorUnavailableError("The actor is restarting", None)
    fake = FakeRay({("run", 0): [None, died], ("check", 0): [restarting, restarting]})
    run = object.__new__(DRIVER._Run)
    run.ray, run.actors = fake, [fake.actor(0)]  # one worker: the job must wait for its restart
    run.job = type("Job", (), {"sites": ("resid_post",), "layers": (0,), "pad": 0, "stack": None})()
    done: set[int] = set()
    timings, retried = run.collect([0, 1, 2, 3, 4], {n: [] for n in range(5)}, [10] * 5, done, lambda: None, False, 5)
    assert done == set(range(5)) and retried == 1
    assert [timings[n]["attempts"] for n in range(5)] == [1, 2, 1, 1, 1]  # its second shard was redone
    checks = [call for call in fake.calls if call[0] == "check"]
    assert len(checks) == 3  # probed until the restarted worker answered, then handed shards again
    assert fake.calls[-1][0] == "run"


def test_a_shard_whose_workers_keep_dying_is_a_clear_error() -> None:
    died = ray.exceptions.ActorDiedError()
    fake = FakeRay({("run", 0): [died] * 9, ("run", 1): [died] * 9})
    run = object.__new__(DRIVER._Run)
    run.ray, run.actors = fake, [fake.actor(0), fake.actor(1)]
    run.job = type("Job", (), {"sites": ("resid_post",), "layers": (0,), "pad": 0, "stack": None})()
    with pytest.raises(LmscopeError, match="failed 4 times, its worker dying each time"):
        run.collect([0, 1], {n: [] for n in range(2)}, [10] * 2, set(), lambda: None, False, 2)


class FirstShards(DRIVER.Helper):
    """The driver's helper, told that the workers are ready once it has taken ``LIMIT`` shards."""

    LIMIT = 2

    def _take(self) -> int | None:
        if len(self.done) >= self.LIMIT:  # (shards are taken one at a time, each done before the next)
            return None
        return super()._take()


def test_while_local_workers_start_the_driver_collects_the_first_shards(
    cluster, lm, reference, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(DRIVER, "_starts_local", lambda address: True)  # as if this job started the cluster
    monkeypatch.setattr(DRIVER, "Helper", FirstShards)
    col = lmscope.collect(lm, TEXTS, out_dir=tmp_path / "acts", progress=False, **OPTIONS, **RAY)
    assert_same(reference, col)
    timings = manifest(col)["timings"]
    assert timings["driver_shards"] == 2 and timings["shards_retried"] == 0
    assert [s.get("worker") for s in timings["shards"]] == ["driver", "driver", None, None, None, None]
    assert [s["attempts"] for s in timings["shards"]] == [1] * SHARDS
    assert not [t for t in threading.enumerate() if t.name == "lmscope-driver-shards"]


def test_an_error_in_the_drivers_shards_stops_the_job(cluster, lm, tmp_path, monkeypatch) -> None:
    collect_module = sys.modules["lmscope.analysis.collect"]  # (the package's name "collect" is the function)

    def broken(*args, **kwargs):
        raise RuntimeError("the driver's batch failed")

    monkeypatch.setattr(DRIVER, "_starts_local", lambda address: True)
    monkeypatch.setattr(collect_module, "batch_part", broken)  # the driver's shards only: workers are processes
    out = tmp_path / "acts"
    with pytest.raises(RuntimeError, match="the driver's batch failed"):
        lmscope.collect(lm, TEXTS, out_dir=out, progress=False, **OPTIONS, **RAY)
    assert not (out / "collection.json").exists() and (out / "collection.partial.json").exists()
    assert not [t for t in threading.enumerate() if t.name == "lmscope-driver-shards"]
