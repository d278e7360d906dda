"""The tutorial notebook (docs/tutorial.ipynb) runs headless from top to bottom, and every view it shows
is a self-contained lmscope fragment that carries its text twin outside any script."""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"

# The views the tutorial shows, in order (data-view of each fragment).
VIEWS = [
    "lens",
    "rankings",
    "rankings",
    "saliency",
    "flow",
    "head_shares",
    "promoted",
    "top_neurons",
    "promoted",
    "attention",
    "attention",
    "attention",
    "nmf",
    "probing",
]


def views_of(notebook: nbformat.NotebookNode) -> list[str]:
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            markup = output.get("data", {}).get("text/html", "")
            found += re.findall(r'<div class="lmscope" id="lmscope-[0-9a-f]{12}" data-view="([a-z_]+)">', markup)
    return found


def test_tutorial_is_saved_without_outputs() -> None:
    notebook = nbformat.read(TUTORIAL, as_version=4)
    nbformat.validate(notebook)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.embedded
def test_tutorial_runs_headless(tmp_path: Path) -> None:
    notebook = nbformat.read(TUTORIAL, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    print(f"tutorial executed in {time.perf_counter() - started:.1f} s")

    assert views_of(notebook) == VIEWS
    ids = re.findall(r'id="(lmscope-[0-9a-f]{12})"', "".join(nbformat.writes(notebook).split()))
    assert len(ids) == len(set(ids)), "two views share an id"
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error"
            assert output.get("name") != "stderr" or "Traceback" not in output.get("text", "")
            markup = output.get("data", {}).get("text/html")
            if markup:
                # the twin is plain markup, outside <noscript>, shown wherever scripts are stripped
                twin = re.search(r'<pre class="lmscope-text"[^>]*>(.*?)</pre>', markup, re.S)
                assert twin is not None and html.unescape(twin.group(1)).strip()
                assert "<noscript>" not in markup
    assert not list(tmp_path.iterdir()), "the tutorial wrote files"
