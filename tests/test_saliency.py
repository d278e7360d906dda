"""Input saliency: batched attributions equal the per-token computation (Ecco's loop), IG is complete,
the embedded model attributes " Paris" to " France", and the views draw safely in Chromium."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

import lmscope
from browser import open_html
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import Saliency, _gradients
from lmscope.cli import main
from lmscope.views import page
from lmscope.views.saliency import GRADIENT_NOTE

PROMPT = "The keys to the cabinet"
EVIL = "<img src=x onerror=alert(1)>"
RTOL, ATOL = 1e-4, 1e-6  # atol only for entries that are ~0 (float32 rounding of a different graph)


def loop_gradients(lm: lmscope.LM, ids: torch.Tensor, positions, target="prob", foil=None):
    """The straightforward computation (Ecco's): a forward and a backward pass over each prefix."""
    embed = lm.model.get_input_embeddings()
    out = []
    for t in positions:
        with torch.no_grad():
            e = embed(ids[None, :t])[0]  # [pos, d_model]
        e.requires_grad_(True)
        logits = lm.model(inputs_embeds=e[None]).logits[0, -1].float()  # [vocab]
        if foil is not None:
            f = logits[ids[t]] - logits[foil]
        elif target == "logit":
            f = logits[ids[t]]
        else:
            f = torch.softmax(logits, -1)[ids[t]]
        (g,) = torch.autograd.grad(f, e)
        out.append((g.detach(), e.detach(), float(f.detach())))
    return out


def reference(method: str, g: torch.Tensor, e: torch.Tensor) -> np.ndarray:
    if method == "grad_x_input":
        a = (g * e).norm(dim=-1)
        return (a / a.sum()).numpy()
    if method == "gradient":
        a = g.norm(dim=-1)
        return (a / a.sum()).numpy()
    return (g * e).sum(-1).numpy()  # input_x_gradient


def assert_equal_to_loop(result: Saliency, loop, method: str) -> None:
    assert len(result.attributions) == len(loop)
    for row, (g, e, _), t in zip(result.attributions, loop, result.positions, strict=True):
        assert row.shape == (t,)
        np.testing.assert_allclose(row, reference(method, g, e), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(result.values, [f for _, _, f in loop], rtol=RTOL, atol=ATOL)


def test_batched_equals_per_token_loop_on_every_causal_family(causal_family: lmscope.LM) -> None:
    out = causal_family.generate(PROMPT, generate=4)
    positions = range(out.n_input, len(out.tokens))
    loop = loop_gradients(causal_family, out.token_ids, positions)
    methods = ("grad_x_input", "gradient", "input_x_gradient") if causal_family.arch.family.name == "llama" else ()
    result = out.primary_attributions()
    assert result.positions == tuple(positions)
    assert_equal_to_loop(result, loop, "grad_x_input")
    for method in methods:
        assert_equal_to_loop(out.primary_attributions(method), loop, method)
    # a small row budget splits the targets into several batched passes: same numbers
    chunked = out.saliency("grad_x_input", batch_size=2 * len(out.tokens))
    assert_equal_to_loop(chunked, loop, "grad_x_input")


def test_logit_and_contrastive_targets_equal_the_loop() -> None:
    lm = tiny("qwen2")
    out = lm.trace(PROMPT + " are on the table")
    positions = range(1, len(out.tokens))
    assert_equal_to_loop(
        out.saliency(target="logit"), loop_gradients(lm, out.token_ids, positions, "logit"), "grad_x_input"
    )
    foil = lm.tokenizer(" chair", add_special_tokens=False)["input_ids"]
    assert len(foil) == 1
    result = out.saliency("input_x_gradient", contrast=" chair")
    assert result.target == "contrast" and result.contrast == (" chair",) * len(positions)
    assert_equal_to_loop(result, loop_gradients(lm, out.token_ids, positions, foil=foil[0]), "input_x_gradient")
    per_output = out.saliency(contrast=[foil[0]] * len(positions))
    np.testing.assert_allclose(per_output.values, result.values, rtol=RTOL)


def test_integrated_gradients_equals_captum_per_prefix() -> None:
    from captum.attr import IntegratedGradients

    lm = tiny("llama")
    out = lm.generate(PROMPT, generate=3)
    steps = 16
    result = out.saliency("integrated_gradients", steps=steps, batch_size=3 * len(out.tokens))
    assert result.signed and not result.normalized and result.steps == steps
    ids = out.token_ids
    for row, t in zip(result.attributions, result.positions, strict=True):
        e = lm.model.get_input_embeddings()(ids[None, :t]).detach()

        def prob(x: torch.Tensor, t: int = t) -> torch.Tensor:
            return torch.softmax(lm.model(inputs_embeds=x).logits[:, -1].float(), -1)[:, ids[t]]

        attribution = IntegratedGradients(prob).attribute(e, n_steps=steps, method="gausslegendre")
        np.testing.assert_allclose(row, attribution[0].sum(-1).detach().numpy(), rtol=1e-3, atol=1e-8)
    # completeness: sum of attributions = f(x) - f(baseline), up to the quadrature error reported
    sums = np.array([row.sum() for row in result.attributions])
    gap = result.values - result.baseline_values
    np.testing.assert_allclose(np.abs(sums - gap), result.completeness_error, rtol=1e-4, atol=1e-9)


def loop_occlusion(lm: lmscope.LM, ids: torch.Tensor, positions, baseline: torch.Tensor, foil=None) -> list:
    """The straightforward computation: re-run each output's prefix once per occluded token."""
    embed = lm.model.get_input_embeddings()

    def f(e: torch.Tensor, t: int) -> float:
        logits = lm.model(inputs_embeds=e[None]).logits[0, -1].float()  # [vocab]
        if foil is not None:
            return float(logits[ids[t]] - logits[foil])
        return float(torch.softmax(logits, -1)[ids[t]])

    rows = []
    with torch.no_grad():
        for t in positions:
            e = embed(ids[None, :t])[0]  # [pos, d_model]
            whole = f(e, t)
            row = []
            for s in range(t):
                occluded = e.clone()
                occluded[s] = baseline
                row.append(whole - f(occluded, t))
            rows.append((np.array(row), whole))
    return rows


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma"])
def test_occlusion_equals_a_loop_of_re_runs(family: str) -> None:
    lm = tiny(family)
    out = lm.generate(PROMPT, generate=3)
    positions = range(1, len(out.tokens))
    ids = out.token_ids
    d_model = lm.model.get_input_embeddings().weight.shape[1]
    erased = out.saliency("occlusion", positions=positions, batch_size=2 * len(ids))  # several batched passes
    assert erased.signed and not erased.normalized and erased.method == "occlusion"
    loop = loop_occlusion(lm, ids, positions, torch.zeros(d_model))
    for row, (expected, _), t in zip(erased.attributions, loop, erased.positions, strict=True):
        assert row.shape == (t,)
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(erased.values, [whole for _, whole in loop], rtol=1e-5)
    # replacing by a token's embedding, with a contrastive target
    token = ids[1]
    replacement = lm.model.get_input_embeddings()(token[None])[0].detach()
    foil = ids[2]
    replaced = out.saliency("occlusion", positions=positions, baseline=int(token), contrast=int(foil))
    loop = loop_occlusion(lm, ids, positions, replacement, foil=foil)
    for row, (expected, _) in zip(replaced.attributions, loop, strict=True):
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)  # logit units: float32 rounding ~1e-6


def test_gradient_views_say_they_can_under_credit_a_decisive_token() -> None:
    out = tiny("llama").generate(PROMPT, generate=2)
    for method in ("grad_x_input", "gradient", "input_x_gradient", "integrated_gradients"):
        result = out.saliency(method, steps=2)
        assert GRADIENT_NOTE in str(result) and json.dumps(GRADIENT_NOTE) in result.to_html()
    assert "' France' for ' Paris'" in GRADIENT_NOTE and "occlusion" in GRADIENT_NOTE
    occluded = out.saliency("occlusion")
    assert GRADIENT_NOTE not in str(occluded) and json.dumps(GRADIENT_NOTE) not in occluded.to_html()


def test_row_budget_is_chosen_from_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _gradients.last_level_cache() > 0
    lm = tiny("llama")
    widest = max(lm.model.config.hidden_size, lm.model.config.intermediate_size)
    monkeypatch.setattr(_gradients, "last_level_cache", lambda: 4 * 4 * widest * 1000)
    assert _gradients.default_rows(lm.loaded) == 1000  # [rows, widest] float32 = a quarter of the cache
    monkeypatch.setattr(_gradients, "last_level_cache", lambda: 1)
    assert _gradients.default_rows(lm.loaded) == 256
    monkeypatch.setattr(_gradients, "last_level_cache", lambda: 2**40)
    assert _gradients.default_rows(lm.loaded) == 4096
    assert _gradients._size("32768K\n") == 32 * 2**20 and _gradients._size("2M") == 2 * 2**20


def test_saliency_leaves_the_model_as_it_was() -> None:
    lm = tiny("gpt2")
    params = list(lm.model.parameters())
    params[0].requires_grad_(False)  # a user's mix of frozen and trainable parameters
    try:
        flags = [p.requires_grad for p in params]
        out = lm.generate(PROMPT, generate=2)
        out.saliency()
        out.saliency("ig", steps=4)
        assert [p.requires_grad for p in params] == flags
        assert all(p.grad is None for p in params)
    finally:
        params[0].requires_grad_(True)


def test_output_positions_default_and_choice() -> None:
    lm = tiny("mistral")
    generated = lm.generate(PROMPT, generate=3)
    assert generated.saliency().positions == (5, 6, 7)
    traced = lm.trace(PROMPT)
    assert traced.saliency().positions == (1, 2, 3, 4)
    assert traced.saliency(positions=-1).positions == (4,)
    assert traced.saliency(positions=slice(2, None)).positions == (2, 3, 4)
    assert traced.saliency(positions=[4, 2, -1]).positions == (2, 4)
    full = traced.saliency()
    one = traced.saliency(positions=[3])
    np.testing.assert_allclose(one.attributions[0], full.attributions[2], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(full.matrix()[2], [*full.attributions[2], 0, 0])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"positions": 0}, "position 0 has no tokens before it"),
        ({"positions": 9}, "position 9 is out of range"),
        ({"attr_method": "deeplift"}, "unknown attribution method 'deeplift'"),
        ({"style": "fancy"}, "unknown style 'fancy'"),
        ({"target": "loss"}, "unknown target 'loss'"),
        ({"contrast": " wardrobe cupboard"}, r"is \d tokens, not one"),
        ({"contrast": [" chair"]}, "one per output token"),
        ({"attr_method": "ig", "steps": 0}, "steps must be at least 1"),
        ({"attr_method": "ig", "baseline": torch.zeros(3)}, "a baseline tensor must be"),
    ],
)
def test_bad_input_is_a_clear_error(options, message) -> None:
    out = tiny("llama").trace(PROMPT)
    with pytest.raises(LmscopeError, match=message):
        out.saliency(**options)


