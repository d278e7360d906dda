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
    n = len(out.tokens)
    causal = lm.model.can_generate()
    # (position, the state it is read from): Ecco's meaning for a causal LM, the token's own state for a masked LM
    cases = [(1, 0), ("next", n - 1), (-1, n - 1), (n, n - 1), (-2, n - 3)] if causal else [(0, 0), (-1, n - 1)]
    for position, state in cases:
        top = out.layer_predictions(position=position, layer=-1, topk=5)
        assert top.layers == (lm.arch.n_layers - 1,) and top.state_position == state
        want = expected[state].topk(5)
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
    result = out.rankings_watch([" is", " are", 7], position=2)  # the token at 2, predicted from the state at 1
    ids = [lm.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" is", " are")] + [7]
    assert isinstance(result, RankingsWatch)
    assert result.position == 2 and result.state_position == 1
    assert result.columns == (" is", " are", lm.unembed.token_strings([7])[0])
    assert result.words[:2] == (" is", " are") and result.notes == ()
    np.testing.assert_array_equal(result.column_ids, ids)
    lens = lens_logits(out.trace, lm.unembed, position=1)  # [layer, vocab]
    for layer in range(lm.arch.n_layers):
        assert_ranks(result.ranks[layer], lens[layer].expand(3, -1), torch.tensor(ids))
    after = out.rankings_watch([" is"])  # Ecco's default -1: the token after the last one
    assert after.position is None and after.state_position == len(out.tokens) - 1
    assert str(after).startswith(
        "Rankings watch: prediction after the last token, read from the state at 4 ('·cabinet')"
    )
    assert after.to_dict()["position"] is None and after.to_dict()["state_position"] == 4


def ecco_state(method: str, position: int, n: int) -> int:
    """The hidden state Ecco reads, written from Ecco's own indexing (src/ecco/output.py):
    ``layer_predictions`` takes ``h[position - 1]``; ``rankings_watch`` takes ``h[position - 1]``
    except for its default ``-1``, which takes ``h[-1]``."""
    if method == "rankings_watch" and position == -1:
        return n - 1
    return (position - 1) % n


def test_ecco_code_copied_as_is_reads_eccos_state() -> None:
    lm = tiny("llama")
    out = lm.generate(TEXT, generate=2)  # 7 tokens, the last two generated
    n = len(out.tokens)
    lens = lens_logits(out.trace, lm.unembed)  # [layer, pos, vocab]
    for position in (1, 3, 5, 6, n, -2):  # n: Ecco's article watches position=5 on its 5-token input
        state = ecco_state("layer_predictions", position, n)
        top = out.layer_predictions(position=position, layer=2, topk=3)  # Ecco: output.layer_predictions(...)
        assert top.state_position == state
        assert top.tokens[0] == lm.unembed.token_strings(lens[2, state].topk(3).indices.tolist())
        assert top.position == (position % n if position != n else None)
    for position in (-1, 1, 4, 6, n, -3):
        state = ecco_state("rankings_watch", position, n)
        watch = out.rankings_watch([" is", " are"], position=position)
        assert watch.state_position == state
        ids = torch.tensor(watch.column_ids)
        assert_ranks(watch.ranks[-1], lens[-1, state].expand(2, -1), ids)
    # the generated token at 5 is explained from the state at 4, and says so
    top = out.layer_predictions(position=5, topk=1)
    token = out.tokens[5].replace(" ", "·")
    assert str(top).startswith(f"Logit lens: prediction of '{token}' at 5, read from the state at 4 ('·cabinet')")
    assert top.to_dict()["position"] == 5 and top.to_dict()["state_position"] == 4


