"""Saliency of encoder-decoder models: each target token over the source tokens and the decoder prefix.

References are computed independently of lmscope's hooks: for each target, one forward pass of the
Hugging Face model through its own ``inputs_embeds`` / ``decoder_inputs_embeds`` over the source
and the target's prefix, and a backward pass to both (the per-token loop of inseq and Ecco).
"""

from __future__ import annotations

import html

import numpy as np
import pytest
import torch

import lmscope
from lmscope.analysis._cross_attention import rewritten_cross_attention
from lmscope.analysis._gradients import frozen_parameters, gauss_legendre
from lmscope.analysis._seq2seq_gradients import seq2seq_embeddings
from lmscope.analysis._seq2seq_saliency import Seq2SeqSaliency
from lmscope.errors import LmscopeError

SOURCE = "The old lighthouse keeper climbed the stairs"
TARGET = "Der alte Leuchtturm"


@pytest.fixture(scope="module", params=["t5", "bart", "marian"])
def seq2seq(request: pytest.FixtureRequest) -> tuple[lmscope.LM, lmscope.Output]:
    lm = lmscope.from_pretrained(f"tiny-{request.param}")
    return lm, lm.trace(SOURCE, target=TARGET)


def _encoder_scale(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """What the encoder multiplies its embeddings by on the token-id path but not for ``inputs_embeds``.

    Marian's and Pegasus's encoders (transformers 5) scale by ``√d_model`` only when given ids, so
    a reference through ``inputs_embeds`` passes the embeddings scaled; 1 for the others.
    """
    encoder = model.get_encoder()
    with torch.no_grad():
        want = encoder(input_ids=ids[None]).last_hidden_state
        embeds = model.get_input_embeddings()(ids[None])
        for scale in (1.0, float(getattr(encoder, "embed_scale", 1.0) or 1.0)):
            if torch.allclose(encoder(inputs_embeds=embeds * scale).last_hidden_state, want, atol=1e-6):
                return scale
    raise AssertionError("the encoder's embedding scale is neither 1 nor its embed_scale")


def _loop(lm: lmscope.LM, out: lmscope.Output, method: str, foil: int | None = None) -> list[tuple[np.ndarray, ...]]:
    """The per-token loop: a whole forward pass (encoder included) and a backward pass per target."""
    model = lm.model
    src, dec = seq2seq_embeddings(model, out.trace.encoder.token_ids, out.token_ids)
    scale = _encoder_scale(model, out.trace.encoder.token_ids)
    rows = []
    for t in range(1, len(out.tokens)):
        s = src[None].clone().requires_grad_(True)
        d = dec[None, :t].clone().requires_grad_(True)
        logits = model(inputs_embeds=s * scale, decoder_inputs_embeds=d, use_cache=False).logits[0, -1].float()
        token = int(out.token_ids[t])
        f = logits[token] - logits[foil] if foil is not None else torch.softmax(logits, -1)[token]
        g_s, g_d = (g[0] for g in torch.autograd.grad(f, (s, d)))
        if method == "grad_x_input":
            a_s, a_d = (g_s * s[0]).norm(dim=-1), (g_d * d[0]).norm(dim=-1)
        elif method == "gradient":
            a_s, a_d = g_s.norm(dim=-1), g_d.norm(dim=-1)
        else:
            a_s, a_d = (g_s * s[0]).sum(-1), (g_d * d[0]).sum(-1)
        if method != "input_x_gradient":
            total = a_s.sum() + a_d.sum()
            a_s, a_d = a_s / total, a_d / total
        rows.append((a_s.detach().numpy(), a_d.detach().numpy(), float(f.detach())))
    return rows


@pytest.mark.parametrize("method", ["grad_x_input", "gradient", "input_x_gradient"])
def test_batched_equals_the_per_token_loop(seq2seq: tuple[lmscope.LM, lmscope.Output], method: str) -> None:
    lm, out = seq2seq
    result = out.saliency(method)
    assert isinstance(result, Seq2SeqSaliency)
    assert result.positions == tuple(range(1, len(out.tokens)))
    assert result.source_tokens == out.trace.encoder.tokens
    for i, (a_s, a_d, f) in enumerate(_loop(lm, out, method)):
        assert result.source_attributions[i].shape == (len(out.trace.encoder.tokens),)
        assert result.attributions[i].shape == (result.positions[i],)  # decoder prefix s < t
        np.testing.assert_allclose(result.source_attributions[i], a_s, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(result.attributions[i], a_d, atol=1e-6, rtol=1e-4)
        assert result.values[i] == pytest.approx(f, rel=1e-4, abs=1e-7)
        if method != "input_x_gradient":  # one normalization over source and prefix together
            assert result.source_attributions[i].sum() + result.attributions[i].sum() == pytest.approx(1, abs=1e-5)


def test_batches_of_one_equal_one_batch(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    _, out = seq2seq
    whole, ones = out.saliency(), out.saliency(batch_size=1)
    for a, b in zip(
        whole.source_attributions + whole.attributions, ones.source_attributions + ones.attributions, strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_contrast_equals_the_loop(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = seq2seq
    foil = 17
    result = out.saliency("input_x_gradient", contrast=foil)
    assert result.target == "contrast"
    for i, (a_s, a_d, f) in enumerate(_loop(lm, out, "input_x_gradient", foil=foil)):
        np.testing.assert_allclose(result.source_attributions[i], a_s, atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(result.attributions[i], a_d, atol=1e-5, rtol=1e-4)
        assert result.values[i] == pytest.approx(f, rel=1e-4, abs=1e-5)


def test_integrated_gradients_complete_over_source_and_prefix(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = seq2seq
    # T5 adds no position embedding and its RMS norm is scale invariant, so f jumps at the zero
    # baseline (see lmscope.analysis._seq2seq_saliency); a token's embedding is a smooth baseline.
    smooth = lm.arch.family.name != "t5"
    options = {"target": "logit", "steps": 16 if smooth else 32, "baseline": "zero" if smooth else 5}
    result = out.saliency("integrated_gradients", **options)
    gap = result.values - result.baseline_values
    pairs = zip(result.source_attributions, result.attributions, strict=True)
    totals = np.array([s.sum() + d.sum() for s, d in pairs])
    np.testing.assert_allclose(np.abs(totals - gap), result.completeness_error, atol=1e-5)
    bound = 1e-4 if smooth else 5e-2 * max(1.0, float(np.abs(gap).max()))
    assert float(result.completeness_error.max()) < bound
    few = {**options, "steps": 4}
    whole, small = out.saliency("ig", **few), out.saliency("ig", batch_size=8, **few)  # other batching, same result
    for a, b in zip(
        whole.source_attributions + whole.attributions, small.source_attributions + small.attributions, strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_integrated_gradients_equal_the_per_token_loop(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    """Each target's path integral, step by step, through the model's own forward (SDPA attention)."""
    lm, out = seq2seq
    steps, token = 6, 5
    result = out.saliency("integrated_gradients", target="logit", steps=steps, baseline=token)
    model = lm.model
    src, dec = seq2seq_embeddings(model, out.trace.encoder.token_ids, out.token_ids)
    base_s, base_d = seq2seq_embeddings(model, torch.tensor([token]), torch.tensor([token]))  # [1, d_model] each
    alphas, weights = gauss_legendre(steps)
    scale = _encoder_scale(model, out.trace.encoder.token_ids)
    for i, t in enumerate(result.positions):
        total_s, total_d = torch.zeros_like(src), torch.zeros_like(dec[:t])
        for alpha, weight in zip(alphas, weights, strict=True):
            s = (base_s + float(alpha) * (src - base_s))[None].requires_grad_(True)
            d = (base_d + float(alpha) * (dec[:t] - base_d))[None].requires_grad_(True)
            logits = model(inputs_embeds=s * scale, decoder_inputs_embeds=d, use_cache=False).logits[0, -1].float()
            g_s, g_d = torch.autograd.grad(logits[int(out.token_ids[t])], (s, d))
            total_s += float(weight) * g_s[0]
            total_d += float(weight) * g_d[0]
        a_s, a_d = (total_s * (src - base_s)).sum(-1), (total_d * (dec[:t] - base_d)).sum(-1)
        np.testing.assert_allclose(result.source_attributions[i], a_s.numpy(), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(result.attributions[i], a_d.numpy(), atol=1e-5, rtol=1e-4)


def test_gradient_passes_restore_the_attention_implementation(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = seq2seq
    before = lm.model.config._attn_implementation
    out.saliency("gradient")
    assert lm.model.config._attn_implementation == before
    with pytest.raises(RuntimeError, match="inside"), rewritten_cross_attention(lm.model):
        assert lm.model.config._attn_implementation == "lmscope_cross_attention_gradients"
        raise RuntimeError("inside")
    assert lm.model.config._attn_implementation == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in lm.model.modules())  # scoped hooks


def _value_and_grads(model: torch.nn.Module, out: lmscope.Output, rewritten: bool) -> tuple[torch.Tensor, ...]:
    """The last target's logit and its gradients w.r.t. both stacks' embeddings (eager or rewritten attention)."""
    src, dec = seq2seq_embeddings(model, out.trace.encoder.token_ids, out.token_ids)
    s, d = src[None].clone().requires_grad_(True), dec[None, :-1].clone().requires_grad_(True)
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for config, _ in saved:  # the reference: the families' own eager attention
            config._attn_implementation_internal = "eager"
        with frozen_parameters(model), rewritten_cross_attention(model) if rewritten else torch.enable_grad():
            logits = model(inputs_embeds=s, decoder_inputs_embeds=d, use_cache=False).logits[0, -1]
            value = logits[int(out.token_ids[-1])]
            return (value.detach(), *torch.autograd.grad(value, (s, d)))
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def _cross_key_projections(model: torch.nn.Module) -> list[torch.nn.Module]:
    decoder = model.get_decoder()
    return [m for name, m in decoder.named_modules() if name.endswith(("EncDecAttention.k", "encoder_attn.k_proj"))]


def test_rewritten_cross_attention_equals_eager_and_skips_the_key_projections(
    seq2seq: tuple[lmscope.LM, lmscope.Output],
) -> None:
    lm, out = seq2seq
    projections = _cross_key_projections(lm.model)
    assert projections
    reached = []
    handles = [m.register_full_backward_hook(lambda *_: reached.append(1)) for m in projections]
    try:
        eager = _value_and_grads(lm.model, out, rewritten=False)
        assert len(reached) == len(projections)  # autograd pulls back through every cross-attention key projection
        reached.clear()
        fast = _value_and_grads(lm.model, out, rewritten=True)
        assert not reached  # the rewrite reaches the encoder output without them
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(fast[0], eager[0])  # the forward is the eager one, bit for bit
    for a, b in zip(fast[1:], eager[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_rewritten_cross_attention_falls_back_where_keys_are_not_a_projection_of_the_states(
    seq2seq: tuple[lmscope.LM, lmscope.Output],
) -> None:
    lm, out = seq2seq
    shifted = [m.register_forward_hook(lambda _m, _a, y: y * 1.5 + 0.25) for m in _cross_key_projections(lm.model)]
    try:
        eager = _value_and_grads(lm.model, out, rewritten=False)
        fast = _value_and_grads(lm.model, out, rewritten=True)
    finally:
        for handle in shifted:
            handle.remove()
    assert torch.equal(fast[0], eager[0])
    for a, b in zip(fast[1:], eager[1:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_occlusion_equals_rerunning_without_each_token(seq2seq: tuple[lmscope.LM, lmscope.Output]) -> None:
    lm, out = seq2seq
    result = out.saliency("occlusion", target="logit", positions=[2, len(out.tokens) - 1])
    src, dec = seq2seq_embeddings(lm.model, out.trace.encoder.token_ids, out.token_ids)
    scale = _encoder_scale(lm.model, out.trace.encoder.token_ids)

    def logit(s: torch.Tensor, d: torch.Tensor, t: int) -> float:
        with torch.no_grad():
            logits = lm.model(inputs_embeds=s[None] * scale, decoder_inputs_embeds=d[None, :t], use_cache=False).logits
        return float(logits[0, -1, int(out.token_ids[t])])

    for i, t in enumerate(result.positions):
        full = logit(src, dec, t)
        for s in (0, len(src) - 1):
            erased = src.clone()
            erased[s] = 0
            assert result.source_attributions[i][s] == pytest.approx(full - logit(erased, dec, t), abs=1e-4)
        erased = dec.clone()
        erased[t - 1] = 0
        assert result.attributions[i][t - 1] == pytest.approx(full - logit(src, erased, t), abs=1e-4)


def test_generated_tokens_are_explained_by_default() -> None:
    lm = lmscope.from_pretrained("tiny-t5")
    out = lm.generate(SOURCE, generate=3)
    result = out.saliency()
    assert result.positions == tuple(range(out.n_input, len(out.tokens)))
    probs = torch.softmax(out.logits.float(), -1)
    for i, t in enumerate(result.positions):
        assert result.values[i] == pytest.approx(float(probs[t - 1, out.token_ids[t]]), rel=1e-4, abs=1e-7)
    nxt = out.saliency(positions="next")
    assert nxt.positions == (len(out.tokens),) and nxt.next_token is not None


def test_views_show_source_and_target_escaped() -> None:
    lm = lmscope.from_pretrained("tiny-t5")
    out = lm.trace("<script>alert(1)</script> & more", target="<b>bold</b>")
    result = out.saliency()
    text = str(result)
    assert "src " in text and "normalized together" in text
    page = result.to_html()
    assert "<script>alert(1)" not in page and "<b>bold" not in page
    assert '"source_tokens"' in page and '"source_attributions"' in page
    assert html.escape("<script>") not in text  # the text twin holds the tokens as they are
    assert result.to_dict()["source_tokens"] == list(out.trace.encoder.tokens)


def test_bad_input() -> None:
    lm = lmscope.from_pretrained("tiny-t5")
    out = lm.trace(SOURCE, target=TARGET)
    with pytest.raises(LmscopeError, match="baseline tensor"):
        out.saliency("integrated_gradients", baseline=torch.zeros(3, 3))
    with pytest.raises(LmscopeError, match="position 0"):
        out.saliency(positions=[0])


@pytest.mark.browser
def test_view_colours_source_and_prefix_on_one_scale(browser) -> None:
    from browser import open_html

    lm = lmscope.from_pretrained("tiny-t5")
    out = lm.trace("<img src=x onerror=alert(1)> keys", target="Die Schlüssel")
    result = out.saliency()
    opened = open_html(browser, lmscope.views.page(result.to_html()))
    root = opened.page.locator(".lmscope")
    source = root.locator(".lms-sal-source .lms-sal-cell")
    assert source.count() == len(result.source_tokens)
    assert root.locator(".lms-sal-source").inner_text().replace("\n", " ").startswith("source")
    for i, t in enumerate(result.positions):
        root.locator(f'.lms-sal-cell[data-pos="{t}"]').hover()
        assert root.get_attribute("data-selected") == str(t)
        alphas = opened.page.locator(".lms-sal-source .lms-token").evaluate_all(
            "cs => cs.map(c => c.style.background ? parseFloat(c.style.background.split(',')[3] || '1') : 0)"
        )
        scale = max(result.source_attributions[i].max(), result.attributions[i].max())  # one scale for both rows
        np.testing.assert_allclose(alphas, result.source_attributions[i] / scale, atol=6e-3)  # alpha kept to ~2 digits
    assert opened.page.locator("img").count() == 0
    opened.assert_clean()
