"""Logit lens and rankings: checked against the model's own logits and a sorting reference."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

import lmscope
from conftest import tiny
from lmscope import LmscopeError
from lmscope.analysis import RankingsWatch, lens_logits, rankings
from lmscope.cli import main

rankings_module = importlib.import_module("lmscope.analysis.rankings")  # the package attribute is the function

TEXT = "The keys to the cabinet"


def hf_logits(lm: lmscope.LM, ids: torch.Tensor) -> torch.Tensor:
    """The model's own logits ``[pos, vocab]``, without lmscope's capture."""
    with torch.no_grad():
        return lm.model(ids[None]).logits[0].float()


def sorting_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Reference: rank by sorting the whole vocabulary (1 = top). ``logits [row, vocab]``, ``targets [row]``."""
    order = logits.argsort(dim=-1, descending=True)  # [row, vocab]
    return (order == targets[:, None]).int().argmax(dim=-1) + 1


def assert_ranks(ranks: np.ndarray, logits: torch.Tensor, targets: torch.Tensor, eps: float = 1e-5) -> None:
    """``ranks`` equal the sorting reference, up to logits within ``eps`` of the target's (float near-ties,
    which a matmul of another batch size may order differently)."""
    reference = sorting_ranks(logits, targets).numpy()
    target = logits.gather(-1, targets[:, None])  # [row, 1]
    ties = ((logits - target).abs() <= eps).sum(-1).numpy() - 1  # [row], the target itself excluded
    assert (np.abs(ranks - reference) <= ties).all(), (ranks, reference)


def check_final_lens(lm: lmscope.LM, text: str) -> None:
    out = lm.trace(text, sites=["resid_post"])
    expected = torch.softmax(hf_logits(lm, out.token_ids), dim=-1)  # [pos, vocab]
    lens = torch.softmax(lens_logits(out.trace, lm.unembed)[-1], dim=-1)  # [pos, vocab]
    torch.testing.assert_close(lens, expected, atol=1e-6, rtol=1e-4)
    for position in (0, -1):
        top = out.layer_predictions(position=position, layer=-1, topk=5)
        assert top.layers == (lm.arch.n_layers - 1,)
        want = expected[position].topk(5)
        np.testing.assert_allclose(top.probs[0], want.values.numpy(), rtol=1e-4, atol=1e-7)
        assert top.tokens[0] == lm.unembed.token_strings(want.indices.tolist())


def test_final_layer_lens_is_the_models_distribution(any_family: lmscope.LM) -> None:
    check_final_lens(any_family, TEXT)


@pytest.mark.embedded
def test_final_layer_lens_is_the_models_distribution_embedded(embedded: lmscope.LM) -> None:
    check_final_lens(embedded, TEXT)


@pytest.mark.parametrize("family", ["gpt2", "llama", "phi"])
def test_rankings_match_a_sorting_reference(family: str) -> None:
    lm = tiny(family)
    out = lm.trace(TEXT)
    result = out.rankings()
    ids = out.token_ids
    assert result.columns == out.tokens[1:]
    assert result.positions == (0, 1, 2, 3) and result.targets == (1, 2, 3, 4)
    assert result.ranks.shape == (lm.arch.n_layers, len(ids) - 1)
    lens = lens_logits(out.trace, lm.unembed)  # [layer, pos, vocab]
    for layer in range(lm.arch.n_layers):
        assert_ranks(result.ranks[layer], lens[layer, :-1], ids[1:])
    # the last layer ranks come straight from the model's own logits
    assert_ranks(result.ranks[-1], hf_logits(lm, ids)[:-1], ids[1:])


def test_greedy_generated_tokens_rank_first_at_the_last_layer() -> None:
    lm = tiny("llama")
    out = lm.generate(TEXT, generate=4)
    result = out.rankings()
    assert result.columns == out.tokens[-4:]
    assert result.targets == tuple(range(out.n_input, out.n_input + 4))
    assert result.positions == tuple(t - 1 for t in result.targets)
    np.testing.assert_array_equal(result.ranks[-1], [1, 1, 1, 1])
    assert result.ranks.min() >= 1 and result.ranks.max() <= out.trace.model.vocab_size
    assert str(result).startswith("Rankings: rank of each generated token after every layer (1 = top of 49152)")


def test_masked_lm_ranks_each_token_at_its_own_position() -> None:
    lm = tiny("bert")
    out = lm.trace(TEXT)
    result = out.rankings()
    n = len(out.tokens)
    assert result.positions == result.targets == tuple(range(n))
    assert_ranks(result.ranks[-1], hf_logits(lm, out.token_ids), out.token_ids)
    assert str(result).startswith("Rankings: rank of each token at its own position")


class Spy:
    """An unembedding that records how many rows each call gets."""

    def __init__(self, unembed):
        self.unembed = unembed
        self.rows: list[int] = []

    def __call__(self, h, norm=True):
        self.rows.append(h.shape[0])
        return self.unembed(h, norm=norm)


