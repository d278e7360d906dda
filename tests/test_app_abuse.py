"""The web app under abuse, in process: cost limits, the config schema, odd but legal input, one
cache key per model, foreign hosts and cross-site writes, and the job queue and its cancellation.
(Real servers under load, cancellation by disconnect, uploads and shutdown: ``test_app_abuse_server``.)"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

import lmscope
from conftest import tiny
from lmscope.app import create_app, load_config
from lmscope.app._jobs import Busy, Cancelled, Jobs, cancellable
from test_app_api import TEXT, error, post_run, upload, write_config


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config directory whose allowed directory holds a model, a pickle-only model and a symlink loop."""
    root = tmp_path_factory.mktemp("abuse")
    lm = tiny("gpt2")
    (root / "allowed").mkdir()
    lm.model.save_pretrained(root / "allowed" / "model")
    lm.tokenizer.save_pretrained(root / "allowed" / "model")
    pickled = root / "allowed" / "pickled"
    pickled.mkdir()
    lm.model.config.save_pretrained(pickled)
    lm.tokenizer.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))  # no safetensors: only a pickle
    (root / "allowed" / "loop-a").symlink_to(root / "allowed" / "loop-b")
    (root / "allowed" / "loop-b").symlink_to(root / "allowed" / "loop-a")
    return root


