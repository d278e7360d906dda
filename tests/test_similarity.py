"""CCA, SVCCA, PWCCA and CKA against their definitions and straightforward implementations."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import cca, cca_correlations, cka, layer_similarity, pwcca, svcca


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def correlated(n: int = 600, p: int = 12, q: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two [tokens, features] inputs sharing a 5-dimensional latent, plus noise and unequal scales."""
    r = rng(seed)
    latent = r.normal(size=(n, 5))
    a = latent @ r.normal(size=(5, p)) + 0.5 * r.normal(size=(n, p))
    b = latent @ r.normal(size=(5, q)) + 0.8 * r.normal(size=(n, q))
    return a * r.uniform(0.5, 3, size=p), b


def orthogonal(d: int, seed: int = 1) -> np.ndarray:
    q, r = np.linalg.qr(rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---- straightforward reference implementations (definitions, no shared code) ----


def inv_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return v @ np.diag(w**-0.5) @ v.T


def reference_cca(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hotelling: ρ² are the eigenvalues of Σaa⁻¹ Σab Σbb⁻¹ Σba; also the canonical variates of a."""
    a, b = a - a.mean(0), b - b.mean(0)
    saa, sbb, sab = a.T @ a, b.T @ b, a.T @ b
    m = inv_sqrt(saa) @ sab @ inv_sqrt(sbb)
    u, rho, _ = np.linalg.svd(m)
    k = min(a.shape[1], b.shape[1])
    variates = a @ inv_sqrt(saa) @ u[:, :k]  # [tokens, k], unit norm columns
    eig = np.sort(np.linalg.eigvals(np.linalg.inv(saa) @ sab @ np.linalg.inv(sbb) @ sab.T).real)[::-1][:k]
    np.testing.assert_allclose(np.sqrt(np.clip(eig, 0, None)), rho[:k], atol=1e-8)
    return rho[:k], variates


def reference_pwcca(a: np.ndarray, b: np.ndarray) -> float:
    rho, h = reference_cca(a, b)
    a = a - a.mean(0)
    alpha = np.array([sum(abs(h[:, i] @ a[:, j]) for j in range(a.shape[1])) for i in range(len(rho))])
    return float((alpha / alpha.sum()) @ rho)


def reference_cka(k: np.ndarray, m: np.ndarray) -> float:
    """Kornblith et al. 2019: HSIC(K, L) = tr(K H L H) / (n − 1)², CKA = HSIC(K,L) / √(HSIC(K,K)·HSIC(L,L))."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    hsic = lambda x, y: np.trace(x @ h @ y @ h)  # noqa: E731
    return float(hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m)))


