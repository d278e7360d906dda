"""Neuron activations, NMF/PCA/ICA factors, the factor explorer and the similarity heatmap."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import lmscope
import lmscope.views
from browser import open_html
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import Factors, LayerSimilarity, factorize
from lmscope.analysis._positions import Dominance
from lmscope.cli import main

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill, and the cat sat on the mat by the door."
XSS = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def out() -> lmscope.Output:
    return tiny("llama").trace(TEXT, sites=("mlp_act", "resid_post"))


def act_matrix(out: lmscope.Output, layers: range) -> np.ndarray:  # [pos, layer·neuron]
    return np.concatenate([out.trace.at("mlp_act", layer).numpy() for layer in layers], axis=1).astype(np.float64)


def test_activations_are_layer_neuron_pos(out: lmscope.Output) -> None:
    acts = out.activations(layers=[0, 2])
    assert acts.values.shape == (2, 128, len(out.tokens)) and acts.tokens == out.tokens
    np.testing.assert_array_equal(acts.values[1], out.trace.at("mlp_act", 2).numpy().T)
    resid = out.activations(site="resid_post")
    assert resid.layers == (0, 1, 2) and resid.values.shape == (3, 64, len(out.tokens))
    _, _, peak = acts.top_neurons(1)[0]
    assert peak == acts.values.max() and "layer  neuron  peak" in str(acts)


def test_nmf_factors_are_nonnegative_and_reconstruct(out: lmscope.Output) -> None:
    nmf = out.run_nmf(n_components=4, from_layer=0, to_layer=2)
    x = np.maximum(act_matrix(out, range(2)), 0)  # nonneg="clip"
    assert nmf.layers == (0, 1) and nmf.components.shape == (4, len(out.tokens))
    assert nmf.loadings.shape == (4, x.shape[1]) and nmf.n_neurons == 128
    assert (nmf.components >= 0).all() and (nmf.loadings >= 0).all()
    error = np.linalg.norm(x - nmf.components.T.astype(np.float64) @ nmf.loadings)
    assert nmf.reconstruction_error == pytest.approx(error, rel=1e-4)
    assert nmf.relative_error == pytest.approx(error / np.linalg.norm(x), rel=1e-4)
    assert nmf.negative_fraction == pytest.approx((act_matrix(out, range(2)) < 0).mean())
    # neurons(): the largest loadings, mapped back to (layer, neuron)
    layer, neuron, loading = nmf.neurons(2, 1)[0]
    assert loading == nmf.loadings[2].max() and nmf.loadings[2, layer * 128 + neuron] == loading


def test_nmf_error_decreases_with_components_and_seed_repeats(out: lmscope.Output) -> None:
    errors = [out.run_nmf(k, 0, 3).relative_error for k in (1, 2, 4, 8, 12)]
    assert all(later < earlier for earlier, later in itertools.pairwise(errors)), errors
    first, again = out.run_nmf(5, 0, 3, seed=3), out.run_nmf(5, 0, 3, seed=3)
    np.testing.assert_array_equal(first.components, again.components)
    np.testing.assert_array_equal(first.loadings, again.loadings)


def test_nonnegativity_handling_is_explicit(out: lmscope.Output) -> None:
    x = act_matrix(out, range(1))
    shifted = out.run_nmf(3, 0, 1, nonneg="shift")
    rebuilt = shifted.components.T.astype(np.float64) @ shifted.loadings
    error = np.linalg.norm((x - x.min(0)) - rebuilt)
    assert shifted.nonneg == "shift" and shifted.reconstruction_error == pytest.approx(error, rel=1e-4)
    with pytest.raises(LmscopeError, match="negative and nonneg='error'"):
        out.run_nmf(3, 0, 1, nonneg="error")
    assert "negatives clipped to 0" in str(out.run_nmf(3, 0, 1))


def test_pca_and_ica_alternatives(out: lmscope.Output) -> None:
    x = act_matrix(out, range(3))
    centered = x - x.mean(0)
    u, s, vt = np.linalg.svd(centered, full_matrices=False)
    best = np.linalg.norm(centered - (u[:, :4] * s[:4]) @ vt[:4])  # Eckart–Young: the optimum for rank 4
    pca = out.factorize("pca", n_components=4)
    ica = out.factorize("ica", n_components=4)
    assert pca.reconstruction_error == pytest.approx(best, rel=1e-5)
    # ICA unmixes the same whitened 4-dimensional subspace, so it reconstructs equally well.
    assert ica.reconstruction_error == pytest.approx(best, rel=1e-4)
    for result in (pca, ica):  # signs fixed: each factor's largest-magnitude value is positive
        peaks = result.components[np.arange(4), np.abs(result.components).argmax(1)]
        assert (peaks > 0).all() and result.nonneg is None
    np.testing.assert_array_equal(ica.components, out.factorize("ica", n_components=4).components)


def test_factorize_a_collected_corpus() -> None:
    lm = tiny("llama")
    texts = [TEXT, "Colorless green ideas sleep furiously.", "I saw the man with the telescope."]
    col = lmscope.collect(lm, texts, sites=("mlp_act",), progress=False)
    corpus = factorize(col, 3, 1, 3)
    np.testing.assert_array_equal(col.run_nmf(3, 1, 3).components, corpus.components)
    assert corpus.components.shape == (3, col.n_tokens) and corpus.offsets == tuple(col.offsets)
    assert list(corpus.tokens) == [t for tokens in col.tokens for t in tokens]
    # one text collected = the same factorization as its trace
    alone = factorize(lmscope.collect(lm, [TEXT], sites=("mlp_act",), progress=False), 3, 1, 3)
    np.testing.assert_allclose(alone.components, lm.trace(TEXT).run_nmf(3, 1, 3).components, atol=1e-3)
    top = corpus.top_tokens(3)
    for factor, row in enumerate(top):
        assert [value for _, _, value in row] == sorted(corpus.components[factor], reverse=True)[:3]
    assert "3 factors, " in str(corpus) and "in 3 texts" in str(corpus)


def test_bad_factorization_requests(out: lmscope.Output) -> None:
    with pytest.raises(LmscopeError, match="n_components must lie in"):
        out.run_nmf(n_components=500)
    with pytest.raises(LmscopeError, match="unknown method"):
        out.factorize("svd")
    with pytest.raises(LmscopeError, match="selects no layers"):
        out.run_nmf(2, from_layer=2, to_layer=2)
    partial = tiny("llama").trace(TEXT, sites=("mlp_act",), layers=[0])
    assert partial.run_nmf(2).layers == (0,)  # no bounds: every captured layer
    with pytest.raises(LmscopeError, match=r"layers \[1, 2\] were not captured"):
        partial.run_nmf(2, 0, 3)


def test_text_twin_lists_top_tokens_per_factor(out: lmscope.Output) -> None:
    nmf = out.run_nmf(3, 0, 3)
    lines = str(nmf).splitlines()
    assert lines[0] == f"NMF of mlp_act, layers 0..2 (3 factors, {len(out.tokens)} tokens in 1 text)"
    for factor, row in enumerate(nmf.top_tokens(6)):
        line = lines[4 + factor]
        assert line.startswith(str(factor))
        _, token, value = row[0]
        assert f"{lmscope.views.visible(token)!r} {value:.2f}" in line


def test_positions_and_skip_first_choose_the_factorized_tokens(out: lmscope.Output) -> None:
    skipped = out.run_nmf(3, 0, 3, skip_first=True)
    direct = factorize(out.trace, 3, 0, 3, positions=slice(1, None))
    np.testing.assert_array_equal(skipped.components, direct.components)
    assert skipped.tokens == out.tokens[1:] and skipped.components.shape == (3, len(out.tokens) - 1)
    assert skipped.selection == "first token skipped" and "first token skipped" in str(skipped).splitlines()[1]
    pca = out.factorize("pca", 2, 0, 3, positions=[0, 2, 4, 6, -1])
    assert pca.tokens == tuple(out.tokens[p] for p in (0, 2, 4, 6, len(out.tokens) - 1))
    acts = out.activations(layers=[0, 2], skip_first=True)
    assert acts.positions == tuple(range(1, len(out.tokens))) and acts.tokens == out.tokens[1:]
    np.testing.assert_array_equal(acts.values[1], out.trace.at("mlp_act", 2).numpy()[1:].T)
    assert "positions 1.." in str(acts)
    with pytest.raises(LmscopeError, match="either skip_first"):
        out.run_nmf(2, skip_first=True, positions=[1])


def test_collections_skip_the_first_token_of_every_text() -> None:
    lm = tiny("llama")
    texts = [TEXT, "Colorless green ideas sleep furiously.", "I saw the man with the telescope."]
    col = lmscope.collect(lm, texts, sites=("mlp_act",), progress=False)
    full = col.get("mlp_act", 1)
    starts = set(col.offsets)
    keep = [i for i in range(col.n_tokens) if i not in starts]
    np.testing.assert_array_equal(col.get("mlp_act", 1, skip_first=True), full[keep])
    last = [s.stop - 1 for s in map(col.span, range(len(col)))]
    np.testing.assert_array_equal(col.get("mlp_act", 1, positions=[-1]), full[last])
    nmf = col.run_nmf(3, 1, 3, skip_first=True)
    assert nmf.components.shape[1] == len(keep) and len(nmf.offsets) == 3
    assert nmf.offsets == tuple(int(o) - i for i, o in enumerate(col.offsets))  # each text one token shorter
    assert list(nmf.tokens) == [col.all_tokens[i] for i in keep]
    similarity = col.layer_similarity("cka", site_a="mlp_act", site_b="mlp_act", skip_first=True)
    assert similarity.n_tokens == len(keep) and "first token of each text skipped" in str(similarity)


def sink_output() -> lmscope.Output:
    """The fixture's trace with position 0's activations multiplied by 100: a synthetic attention sink."""
    import dataclasses

    base = tiny("llama").trace(TEXT, sites=("mlp_act", "resid_post"))
    tensors = dict(base.trace.tensors)
    act = tensors["mlp_act"].clone()
    act[:, 0] *= 100.0
    tensors["mlp_act"] = act
    return lmscope.Output(dataclasses.replace(base.trace, tensors=tensors), base.lm)


def test_one_dominant_position_is_noted_for_nmf_pca_and_activations() -> None:
    sink = sink_output()
    for result in (sink.run_nmf(3, 0, 3), sink.factorize("pca", 3, 0, 3), sink.activations()):
        assert result.dominance.pos == 0 and result.dominance.share > 0.5
        assert "note: position 0 ('The') holds" in str(result) and "skip_first=True" in str(result)
        assert "note: position 0" in result.to_html()
    for result in (sink.run_nmf(3, 0, 3, skip_first=True), sink.activations(skip_first=True)):
        assert "note:" not in str(result)
    plain = tiny("llama").trace(TEXT, sites=("mlp_act",)).run_nmf(3, 0, 3)
    assert plain.dominance.share < 0.5 and "note:" not in str(plain)


def test_cli_nmf_and_collect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    html = tmp_path / "nmf.html"
    args = ["nmf", TEXT, "--model", "tiny-llama", "--components", "3", "--layers", "0:2", "--html", str(html)]
    assert main(args) == 0
    assert "NMF of mlp_act, layers 0..1 (3 factors" in capsys.readouterr().out and html.is_file()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"{TEXT}\n\nI saw the man with the telescope.\n", encoding="utf-8")
    model = ["--model", "tiny-llama"]
    assert main(["nmf", "--file", str(corpus), *model, "--components", "2", "--method", "pca", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "Factors" and data["method"] == "pca" and len(data["offsets"]) == 2
    out_dir = tmp_path / "col"
    args = ["collect", "--file", str(corpus), *model, "--out", str(out_dir), "--sites", "mlp_act", "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["texts"] == 2 and lmscope.load_collection(out_dir).sites == ("mlp_act",)
    assert main(["nmf", TEXT, "--model", "tiny-llama", "--layers", "x:y"]) == 2
    assert "--layers takes A:B" in capsys.readouterr().err


def xss_factors() -> Factors:
    tokens = ("The", XSS, " cat", " sat", "\n", "<script>alert(2)</script>")
    components = np.array([[0.1, 2.0, 0.0, 0.5, 0.0, 0.2], [1.0, 0.0, 0.3, 0.0, 2.0, 0.1]], dtype=np.float32)
    return Factors(
        method="nmf",
        site="mlp_act",
        layers=(0, 1),
        n_neurons=2,
        components=components,
        loadings=np.array([[1, 0, 0, 2], [0, 3, 1, 0]], dtype=np.float32),
        tokens=tokens,
        offsets=(0, 3),
        reconstruction_error=0.5,
        relative_error=0.25,
        nonneg="clip",
        negative_fraction=0.1,
        seed=0,
        n_iter=10,
    )


@pytest.mark.browser
def test_factor_explorer_in_chromium(browser: object) -> None:
    factors = xss_factors()
    opened = open_html(browser, lmscope.views.page(factors.to_html()))
    page = opened.page
    assert page.locator(".lms-nmf-row").count() == 2
    assert page.locator(".lms-nmf-spark polyline").count() == 2
    chips = page.locator(".lms-nmf-tokens .lms-token")
    shown = lmscope.views.visible(XSS)  # the payload shows as text (spaces made visible)
    assert chips.all_text_contents() == ["The", shown, "·cat"]  # text 0
    page.locator(".lms-nmf-row").nth(0).hover()  # factor 0 peaks on the second token
    assert chips.nth(1).get_attribute("data-strength") == "1.000"
    assert chips.nth(0).get_attribute("data-strength") == "0.050"
    page.locator(".lms-nmf-row").nth(1).hover()
    assert chips.nth(0).get_attribute("data-strength") == "1.000"
    page.select_option(".lms-nmf-select", "1")  # text 1: three tokens, newline made visible
    assert chips.all_text_contents() == ["·sat", "↵", "<script>alert(2)</script>"]
    top = page.locator(".lms-nmf-top tr").nth(0).locator(".lms-token").all_text_contents()
    assert top[:2] == [shown, "·sat"]  # top tokens across both texts
    assert page.locator(".lmscope img").count() == 0
    opened.assert_clean()


@pytest.mark.browser
def test_dominance_note_in_chromium(browser: object) -> None:
    for result in (sink_output().run_nmf(3, 0, 3), sink_output().activations()):
        opened = open_html(browser, lmscope.views.page(result.to_html()))
        note = opened.page.locator(".lms-nmf-note").text_content()
        assert note.startswith("note: position 0 ('The') holds") and "skip_first=True" in note
        opened.assert_clean()


@pytest.mark.browser
def test_activations_and_heatmap_in_chromium(browser: object, out: lmscope.Output) -> None:
    acts = out.activations(layers=[1])
    opened = open_html(browser, lmscope.views.page(acts.to_html()))
    assert opened.page.locator(".lms-nmf-row").count() == 8
    assert opened.page.locator(".lms-nmf-tokens .lms-token").count() == len(out.tokens)
    opened.assert_clean()
    heat = LayerSimilarity(
        method="cka",
        options={"kernel": XSS},
        site_a=XSS,
        site_b="mlp_act",
        layers_a=(0, 1, 2),
        layers_b=(0, 1, 2),
        matrix=np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.4], [0.2, 0.4, 1.0]]),
        n_tokens=25,
        dominance=(Dominance(0, XSS, 0.9, "resid_post (centered) at layer 1"),),
    )
    opened = open_html(browser, lmscope.views.page(heat.to_html()))
    page = opened.page
    note = page.locator(".lms-sim-note").text_content()
    assert note.startswith("note: position 0 (") and lmscope.views.visible(XSS) in note and "90%" in note
    assert page.locator(".lms-sim-cell").count() == 9
    page.locator(".lms-sim-cell").nth(1).hover()
    assert page.locator(".lms-sim-readout").text_content() == f"{XSS} L0 vs mlp_act L1: 0.500"
    assert XSS in page.locator(".lms-title").text_content() and page.locator(".lmscope img").count() == 0
    opened.assert_clean()
