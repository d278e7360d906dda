"""lmscope verify: passes on every tiny family and the embedded model, fails on a capture made wrong."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

import lmscope
from conftest import tiny
from lmscope.analysis.verify import verify
from lmscope.cli import main
from lmscope.models._tiny import TINY_FAMILIES


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_passes_on_every_tiny_family(family: str) -> None:
    any_family = tiny(family)
    report = verify(any_family, generate=2)
    assert report.passed, str(report)
    assert report.layout == "architecture table"
    statuses = {(c.name, c.status) for c in report.checks}
    # state-space models have no attention; Falcon's eager attention is not what it runs (the blocks check covers it)
    attention = "n/a" if any_family.arch.family.attn is None or any_family.arch.family.eager_differs else "pass"
    assert ("logits", "pass") in statuses and ("attention", attention) in statuses and ("lens", "pass") in statuses
    assert ("blocks", "pass") in statuses
    if any_family.model.can_generate() and not any_family.arch.family.post_norm:
        assert ("generation", "pass") in statuses
    data = report.to_dict()
    assert json.loads(json.dumps(data))["passed"] is True and data["failed"] == []
    assert str(report).splitlines()[-1].startswith("PASSED")
    assert "verify.js" not in report.to_html() and 'data-view="verify"' in report.to_html()


def test_passes_on_the_embedded_model(embedded: lmscope.LM) -> None:
    report = lmscope.verify(embedded, generate=4)
    assert report.passed, str(report)
    logits = next(c for c in report.checks if c.name == "logits")
    assert logits.tolerance == 1e-5 and logits.value <= 1e-5


@contextmanager
def _wrong_capture(lm: lmscope.LM):
    """Capture that changes what the model computes: block 1's output is nudged while hooks are on."""
    import lmscope.capture._run as run

    original = run.recording

    @contextmanager
    def nudged(loaded, sites, layers):
        def hook(module, args, output):
            return (output[0] + 1e-2, *output[1:]) if isinstance(output, tuple) else output + 1e-2

        handle = loaded.arch.blocks[1].register_forward_hook(hook)
        try:
            with original(loaded, sites, layers) as recorder:
                yield recorder
        finally:
            handle.remove()

    run.recording = nudged
    try:
        yield
    finally:
        run.recording = original


def test_fails_naming_the_check_when_capture_changes_the_model(capsys) -> None:
    lm = tiny("llama")
    with _wrong_capture(lm):
        report = verify(lm, generate=2)
    assert not report.passed
    assert any(name.startswith("logits: max |Δ logit|") for name in report.failed)
    assert str(report).splitlines()[-1].startswith("FAILED: logits")
    with _wrong_capture(lm):
        status = main(["verify", "tiny-llama", "--generate", "2"])
    captured = capsys.readouterr()
    assert status != 0
    assert "FAILED" in captured.out
    assert captured.err.startswith("lmscope: error: verify failed: logits: max |Δ logit|")
    assert len(captured.err.strip().splitlines()) == 1
    assert verify(lm, generate=2).passed  # nothing left behind


def test_wrong_attention_probabilities_fail_the_attention_check(monkeypatch) -> None:
    import lmscope.capture._hooks as hooks
    import lmscope.capture._lazy_attention as lazy

    original = hooks.attention_probs
    monkeypatch.setattr(hooks, "attention_probs", lambda *a: original(*a).flip(-2))  # stored probabilities
    monkeypatch.setattr(lazy, "attention_probs", lambda *a: original(*a).flip(-2))  # computed from q and k
    report = verify(tiny("qwen2"), generate=2)
    failed = " ".join(report.failed)
    assert "attention: attention probabilities vs eager attention" in failed
    assert "blocks: attention updates" in failed


def test_json_output_and_exit_status(capsys) -> None:
    assert main(["verify", "--model", "tiny-gpt2", "--json", "--generate", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "VerifyReport" and data["passed"] is True
    assert {c["name"] for c in data["checks"]} == {"logits", "generation", "lens", "blocks", "attention"}
    assert all(c["status"] in ("pass", "n/a") for c in data["checks"])


def test_half_precision_uses_its_stated_tolerance() -> None:
    lm = lmscope.from_pretrained("tiny-llama", dtype="bfloat16")
    report = verify(lm, generate=2)
    assert report.dtype == "bfloat16"
    logits = next(c for c in report.checks if c.name == "logits")
    assert logits.tolerance == pytest.approx(0.2)
    assert report.passed, str(report)


def test_headless_model_reports_what_does_not_apply() -> None:
    report = verify(lmscope.from_pretrained("minilm-l6"))
    assert report.passed, str(report)
    skipped = {c.name for c in report.checks if c.status == "n/a"}
    assert {"logits", "generation", "lens"} <= skipped
    assert torch.isfinite(torch.tensor([c.value for c in report.checks if c.value is not None])).all()
