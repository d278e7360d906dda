"""Faithfulness of saliency: deletion and insertion curves equal the runs they describe, built by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from lmscope import Intervention, LmscopeError
from lmscope.analysis.faithfulness import FAITHFULNESS_METHODS, saliency_faithfulness

TEXT = "The keys to the cabinet are on the"


def logits_with_deleted(lm, text: str, deleted: list[int], baseline: torch.Tensor) -> torch.Tensor:
    """The logits after the last token with the embeddings at ``deleted`` replaced by ``baseline``, by hand."""
    ids = lm.encode(text)
    embeds = lm.model.get_input_embeddings()(ids[None]).detach().clone()  # [1, pos, d_model]
    embeds[0, deleted] = baseline
    with torch.no_grad():
        return lm.model(inputs_embeds=embeds, use_cache=False).logits[0, -1].float()


def test_deletion_and_insertion_curves_are_the_runs_they_describe() -> None:
    lm = tiny("llama")
    result = lm.faithfulness(TEXT, method="grad_x_input", draws=2)
    n = len(result.tokens)
    assert result.unit == "token" and result.n_units == n and result.ks == tuple(range(1, n + 1))
    target = int(lm.trace(TEXT, sites=()).logits[-1].argmax())
    order = list(np.argsort(-result.scores, kind="stable"))
    # The scores are the saliency method's own attributions of the next token.
    saliency = lm.trace(TEXT, sites=()).primary_attributions("grad_x_input", positions="next")
    np.testing.assert_allclose(result.scores, saliency.attributions[0], rtol=1e-5)
    zero = torch.zeros(lm.arch.d_model)
    for i, k in enumerate(result.ks):
        deleted = logits_with_deleted(lm, TEXT, order[:k], zero)
        kept = logits_with_deleted(lm, TEXT, order[k:], zero)
        assert result.top_logit[i] == pytest.approx(float(deleted[target]), abs=1e-4)
        assert result.top_prob[i] == pytest.approx(float(torch.softmax(deleted, -1)[target]), abs=1e-6)
        assert result.insert_logit[i] == pytest.approx(float(kept[target]), abs=1e-4)
    # Deleting with the zero baseline is zero-ablating the embedding through the intervention API.
    ablated = lm.trace(TEXT, sites=(), interventions=[Intervention.zero("embed", positions=order[:3])])
    assert result.top_logit[2] == pytest.approx(float(ablated.logits[-1, target]), abs=1e-4)
    # Keeping every token is the intact run; deleting every token is the same whichever the order.
    assert result.insert_logit[-1] == pytest.approx(result.base_logit, abs=1e-4)
    assert result.random_logit[-1] == pytest.approx(result.top_logit[-1], abs=1e-4)
    top, rand, ins = result.top_prob, result.random_prob, result.insert_prob
    assert result.comprehensiveness == pytest.approx(float(np.mean(result.base_prob - top)), abs=1e-7)
    assert result.random_comprehensiveness == pytest.approx(float(np.mean(result.base_prob - rand)), abs=1e-7)
    assert result.sufficiency == pytest.approx(float(np.mean(result.base_prob - ins)), abs=1e-7)
    assert result.top_auc == pytest.approx(float(np.mean(result.base_logit - result.top_logit)), abs=1e-5)


def test_occlusion_scores_exactly_the_one_token_deletions() -> None:
    """Occlusion runs against the deletion baseline, so its top score is the first point of the deletion curve."""
    lm = tiny("llama")
    for baseline in ("zero", "mean", " the"):
        result = saliency_faithfulness(lm, TEXT, "occlusion", ks=(1, 2), draws=1, baseline=baseline)
        assert result.base_prob - result.top_prob[0] == pytest.approx(float(result.scores.max()), abs=1e-6)
    table = lm.model.get_input_embeddings().weight
    mean = saliency_faithfulness(lm, TEXT, "gradient", ks=(2,), draws=1, baseline="mean")
    order = list(np.argsort(-mean.scores, kind="stable"))
    by_hand = logits_with_deleted(lm, TEXT, order[:2], table.float().mean(0).detach())
    target = int(lm.trace(TEXT, sites=()).logits[-1].argmax())
    assert mean.baseline == "mean input embedding"
    assert mean.top_logit[0] == pytest.approx(float(by_hand[target]), abs=1e-4)


@pytest.mark.parametrize("method", [m for m in FAITHFULNESS_METHODS if m != "flow"])
def test_every_saliency_method_has_curves_views_and_json(method: str) -> None:
    lm = tiny("gpt2")
    result = lm.faithfulness("The keys to the cabinet", method=method, ks=(0, 1, 3), draws=2, steps=4)
    assert result.method == method and result.top_logit.shape == (3,) and result.insert_prob.shape == (3,)
    assert result.top_logit[0] == pytest.approx(result.base_logit, abs=1e-4)  # k = 0 deletes nothing
    text = str(result)
    assert "comprehensiveness" in text and "top-k only prob" in text and "rank" in text
    html = result.to_html()
    assert 'data-view="faithfulness"' in html and "lms-fa-chart" in html
    json.dumps(result.to_dict())
    if method == "occlusion":
        pytest.importorskip("matplotlib")
        figure = result.plot()
        assert len(figure.axes) == 2 and len(figure.axes[0].lines) == 4  # three curves and the intact run


def test_flow_faithfulness_shares_the_result_and_view() -> None:
    lm = tiny("llama")
    result = lm.faithfulness(TEXT, threshold=0.02, ks=(1, 4), draws=1)
    assert result.method == "flow" and result.unit == "edge" and result.insert_logit is None
    assert result.n_edges == result.n_units and "flow graph" in str(result) and "comprehensiveness" not in str(result)
    assert 'data-view="faithfulness"' in result.to_html()


def test_bad_requests_are_clear_errors() -> None:
    lm = tiny("llama")
    for options, message in [
        ({"method": "bogus"}, "unknown faithfulness method"),
        ({"method": "occlusion", "threshold": 0.1}, "threshold applies to the flow graph"),
        ({"method": "occlusion", "ks": (99,)}, "ks must lie in 0..8"),
        ({"method": "occlusion", "ks": ()}, "ks must lie in"),
        ({"method": "occlusion", "draws": 0}, "draws must be at least 1"),
        ({"method": "occlusion", "baseline": ""}, "deletion baseline"),
        ({"method": "occlusion", "baseline": "two words"}, "is 2 tokens"),
        ({"method": "flow", "draws": 0}, "draws must be at least 1"),
        ({"method": "flow", "baseline": "mean"}, "baseline applies to saliency methods"),
    ]:
        with pytest.raises(LmscopeError, match=message):
            lm.faithfulness(TEXT, **options)
    with pytest.raises(LmscopeError, match="not a causal language model"):
        tiny("bert").faithfulness(TEXT, method="gradient")


def test_command_line_saliency_faithfulness(capsys) -> None:
    from lmscope.cli import main

    assert main(["faithfulness", TEXT, "--method", "occlusion", "--draws", "1", "--model", "tiny-llama"]) == 0
    assert "comprehensiveness" in capsys.readouterr().out
    assert main(["faithfulness", TEXT, "--method", "gradient", "--baseline", "mean", "--model", "tiny-llama",
                 "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "gradient" and data["baseline"] == "mean input embedding"
    assert main(["faithfulness", TEXT, "--baseline", "mean", "--model", "tiny-llama"]) == 2
    assert "--baseline applies to saliency" in capsys.readouterr().err


@pytest.mark.browser
def test_curves_draw_in_chromium_and_hostile_tokens_stay_text(browser) -> None:
    import dataclasses

    from browser import open_html
    from lmscope.views import page

    evil = "<img src=x onerror=alert(1)>"
    result = saliency_faithfulness(tiny("llama"), TEXT, "gradient", ks=(1, 2, 4), draws=1)
    result = dataclasses.replace(result, tokens=(evil, *result.tokens[1:]), target=evil)
    opened = open_html(browser, page(result.to_html()))
    root = opened.page.locator(".lmscope")
    assert root.locator("svg.lms-fa-chart").count() == 2
    assert root.locator("polyline").count() == 6  # deletion, random, insertion: logit and probability
    assert root.locator("circle.lms-fa-top").count() == 6
    assert root.locator(".lms-fa-tokens .lms-token").count() == len(result.tokens)
    assert root.locator("img").count() == 0 and evil.replace(" ", "·") in root.text_content()
    opened.assert_clean()