def test_masked_lms_and_model_less_traces_are_refused(tmp_path) -> None:
    with pytest.raises(LmscopeError, match="not a causal language model"):
        tiny("bert").trace(PROMPT).saliency()
    path = tiny("llama").trace(PROMPT).save(tmp_path / "t.safetensors")
    with pytest.raises(LmscopeError, match="saliency needs the model's weights"):
        lmscope.load_trace(path).saliency()


def test_text_twin_lists_top_inputs_and_json_round_trips() -> None:
    out = tiny("llama").generate(PROMPT, generate=2)
    result = out.saliency()
    lines = str(result).splitlines()
    assert lines[0] == "Saliency: grad_x_input of each output token's probability, 2 output token(s)"
    assert lines[1] == GRADIENT_NOTE
    assert len(lines) == 6  # title, note, header, rule, one row per output
    for line, i in zip(lines[4:], range(2), strict=True):
        order = np.argsort(-result.attributions[i], kind="stable")[:5]
        shown = [f"{lmscope.views.visible(result.tokens[s])!r} {100 * result.attributions[i][s]:.2f}%" for s in order]
        assert line.split("  ", 1)[0].startswith(f"{result.positions[i]} ")
        assert line.endswith("  ".join(shown))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["kind"] == "Saliency" and data["positions"] == [5, 6]
    assert [len(a) for a in data["attributions"]] == [5, 6]
    signed = out.saliency("input_x_gradient")
    assert f"{signed.attributions[0][signed.top(0, 1)[0][0]]:+.3g}" in str(signed)


