"""Interventions: each operation does exactly what it says, checked against the same change made by hand."""

from __future__ import annotations

import pytest
import torch

import lmscope
from conftest import CAUSAL_FAMILIES, tiny
from lmscope import Intervention, LmscopeError
from lmscope.capture import INTERVENTION_SITES
from lmscope.capture._interventions import site_values

TEXT = "The keys to the cabinet are on the table"
OTHER = "The cat of the neighbours sat on the mat"


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def plain_logits(lm: lmscope.LM, text: str) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(lm.encode(text)[None]).logits[0]


def layers_of(site: str) -> list[int] | None:
    return None if site == "embed" else [0, 1]


@pytest.mark.parametrize("family", [*CAUSAL_FAMILIES, "bert"])
def test_patching_a_run_with_its_own_activations_changes_nothing(family: str) -> None:
    lm = tiny(family)
    plain = lm.trace(TEXT)
    for site in INTERVENTION_SITES:
        out = lm.trace(TEXT, interventions=[Intervention.patch(site, plain, layers=layers_of(site))])
        atol = 1e-5 if site == "attn_probs" else 0  # edges recompute attention from probabilities
        torch.testing.assert_close(out.logits, plain.logits, atol=atol, rtol=0, msg=site)
        changed = lm.trace(TEXT, interventions=[Intervention.zero(site, layers=layers_of(site), positions=1)])
        assert not torch.allclose(changed.logits, plain.logits), site


def test_zero_ablating_a_head_equals_zeroing_its_slice_by_hand() -> None:
    lm = tiny("llama")
    last, head = lm.arch.n_layers - 1, 1
    d_head = lm.arch.d_head
    out = lm.trace(TEXT, interventions=[Intervention.zero("head_out", layers=last, heads=head)])
    ids = lm.encode(TEXT)
    plain = lm.trace(TEXT).trace
    z = site_values(lm.loaded, ids, "head_out", (last,))[last]  # [pos, head, d_head]
    block = lm.arch.blocks[last]
    w_o = block.self_attn.o_proj.weight  # [d_model, head·d_head]
    with torch.no_grad():
        attn = plain.at("attn_out", last) - z[:, head] @ w_o[:, head * d_head : (head + 1) * d_head].T
        mid = plain.at("resid_pre", last) + attn
        post = mid + block.mlp(block.post_attention_layernorm(mid))
    torch.testing.assert_close(out.logits, lm.unembed(post), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.trace.at("attn_out", last), attn, atol=1e-6, rtol=0)


def test_steering_equals_adding_the_vector_by_hand() -> None:
    lm = tiny("llama")
    last = lm.arch.n_layers - 1
    vector = torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(0))
    out = lm.trace(TEXT, interventions=[Intervention.steer("resid_post", vector, scale=3.0, layers=last, positions=-1)])
    plain = lm.trace(TEXT).trace
    by_hand = plain.at("resid_post", last).clone()
    by_hand[-1] += 3.0 * vector
    torch.testing.assert_close(out.logits, lm.unembed(by_hand), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:-1], plain.logits[:-1], atol=0, rtol=0)
    torch.testing.assert_close(out.trace.at("resid_post", last), by_hand, atol=1e-6, rtol=0)


def test_patch_mean_resample_set_and_apply() -> None:
    lm = tiny("llama")
    other = lm.trace(OTHER)
    assert other.trace.n_pos == lm.trace(TEXT).trace.n_pos
    patched = lm.trace(TEXT, interventions=[Intervention.patch("resid_post", other, layers=1)])
    torch.testing.assert_close(patched.logits, other.logits, atol=1e-5, rtol=0)  # the whole state replaced
    resampled = lm.trace(TEXT, interventions=[Intervention.resample("resid_post", [OTHER], layers=1)])
    torch.testing.assert_close(resampled.logits, patched.logits, atol=0, rtol=0)
    texts = [TEXT, OTHER, "A short one"]
    values = [site_values(lm.loaded, lm.encode(t), "mlp_act", (0,))[0] for t in texts]
    mean = torch.cat(values).mean(0)
    by_mean = lm.trace(TEXT, interventions=[Intervention.mean("mlp_act", texts, layers=0, neurons=[3, 5])])
    by_set = lm.trace(TEXT, interventions=[Intervention.set("mlp_act", mean[[3, 5]], layers=0, neurons=[3, 5])])
    torch.testing.assert_close(by_mean.logits, by_set.logits, atol=1e-5, rtol=0)
    assert torch.allclose(by_mean.trace.at("mlp_act", 0)[:, [3, 5]], mean[[3, 5]].expand(len(values[0]), 2))
    doubled = lm.trace(TEXT, interventions=[Intervention.apply("mlp_out", lambda x, layer: 2 * x, layers=0)])
    added = lm.trace(
        TEXT, interventions=[Intervention.apply("mlp_out", lambda x, layer: x, layers=0)] * 2
    )  # identity twice
    torch.testing.assert_close(added.logits, lm.trace(TEXT).logits, atol=0, rtol=0)
    assert not torch.allclose(doubled.logits, added.logits)


