"""Every ```python block of README.md runs, in order, in one namespace (on the embedded model)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

import lmscope

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_the_articles_examples() -> None:
    code = "\n".join(python_blocks(README.read_text(encoding="utf-8")))
    assert 'lm.generate(" 1, 1, 1,", generate=1)' in code
    for call in (
        "layer_predictions(position=9",
        'layer_predictions(position="next"',
        "rankings()",
        'rankings_watch([" is", " are"], position=5)',
        'rankings_watch([" is", " are"])',
    ):
        assert call in code


@pytest.mark.embedded
def test_readme_python_blocks_run(embedded: lmscope.LM, tmp_path, monkeypatch, capsys) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no python blocks"
    real = lmscope.from_pretrained

    def reuse_embedded(name=None, **kwargs):  # the same model, loaded once per test session
        return embedded if name is None and not kwargs else real(name, **kwargs)

    monkeypatch.setattr(lmscope, "from_pretrained", reuse_embedded)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # snippets write only into temp dirs
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Logit lens: prediction after the last token, read from the state at 4 ('·cabinet')" in printed
    assert "Logit lens: prediction of '·' at 9, read from the state at 8 (',')" in printed
    assert "Logit lens: prediction after the last token, read from the state at 9 ('·')" in printed
    assert "Rankings: rank of each generated token after every layer" in printed
    after = "Rankings watch: prediction after the last token, read from the state at 4"
    assert printed.count(f"{after} ('·cabinet')") == 1 and printed.count(f"{after} ('·cabinets')") == 1


def test_readme_pictures_exist_and_the_script_makes_each() -> None:
    """Every picture the README shows is in the repository, and scripts/screenshots.py names it."""
    text = README.read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]*\]\((docs/images/[^)]+\.png)\)", text)
    assert len(pictures) >= 11
    script = (README.parent / "scripts" / "screenshots.py").read_text(encoding="utf-8")
    for picture in pictures:
        path = README.parent / picture
        assert path.read_bytes()[:4] == b"\x89PNG", picture
        assert f'"{Path(picture).stem}' in script, f"scripts/screenshots.py does not make {picture}"
