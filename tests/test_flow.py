"""Information-flow graph and components (issue 5): exact decompositions, exact fast proximities."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import pytest
import torch

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis._contributions import (
    attention_parts,
    attention_proximity,
    block_contributions,
    check_decomposable,
    head_updates,
    proximity,
)
from lmscope.analysis.components import update_vector
from lmscope.analysis.flow import flow_weights
from lmscope.models import FAMILIES
from lmscope.views.flow import strongest_routes

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."


@functools.cache
def traced(family: str) -> lmscope.Output:
    return tiny(family).trace(TEXT)


def reference_proximity(probs: torch.Tensor, updates: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """Straightforward: materialize every term ``A[h,q,k] · u[k,h]`` and take the clamped L1 proximity."""
    terms = probs.permute(1, 2, 0)[..., None] * updates[None]  # [pos_q, pos_k, head, d_model]
    size = whole.abs().sum(-1)[:, None, None]
    return (size - (whole[:, None, None] - terms).abs().sum(-1)).clamp_min(0)


def reference_contributions(out: lmscope.Output, layer: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All parts of the block sum at ``q`` stacked explicitly and attributed with :func:`proximity`.

    Returns the (k, h) contributions ``[pos_k, head]`` and the residual's contribution.
    """
    lm, trace = out.lm, out.trace
    parts = attention_parts(trace, lm.arch, layer, q)
    pieces = [parts.terms[: q + 1].reshape(-1, parts.terms.shape[-1]), parts.bias[None], parts.residual[None]]
    whole = parts.whole
    if lm.arch.parallel:
        mlp = trace.at("mlp_out", layer)[q].float()
        pieces.append(mlp[None])
        whole = whole + mlp
    c = proximity(torch.cat(pieces), whole)
    n = (q + 1) * lm.arch.n_heads
    return c[:n].view(q + 1, lm.arch.n_heads), c[n + 1]


# --- the proximity function ---------------------------------------------------------------------


def test_proximity_reproduces_published_vectors() -> None:
    parts = torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 1.0]])  # two parts, then the residual
    whole = torch.tensor([2.0, 2.0])
    torch.testing.assert_close(proximity(parts, whole, norm=1), torch.tensor([0.4, 0.0, 0.6]))
    torch.testing.assert_close(
        proximity(parts, whole, norm=2), torch.tensor([0.43613, 0.0, 0.56387]), atol=1e-5, rtol=0
    )
    parts = torch.tensor([[1.0, 1.0], [2.0, 2.0], [1.0, 1.0]])
    for norm in (1, 2):
        torch.testing.assert_close(
            proximity(parts, torch.tensor([4.0, 4.0]), norm=norm), torch.tensor([0.25, 0.5, 0.25])
        )


def test_fast_proximity_is_exact_on_hard_cases() -> None:
    """Many coordinate flips, exact zeros in y and terms reaching every coordinate."""
    gen = torch.Generator().manual_seed(0)
    n_pos, n_heads, d = 12, 3, 40
    probs = torch.softmax(torch.randn(n_heads, n_pos, n_pos, generator=gen) * 3, -1)
    probs = probs * torch.tril(torch.ones(n_pos, n_pos))
    updates = torch.randn(n_pos, n_heads, d, generator=gen) * torch.rand(n_pos, n_heads, 1, generator=gen) * 4
    whole = torch.randn(n_pos, d, generator=gen)
    whole[:, :5] = 0.0  # ties: sign(0) must count as +1 in the identity
    whole[3] *= 1e-3  # one query whose output is tiny: every term flips coordinates
    fast, slack = attention_proximity(probs, updates, whole)
    torch.testing.assert_close(fast, reference_proximity(probs, updates, whole), atol=1e-5, rtol=1e-5)
    assert slack.eq(0).all()