def reference_hsic_unbiased(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. 2012, Theorem 2: the U-statistic over distinct index quadruples (i, j, q, r)."""
    n = k.shape[0]
    total = 0.0
    for quad in itertools.permutations(range(n), 4):
        for i, j, q, r in itertools.permutations(quad):
            total += k[i, j] * m[i, j] + k[i, j] * m[q, r] - 2 * k[i, j] * m[i, q]
    return total / 24 / (n * (n - 1) * (n - 2) * (n - 3))


def rbf(x: np.ndarray, sigma_fraction: float) -> np.ndarray:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    width = sigma_fraction * np.median(d[np.triu_indices(len(x), 1)])
    return np.exp(-(d**2) / (2 * width**2))


# ---- definitions ----


def test_identical_inputs_give_one() -> None:
    a, _ = correlated()
    assert cca(a, a) == pytest.approx(1, abs=1e-9)
    assert svcca(a, a, dims=6) == pytest.approx(1, abs=1e-9)
    assert pwcca(a, a) == pytest.approx(1, abs=1e-9)
    assert cka(a, a) == pytest.approx(1, abs=1e-12)
    assert cka(a, a, kernel="rbf") == pytest.approx(1, abs=1e-12)
    assert cka(a[:40], a[:40], debiased=True) == pytest.approx(1, abs=1e-12)


def test_matches_straightforward_implementations() -> None:
    a, b = correlated()
    rho, _ = reference_cca(a, b)
    np.testing.assert_allclose(cca_correlations(a, b), rho, atol=1e-9)
    assert cca(a, b) == pytest.approx(rho.mean(), abs=1e-9)
    assert pwcca(a, b) == pytest.approx(reference_pwcca(a, b), abs=1e-9)
    # SVCCA: project each input on its top singular directions, then plain CCA.
    reduce = lambda x, k: np.linalg.svd(x - x.mean(0), full_matrices=False)[0][:, :k]  # noqa: E731
    assert svcca(a, b, dims=4) == pytest.approx(reference_cca(reduce(a, 4), reduce(b, 4))[0].mean(), abs=1e-9)
    # CKA: feature-space linear form equals the Gram form; RBF against its definition.
    small_a, small_b = a[:150], b[:150]
    assert cka(small_a, small_b) == pytest.approx(reference_cka(small_a @ small_a.T, small_b @ small_b.T), abs=1e-10)
    expected = reference_cka(rbf(small_a, 0.5), rbf(small_b, 0.5))
    assert cka(small_a, small_b, kernel="rbf", sigma=0.5) == pytest.approx(expected, abs=1e-10)


def test_debiased_cka_matches_the_u_statistic() -> None:
    a, b = correlated(n=8, p=3, q=4, seed=3)
    ka, kb = (a - a.mean(0)) @ (a - a.mean(0)).T, (b - b.mean(0)) @ (b - b.mean(0)).T
    expected = reference_hsic_unbiased(ka, kb) / np.sqrt(
        reference_hsic_unbiased(ka, ka) * reference_hsic_unbiased(kb, kb)
    )
    assert cka(a, b, debiased=True) == pytest.approx(expected, abs=1e-10)


def test_invariances_each_method_claims() -> None:
    a, b = correlated()
    q = orthogonal(a.shape[1])
    invertible = rng(5).normal(size=(a.shape[1], a.shape[1])) + 3 * np.eye(a.shape[1])
    perm = rng(6).permutation(a.shape[1])
    shift = rng(7).normal(size=a.shape[1]) * 10
    for transform in (a @ q, 7.5 * a, a + shift):  # orthogonal map, isotropic scaling, translation
        assert cca(transform, b) == pytest.approx(cca(a, b), abs=1e-9)
        assert svcca(transform, b, dims=5) == pytest.approx(svcca(a, b, dims=5), abs=1e-9)
        assert cka(transform, b) == pytest.approx(cka(a, b), abs=1e-9)
        assert cka(transform, b, kernel="rbf") == pytest.approx(cka(a, b, kernel="rbf"), abs=1e-9)
    assert cca(a @ invertible, b) == pytest.approx(cca(a, b), abs=1e-9)  # CCA: any invertible linear map
    assert cka(a @ invertible, b) != pytest.approx(cka(a, b), abs=1e-3)  # ... which CKA does not claim
    for transform in (3.0 * a, a[:, perm]):  # PWCCA: isotropic scaling and neuron order
        assert pwcca(transform, b) == pytest.approx(pwcca(a, b), abs=1e-9)


def test_independent_inputs_give_the_null_level() -> None:
    n, p, q = 6000, 20, 30
    a, b = rng(10).normal(size=(n, p)), rng(11).normal(size=(n, q))
    assert cka(a, b) < 0.02
    # The biased estimator's null level shrinks like 1/n; the unbiased one is centered on 0.
    assert cka(a[:2000], b[:2000], kernel="rbf") < 0.04 < cka(a[:200], b[:200], kernel="rbf")
    assert abs(cka(a[:400], b[:400], kernel="rbf", debiased=True)) < 0.02
    # For independent data, E[Σ ρ²] = p·q / (n − 1) (random subspaces), so mean ρ² ≈ q / (n − 1).
    assert np.mean(cca_correlations(a, b) ** 2) == pytest.approx(q / (n - 1), rel=0.1)
    # More features than tokens: the biased CKA refuses; the unbiased estimate stays near 0.
    wide_a, wide_b = rng(12).normal(size=(60, 500)), rng(13).normal(size=(60, 400))
    with pytest.raises(LmscopeError, match="debiased=True"):
        cka(wide_a, wide_b)
    assert reference_cka(wide_a @ wide_a.T, wide_b @ wide_b.T) > 0.8  # what the refusal protects from
    assert abs(cka(wide_a, wide_b, debiased=True)) < 0.05


def test_few_samples_shapes_and_layout() -> None:
    a, b = correlated(n=40, p=30, q=20)
    with pytest.raises(LmscopeError, match="more tokens than features"):
        cca(a, b)
    with pytest.raises(LmscopeError, match="more tokens than features"):
        pwcca(a, b)
    regularized = cca(a, b, epsilon=1e-2)
    assert 0 < regularized < 1
    assert svcca(a, b, dims=5) == pytest.approx(svcca(a.T, b.T, dims=5, neurons_first=True), abs=1e-12)
    with pytest.raises(LmscopeError, match="same tokens"):
        cka(a, b[:30])
    with pytest.raises(LmscopeError, match="2-D"):
        cca(a[:, 0], b)
    with pytest.raises(LmscopeError, match="kernel"):
        cka(a, a, kernel="cosine")


def test_layer_pairs_compare_hidden_states_and_ffn_activations() -> None:
    lm = tiny("llama")
    trace = lm.trace("The keys to the cabinet are on the table, said Mrs. O'Neill to the man at the door.").trace
    result = layer_similarity(trace, "cka", site_a="resid_post", site_b="mlp_act")
    assert result.options == {"debiased": True}  # fewer tokens than features: recorded, not silent
    for i, la in enumerate(result.layers_a):
        for j, lb in enumerate(result.layers_b):
            a, b = trace.at("resid_post", la).numpy(), trace.at("mlp_act", lb).numpy()
            assert result.matrix[i, j] == pytest.approx(cka(a, b, debiased=True), abs=1e-12)
    same = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post")
    np.testing.assert_allclose(np.diag(same.matrix), 1, atol=1e-9)
    np.testing.assert_allclose(same.matrix, same.matrix.T, atol=1e-9)
    text = str(result)
    assert "CKA (debiased=True): resid_post (rows) vs mlp_act (columns)" in text
    assert f"{result.matrix[0, 2]:.3f}" in text.splitlines()[3]
    with pytest.raises(LmscopeError, match="unknown similarity"):
        layer_similarity(trace, "mutual-information")


def test_layer_pairs_over_a_collected_corpus() -> None:
    lm = tiny("gpt2")
    texts = ["The keys to the cabinet are on the table.", "I saw the man with the telescope.", "Yes."] * 12
    col = lmscope.collect(lm, texts, sites=("resid_post", "mlp_act"), progress=False)
    assert col.n_tokens > 128  # more tokens than FFN neurons: the plain (biased) estimator applies
    result = col.layer_similarity("cka")
    assert result.options == {"debiased": False} and result.n_tokens == col.n_tokens
    assert result.matrix[1, 2] == pytest.approx(cka(col.get("resid_post", 1), col.get("mlp_act", 2)), abs=1e-12)
    pw = col.layer_similarity("svcca", site_b="resid_post", dims=8)
    np.testing.assert_allclose(np.diag(pw.matrix), 1, atol=1e-9)


# ---- precision, shared decompositions, positions ----


def layer_normed(n: int = 400, p: int = 20, seed: int = 3) -> np.ndarray:
    """LayerNorm-like rows (each row's features sum to 0): rank p − 1, exactly so only in float64."""
    x = rng(seed).normal(size=(n, p)) * rng(seed + 1).uniform(0.5, 2, size=p)
    x = x - x.mean(axis=1, keepdims=True)
    return x / x.std(axis=1, keepdims=True)


def test_rank_tolerance_follows_the_input_dtype() -> None:
    """A float32 input's rounding-level direction is not a canonical direction (it was, at float64 eps)."""
    import torch

    a64 = layer_normed()
    b = np.concatenate([a64, rng(9).normal(size=(len(a64), 1))], axis=1)  # a's span plus one unrelated direction
    assert cca(a64, b) == pytest.approx(1.0, abs=1e-9)  # 19 correlations, all 1
    a32 = a64.astype(np.float32)
    singular = np.linalg.svd(a32.astype(np.float64) - a32.astype(np.float64).mean(0), compute_uv=False)
    assert 1e-12 < singular[-1] / singular[0] < 1e-5  # the spurious direction: float32 rounding, above float64 eps
    rho = cca_correlations(a32, b)
    assert len(rho) == 19  # the rounding direction is dropped
    assert cca(a32, b) == pytest.approx(1.0, abs=1e-6)
    assert cca(torch.from_numpy(a32), b) == pytest.approx(cca(a32, b), abs=1e-12)
    assert pwcca(a32, b) == pytest.approx(1.0, abs=1e-6)
    bf16 = torch.from_numpy(a64).to(torch.bfloat16)  # bfloat16: no numpy twin, its own (coarser) epsilon
    assert len(cca_correlations(bf16, b)) == 19


@functools.cache
def small_corpus() -> lmscope.Collection:
    texts = ["The keys to the cabinet are on the table.", "I saw the man with the telescope.", "Yes, no."] * 14
    return lmscope.collect(tiny("gpt2"), texts, sites=("resid_post",), progress=False)


@pytest.mark.parametrize(
    ("method", "options"),
    [("svcca", {"dims": 6}), ("svcca", {"variance": 0.9}), ("pwcca", {}), ("cca", {}), ("cca", {"epsilon": 1e-3})],
)
def test_layer_pairs_decompose_each_layer_once_with_equal_results(method: str, options: dict) -> None:
    col = small_corpus()
    result = col.layer_similarity(method, site_a="resid_post", site_b="resid_post", **options)
    measure = {"svcca": svcca, "pwcca": pwcca, "cca": cca}[method]
    for i, la in enumerate(result.layers_a):
        for j, lb in enumerate(result.layers_b):
            direct = measure(col.get("resid_post", la), col.get("resid_post", lb), **options)
            assert result.matrix[i, j] == pytest.approx(direct, abs=1e-10)


def test_positions_choose_the_compared_tokens() -> None:
    lm = tiny("llama")
    trace = lm.trace("The keys to the cabinet are on the table, said Mrs. O'Neill to the man at the door.").trace
    full = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post")
    skipped = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post", skip_first=True)
    assert skipped.n_tokens == full.n_tokens - 1 and skipped.selection == "first token skipped"
    a, b = trace.at("resid_post", 0)[1:].numpy(), trace.at("resid_post", 2)[1:].numpy()
    assert skipped.matrix[0, 2] == pytest.approx(cka(a, b, debiased=True), abs=1e-12)
    chosen = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post", positions=range(2, 12))
    a, b = trace.at("resid_post", 0)[2:12].numpy(), trace.at("resid_post", 1)[2:12].numpy()
    assert chosen.n_tokens == 10 and chosen.matrix[0, 1] == pytest.approx(cka(a, b, debiased=True), abs=1e-12)
    assert "compared: positions" in str(chosen)
    found = full.dominance[0]
    assert 0 <= found.pos < trace.n_pos and 0 < found.share <= 1 and found.token == trace.tokens[found.pos]
    with pytest.raises(LmscopeError, match="either skip_first"):
        layer_similarity(trace, "cka", skip_first=True, positions=[1, 2])
    with pytest.raises(LmscopeError, match="keeps no token"):
        layer_similarity(trace, "cka", positions=[500])


def test_one_dominant_position_is_noted_in_text_and_html() -> None:
    """A synthetic sink: a trace whose first position is 100× every other (the note), then skip_first (none)."""
    import dataclasses

    out = tiny("llama").trace("The keys to the cabinet are on the table, said Mrs. O'Neill.")
    tensors = dict(out.trace.tensors)
    sink = tensors["resid_post"].clone()
    sink[:, 0] *= 100.0
    tensors["resid_post"] = sink
    trace = dataclasses.replace(out.trace, tensors=tensors)
    result = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post")
    assert result.dominance[0].pos == 0 and result.dominance[0].share > 0.5
    text = str(result)
    assert "note: position 0 ('The') holds" in text and "skip_first=True" in text
    assert "holds" in result.to_html() and "skip_first=True" in result.to_html()
    clean = layer_similarity(trace, "cka", site_a="resid_post", site_b="resid_post", skip_first=True)
    assert "note:" not in str(clean) and "first token skipped" in str(clean)


@pytest.mark.embedded
def test_embedded_attention_sink_dominates_cka_until_skipped(embedded: lmscope.LM) -> None:
    """SmolLM2's first token holds most of the centered squared norm: CKA ≈ 1 for later layers until it is left out."""
    from lmscope.analysis.collect import read_texts
    from lmscope.probing import ud_file

    texts = [t for t in read_texts(ud_file("dev"))[:60] if len(t) > 40][:6]
    col = lmscope.collect(embedded, texts, sites=("resid_post",), layers=(4, 12, 20, 28), progress=False)
    full = col.layer_similarity("cka", site_a="resid_post", site_b="resid_post")
    skipped = col.layer_similarity("cka", site_a="resid_post", site_b="resid_post", skip_first=True)
    found = full.dominance[0]
    assert found.pos == 0 and found.share > 0.5 and found.n_texts == 6
    assert "note: position 0 of each text" in str(full) and "note:" not in str(skipped)
    assert full.matrix[1, 2] > 0.98 and full.matrix[1, 3] > 0.95  # layers 12/20 and 12/28: the sink agrees
    assert skipped.matrix[1, 2] < 0.95 and skipped.matrix[1, 3] < 0.8
    assert np.abs(skipped.matrix - full.matrix).max() > 0.2
    figure = full.plot()
    assert "position 0 of each text" in figure.axes[0].get_title(loc="left")
    for method in ("nmf", "pca"):  # the same sink dominates factorizations of the residual stream
        factors = col.run_nmf(3, site="resid_post", method=method)
        assert factors.dominance.pos == 0 and factors.dominance.share > 0.5, factors.dominance
        assert "note: position 0 of each text" in str(factors) and "note: position 0" in factors.to_html()
        assert "note:" not in str(col.run_nmf(3, site="resid_post", method=method, skip_first=True))


def test_each_layer_is_decomposed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """SVCCA over L × L layer pairs: one SVD per layer and one of its reduction, not two per pair."""
    col = small_corpus()
    calls: list[tuple[int, ...]] = []
    svd = np.linalg.svd

    def counted(x, *args, **kwargs):
        calls.append(x.shape)
        return svd(x, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", counted)
    result = col.layer_similarity("svcca", site_a="resid_post", site_b="resid_post", dims=6)
    n_layers = len(result.layers_a)
    tall = [shape for shape in calls if shape[0] == col.n_tokens]  # decompositions of a layer's [tokens, features]
    assert len(tall) == 2 * n_layers  # the input, then its 6-dimensional reduction
    assert len(calls) - len(tall) == n_layers**2  # per pair only the small [6, 6] product


def test_dominance_counts_a_position_across_texts_unless_one_token_holds_it() -> None:
    from lmscope.analysis._positions import dominance, dominance_note, found, within_text

    lengths, tokens = [3, 3, 3], ["A", "b", "c", "D", "e", "f", "G", "h", "i"]
    groups, origin = within_text(lengths), np.arange(9)
    x = np.ones((9, 2))
    x[[0, 3, 6]] = 10.0  # every text's first token: 3 × 200 of 612
    pos, share, row = dominance(x, False, groups)
    assert (pos, row) == (0, None) and share == pytest.approx(600 / 612)
    sink = found((pos, share, row), origin, tokens, lengths, "resid_post")
    assert (sink.text, sink.token, sink.n_texts) == (None, "A", 3)
    note = dominance_note(sink, sink.token)
    assert note.startswith("position 0 of each text (e.g. 'A') holds 98%") and "skip_first=True" in note
    x = np.ones((9, 2))
    x[4] = 30.0  # one token of text 1 alone
    measured = dominance(x, False, groups)
    assert measured[:2] == (1, pytest.approx(1800 / 1816)) and measured[2] == 4
    alone = found(measured, origin, tokens, lengths, "resid_post")
    assert (alone.pos, alone.text, alone.token) == (1, 1, "e")
    assert dominance_note(alone, "e").startswith("position 1 of text 1 ('e') holds 99%")
    assert "positions=... can leave it out" in dominance_note(alone, "e")
    assert dominance_note(found(dominance(np.ones((9, 2)), False, groups), origin, tokens, lengths, "x"), "b") is None
