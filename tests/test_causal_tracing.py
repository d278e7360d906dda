"""Causal tracing and patching: the fast paths equal the straightforward ones; gradients equal finite differences."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import tiny
from lmscope import Intervention, LmscopeError
from lmscope.analysis.causal_tracing import causal_trace, causal_trace_loop, subject_positions
from lmscope.analysis.patching import activation_patching, spearman
from lmscope.capture._interventions import site_values

PROMPT = "The capital of France is the city of"
CLEAN, CORRUPT = "The capital of France is", "The capital of Italy is"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_causal_tracing_equals_the_loop_of_forward_passes(family: str) -> None:
    lm = tiny(family)
    fast = causal_trace(lm, PROMPT, "France", samples=2, window=3)
    loop = causal_trace_loop(lm, PROMPT, "France", samples=2, window=3)
    assert fast.scores.shape == (3, lm.arch.n_layers + 1, len(fast.tokens))
    np.testing.assert_allclose(fast.scores, loop.scores, atol=1e-6, equal_nan=True)
    assert np.isnan(fast.scores[1:, 0]).all()  # the embedding row exists only for the residual stream
    # Restoring the last layer at the last position restores the clean prediction.
    assert fast.scores[0, -1, -1] == pytest.approx(fast.clean_prob, rel=1e-4)
    # Before the subject nothing was corrupted: restoring there is the corrupted run.
    first = fast.subject[0]
    np.testing.assert_allclose(fast.scores[0, :, :first], fast.corrupted_prob, rtol=1e-4)


def test_one_token_subject_restored_at_the_embedding_is_the_clean_run() -> None:
    lm = tiny("llama")
    (pos,) = subject_positions(lm.trace(PROMPT).tokens, " France")
    result = causal_trace(lm, PROMPT, [pos], samples=1)
    assert result.scores[0, 0, pos] == pytest.approx(result.clean_prob, rel=1e-4)
    assert result.scores[0, 0, pos] != pytest.approx(result.corrupted_prob, rel=1e-3)


def test_causal_trace_views_and_errors() -> None:
    lm = tiny("llama")
    result = causal_trace(lm, PROMPT, "capital of France", " Paris", samples=1)
    text = str(result)
    assert "residual stream" in text and "MLP output" in text and "peak" in text
    html = result.to_html()
    assert 'data-view="interventions"' in html and "residual stream" in html
    json.dumps(result.to_dict())
    with pytest.raises(LmscopeError, match="is not in the text"):
        causal_trace(lm, PROMPT, "Germany")
    with pytest.raises(LmscopeError, match="not a causal language model"):
        causal_trace(tiny("bert"), PROMPT, "France")


def metric_after(lm, text: str, intervention: Intervention, answer: int, wrong: int) -> float:
    logits = lm.trace(text, interventions=[intervention], sites=()).logits[-1]
    return float(logits[answer] - logits[wrong])


@pytest.mark.parametrize("kind", ["heads", "positions", "neurons"])
def test_attribution_patching_equals_finite_differences(kind: str) -> None:
    lm = tiny("llama")
    result = activation_patching(lm, CLEAN, CORRUPT, " Paris", " Rome", kind=kind, top=4)
    answer, wrong = (lm.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in (" Paris", " Rome"))
    site = {"heads": "head_out", "positions": "resid_pre", "neurons": "mlp_act"}[kind]
    layer, unit = result.cells[1]
    ids = {t: lm.encode(t) for t in (CLEAN, CORRUPT)}
    delta = (
        site_values(lm.loaded, ids[CLEAN], site, (layer,))[layer]
        - site_values(lm.loaded, ids[CORRUPT], site, (layer,))[layer]
    )
    where = {"heads": dict(heads=unit), "positions": dict(positions=unit), "neurons": dict(neurons=unit)}[kind]
    step = delta[[unit]] if kind == "positions" else delta[:, [unit]]

    def shifted(eps: float) -> float:
        move = Intervention.apply(site, lambda x, _layer: x + eps * step, layers=layer, **where)
        return metric_after(lm, CORRUPT, move, answer, wrong)

    eps = 1e-2
    finite = (shifted(eps) - shifted(-eps)) / (2 * eps)
    attribution = np.asarray(result.attribution).reshape(-1)[1]
    assert attribution == pytest.approx(finite, rel=1e-3, abs=1e-5)
    # Exact patching of that cell equals the intervention API's patch.
    patched = metric_after(lm, CORRUPT, Intervention.patch(site, CLEAN, layers=layer, **where), answer, wrong)
    exact = np.asarray(result.exact).reshape(-1)[1]
    assert exact == pytest.approx(patched - result.corrupted_metric, abs=1e-4)
    assert -1 <= result.spearman <= 1
    assert "exact" in str(result) and "lms-iv-panel" in result.to_html()


def test_spearman_and_errors() -> None:
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 45])) == pytest.approx(1)
    assert spearman(np.array([1, 2, 3, 4]), np.array([4, 3, 2, 1])) == pytest.approx(-1)
    assert spearman(np.array([1, 1, 2]), np.array([1, 1, 2])) == pytest.approx(1)
    with pytest.raises(LmscopeError, match="equal length"):
        activation_patching(tiny("llama"), CLEAN, "A much longer corrupted prompt than that", " Paris")


def test_ablating_the_flow_graphs_top_edges_hurts_more_than_random_edges() -> None:
    lm = tiny("llama")
    result = lm.faithfulness("The keys to the cabinet are on the", threshold=0.02, ks=(1, 4, 16), draws=2)
    assert result.ks == (1, 4, 16) and result.top_logit.shape == (3,) and result.random_logit.shape == (3,)
    assert result.beats_random and result.top_auc > result.random_auc
    assert "top-k logit" in str(result) and 'data-view="faithfulness"' in result.to_html()
    json.dumps(result.to_dict())
    with pytest.raises(LmscopeError, match="ks must lie in"):
        lm.faithfulness("The keys to the cabinet are on the", ks=(10**6,))


def test_command_line_causal_trace_and_faithfulness(capsys) -> None:
    from lmscope.cli import main

    assert (
        main(["causal-trace", PROMPT, "--subject", "France", "--samples", "1", "--model", "tiny-llama", "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "CausalTrace" and len(data["scores"]) == 3
    assert main(["faithfulness", PROMPT, "--threshold", "0.02", "--draws", "1", "--model", "tiny-llama"]) == 0
    assert "top-k logit" in capsys.readouterr().out
    assert main(["causal-trace", PROMPT, "--subject", "Germany", "--model", "tiny-llama"]) == 2
    assert "is not in the text" in capsys.readouterr().err
