"""The command line prints text twins, JSON, and one-line errors with exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmscope
import lmscope._files
from conftest import tiny
from lmscope.cli import _parser, main


def test_models_lists_names(capsys) -> None:
    assert main(["models"]) == 0
    assert "tiny-llama" in capsys.readouterr().out


def test_lens_table_and_json(capsys) -> None:
    assert main(["lens", "The keys to the cabinet", "--model", "tiny-gpt2", "--topk", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Logit lens: ") and "('·cabinet')" in text.splitlines()[0]
    assert "top 3" in text
    assert main(["lens", "The keys to the cabinet", "--model", "tiny-gpt2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "LayerPredictions"
    assert data["layers"] == [0, 1, 2]
    assert len(data["tokens"][0]) == 5


def test_bad_input_is_one_line_and_status_2(capsys) -> None:
    assert main(["lens", "", "--model", "tiny-gpt2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lmscope: error: the text is empty: give some text to run the model on"
    assert main(["lens", "hi", "--model", "nope"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_python_dash_m_runs() -> None:
    done = subprocess.run([sys.executable, "-m", "lmscope", "models", "--json"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "minilm-l6" in json.loads(done.stdout)


def test_version(capsys) -> None:
    from importlib.metadata import version

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmscope {version('lmscope')}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (group,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(group.choices)


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help() -> None:
    missing = [
        f"lmscope {name} {action.option_strings or action.dest}"
        for name, parser in subcommands().items()
        for action in options(parser)
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, missing
    top = [a for a in _parser()._actions if a.option_strings and not a.help]
    assert not top


# ----------------------------------------------------------------------------------------------------------
# Every subcommand, every option, bad values: one line on stderr, non-zero status, no traceback.

MODEL = ("--model", "tiny-gpt2")
# A valid call of each subcommand (fast, on tiny models); the sweep spoils one option at a time.
VALID: dict[str, list[str]] = {
    "models": [],
    "lens": ["The keys to the cabinet", *MODEL],
    "rankings": ["The keys to the cabinet", *MODEL],
    "watch": ["The keys to the cabinet", "--words", " is", " are", *MODEL],
    "saliency": ["The keys to the cabinet", *MODEL],
    "serve": ["--port", "{port}"],
    "nmf": ["The keys to the cabinet are on the table", "--components", "2", *MODEL],
    "collect": ["The keys to the cabinet", "--out", "{tmp}/acts", *MODEL],
    "similarity": ["{tmp}/corpus"],
    "attention": ["The keys to the cabinet", *MODEL],
    "probe": ["--model", "tiny-bert", "--tokens", "40", "--seeds", "1", "--epochs", "1", "--sites", "resid_post"],
    "flow": ["The keys to the cabinet", *MODEL],
    "verify": ["tiny-gpt2"],
    "causal-trace": ["The keys to the cabinet", "--subject", "keys", "--samples", "1", *MODEL],
    "faithfulness": ["The keys to the cabinet", "--draws", "1", *MODEL],
}
NO_CUDA = [] if torch.cuda.is_available() else ["cuda"]
# Bad values per option (the same for every subcommand that has it; TEXT and MODEL are positionals).
# A flag has no value to spoil: its entry is empty. A new option must be added here (the test checks).
BAD: dict[str, list[str]] = {
    "TEXT": ["", "notes.txt", "missing/file.conllu", "{tmp}/a_file"],
    "MODEL": ["nope", "{tmp}/missing", "{tmp}/a_file", "{tmp}/pickle_model"],
    "--all": [],
    "--text": ["   ", "notes.txt"],
    "--model": ["nope", "{tmp}/missing", "{tmp}/a_file", "{tmp}/empty_dir", "{tmp}/pickle_model"],
    "--device": ["warp9", "cuda:99", "", *NO_CUDA],
    "--dtype": ["float7", ""],
    "--device-map": ["everywhere", ""],
    "--device-memory": ["cpu", "cpu=lots", ""],
    "--offload-folder": ["{tmp}/a_file", ""],
    "--max-memory": ["x", "0", "-1", "4XB", "", "nan"],
    "--store": ["{tmp}/missing/trace.safetensors", "{tmp}/a_file/trace.safetensors"],
    "--json": [],
    "--html": ["{tmp}/missing/view.html", "{tmp}", "{tmp}/a_file/view.html"],
    "--position": ["x", "99", "-99", ""],
    "--layer": ["x", "99", "-99"],
    "--topk": ["0", "-1", "100000", "x"],
    "--no-norm": [],
    "--generate": ["-1", "100000", "x"],
    "--words": [""],
    "--method": ["bogus"],
    "--target": ["bogus"],
    "--target-text": ["", "words"],  # a decoder-only model takes no target
    "--contrast": [""],
    "--steps": ["0", "-3", "100000", "x"],
    "--style": ["bogus"],
    "--stack": ["bogus"],
    "--targets": ["", "{tmp}/missing/targets.txt", "{tmp}/a_file"],
    "--config": ["{tmp}/missing.json", "{tmp}", "{tmp}/a_file", "{tmp}/wrong_type.json", "{tmp}/unknown_key.json"],
    "--print-config": [],
    "--host": ["no such host!", "8.8.8.8", ""],
    "--port": ["0", "-1", "70000", "x"],
    "--file": ["{tmp}/missing.txt", "{tmp}", "{tmp}/empty.txt", "{tmp}/not_utf8.txt"],
    "--components": ["0", "-2", "x", "50"],
    "--layers": ["5:2", "9:", "x", "1:2:3", "99"],
    "--site": ["bogus", "attn_probs"],
    "--nonneg": ["bogus"],
    "--seed": ["-1", "x", str(2**40)],
    "--limit": ["0", "-1", "x"],
    "--out": ["{tmp}/a_file", "{tmp}/missing/deeper/acts", "{tmp}/finished"],
    "--restart": [],
    "--sites": ["bogus", "", "attn_probs"],
    "--batch-size": ["0", "-1", "x", "100000"],
    "--text-pair": [""],
    "--view": ["bogus"],
    "--kind": ["bogus"],
    "--head": ["-1", "99", "x"],
    "--query": ["99", "-99", "x"],
    "--top-k": ["0", "-1", "x"],
    "--part": ["bogus", "cross"],  # cross: the test model is not an encoder-decoder model
    "--task": ["bogus"],
    "--tokens": ["0", "-5", "x"],
    "--seeds": ["0", "1000", "x"],
    "--pool": ["bogus"],
    "--epochs": ["0", "x"],
    "--data": ["{tmp}/missing", "{tmp}/empty_dir", "{tmp}/a_file"],
    "--plot": ["{tmp}/missing/plot.png", "{tmp}"],
    "--threshold": ["-0.1", "1.5", "nan", "inf", "x"],
    "--mode": ["bogus"],
    "--subject": ["", "absent words"],
    "--answer": [""],
    "--samples": ["0", "-1", "x", "100"],
    "--window": ["0", "-1", "x", "100"],
    "--draws": ["0", "-1", "x", "1000"],
    "--baseline": ["", "zero", "two words"],
    "--engine": ["bogus"],
    "--address": ["127.0.0.1:1", "not an address"],  # without --engine ray: refused before anything starts
    "--workers": ["0", "-1", "x"],
    "--worker-cpus": ["0", "x"],
    "--worker-gpus": ["-1", "x", "nan"],
    "--shard-mb": ["0", "-1", "x", "nan"],
    "DIR": ["{tmp}/missing", "{tmp}/a_file", "{tmp}/empty_dir", "{tmp}"],
    "--site-b": ["bogus", "attn_probs"],
    "--skip-first": [],
    "--dims": ["0", "-1", "x", "100000"],
    "--epsilon": ["-1", "x", "nan"],
    "--memory-mb": ["0", "-1", "x", "nan"],
    "--threads": ["0", "-1", "x"],
}


def option_name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else str(action.metavar or action.dest).upper()


@pytest.fixture(scope="module")
def playground(tmp_path_factory) -> Path:
    """Files the bad values point at: a plain file, an empty folder, bad configs, a pickle model, ..."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "a_file").write_text("a file, not a folder or a model")
    (tmp / "empty_dir").mkdir()
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "not_utf8.txt").write_bytes(b"caf\xe9 au lait\n")
    (tmp / "wrong_type.json").write_text(json.dumps({"max_generate": "many"}))
    (tmp / "unknown_key.json").write_text(json.dumps({"max_generat": 4}))
    lm = tiny("gpt2")
    lm.model.config.save_pretrained(tmp / "pickle_model")
    lm.tokenizer.save_pretrained(tmp / "pickle_model")

    class Payload:  # an object that is not weights: torch.load(weights_only=True) refuses it
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weight": Payload()}, tmp / "pickle_model" / "pytorch_model.bin")
    lmscope.collect(lm, ["a finished collection"], out_dir=tmp / "finished", progress=False)
    texts = [f"Text number {i} of a corpus large enough for every layer pair's similarity." for i in range(12)]
    lmscope.collect(lm, texts, out_dir=tmp / "corpus", progress=False)
    return tmp