def test_next_has_its_own_spelling_everywhere() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    n = len(out.tokens)
    spellings = ("next", n, -1)
    lenses = [out.layer_predictions(position=p, topk=3) for p in spellings]
    assert all(r.position is None and r.state_position == n - 1 for r in lenses)
    assert all(r.tokens == lenses[0].tokens for r in lenses)
    assert str(lenses[0]).startswith("Logit lens: prediction after the last token, read from the state at 4")
    watches = [out.rankings_watch([" is"], position=p) for p in spellings]
    assert all(np.array_equal(w.ranks, watches[0].ranks) for w in watches)
    flows = [out.flow(position=p, details=False) for p in spellings]
    assert all(f.positions == (n - 1,) for f in flows)
    assert "explains the prediction after the last token, read from the state at 4" in str(flows[0])
    assert out.flow(position=3, details=False).positions == (2,)  # the graph of token 3 starts at the state 2
    assert out.position_of_state(-1) == n and out.position_of_state(2) == 3
    assert out.layer_predictions(position=out.position_of_state(2)).state_position == 2
    assert out.layer_predictions().position == 1  # Ecco's default: the second token, from the first state


def test_masked_lm_positions_name_the_token_at_its_own_state() -> None:
    out = tiny("bert").trace(TEXT)
    top = out.layer_predictions(position=2, topk=2)
    assert top.position == top.state_position == 2
    assert "read from its own state" in str(top)
    assert out.position_of_state(2) == 2
    with pytest.raises(LmscopeError, match="masked LM"):
        out.rankings_watch([" is"], position="next")


def test_watch_word_of_several_tokens_uses_its_first_and_warns() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    with pytest.warns(UserWarning, match=r"' antidisestablishment' is 4 tokens \(' ant', 'idis', .*first token ' ant'"):
        result = out.rankings_watch([" antidisestablishment"])
    assert result.columns == (" ant",) and result.words == (" antidisestablishment",)
    note = "' antidisestablishment' is 4 tokens (' ant', 'idis', 'establish', 'ment'): ranking its first token ' ant'"
    assert result.notes == (note,) and note in str(result).splitlines()
    assert note in result.to_html()


def test_watch_words_without_a_space_are_ranked_as_words_with_a_note() -> None:
    lm = tiny("llama")
    out = lm.trace(TEXT)
    bare = out.rankings_watch(["is", "are", ",", "1", 7])
    spaced = out.rankings_watch([" is", " are", ",", "1", 7])
    assert bare.words[:4] == ("is", "are", ",", "1")
    assert bare.columns == spaced.columns and bare.columns[:4] == (" is", " are", ",", "1")
    np.testing.assert_array_equal(bare.ranks, spaced.ranks)
    is_id = lm.tokenizer("is", add_special_tokens=False)["input_ids"][0]
    assert bare.notes == (
        f"'is' is ranked as the word mid-sentence, ' is' (token id {is_id} ranks 'is' itself)",
        f"'are' is ranked as the word mid-sentence, ' are' (token id {lm.tokenizer.convert_tokens_to_ids('are')} "
        "ranks 'are' itself)",
    )
    assert spaced.notes == ()  # "," and "1" are taken as given: SmolLM2 spells " 1" as " ", "1"
    lines = str(bare).splitlines()
    assert lines[2] == bare.notes[0] and lines[3] == bare.notes[1]
    assert bare.notes[0] in bare.to_html()
    exact = out.rankings_watch([is_id])  # a token id ranks the token itself
    assert exact.columns == ("is",) and exact.notes == ()
    with pytest.warns(UserWarning, match="' antidisestablishment' is 4 tokens"):
        split = out.rankings_watch(["antidisestablishment"])
    assert split.notes == (
        "'antidisestablishment' is ranked as the word mid-sentence, ' antidisestablishment'; "
        "' antidisestablishment' is 4 tokens (' ant', 'idis', 'establish', 'ment'): ranking its first token ' ant'",
    )