def test_cli_prints_the_table_and_json(capsys, tmp_path) -> None:
    args = ["saliency", PROMPT, "--model", "tiny-gpt2", "--generate", "2"]
    assert main([*args, "--html", str(tmp_path / "s.html")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Saliency: grad_x_input of each output token's probability, 2 output token(s)")
    assert 'data-view="saliency"' in (tmp_path / "s.html").read_text(encoding="utf-8")
    assert main([*args, "--method", "gradient", "--contrast", " the", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "gradient" and data["target"] == "contrast" and len(data["positions"]) == 2
    assert main([*args, "--method", "occlusion", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "occlusion"
    assert main(["saliency", PROMPT, "--model", "tiny-gpt2", "--contrast", " two words"]) == 2
    assert "tokens, not one: give a single token" in capsys.readouterr().err


# The embedded model: exactness at real scale, completeness of IG, and one behaviour check.


@pytest.mark.embedded
def test_embedded_batched_equals_loop_and_france_explains_paris(embedded: lmscope.LM) -> None:
    out = embedded.trace("The capital of France is Paris")  # teacher-forced: every token after the first
    assert out.tokens[-1] == " Paris"
    result = out.saliency("grad_x_input")
    positions = range(1, len(out.tokens))
    assert result.positions == tuple(positions)
    assert_equal_to_loop(result, loop_gradients(embedded, out.token_ids, positions), "grad_x_input")
    top3 = [out.tokens[s] for s, _ in result.top(len(positions) - 1, 3)]
    assert " France" in top3, str(result)


@pytest.mark.embedded
def test_embedded_occlusion_gives_france_the_credit_gradients_withhold(embedded: lmscope.LM) -> None:
    out = embedded.trace("The capital of France is Paris")
    france = out.tokens.index(" France")
    occluded = out.saliency("occlusion", positions=-1)
    # erasing " France" takes away nearly all of p(" Paris")
    assert occluded.attributions[0][france] > 0.9 * occluded.values[0], str(occluded)
    grads = out.saliency("grad_x_input", positions=-1)
    assert grads.attributions[0][france] < grads.attributions[0].max(), str(grads)


@pytest.mark.embedded
def test_embedded_integrated_gradients_is_complete(embedded: lmscope.LM) -> None:
    # at the default 50 steps: |Σ a − (f(x) − f(0))| ≤ 1e-3 (probability units)
    ig = embedded.trace("The capital of France is Paris").saliency("integrated_gradients", positions=[3, 5])
    assert ig.steps == 50
    gap = ig.values - ig.baseline_values
    assert gap[-1] > 0.5  # " Paris" is likely after the real text, not after zero embeddings
    sums = np.array([row.sum() for row in ig.attributions])
    assert np.all(np.abs(sums - gap) <= 1e-3), (sums, gap)
    np.testing.assert_allclose(np.abs(sums - gap), ig.completeness_error, rtol=1e-4, atol=1e-6)


# Views in headless Chromium.


def synthetic(n: int, signed: bool = False, style: str = "minimal") -> Saliency:
    rng = np.random.default_rng(0)
    tokens = tuple(f" t{i}" for i in range(n))
    positions = tuple(range(n // 2, n))
    rows = []
    for t in positions:
        row = rng.normal(size=t) if signed else rng.random(t)
        rows.append((row if signed else row / row.sum()).astype(np.float32))
    return Saliency(
        method="input_x_gradient" if signed else "grad_x_input",
        target="prob",
        style=style,
        tokens=tokens,
        token_ids=np.arange(n),
        n_input=n // 2,
        positions=positions,
        attributions=tuple(rows),
        values=np.full(len(positions), 0.5, dtype=np.float32),
        signed=signed,
        normalized=not signed,
    )


ALPHA_ATOL = 0.5 / 255 + 1e-3  # browsers keep alpha in 8 bits


def colours(opened, selector: str) -> list[tuple[str, float]]:
    """(rgb, alpha) of each element's inline background; ("", 0) where none (rgba with alpha 1 reads as rgb)."""
    styles = opened.page.locator(selector).evaluate_all("cs => cs.map(c => c.style.background)")
    out = []
    for style in styles:
        parts = [p.strip() for p in style[style.find("(") + 1 : -1].split(",")] if style else []
        out.append((", ".join(parts[:3]), float(parts[3]) if len(parts) == 4 else float(bool(parts))))
    return out


@pytest.mark.browser
def test_minimal_view_colours_inputs_of_the_hovered_output(browser) -> None:
    out = tiny("llama").generate(PROMPT, generate=3)
    result = out.saliency()
    opened = open_html(browser, page(result.to_html()))
    root = opened.page.locator(".lmscope")
    assert root.locator(".lms-sal-cell").count() == len(result.tokens)
    assert root.locator(".lms-sal-output").count() == 3
    assert root.get_attribute("data-style") == "minimal"
    assert root.locator(".lms-sal-figure").first.is_visible() is False
    for i, t in enumerate(result.positions):
        root.locator(f'.lms-sal-cell[data-pos="{t}"]').hover()
        assert root.get_attribute("data-selected") == str(t)
        got = [alpha for _, alpha in colours(opened, ".lms-sal-cell .lms-token")]
        row = result.attributions[i]
        np.testing.assert_allclose(got[:t], row / row.max(), atol=ALPHA_ATOL)
        assert got[t:] == [0] * (len(result.tokens) - t)
    info = root.locator(".lms-sal-info").text_content()
    assert info.startswith(f"output {json.dumps(result.tokens[-1])} at {result.positions[-1]}: probability")
    assert root.locator(".lms-sal-note").text_content() == GRADIENT_NOTE
    opened.assert_clean()


@pytest.mark.browser
def test_detailed_view_shows_bars_and_percentages(browser) -> None:
    result = tiny("llama").generate(PROMPT, generate=2).saliency(style="detailed")
    opened = open_html(browser, page(result.to_html()))
    root = opened.page.locator(".lmscope")
    assert root.get_attribute("data-style") == "detailed"
    t = result.positions[-1]
    figures = root.locator(".lms-sal-figure").all_text_contents()
    assert figures[:t] == [f"{100 * v:.2f}%" for v in result.attributions[-1]]
    assert figures[t:] == [""] * (len(result.tokens) - t)
    widths = root.locator(".lms-sal-fill").evaluate_all("fs => fs.map(f => parseFloat(f.style.width))")
    row = result.attributions[-1]
    np.testing.assert_allclose(widths[:t], 100 * row / row.max(), atol=0.06)
    root.locator('button[data-style="minimal"]').click()
    assert root.locator(".lms-sal-figure").first.is_visible() is False
    opened.assert_clean()


@pytest.mark.browser
def test_signed_view_uses_two_colours_and_hostile_tokens_stay_text(browser) -> None:
    result = synthetic(12, signed=True)
    result = dataclasses.replace(result, tokens=(EVIL, *result.tokens[1:]), contrast=(EVIL,) * 6)
    opened = open_html(browser, page(result.to_html()))
    root = opened.page.locator(".lmscope")
    assert root.locator("img").count() == 0
    assert EVIL.replace(" ", "·") in root.locator(".lms-body").text_content()
    assert EVIL in root.locator(".lms-sal-info").text_content()
    row = result.attributions[-1]
    drawn = colours(opened, ".lms-sal-cell .lms-token")
    assert [rgb for rgb, _ in drawn[: len(row)]] == ["214, 39, 40" if v >= 0 else "31, 119, 180" for v in row]
    np.testing.assert_allclose([a for _, a in drawn[: len(row)]], np.abs(row) / np.abs(row).max(), atol=ALPHA_ATOL)
    opened.assert_clean()


@pytest.mark.browser
def test_a_few_hundred_tokens_stay_responsive(browser) -> None:
    result = synthetic(400, style="detailed")
    opened = open_html(browser, page(result.to_html()))
    root = opened.page.locator(".lmscope")
    assert root.locator(".lms-sal-cell").count() == 400
    elapsed = root.evaluate(
        """r => { const cells = r.querySelectorAll('.lms-sal-output'); const t0 = performance.now();
                  for (const c of cells) c.dispatchEvent(new MouseEvent('mouseenter'));
                  return (performance.now() - t0) / cells.length; }"""
    )
    assert elapsed < 50, f"{elapsed:.1f} ms per hover"  # 200 outputs x 400 tokens restyled each time
    assert root.get_attribute("data-selected") == "399"
    start = time.perf_counter()
    html = result.to_html()
    assert time.perf_counter() - start < 1 and len(html) < 2_000_000
    opened.assert_clean()