class Payload:
    """A pickle that would call ``print`` if it were ever unpickled unsafely."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("lmscope: this pickle ran",))


@pytest.fixture(scope="module")
def client(site: Path) -> TestClient:
    return TestClient(create_app(write_config(site)))


# -- 1. cost limits ---------------------------------------------------------------------------


def test_cost_limit_refuses_before_running(site: Path) -> None:
    app = create_app(load_config(write_config(site), max_cost=5_000))
    client = TestClient(app)
    run = post_run(client)  # 5 tokens, 3 layers
    saliency = f"/api/runs/{run['id']}/saliency"
    message = error(client.get(saliency, params={"method": "ig", "steps": 256}), 400)
    # 2 × 256 steps × 4 outputs × 5 tokens × 3 layers = 30,720
    assert "would cost 30,720" in message and "max_cost of 5,000" in message and "256 steps" in message
    assert app.state.lmscope.jobs.stats()["done"] == 1  # only the run itself reached a model worker
    assert client.get(saliency, params={"method": "ig", "steps": 16, "html": False}).status_code == 200
    flow = f"/api/runs/{run['id']}/flow"
    assert client.get(flow, params={"html": False}).status_code == 200  # 4 × 1 × 5 × 3 = 60


def test_flow_of_every_position_costs_more(site: Path) -> None:
    from lmscope.app.analyses import flow_cost, saliency_cost

    trace = tiny("llama").trace(TEXT).trace
    assert flow_cost(trace, None)[0] == 4 * 5 * 5 * 3 and flow_cost(trace, -1)[0] == 4 * 5 * 3
    assert saliency_cost(trace, "grad_x_input", None, 32)[0] == 4 * 5 * 3
    assert saliency_cost(trace, "ig", [2, 3], 10)[0] == 2 * 10 * 2 * 5 * 3


# -- 4. the config schema ---------------------------------------------------------------------

WRONG_TYPES = {
    "models": ["tiny-llama"],
    "default_model": 3,
    "sample_prompts": 7,
    "max_input_tokens": "128",
    "max_generate": 1.5,
    "devices": "cpu",
    "dtypes": "float32",
    "allow_paths": "false",
    "allowed_dirs": "/srv/models",
    "model_cache_size": True,
    "run_cache_size": [16],
    "run_cache_mb": "512",
    "max_upload_mb": None,
    "sites": "resid_post",
    "max_cost": 1e6,
    "workers": "2",
    "queue_size": {"n": 8},
    "allowed_hosts": "example.org",
    "max_trace_mb": "512",
    "trace_dir": 5,
}


def test_schema_covers_every_config_field() -> None:
    from dataclasses import fields

    from lmscope.app.config import AppConfig

    assert set(WRONG_TYPES) == {f.name for f in fields(AppConfig)}


@pytest.mark.parametrize("key", sorted(WRONG_TYPES))
def test_config_rejects_each_wrong_type(key: str, tmp_path: Path) -> None:
    config = json.loads(write_config(tmp_path).read_text())
    config[key] = WRONG_TYPES[key]
    path = tmp_path / "wrong.json"
    path.write_text(json.dumps(config))
    with pytest.raises(lmscope.LmscopeError) as caught:
        load_config(path)
    message = str(caught.value)
    assert f"'{key}'" in message and "\n" not in message and str(path) in message


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"models": {"m": {"source": "tiny-gpt2", "weights": "x"}}, "default_model": "m"}, "'models.m"),
        ({"models": {"m": {"source": 3}}, "default_model": "m"}, "'models.m.source'"),
        ({"max_cost": 0}, "'max_cost' should be greater than or equal to 1"),
        ({"run_cache_mb": -1}, "'run_cache_mb' should be greater than 0"),
        ({"sites": ["resid_post", "nope"]}, "unknown sites ['nope']"),
    ],
)
def test_config_rejects_bad_values(settings: dict[str, Any], words: str, tmp_path: Path) -> None:
    with pytest.raises(lmscope.LmscopeError) as caught:
        load_config(write_config(tmp_path, **settings))
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_string_for_allowed_dirs_never_opens_the_filesystem(tmp_path: Path) -> None:
    with pytest.raises(lmscope.LmscopeError, match="'allowed_dirs' should be a valid array"):
        load_config(write_config(tmp_path, allowed_dirs="/"))


def test_serve_with_a_wrong_type_is_one_line(tmp_path: Path, capsys: Any) -> None:
    from lmscope.cli import main

    assert main(["serve", "--config", str(write_config(tmp_path, allow_paths="false"))]) == 2
    err = capsys.readouterr().err.strip()
    assert "'allow_paths'" in err and "Traceback" not in err and len(err.splitlines()) == 1


# -- 7. odd but legal input -------------------------------------------------------------------


def test_lone_surrogate_is_a_clear_400(client: TestClient) -> None:
    for body in (b'{"text": "keys \\ud800 to"}', b'{"text": "hi", "model": "tiny-\\udfff"}'):
        response = client.post("/api/runs", content=body, headers={"content-type": "application/json"})
        assert "lone surrogate" in error(response, 400)


def test_odd_paths_are_clear_4xx(client: TestClient, site: Path) -> None:
    allowed = site / "allowed"
    cases = {
        str(allowed / "loop-a"): "symlink loop",
        str(allowed) + "/x\x00y": "NUL byte",
        str(allowed / ("x" * 300)): "too long",
        str(allowed) + "/" + "a/" * 600: "too long",
    }
    for path, words in cases.items():
        assert words in error(client.post("/api/runs", json={"text": TEXT, "model": path}), 400), path
        assert words in error(client.post("/api/traces/open", json={"path": path}), 400), path
    assert "was not found" in error(client.post("/api/traces/open", json={"path": str(allowed / "none")}), 400)


def test_pickle_only_model_directory_is_a_clear_400(client: TestClient, capfd: Any) -> None:
    pickled = str(client.app.state.lmscope.config.allowed_dirs[0] / "pickled")
    message = error(client.post("/api/runs", json={"text": TEXT, "model": pickled}), 400)
    assert "could not be loaded" in message or "pickle" in message, message
    assert "this pickle ran" not in capfd.readouterr().out


# -- 8. one model, one key --------------------------------------------------------------------


def test_spellings_of_a_path_are_one_model(site: Path) -> None:
    app = create_app(write_config(site))
    client = TestClient(app)
    model = site / "allowed" / "model"
    spellings = [str(model), f"{model}/", f"{site}/allowed/./model", f"{site}/allowed/../allowed/model"]
    for spelling in spellings:
        post_run(client, model=spelling)
    keys = client.get("/api/status").json()["models"]
    assert keys == [{"model": str(model.resolve()), "device": "cpu", "dtype": "float32"}]
    assert app.state.lmscope.models.locks() == 0  # the lock table holds only keys in use


def test_lock_table_is_bounded_by_requests_in_flight(site: Path) -> None:
    from lmscope.app.state import ModelCache, ModelKey

    cache = ModelCache(1, lambda key: key.model)
    for i in range(50):
        with cache.using(ModelKey(f"m{i}", "cpu", "float32")) as model:
            assert model == f"m{i}" and cache.locks() == 1
    assert cache.locks() == 0 and len(cache.loaded()) == 1


# -- 9. hosts, origins, docs and what errors disclose -------------------------------------------


def test_foreign_host_is_refused(client: TestClient, tmp_path: Path) -> None:
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost:9999"):
        assert "does not answer for the host" in error(client.get("/api/status", headers={"host": host}), 421)
    assert "does not answer" in error(client.get("/static/app/app.css", headers={"host": "evil.example"}), 421)
    for host in ("localhost", "127.0.0.1", "[::1]", "testserver"):  # testserver: the address it is served on
        assert client.get("/api/status", headers={"host": host}).status_code == 200
    listed = TestClient(create_app(load_config(write_config(tmp_path), allowed_hosts=["lab.local"])))
    assert listed.get("/api/config", headers={"host": "lab.local"}).status_code == 200


def test_cross_site_writes_are_refused(client: TestClient) -> None:
    body = json.dumps({"text": TEXT})
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": kind} if kind else {}
        assert "send JSON" in error(client.post("/api/runs", content=body, headers=headers), 415)
    foreign = {"origin": "http://evil.example", "content-type": "application/json"}
    assert "cross-origin" in error(client.post("/api/runs", content=body, headers=foreign), 403)
    assert "cross-origin" in error(client.post("/api/runs", content=body, headers={**foreign, "origin": "null"}), 403)
    site = {"sec-fetch-site": "cross-site", "content-type": "application/json"}
    assert "cross-origin" in error(client.post("/api/runs", content=body, headers=site), 403)
    run_id = post_run(client)["id"]
    assert "cross-origin" in error(client.delete(f"/api/runs/{run_id}", headers={"origin": "http://evil.example"}), 403)
    own = {"origin": "http://testserver", "content-type": "application/json"}
    assert client.post("/api/runs", content=body, headers=own).status_code == 200


def test_docs_stay_offline(client: TestClient) -> None:
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


def test_errors_never_name_server_directories(client: TestClient, site: Path, tmp_path: Path) -> None:
    outside = error(client.post("/api/traces/open", json={"path": "/etc/passwd"}), 403)
    assert str(site) not in outside and "allowed" not in outside.replace("outside the directories", "")
    damaged = error(upload(client, b"\x08\x00\x00\x00\x00\x00\x00\x00{}junk", name="my run.safetensors"), 400)
    assert "'my run.safetensors'" in damaged
    for secret in (str(site), os.path.realpath(os.environ.get("TMPDIR", "/tmp")), "lmscope-"):
        assert secret not in damaged
    missing = error(client.post("/api/runs", json={"text": TEXT, "model": "local"}), 400)  # ./local-gpt2: absent
    assert "'local'" in missing and str(site) not in missing
    unnamed = error(upload(client, b"not a trace"), 400)
    assert unnamed.startswith("the uploaded file") and "lmscope-" not in unnamed


def test_internal_errors_name_no_paths(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app(write_config(site))
    client = TestClient(app, raise_server_exceptions=False)

    def fail(self: Any) -> Any:
        raise OSError(f"cannot open {site}/secret/file")

    monkeypatch.setattr(type(app.state.lmscope), "status", fail)
    message = error(client.get("/api/status"), 500)
    assert message.startswith("internal error (OSError)") and str(site) not in message


# -- the job queue ----------------------------------------------------------------------------


def test_jobs_run_one_at_a_time_per_key_and_refuse_a_full_queue() -> None:
    jobs = Jobs(workers=2, queue_size=2)
    release = threading.Event()
    active: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}

    def work(key: str) -> Any:
        def run(cancel: threading.Event) -> str:
            active[key] += 1
            peak[key] = max(peak[key], active[key])
            release.wait(5)
            active[key] -= 1
            return key

        return run

    first, second = jobs.submit("a", work("a")), jobs.submit("a", work("a"))
    other = jobs.submit("b", work("b"))
    with pytest.raises(Busy) as full:
        jobs.submit("a", work("a"))
    assert "queue_size 2" in str(full.value) and full.value.retry_after >= 1
    release.set()
    assert [job.future.result(5) for job in (first, second, other)] == ["a", "a", "b"]
    assert peak == {"a": 1, "b": 1}  # never two jobs on one key at once
    queued = jobs.submit("a", lambda cancel: time.sleep(0.5))
    waiting = jobs.submit("a", lambda cancel: "never")
    jobs.cancel(waiting)  # still queued: dropped at once
    with pytest.raises(Cancelled):
        waiting.future.result(1)
    queued.future.result(5)
    jobs.close()
    with pytest.raises(Busy, match="shutting down"):
        jobs.submit("a", work("a"))


def test_jobs_bound_the_whole_app_too() -> None:
    jobs = Jobs(workers=1, queue_size=5, max_jobs=2)
    release = threading.Event()
    held = [jobs.submit(key, lambda cancel: release.wait(5)) for key in ("a", "b")]
    with pytest.raises(Busy, match="the server is busy: 2 requests"):
        jobs.submit("c", lambda cancel: None)  # a new key does not widen the bound
    release.set()
    assert [job.future.result(5) for job in held] == [True, True]
    assert jobs.submit("c", lambda cancel: "room again").future.result(5) == "room again"
    jobs.close()


def test_cancellable_stops_the_model_at_its_next_block() -> None:
    lm = tiny("llama")
    cancel = threading.Event()
    blocks: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: blocks.append(i)) for i, b in enumerate(lm.arch.blocks)]
    try:
        with cancellable(lm, cancel):
            lm.trace(TEXT)  # not cancelled: runs through
            assert blocks == [0, 1, 2]
            cancel.set()
            blocks.clear()
            with pytest.raises(Cancelled):
                lm.trace(TEXT)
            assert blocks == [0]  # block 0's own hook (registered first) ran, then the cancel hook stopped it
    finally:
        for handle in handles:
            handle.remove()
    assert all(not b._forward_pre_hooks for b in lm.arch.blocks)  # the cancel hooks are gone
    torch.testing.assert_close(lm.trace(TEXT).logits, tiny("llama").trace(TEXT).logits)