def test_cli_and_library_watch_the_same_tokens(capsys) -> None:
    out = tiny("llama").trace(TEXT)
    for position in ("next", "3"):
        args = ["watch", TEXT, "--model", "tiny-llama", "--words", "is", "are", "--position", position, "--json"]
        assert main(args) == 0
        data = json.loads(capsys.readouterr().out)
        want = out.rankings_watch(["is", "are"], position=position if position == "next" else int(position))
        assert data == json.loads(json.dumps(want.to_dict()))
        assert data["columns"] == [" is", " are"] and len(data["notes"]) == 2
    assert main(["lens", TEXT, "--model", "tiny-llama", "--position", "2", "--topk", "2"]) == 0
    assert capsys.readouterr().out.startswith("Logit lens: prediction of '·to' at 2, read from the state at 1")
    assert main(["lens", TEXT, "--model", "tiny-llama", "--topk", "2"]) == 0  # the command line's default: next
    assert capsys.readouterr().out.startswith("Logit lens: prediction after the last token")
    assert main(["flow", TEXT, "--model", "tiny-llama", "--position", "3"]) == 0
    assert "explains the prediction of '·the' at 3, read from the state at 2 ('·to')" in capsys.readouterr().out
    assert main(["lens", TEXT, "--model", "tiny-llama", "--position", "0"]) == 2
    assert "position 0 is the first token, which no state predicts" in capsys.readouterr().err


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
    with pytest.raises(LmscopeError, match="position 0 is the first token, which no state predicts"):
        out.layer_predictions(position=0)
    with pytest.raises(LmscopeError, match="not a token index or 'next'"):
        out.rankings_watch([" is"], position="last")
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
    lens = out.layer_predictions(position=out.n_input, layer=-1, topk=1)  # the first generated token
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
    assert text.startswith("Rankings watch: prediction after the last token, read from the state at 4 ('·cabinet')")
    assert text.splitlines()[2].split() == ["layer", "·is", "·are"]
    assert 'data-view="rankings"' in page.read_text(encoding="utf-8")
    assert main(["watch", TEXT, "--model", "tiny-llama", "--words", "", "--position", "1"]) == 2
    assert "cannot encode the watch word ''" in capsys.readouterr().err


def test_saliency_explains_the_prediction_the_lens_explains() -> None:
    """The app's tabs ask the same position of every analysis: saliency of "next" (or len(tokens)) attributes
    the top prediction after the last token, exactly as if that token were appended and explained."""
    lm = tiny("llama")
    out = lm.trace("The capital of France is")
    n = len(out.tokens)
    lens = out.layer_predictions(position="next", layer=-1, topk=1)
    spelled = [out.primary_attributions(positions=p) for p in ("next", n, [n])]
    sal = spelled[0]
    assert sal.positions == (n,) and sal.next_token == lens.tokens[0][0]
    assert all(s.positions == (n,) and np.allclose(s.attributions[0], sal.attributions[0]) for s in spelled)
    np.testing.assert_allclose(sal.values, lens.probs[0], rtol=1e-4)
    appended = lm.trace("The capital of France is" + sal.next_token)
    assert len(appended.tokens) == n + 1
    reference = appended.primary_attributions(positions=-1)
    np.testing.assert_allclose(sal.attributions[0], reference.attributions[0], rtol=1e-3, atol=1e-6)
    token = sal.next_token.replace(" ", "·")
    assert any(line.startswith(f"{n} '{token}' (next)") for line in str(sal).splitlines())
    assert sal.to_html().count(json.dumps(sal.next_token)) >= 1
    inside = out.primary_attributions(positions=3)  # a token inside the text: the same token the lens explains at 3
    assert inside.positions == (3,) and inside.next_token is None


def test_app_watches_the_words_the_library_watches(tmp_path) -> None:
    """The app passes typed words on unchanged (its page no longer adds a space): the library's rule decides."""
    testclient = pytest.importorskip("fastapi.testclient")
    from lmscope.app import create_app

    config = tmp_path / "app.json"
    config.write_text(json.dumps({"default_model": "tiny-llama", "models": {"tiny-llama": "tiny-llama"}}))
    client = testclient.TestClient(create_app(config))
    run = client.post("/api/runs", json={"text": TEXT}).json()
    out = tiny("llama").trace(TEXT)
    for position in (-1, 3):
        params = {"watch": ["is", ",", "1"], "position": position, "html": False}
        reply = client.get(f"/api/runs/{run['id']}/rankings_watch", params=params).json()
        want = out.rankings_watch(["is", ",", "1"], position=position)
        assert reply["text"] == str(want) and reply["data"]["notes"] == list(want.notes)
        assert reply["data"]["columns"] == [" is", ",", "1"]