def test_tolerance_bounds_are_reported_and_hold() -> None:
    out = traced("llama")
    exact = block_contributions(out.trace, out.lm.arch, 1)
    loose = block_contributions(out.trace, out.lm.arch, 1, tolerance=0.05)
    assert exact.error.eq(0).all()
    assert loose.error.max() > 0
    worst = (loose.attention - exact.attention).abs().amax((1, 2))
    assert (worst <= loose.error + 1e-6).all()


def test_degenerate_sum_splits_evenly_among_its_parts() -> None:
    """A whole nearer 0 than to every part: all proximities are 0, the non-zero parts share it evenly."""
    parts = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])  # the zero part is no part
    whole = torch.tensor([1.0, 0.0])  # ‖y‖ = 1, ‖y − z‖ = 1 and 2
    for norm in (1, 2):
        torch.testing.assert_close(proximity(parts, whole, norm=norm), torch.tensor([0.5, 0.5, 0.0]))
    cancelled = torch.tensor([[3.0, -1.0], [-3.0, 1.0]])  # the parts cancel exactly: y = 0
    torch.testing.assert_close(proximity(cancelled, cancelled.sum(0)), torch.tensor([0.5, 0.5]))
    # per column of a batched call: only the degenerate column is split evenly
    batch = torch.stack([parts, torch.tensor([[1.0, 1.0], [-1.0, 0.0], [2.0, 1.0]])], dim=1)
    c = proximity(batch, torch.stack([whole, torch.tensor([2.0, 2.0])]))
    torch.testing.assert_close(c[:, 0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(c[:, 1], torch.tensor([0.4, 0.0, 0.6]))


def _cancelled(trace: lmscope.capture.Trace, layer: int, q: int, *, block: str, parallel: bool):
    """A copy of ``trace`` whose ``block`` output at (layer, q) cancels its residual exactly (whole = 0)."""
    tensors = {name: t.clone() for name, t in trace.tensors.items()}
    i = trace.layer_index(layer)
    pre, attn, mlp = tensors["resid_pre"][i], tensors["attn_out"][i], tensors["mlp_out"][i]
    if block == "attention":
        pre[q] = -(attn[q] + mlp[q]) if parallel else -attn[q]
    else:
        mlp[q] = -(pre[q] + attn[q])
    tensors["resid_mid"][i] = pre + attn
    tensors["resid_post"][i] = pre + attn + mlp
    return dataclasses.replace(trace, tensors=tensors)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox"])
def test_degenerate_blocks_split_evenly_and_sum_to_one(family: str) -> None:
    """Attention (with and without bias, sequential and parallel) and FFN blocks whose whole is 0."""
    out = traced(family)
    arch, layer, q = out.lm.arch, 1, 4
    trace = _cancelled(out.trace, layer, q, block="attention", parallel=arch.parallel)
    c = block_contributions(trace, arch, layer)
    probs = trace.at("attn_probs", layer)[:, q].float()  # [head, pos_k]
    terms = (probs.T > 0) & (head_updates(trace, arch, layer) != 0).any(-1)  # [pos_k, head]
    bias = getattr(arch.o_proj(layer), "bias", None)
    has_bias = bias is not None and bool(bias.ne(0).any())  # a bias of zeros is no part
    n_parts = int(terms.sum()) + 1 + has_bias + arch.parallel
    share = torch.tensor(1.0 / n_parts)
    torch.testing.assert_close(c.attention[q][terms], share.expand(int(terms.sum())))
    assert c.attention[q][~terms].eq(0).all()
    torch.testing.assert_close(c.attn_residual[q], share)
    torch.testing.assert_close(c.bias[q], share if has_bias else torch.tensor(0.0))
    total = c.attention[q].sum() + c.attn_residual[q] + c.bias[q] + (c.mlp[q] if arch.parallel else 0)
    torch.testing.assert_close(total, torch.tensor(1.0))
    other = block_contributions(out.trace, arch, layer)  # other positions are untouched
    keep = torch.arange(trace.n_pos) != q
    torch.testing.assert_close(c.attention[keep], other.attention[keep])
    if not arch.parallel:
        c = block_contributions(_cancelled(out.trace, layer, q, block="ffn", parallel=False), arch, layer)
        torch.testing.assert_close(c.mlp[q], torch.tensor(0.5))
        torch.testing.assert_close(c.mlp_residual[q], torch.tensor(0.5))


# --- decompositions and contributions for every causal family ----------------------------------


def test_parts_sum_to_the_block_output(causal_family: lmscope.LM) -> None:
    trace = causal_family.trace(TEXT).trace
    for layer in trace.layers:
        for q in (0, 5, trace.n_pos - 1):
            parts = attention_parts(trace, causal_family.arch, layer, q)
            total = parts.terms.sum((0, 1)) + parts.bias + parts.residual
            scale = parts.whole.abs().max()
            torch.testing.assert_close(total / scale, parts.whole / scale, atol=1e-4, rtol=0)
            mid = trace.at("resid_mid", layer)[q].float()
            torch.testing.assert_close(parts.whole / scale, mid / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt-neox", "qwen2", "phi", "gpt2", "opt"])
def test_fast_contributions_equal_the_materialized_reference(family: str) -> None:
    out = traced(family)
    lm, trace = out.lm, out.trace
    for layer in trace.layers:
        probs = trace.at("attn_probs", layer)
        updates = head_updates(trace, lm.arch, layer)
        whole = trace.at("resid_pre", layer) + trace.at("attn_out", layer)
        if lm.arch.parallel:
            whole = whole + trace.at("mlp_out", layer)
        fast, _ = attention_proximity(probs, updates, whole)
        ref = reference_proximity(probs.float(), updates, whole.float())
        torch.testing.assert_close(fast, ref, atol=1e-5 * float(whole.abs().sum(-1).max()), rtol=0)
        c = block_contributions(trace, lm.arch, layer)
        for q in (1, 7, trace.n_pos - 1):
            terms, residual = reference_contributions(out, layer, q)
            torch.testing.assert_close(c.attention[q, : q + 1], terms, atol=2e-5, rtol=0)
            torch.testing.assert_close(c.attn_residual[q], residual, atol=2e-5, rtol=0)


def test_contributions_are_shares_of_each_block(causal_family: lmscope.LM) -> None:
    trace = causal_family.trace(TEXT).trace
    arch = causal_family.arch
    for layer in trace.layers:
        c = block_contributions(trace, arch, layer)
        for t in (c.attention, c.attn_residual, c.bias, c.mlp, c.mlp_residual):
            assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1 + 1e-6
        attention_sum = c.attention.sum((1, 2)) + c.attn_residual + c.bias
        if arch.parallel:
            torch.testing.assert_close(attention_sum + c.mlp, torch.ones(trace.n_pos))
            assert c.mlp_residual.eq(0).all()
        else:
            torch.testing.assert_close(attention_sum, torch.ones(trace.n_pos))
            torch.testing.assert_close(c.mlp + c.mlp_residual, torch.ones(trace.n_pos))
        future = torch.triu(torch.ones(trace.n_pos, trace.n_pos, dtype=torch.bool), diagonal=1)
        assert c.attention[future].eq(0).all()


def test_zero_threshold_keeps_every_positive_edge(causal_family: lmscope.LM) -> None:
    out = causal_family.trace(TEXT)
    graph = out.flow(threshold=0.0, position=None, details=False)
    arch = causal_family.arch
    expected = set()
    for layer in out.trace.layers:
        c = block_contributions(out.trace, arch, layer)
        for q, k in (c.attention.sum(-1) > 0).nonzero().tolist():
            expected.add((layer, "attention", k, q))
        expected |= {(layer, "ffn", q, q) for q in (c.mlp > 0).nonzero().flatten().tolist()}
    got = {(e.layer, e.kind, e.source.pos, e.target.pos) for e in graph.edges if e.kind != "residual"}
    assert got == expected
    assert all(e.source.pos <= e.target.pos for e in graph.edges)
    assert all(e.source.pos == e.target.pos for e in graph.edges if e.kind != "attention")


def test_half_precision_accumulates_in_float32() -> None:
    fp32 = traced("llama")
    lm16 = lmscope.from_pretrained("tiny-llama", dtype="bfloat16")
    out16 = lm16.trace(TEXT)
    assert out16.trace.get("resid_pre").dtype == torch.bfloat16
    for layer in out16.trace.layers:
        c16 = block_contributions(out16.trace, lm16.arch, layer)
        c32 = block_contributions(fp32.trace, fp32.lm.arch, layer)
        assert c16.attention.dtype == torch.float32 and torch.isfinite(c16.attention).all()
        torch.testing.assert_close(
            c16.attention.sum((1, 2)) + c16.attn_residual + c16.bias, torch.ones(out16.trace.n_pos)
        )
        torch.testing.assert_close(c16.attn_residual, c32.attn_residual, atol=0.05, rtol=0)
    graph = out16.flow(threshold=0.04)
    assert graph.edges and all(e.weight == e.weight for e in graph.edges)


def test_ffn_weights_do_not_shrink_as_the_prompt_grows() -> None:
    lm = tiny("llama")
    ids = lm.encode(TEXT + " And then, much later, everyone went home for the night.").tolist()
    short = flow_weights(lm.trace(ids[:6]).trace, lm.arch)
    long = flow_weights(lm.trace(ids).trace, lm.arch)
    assert len(ids) > 20
    torch.testing.assert_close(long.ffn[:, :6], short.ffn, atol=1e-5, rtol=0)
    torch.testing.assert_close(long.ffn_residual[:, :6], short.ffn_residual, atol=1e-5, rtol=0)
    assert short.ffn.mean() > 0.05 and long.ffn.mean() > 0.05


# --- the graph -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt-neox", "phi", "gpt2"])
@pytest.mark.parametrize("mode", ["prune", "renormalize"])
def test_subgraph_is_connected_to_the_output_and_above_threshold(family: str, mode: str) -> None:
    import networkx as nx

    out = traced(family)
    graph = out.flow(threshold=0.04, position=-1, mode=mode, details=False)
    last = out.trace.layers[-1]
    output = f"x{last + 1}.{out.trace.n_pos - 1}"
    g = graph.to_networkx()
    assert output in g and graph.edges
    for edge in graph.edges:
        assert edge.weight >= 0.04
        assert nx.has_path(g, edge.target.id, output) and nx.has_path(g, edge.source.id, output)
        if edge.kind == "attention":
            assert sum(edge.heads) == pytest.approx(1, abs=1e-5)
    assert {n.id for n in graph.nodes} == set(g.nodes)
    n_ffn = sum(e.kind == "ffn" for e in graph.edges)
    assert g.number_of_edges() == len(graph.edges) + n_ffn  # FFN edges run through their block node
    parallel_target = "post" if out.lm.arch.parallel else "mid"
    assert all(e.target.state == parallel_target for e in graph.edges if e.kind == "attention")
    data = json.loads(json.dumps(graph.to_dict()))
    assert data["kind"] == "FlowGraph" and len(data["edges"]) == len(graph.edges)
    assert {"layer", "kind", "source", "target", "weight", "heads"} <= set(data["edges"][0])


@pytest.mark.parametrize("family", ["llama", "phi", "mixtral"])
@pytest.mark.parametrize("mode", ["prune", "renormalize"])
def test_every_position_graph_a_layer_at_a_time_equals_all_weights_at_once(family: str, mode: str) -> None:
    """``position=None`` takes each layer's weights top-down and lets them go: the same edges, bit for bit,
    as extracting from every layer's weights held at once."""
    from lmscope.analysis.flow import _extract

    out = traced(family)
    graph = out.flow(threshold=0.03, position=None, mode=mode, details=False)
    weights = flow_weights(out.trace, out.lm.arch, threshold=0.03, mode=mode)
    assert graph.edges == tuple(_extract(weights, range(out.trace.n_pos), 0.03)) and graph.edges
    assert graph.all_edges == graph.edges and graph.error == weights.error


def test_renormalized_parts_sum_to_one() -> None:
    out = traced("qwen2")
    w = flow_weights(out.trace, out.lm.arch, threshold=0.1, mode="renormalize")
    for index in range(len(w.layers)):
        att = w.attention[index]
        assert ((att == 0) | (att >= 0.1 - 1e-6)).all()
        total = att.sum((1, 2)) + w.attn_residual[index]
        assert (total <= 1 + 1e-5).all() and (total > 0.5).all()  # the bias part may take the rest


def test_text_twin_lists_the_strongest_routes() -> None:
    out = traced("llama")
    graph = out.flow(threshold=0.02, details=False)
    text = str(graph)
    assert text.startswith(f"Information flow to {out.trace.n_pos - 1} ('.')")
    routes = strongest_routes(graph)
    assert routes and "Strongest routes" in text
    score, path = routes[0]
    assert score == pytest.approx(float(torch.tensor([e.weight for e in path], dtype=torch.float64).prod()))
    assert path[0].source.layer == 0 and path[-1].target.id == f"x3.{out.trace.n_pos - 1}"
    assert all(a.target.id == b.source.id for a, b in itertools.pairwise(path))
    assert f"{score:.3f}" in text


def test_details_cover_the_subgraph() -> None:
    out = traced("gpt2")
    graph = out.flow(threshold=0.04)
    lens = graph.details[graph.nodes[-1].id].lens
    expected = out.layer_predictions(position=-1, topk=5).tokens[-1]
    assert tuple(t for t, _ in lens) == expected
    for edge in graph.edges:
        if edge.kind == "attention":
            d = graph.details[edge.id]
            assert len(d.promoted) == 5 and d.promoted[0][1] >= d.suppressed[0][1]
    assert any(graph.details[n.id].neurons for n in graph.nodes if n.kind == "ffn")


def test_bad_input_fails_clearly(tmp_path) -> None:
    out = traced("llama")
    with pytest.raises(LmscopeError, match="threshold"):
        out.flow(threshold=1.5)
    with pytest.raises(LmscopeError, match="mode"):
        out.flow(mode="nope")
    with pytest.raises(LmscopeError, match="out of range"):
        out.flow(position=99)
    with pytest.raises(LmscopeError, match="post-norm"):
        tiny("bert").trace("the keys").flow()
    gapped = tiny("llama").trace(TEXT, layers=[0, 2])
    with pytest.raises(LmscopeError, match="consecutive"):
        gapped.flow()
    no_v = tiny("llama").trace(TEXT, sites=["resid_pre", "attn_out", "mlp_out", "attn_probs"])
    with pytest.raises(LmscopeError, match="'v'"):
        no_v.flow()
    gemma2 = next(f for f in FAMILIES if f.name == "gemma2")
    with pytest.raises(LmscopeError, match="cannot be split"):
        check_decomposable(dataclasses.replace(tiny("llama").arch, family=gemma2))
    with pytest.raises(LmscopeError, match="without a model"):
        lmscope.load_trace(out.save(tmp_path / "t.safetensors")).flow()


# --- components ------------------------------------------------------------------------------------


def test_head_shares_and_contribution_maps_match_the_graph() -> None:
    out = traced("qwen2")
    graph = out.flow(threshold=0.04, details=False)
    edge = next(e for e in graph.edges if e.kind == "attention")
    shares = out.head_shares(edge.layer, edge.target.pos, edge.source.pos)
    torch.testing.assert_close(torch.tensor(shares.shares), torch.tensor(edge.heads), atol=1e-5, rtol=0)
    cmap = out.contribution_map(edge.layer)
    c = block_contributions(out.trace, out.lm.arch, edge.layer).attention
    torch.testing.assert_close(torch.tensor(cmap.contributions), c.permute(2, 0, 1))
    assert cmap.attention.shape == cmap.contributions.shape
    whole = out.head_shares(edge.layer, edge.target.pos)
    torch.testing.assert_close(torch.tensor(whole.contributions), c[edge.target.pos].sum(0))
    assert "Head shares" in str(shares) and "Contribution maps" in str(cmap)


@pytest.mark.parametrize("family", ["llama", "gpt-neox", "opt"])
def test_neuron_parts_and_promoted_tokens(family: str) -> None:
    out = traced(family)
    lm, trace, layer, q = out.lm, out.trace, 1, 4
    n_neurons = trace.at("mlp_act", layer).shape[-1]
    parts = torch.stack([update_vector(trace, lm.arch, layer, q, "ffn", neuron=n) for n in range(n_neurons)])
    bias = getattr(lm.arch.mlp_down(layer), "bias", None)
    total = parts.sum(0) + (0 if bias is None else bias.detach())
    torch.testing.assert_close(total, trace.at("mlp_out", layer)[q], atol=1e-4, rtol=0)
    top = out.top_neurons(layer, q, topk=5)
    rest = trace.at("resid_post", layer)[q] - trace.at("mlp_out", layer)[q]
    pieces = [parts, *([] if bias is None else [bias.detach()[None]]), rest[None]]
    ref = proximity(torch.cat(pieces), trace.at("resid_post", layer)[q])[: len(parts)]
    assert top.neurons.tolist() == ref.topk(5).indices.tolist()
    torch.testing.assert_close(torch.tensor(top.contributions), ref.topk(5).values, atol=1e-5, rtol=0)
    # attention heads add up to the block output, and promoted tokens are the top of W_U · update
    heads = sum(update_vector(trace, lm.arch, layer, q, "attention", head=h) for h in range(lm.arch.n_heads))
    o_bias = getattr(lm.arch.o_proj(layer), "bias", None)
    heads = heads + (0 if o_bias is None else o_bias.detach())
    torch.testing.assert_close(heads, trace.at("attn_out", layer)[q], atol=1e-4, rtol=0)
    result = out.promoted_tokens(layer, q, "attention", head=2, topk=4, norm=False)
    with torch.no_grad():
        logits = lm.model.get_output_embeddings()(update_vector(trace, lm.arch, layer, q, "attention", head=2))
    expected = lm.unembed.token_strings(logits.topk(4).indices.tolist())
    assert result.promoted == expected
    assert lm.unembed.token_strings((-logits).topk(4).indices.tolist()) == result.suppressed
    assert "promoted" in str(result) and "Top FFN neurons" in str(top)
    with pytest.raises(LmscopeError, match="component"):
        out.promoted_tokens(layer, q, "mlp")


def test_cli_flow_json() -> None:
    import contextlib
    import io

    from lmscope.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["flow", "The keys to the cabinet", "--model", "tiny-llama", "--threshold", "0.05", "--json"]) == 0
    data = json.loads(buffer.getvalue())
    assert data["kind"] == "FlowGraph" and data["threshold"] == 0.05
    assert all(e["weight"] >= 0.05 for e in data["edges"])


# --- the embedded model ----------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_graph_is_non_trivial(embedded: lmscope.LM) -> None:
    text = "The countries of the European Union are:\n1. Austria\n2. Belgium\n3. Bulgaria\n4."
    out = embedded.trace(text)
    graph = out.flow(threshold=0.04, details=False)
    last = out.trace.n_pos - 1
    sources = {e.source.pos for e in graph.edges if e.kind == "attention" and e.source.pos != last}
    assert len(sources) >= 3, sources
    assert graph.error == 0


@pytest.mark.embedded
def test_embedded_ffn_that_cancels_its_residual_splits_evenly(embedded: lmscope.LM) -> None:
    """Layer 10's FFN at " the" (position 3): ‖y‖₁ is below both ‖y − mlp‖₁ and ‖y − mid‖₁."""
    out = embedded.trace("The keys to the cabinet are on the table, said")
    trace, arch, layer, q = out.trace, embedded.arch, 10, 3
    mid = (trace.at("resid_pre", layer)[q] + trace.at("attn_out", layer)[q]).float()
    mlp = trace.at("mlp_out", layer)[q].float()
    raw = (mid + mlp).abs().sum() - torch.stack([mid, mlp]).sub(mid + mlp).abs().sum(-1)
    assert (raw < 0).all(), raw  # both proximities are 0 before normalizing: the degenerate case
    weights = flow_weights(trace, arch)
    assert float(weights.ffn[layer, q]) == pytest.approx(0.5)
    assert float(weights.ffn_residual[layer, q]) == pytest.approx(0.5)
    torch.testing.assert_close(weights.ffn + weights.ffn_residual, torch.ones_like(weights.ffn))


# --- the views in a browser ------------------------------------------------------------------------


@pytest.mark.browser
def test_flow_view_draws_selects_and_shows_details(browser) -> None:
    from browser import open_html

    out = traced("llama")
    evil = "<img src=x onerror=alert(1)>"
    graph = out.flow(threshold=0.04)
    graph = dataclasses.replace(graph, tokens=(evil, *graph.tokens[1:]))
    opened = open_html(browser, lmscope.views.page(graph.to_html()))
    page = opened.page
    drawn = page.locator(".lms-flow-edge").count()
    assert drawn == len(graph.edges)
    assert page.locator("circle.lms-flow-node").count() == sum(n.kind == "residual" for n in graph.nodes)
    assert page.locator("rect.lms-flow-ffn").count() == sum(n.kind == "ffn" for n in graph.nodes)
    page.locator(f'circle[data-node="x3.{out.trace.n_pos - 1}"]').click()
    assert "logit lens" in page.locator(".lms-flow-details").inner_text()
    page.locator(".lms-flow-start").select_option("all")
    assert page.locator(".lms-flow-edge").count() == len(graph.all_edges) > drawn
    page.locator(".lms-flow-start").select_option("0")
    assert evil.replace(" ", "·") in page.locator(".lms-flow-start").inner_text()
    assert page.locator("img").count() == 0
    opened.assert_clean()


@pytest.mark.browser
def test_wide_graph_scrolls_to_the_chosen_output(browser) -> None:
    from browser import watch

    lm = tiny("llama")
    graph = lm.trace("The keys to the cabinet are on the table, said Mrs. O'Neill, and nobody moved them.").flow()
    page = browser.new_page(viewport={"width": 400, "height": 700})  # narrower than the graph at its narrowest
    opened = watch(page)
    page.set_content(lmscope.views.page(graph.to_html()), wait_until="load")
    wrap = page.locator(".lms-flow-wrap")
    assert wrap.evaluate("w => w.scrollWidth > w.clientWidth")  # wider than the page
    last = graph.positions[0]
    node = page.locator(f'circle[data-node="x3.{last}"]').bounding_box()
    box = wrap.bounding_box()
    assert box["x"] <= node["x"] and node["x"] + node["width"] <= box["x"] + box["width"]
    page.locator(".lms-flow-start").select_option("0")
    assert wrap.evaluate("w => w.scrollLeft") == 0
    opened.assert_clean()
    page.close()


@pytest.mark.browser
def test_component_views_draw(browser) -> None:
    from browser import open_html

    out = traced("llama")
    results = [out.contribution_map(1), out.head_shares(1, -1), out.top_neurons(1, -1), out.promoted_tokens(1, -1)]
    evil = "<img src=x onerror=alert(1)>"
    results[-1] = dataclasses.replace(results[-1], promoted=(evil, *results[-1].promoted[1:]))
    opened = open_html(browser, lmscope.views.page("".join(r.to_html() for r in results)))
    page = opened.page
    assert page.locator(".lms-map-svg rect").count() > 0
    assert page.locator(".lms-flow-bar").count() == out.lm.arch.n_heads + 10
    assert evil.replace(" ", "·") in page.locator(".lms-promoted").inner_text()
    assert page.locator("img").count() == 0
    opened.assert_clean()