def cases() -> list[tuple[str, str, str]]:
    return [
        (name, option_name(action), value)
        for name, parser in subcommands().items()
        for action in options(parser)
        for value in BAD.get(option_name(action), [])
    ]


def test_every_option_of_every_subcommand_has_bad_values_listed() -> None:
    assert set(VALID) == set(subcommands())
    unlisted = {
        f"{name} {option_name(action)}"
        for name, parser in subcommands().items()
        for action in options(parser)
        if option_name(action) not in BAD
    }
    assert not unlisted, f"add bad values for {sorted(unlisted)} to BAD"
    assert len(cases()) > 250


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def quick_models(monkeypatch) -> None:
    """Tiny models come from the session's cache; a server never actually starts."""
    real = lmscope.from_pretrained
    tiny("gpt2"), tiny("bert")  # built before from_pretrained is replaced

    def cached(name=None, **kwargs):
        plain = not any(kwargs.values())
        return (
            tiny(name.removeprefix("tiny-")) if plain and name in ("tiny-gpt2", "tiny-bert") else real(name, **kwargs)
        )

    monkeypatch.setattr(lmscope, "from_pretrained", cached)
    uvicorn = pytest.importorskip("uvicorn")

    def no_server(*args, **kwargs):
        raise AssertionError("the server started although an option was bad")

    monkeypatch.setattr(uvicorn, "run", no_server)