def test_rankings_unembed_in_bounded_chunks(monkeypatch) -> None:
    lm = tiny("gpt2")
    out = lm.trace(" and".join(["x"] * 60), sites=["resid_post"])
    whole = out.rankings()
    vocab = out.trace.model.vocab_size
    monkeypatch.setattr(rankings_module, "CHUNK_ELEMENTS", vocab * 7)
    spy = Spy(lm.unembed)
    chunked = rankings(out.trace, spy)
    rows = lm.arch.n_layers * (len(out.tokens) - 1)
    assert max(spy.rows) == 7 and sum(spy.rows) == rows and len(spy.rows) == -(-rows // 7)
    lens = lens_logits(out.trace, lm.unembed)[:, :-1]  # [layer, pos, vocab]
    targets = out.token_ids[1:].repeat(lm.arch.n_layers)
    assert_ranks(chunked.ranks.reshape(-1), lens.reshape(-1, lens.shape[-1]), targets)
    assert (chunked.ranks != whole.ranks).mean() < 0.01


def test_rankings_watch_matches_reference() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    result = out.rankings_watch([" is", " are", 7], position=2)
    ids = [lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" is", " are")] + [7]
    assert isinstance(result, RankingsWatch)
    assert result.position == 2 and result.columns == (" is", " are", lm.unembed.token_strings([7])[0])
    assert result.words[:2] == (" is", " are")
    np.testing.assert_array_equal(result.column_ids, ids)
    lens = lens_logits(out.trace, lm.unembed, position=2)  # [layer, vocab]
    for layer in range(lm.arch.n_layers):
        assert_ranks(result.ranks[layer], lens[layer].expand(3, -1), torch.tensor(ids))
    assert out.rankings_watch([" is"]).position == len(out.tokens) - 1


def test_watch_word_of_several_tokens_uses_its_first_and_warns() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    with pytest.warns(UserWarning, match=r"' antidisestablishment' is 4 tokens \(' ant', 'idis', .*first token ' ant'"):
        result = out.rankings_watch([" antidisestablishment"])
    assert result.columns == (" ant",) and result.words == (" antidisestablishment",)
    assert "' antidisestablishment' is ranked by its first token ' ant'" in str(result)


def test_watch_warning_points_at_the_caller() -> None:
    out = tiny("llama").trace(TEXT)
    with pytest.warns(UserWarning) as caught:
        out.rankings_watch([" antidisestablishment"])
    assert caught[0].filename == __file__


@pytest.mark.parametrize(
    ("family", "watch", "message"),
    [
        ("llama", [""], "cannot encode the watch word ''"),
        ("bert", ["\U0001f600"], "cannot encode the watch word"),
        ("llama", [10**6], "outside the vocabulary"),
        ("llama", " is", "non-empty list"),
        ("llama", [], "non-empty list"),
        ("llama", [1.5], "strings or token ids"),
    ],
)
def test_bad_watch_words_are_errors(family: str, watch, message: str) -> None:
    out = tiny(family).trace(TEXT)
    with pytest.raises(LmscopeError, match=message):
        out.rankings_watch(watch)


def test_bad_rankings_input_is_an_error() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    with pytest.raises(LmscopeError, match="position 9 is out of range"):
        out.rankings_watch([" is"], position=9)
    with pytest.raises(LmscopeError, match="site must be one of"):
        out.rankings(site="attn_out")
    with pytest.raises(LmscopeError, match="did not capture 'resid_post'"):
        lm.trace(TEXT, sites=["attn_out"]).rankings()
    with pytest.raises(LmscopeError, match="at least two tokens"):
        lm.trace("The").rankings()
    with pytest.raises(LmscopeError, match="without a model"):
        lmscope.Output(out.trace).rankings()


@pytest.mark.embedded
def test_subject_verb_agreement_on_the_embedded_model(embedded: lmscope.LM) -> None:
    plural = embedded.trace("The keys to the cabinet", sites=["resid_post"]).rankings_watch([" is", " are"])
    singular = embedded.trace("The key to the cabinets", sites=["resid_post"]).rankings_watch([" is", " are"])
    (is_pl, are_pl), (is_sg, are_sg) = plural.ranks[-1], singular.ranks[-1]
    assert are_pl < is_pl, f"plural subject: ' are' rank {are_pl}, ' is' rank {is_pl}"
    assert is_sg < are_sg, f"singular subject: ' is' rank {is_sg}, ' are' rank {are_sg}"
    assert plural.layers == tuple(range(30)) and plural.columns == (" is", " are")


@pytest.mark.embedded
def test_embedded_generated_sequence_rankings(embedded: lmscope.LM) -> None:
    out = embedded.generate(" 1, 1, 1,", generate=3, sites=["resid_post"])
    result = out.rankings()
    np.testing.assert_array_equal(result.ranks[-1], [1, 1, 1])  # greedy: the top token at the last layer
    lens = out.layer_predictions(position=out.n_input - 1, layer=-1, topk=1)
    assert lens.tokens[0][0] == result.columns[0]


def test_cli_rankings_and_watch(capsys, tmp_path) -> None:
    assert main(["rankings", TEXT, "--model", "tiny-llama", "--generate", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "Rankings" and len(data["columns"]) == 2 and data["ranks"][-1] == [1, 1]
    assert main(["rankings", TEXT, "--model", "tiny-gpt2"]) == 0
    assert capsys.readouterr().out.startswith("Rankings: rank of each next token after every layer")
    page = tmp_path / "watch.html"
    assert main(["watch", TEXT, "--model", "tiny-llama", "--words", " is", " are", "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Rankings watch at position 4 ('·cabinet')")
    assert text.splitlines()[2].split() == ["layer", "·is", "·are"]
    assert 'data-view="rankings"' in page.read_text(encoding="utf-8")
    assert main(["watch", TEXT, "--model", "tiny-llama", "--words", "", "--position", "1"]) == 2
    assert "cannot encode the watch word ''" in capsys.readouterr().err
