"""Every `lmscope ...` command in the README runs as written, and the docs' snippets are valid.

The README's commands run in a fresh folder that holds the repository's ``docs`` and ``src`` (the
paths a clone has), through ``lmscope.cli.main``, with the embedded model loaded once per session.
Only ``lmscope serve`` is held back from listening: its config is read and the app is built, and the
server's start is recorded instead of run.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest

from lmscope.cli import _parser, main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[list[str]]:
    """The ``lmscope`` command lines of a text's bash blocks, split as a shell would (comments dropped)."""
    found = []
    for block in blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("lmscope "):
                found.append(shlex.split(line, comments=True))
    return found


def test_the_readme_shows_every_subcommand() -> None:
    shown = {words[1] for words in commands(README.read_text(encoding="utf-8"))}
    (group,) = [a for a in _parser()._actions if a.dest == "command"]
    assert set(group.choices) <= shown
    assert "--version" in shown


@pytest.mark.embedded
def test_readme_commands_run_as_written(embedded, tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("uvicorn")
    import uvicorn

    import lmscope.cli
    from lmscope.app._core import App
    from lmscope.app.config import load_config

    real = lmscope.from_pretrained

    def reuse_embedded(name=None, **kwargs):
        return embedded if name is None and not any(kwargs.values()) else real(name, **kwargs)

    served = []
    monkeypatch.setattr(lmscope, "from_pretrained", reuse_embedded)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.append((app, kwargs)))
    monkeypatch.setattr(lmscope.cli, "_check_listen", lambda host, port: None)
    monkeypatch.setattr(App, "preload", lambda self: None)
    for name in ("docs", "src"):  # what a clone holds, read only
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)

    lines = commands(README.read_text(encoding="utf-8"))
    assert len(lines) >= 15
    for words in lines:
        redirect = words.index(">") if ">" in words else None
        argv = words[1:redirect]
        status = main(argv)
        captured = capsys.readouterr()
        assert status == 0, f"{shlex.join(words)} failed: {captured.err.strip()}"
        assert "error" not in captured.err, shlex.join(words)
        if redirect is not None:
            Path(words[redirect + 1]).write_text(captured.out, encoding="utf-8")

    for page in ("watch.html", "saliency.html", "attention.html", "flow.html", "nmf.html"):
        assert (tmp_path / page).read_text(encoding="utf-8").rstrip().endswith("</html>")
    assert (tmp_path / "probing.png").stat().st_size > 10_000
    assert lmscope.load_collection("acts").layers == tuple(range(6))
    assert len(lmscope.load_collection("ud")) == 50
    config = load_config("app.json")
    assert config.default_model == "smollm2-135m"
    ((_app, options),) = served
    assert options["port"] == 8000 and options["host"] == "127.0.0.1"


def test_readme_config_example_is_a_valid_config(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from lmscope.app.config import AppConfig, load_config

    text = README.read_text(encoding="utf-8")
    section = text[text.index("### The web app's config") :]
    (example,) = blocks(section, "json")[:1]
    path = tmp_path / "app.json"
    path.write_text(example, encoding="utf-8")
    config = load_config(path)
    assert set(config.models) == {"smollm2-135m", "tiny-llama"} and config.max_input_tokens == 256
    # the table names every key the config accepts
    keys = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)?", section, flags=re.M))
    listed = {k for pair in keys for k in pair if k}
    assert listed == {item.name for item in dataclasses.fields(AppConfig)}
    assert set(json.loads(main_print_config())) == listed - {"sites"}  # every key but "all sites" (no value)


def main_print_config() -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["serve", "--print-config"]) == 0
    return out.getvalue()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_commands_parse_and_python_compiles(doc: Path) -> None:
    """The docs' studies take minutes (docs/probing.md: about 4): their commands must parse with the
    command line's own parser, and their Python must compile; the README runs the quick versions."""
    text = doc.read_text(encoding="utf-8")
    for words in commands(text):
        args = _parser().parse_args(words[1:])
        assert callable(args.run)
    for i, block in enumerate(blocks(text, "python")):
        compile(block, f"{doc.name} python block {i + 1}", "exec")