def test_bad_values_give_one_line_errors(playground: Path, quick_models, capsys, monkeypatch) -> None:
    monkeypatch.chdir(playground)
    port = str(free_port())
    failures = []
    for name, option, value in cases():
        value = value.replace("{tmp}", str(playground))
        argv = [arg.replace("{tmp}", str(playground)).replace("{port}", port) for arg in VALID[name]]
        if not option.startswith("-"):  # the positional comes first
            argv[0] = value
        elif option == "--model" and name == "verify":  # verify's MODEL positional would win over --model
            argv = [option, value]
        elif option in argv:  # replace the valid value
            argv[argv.index(option) + 1] = value
        else:
            argv += [option, value]
        status = main([name, *argv])
        captured = capsys.readouterr()
        err = captured.err.strip()
        one_line = err.count("\n") == 0 and err.startswith("lmscope")
        if status not in (1, 2) or not one_line or "Traceback" in err or "unexpected" in err or "this must" in err:
            failures.append(f"lmscope {name} {option} {value!r}: status {status}, stderr {err[:300]!r}")
    assert not failures, "\n".join(failures)


def test_unicode_that_is_not_utf8_is_one_line(capsys) -> None:
    broken = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python receives such bytes in argv
    assert main(["lens", broken, "--model", "tiny-gpt2"]) == 2
    assert capsys.readouterr().err == "lmscope: error: argument 2 (caf\\xe9) is not valid UTF-8: give text in UTF-8\n"
    done = subprocess.run(
        [sys.executable, "-m", "lmscope", "lens", b"caf\xe9", "--model", "tiny-gpt2"], capture_output=True
    )
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1 and b"not valid UTF-8" in done.stderr


# ----------------------------------------------------------------------------------------------------------
# Text and files


