"""The command line prints text twins, JSON, and one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

from lmscope.cli import main


def test_models_lists_names(capsys) -> None:
    assert main(["models"]) == 0
    assert "tiny-llama" in capsys.readouterr().out


def test_lens_table_and_json(capsys) -> None:
    assert main(["lens", "The keys to the cabinet", "--model", "tiny-gpt2", "--topk", "3"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Logit lens at position 4 ('·cabinet')")
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
