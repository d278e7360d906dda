"""Saliency of an intervened run explains the intervened model, checked through the intervention API's own runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny
from lmscope import Intervention, LmscopeError

TEXT = "The keys to the cabinet are on the"
ABLATIONS = [
    Intervention.zero("head_out", layers=0, heads=[0, 1]),
    Intervention.zero("mlp_out", layers=1, positions=[2, 3]),
    Intervention.zero("attn_probs", layers=1, positions=-1, keys=0),
]


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def next_prob(lm, extra: list[Intervention]) -> float:
    """p(the intervened run's top token) after the last token, with ``extra`` interventions on top."""
    logits = lm.trace(TEXT, sites=(), interventions=[*ABLATIONS, *extra]).logits[-1].float()
    return float(torch.softmax(logits, -1)[TARGET[lm.name]])


TARGET: dict[str, int] = {}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saliency_of_an_intervened_run_is_the_intervened_models(family: str) -> None:
    lm = tiny(family)
    hooks = hook_count(lm.model)
    out = lm.trace(TEXT, interventions=ABLATIONS)
    TARGET[lm.name] = int(out.logits[-1].argmax())
    n = len(out.tokens)
    # Occlusion (no gradients): each drop equals zero-ablating that token's embedding in the intervened run.
    occlusion = out.primary_attributions("occlusion", positions="next")
    assert occlusion.values[0] == pytest.approx(next_prob(lm, []), abs=1e-6)
    for s in range(n):
        dropped = next_prob(lm, [Intervention.zero("embed", positions=s)])
        assert occlusion.attributions[0][s] == pytest.approx(next_prob(lm, []) - dropped, abs=1e-6)
    # Signed input × gradient: g_s · e_s is the derivative of the target along e_s (finite differences).
    signed = out.primary_attributions("input_x_gradient", positions="next")
    eps = 1e-3
    for s in (0, n - 1):
        up = next_prob(lm, [Intervention.apply("embed", lambda x, _: x * (1 + eps), positions=s)])
        down = next_prob(lm, [Intervention.apply("embed", lambda x, _: x * (1 - eps), positions=s)])
        assert signed.attributions[0][s] == pytest.approx((up - down) / (2 * eps), rel=2e-2, abs=1e-6)
    # The plain run's saliency differs, and no hook is left behind.
    plain = lm.trace(TEXT).primary_attributions("occlusion", positions="next")
    assert not np.allclose(plain.attributions[0], occlusion.attributions[0])
    assert hook_count(lm.model) == hooks


def test_embedding_interventions_edit_what_saliency_differentiates() -> None:
    lm = tiny("llama")
    swap = Intervention.patch("embed", "The cat to the cabinet are on the", positions=1)
    out = lm.trace(TEXT, interventions=[swap])
    target = int(out.logits[-1].argmax())
    result = out.primary_attributions("grad_x_input", positions="next", target="logit")
    assert result.values[0] == pytest.approx(float(out.logits[-1, target]), abs=1e-4)
    assert result.values[0] != pytest.approx(float(lm.trace(TEXT).logits[-1, target]), abs=1e-3)


def test_a_saved_intervened_trace_refuses_to_run_again(tmp_path) -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT, interventions=ABLATIONS[:1], sites=("resid_post", "attn_probs"))
    out.save(tmp_path / "run.lmscope")
    loaded = lm.load_trace(tmp_path / "run.lmscope")
    with pytest.raises(LmscopeError, match="recorded under interventions"):
        loaded.primary_attributions()
    # The neuron view needs queries and keys: the trace recorded them under the interventions (attention
    # is kept as q and k), so the loaded trace shows the intervened run without running it again.
    live, saved = out.attention(view="neuron", layer=0), loaded.attention(view="neuron", layer=0)
    assert live.weights.shape[0] == 1
    torch.testing.assert_close(saved.weights, live.weights, rtol=0, atol=0)
    # Stored probabilities without q and k: the neuron view would have to run the model again, and refuses.
    stored = lm.trace(TEXT, interventions=ABLATIONS[:1], sites=("resid_post", "attn_probs_stored"))
    stored.save(tmp_path / "stored.lmscope")
    with pytest.raises(LmscopeError, match="recorded under interventions"):
        lm.load_trace(tmp_path / "stored.lmscope").attention(view="neuron", layer=0)