def test_text_and_files_are_unambiguous(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("mytexts.txt").write_text("The cat sat on the mat.\nThe dog sat on the log.\n")
    assert main(["nmf", "mytexts.txt", "--components", "2", *MODEL]) == 2
    assert "use --file mytexts.txt" in capsys.readouterr().err
    assert main(["nmf", "--file", "mytexts.txt", "--components", "2", *MODEL]) == 0
    assert "in 2 texts" in capsys.readouterr().out
    assert main(["collect", "missing/file.conllu", "--out", "acts", *MODEL]) == 2
    assert capsys.readouterr().err == (
        "lmscope: error: 'missing/file.conllu' looks like a file name (no such file here): "
        "to read texts from a file, use --file missing/file.conllu\n"
    )
    assert main(["collect", "--file", "missing/file.conllu", "--out", "acts", *MODEL]) == 2
    assert capsys.readouterr().err == "lmscope: error: text file not found: missing/file.conllu\n"
    assert not Path("acts").exists()
    assert main(["collect", "--file", "mytexts.txt", "--out", "acts", "--json", *MODEL]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 2
    assert main(["lens", "mytexts.txt", *MODEL]) == 2
    assert "lmscope lens takes the text itself" in capsys.readouterr().err
    assert main(["lens", "The cat.txt is a file name in a sentence", *MODEL]) == 0  # has spaces: a text


# ----------------------------------------------------------------------------------------------------------
# Files: checked before the model loads, written atomically


def test_html_paths_are_checked_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loaded before the output path was checked")

    monkeypatch.setattr(lmscope, "from_pretrained", no_loading)
    for path, why in ((tmp_path / "missing" / "v.html", "does not exist: create it first"), (tmp_path, "a folder")):
        assert main(["lens", "hi", "--html", str(path), *MODEL]) == 2
        assert why in capsys.readouterr().err


def test_a_full_disk_never_leaves_a_truncated_page(tmp_path: Path, capsys, monkeypatch) -> None:
    page = tmp_path / "lens.html"
    assert main(["lens", "The keys to the cabinet", "--html", str(page), *MODEL]) == 0
    good = page.read_bytes()
    assert good.rstrip().endswith(b"</html>")

    def disk_full(fd: int) -> None:  # the data went into the page cache; flushing it finds the disk full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lmscope._files.os, "fsync", disk_full)
    capsys.readouterr()
    assert main(["lens", "The keys to the", "--html", str(page), *MODEL]) == 2
    assert capsys.readouterr().err == f"lmscope: error: cannot write {page}: no space left on the device: " + (
        "free some space or write somewhere else\n"
    )
    assert page.read_bytes() == good  # the earlier page is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lens.html"]  # and no temporary file is left


def test_a_full_disk_during_collect_is_one_line_and_resumable(tmp_path: Path, capsys, monkeypatch) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(f"Text number {i} is here." for i in range(12)))
    argv = ["collect", "--file", str(texts), "--out", str(tmp_path / "acts"), "--batch-size", "4", *MODEL]
    storage = sys.modules["lmscope.analysis._collection"]
    real, calls = storage._stream_safetensors, [0]

    def disk_fills(parts, file):
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(parts, file)

    monkeypatch.setattr(storage, "_stream_safetensors", disk_fills)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmscope: error: cannot write ") and err.count("\n") == 1
    assert err.endswith("no space left on the device: free some space or write somewhere else\n")
    assert main(argv) == 0  # the rerun finishes the collection
    assert lmscope.load_collection(tmp_path / "acts").n_tokens > 0


# ----------------------------------------------------------------------------------------------------------
# serve


def test_print_config_is_the_default_config_and_loads(tmp_path: Path, capsys) -> None:
    pytest.importorskip("fastapi")
    from lmscope.app.config import load_config

    assert main(["serve", "--print-config"]) == 0
    text = capsys.readouterr().out
    config = tmp_path / "app.json"
    config.write_text(text)
    assert json.loads(text)["default_model"] == load_config(config).default_model


def test_serve_with_a_missing_config_says_what_a_config_looks_like(tmp_path: Path, capsys) -> None:
    assert main(["serve", "--config", str(tmp_path / "app.json")]) == 2
    err = capsys.readouterr().err
    assert "does not exist: a config is a JSON object such as {" in err
    assert err.endswith("start from the default with: lmscope serve --print-config > app.json\n")