def test_attention_edge_knockout_removes_exactly_that_edge() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT, interventions=[Intervention.zero("attn_probs", layers=0, heads=0, positions=4, keys=0)])
    plain = lm.trace(TEXT).trace
    probs = plain.at("attn_probs", 0)
    v = plain.at("v", 0)  # [pos, kv_head, d_head]
    groups = lm.arch.n_heads // lm.arch.n_kv_heads
    w_o = lm.arch.blocks[0].self_attn.o_proj.weight[:, : lm.arch.d_head]  # head 0's slice
    with torch.no_grad():
        lost = probs[0, 4, 0] * v[0, 0 // groups] @ w_o.T
    torch.testing.assert_close(out.trace.at("attn_out", 0)[4], plain.at("attn_out", 0)[4] - lost, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.trace.at("attn_out", 0)[:4], plain.at("attn_out", 0)[:4], atol=1e-5, rtol=0)


def test_hooks_are_removed_and_the_next_plain_run_equals_hugging_face() -> None:
    lm = tiny("gpt2")
    before = hook_count(lm.model)
    implementation = lm.model.config._attn_implementation
    for site in INTERVENTION_SITES:
        lm.trace(TEXT, interventions=[Intervention.zero(site, layers=layers_of(site))])
    assert hook_count(lm.model) == before
    assert lm.model.config._attn_implementation == implementation
    torch.testing.assert_close(lm.trace(TEXT).logits, plain_logits(lm, TEXT), atol=1e-5, rtol=0)

    def boom(x: torch.Tensor, layer: int) -> torch.Tensor:
        raise RuntimeError("inside the run")

    with pytest.raises(RuntimeError):
        lm.trace(TEXT, interventions=[Intervention.apply("mlp_out", boom, layers=0)])
    assert hook_count(lm.model) == before


def test_the_trace_records_interventions_and_files_keep_them(tmp_path) -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT, interventions=[Intervention.zero("head_out", layers=1, heads=[0, 1], positions=-1)])
    (record,) = out.trace.interventions
    assert record["site"] == "head_out" and record["op"] == "zero"
    assert record["heads"] == [0, 1] and record["positions"] == [out.trace.n_pos - 1] and record["layers"] == [1]
    back = lmscope.load_trace(out.save(tmp_path / "run.lmscope"))
    assert back.trace.interventions == out.trace.interventions
    assert lmscope.load_trace(lm.trace(TEXT).save(tmp_path / "plain.lmscope")).trace.interventions == ()


def test_generate_under_interventions() -> None:
    lm = tiny("llama")
    plain = lm.generate(TEXT, generate=4)
    vector = 50 * torch.randn(lm.arch.d_model, generator=torch.Generator().manual_seed(1))
    steered = lm.generate(TEXT, generate=4, interventions=[Intervention.steer("resid_post", vector, layers=0)])
    assert steered.trace.interventions and steered.tokens != plain.tokens
    assert steered.tokens[: steered.n_input] == plain.tokens[: plain.n_input]
    same = lm.generate(TEXT, generate=4, interventions=[Intervention.patch("mlp_out", TEXT, layers=0)])
    assert same.tokens == plain.tokens


def bad(lm: lmscope.LM, intervention: Intervention, match: str) -> list[int]:
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(LmscopeError, match=match) as error:
            lm.trace(TEXT, interventions=[intervention])
    finally:
        handle.remove()
    assert "\n" not in str(error.value)
    return calls


def test_bad_interventions_are_one_line_errors_before_the_model_runs() -> None:
    lm = tiny("llama")
    n = len(lm.encode(TEXT))
    checks = [
        (Intervention.zero("resid_banana"), "no site 'resid_banana'"),
        (Intervention.zero("resid_post", layers=99), "layer 99 is out of range"),
        (Intervention.zero("resid_post", positions=n), f"position {n} does not exist"),
        (Intervention.zero("head_out", heads=lm.arch.n_heads), f"head {lm.arch.n_heads} does not exist"),
        (Intervention.zero("mlp_act", neurons=10**6), "neuron 1000000 does not exist"),
        (Intervention.zero("resid_post", heads=0), "heads apply to"),
        (Intervention.steer("resid_post", torch.ones(lm.arch.d_model + 1)), "does not fit the selection"),
        (Intervention.set("resid_post", torch.full((lm.arch.d_model,), float("nan"))), "NaN"),
        (Intervention.mean("attn_probs", [TEXT]), "cannot 'mean'"),
        (Intervention.zero("embed", layers=3), "the embedding has no layers"),
    ]
    for intervention, match in checks:
        assert bad(lm, intervention, match) == []
    # Patch sources: of another length, another model, with NaN.
    with pytest.raises(LmscopeError, match="has 3 tokens, the input"):
        lm.trace(TEXT, interventions=[Intervention.patch("resid_post", "Hello there you")])
    with pytest.raises(LmscopeError, match="traced with 'tiny-gpt2'"):
        lm.trace(TEXT, interventions=[Intervention.patch("resid_post", tiny("gpt2").trace(TEXT))])
    source = lm.trace(OTHER).trace
    poisoned = type(source)(**{**source.__dict__, "tensors": dict(source.tensors), "interventions": ({"x": 1},)})
    poisoned.tensors["resid_post"][1, 2, 0] = float("nan")  # an intervened run: its stored values are used
    with pytest.raises(LmscopeError, match="NaN"):
        lm.trace(TEXT, interventions=[Intervention.patch("resid_post", poisoned, layers=1)])


def test_edges_of_attention_outside_the_attention_interface_are_refused_not_ignored() -> None:
    lm = tiny("gpt-neo")  # GPT-Neo computes its own eager attention
    with pytest.raises(LmscopeError, match="cannot be intervened on: intervene on head_out instead"):
        lm.trace(TEXT, interventions=[Intervention.zero("attn_probs", layers=0, positions=3, keys=0)])
    assert hook_count(lm.model) == 0
    plain = lm.trace(TEXT)
    ablated = lm.trace(TEXT, interventions=[Intervention.zero("head_out", layers=0, heads=0)])
    assert not torch.allclose(ablated.logits, plain.logits)
