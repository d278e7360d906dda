"""``lmscope similarity DIR``: every layer pair of a collection, streamed, equals the in-memory measures."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lmscope.analysis._collection import PARTIAL, load_collection
from lmscope.analysis.layer_similarity import layer_similarity
from lmscope.cli import main
from test_streaming import write_collection


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_collection(tmp_path_factory.mktemp("cli") / "col", layers=4, neurons=5)


def run_json(capsys, *argv: str) -> dict:
    assert main(["similarity", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    ("argv", "method", "site_b", "options"),
    [
        ((), "cka", "resid_post", {"debiased": False}),
        (("--method", "cca", "--site-b", "mlp_act"), "cca", "mlp_act", {}),
        (("--method", "svcca", "--dims", "3"), "svcca", "resid_post", {"dims": 3}),
        (("--method", "pwcca", "--epsilon", "0.001"), "pwcca", "resid_post", {"epsilon": 1e-3}),
    ],
)
def test_matrix_equals_the_in_memory_measure(folder, capsys, argv, method, site_b, options) -> None:
    data = run_json(capsys, str(folder), *argv)
    expected = layer_similarity(load_collection(folder), method, "resid_post", site_b, stream=False, **options)
    assert (data["method"], data["site_a"], data["site_b"]) == (method, "resid_post", site_b)
    assert data["layers_a"] == [0, 1, 2, 3] and data["n_tokens"] == expected.n_tokens
    np.testing.assert_allclose(np.array(data["matrix"]), expected.matrix, rtol=1e-5, atol=1e-7)


def test_layers_and_skip_first(folder, capsys) -> None:
    data = run_json(capsys, str(folder), "--layers", "1:3", "--skip-first", "--memory-mb", "0.001")
    expected = layer_similarity(load_collection(folder), "cka", "resid_post", "resid_post", layers=[1, 2],
                                skip_first=True, stream=False, debiased=False)  # fmt: skip
    assert data["layers_a"] == [1, 2] and data["selection"] == expected.selection
    np.testing.assert_allclose(np.array(data["matrix"]), expected.matrix, rtol=1e-5)


def test_table_and_html(folder, capsys, tmp_path) -> None:
    page = tmp_path / "cka.html"
    assert main(["similarity", str(folder), "--html", str(page)]) == 0
    out = capsys.readouterr().out
    assert "cka" in out.lower() and "resid_post" in out
    assert page.read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")


def _partial(tmp_path):
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / PARTIAL).write_text("{}")
    return tmp_path / "partial"


@pytest.mark.parametrize(
    ("target", "argv", "message"),
    [
        (lambda tmp: tmp / "missing", (), "collection folder not found"),
        (lambda tmp: (tmp / "file.txt").write_text("x") and tmp / "file.txt", (), "is a file, not a collection"),
        (lambda tmp: tmp, (), "holds no lmscope collection"),
        (_partial, (), "holds an unfinished collection"),
        (None, ("--site", "mlp_out"), "not 'mlp_out'"),
        (None, ("--layers", "7"), "selects no layer"),
        (None, ("--layers", "x:y"), "--layers takes A:B"),
        (None, ("--dims", "2"), "--dims applies to --method svcca"),
        (None, ("--epsilon", "0.1"), "--epsilon applies to"),
        (None, ("--method", "rbf"), "invalid choice"),
    ],
)
def test_bad_input_is_one_line(folder, capsys, tmp_path, target, argv, message) -> None:
    path = folder if target is None else target(tmp_path)
    assert main(["similarity", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_a_terminal_sees_a_progress_bar_over_the_shards(folder, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["similarity", str(folder)]) == 0
    err = capsys.readouterr().err
    shards = len(load_collection(folder)._shards)
    assert "statistics" in err and f"{shards}/{shards}" in err
