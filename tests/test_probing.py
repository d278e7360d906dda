"""Probing: CoNLL-U reading, word-to-subword alignment, control tasks, linear probes, the UD study, views, CLI."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import lmscope
from conftest import tiny
from lmscope.cli import main
from lmscope.probing import (
    ProbeRow,
    ProbingDataset,
    ProbingResult,
    align,
    control_labels,
    load_ud,
    parse_conllu,
    pool,
    probe,
    read_conllu,
    train_probes,
    ud_dir,
    ud_file,
)

UD = ud_dir()  # the copy that ships inside lmscope

# "I don't know." with a multi-word token, SpaceAfter=No on it and on a word, an empty node, and quotes.
CONLLU = """# sent_id = s1
# text = "I don't know," she said.
1	"	"	PUNCT	``	_	4	punct	_	SpaceAfter=No
2	I	I	PRON	PRP	_	4	nsubj	_	_
3-4	don't	_	_	_	_	_	_	_	_
3	do	do	AUX	VBP	_	5	aux	_	_
4	n't	not	PART	RB	_	5	advmod	_	_
5	know	know	VERB	VB	_	0	root	_	SpaceAfter=No
6	,	,	PUNCT	,	_	5	punct	_	SpaceAfter=No
7	"	"	PUNCT	''	_	5	punct	_	_
7.1	said	say	VERB	VBD	_	_	_	_	_
8	she	she	PRON	PRP	_	9	nsubj	_	_
9	said	say	VERB	VBD	_	0	root	_	SpaceAfter=No
10	.	.	PUNCT	.	_	9	punct	_	_

# sent_id = s2
1-2	du	_	_	_	_	_	_	_	SpaceAfter=No
1	de	de	ADP	IN	_	0	root	_	_
2	le	le	DET	DT	_	1	det	_	_
3	!	!	PUNCT	.	_	1	punct	_	_
"""


def sentence(text: str = CONLLU, index: int = 0):
    return parse_conllu(text)[index]


def words_to_tokens(tokenizer, s) -> list[list[str]]:
    """Each word's token strings, as the text slices the tokenizer's offsets point at."""
    a = align(tokenizer, s)
    return [[s.text[slice(*a.offsets[p])] for p in a.tokens_of(w)] for w in range(len(s))]


# --- CoNLL-U ---------------------------------------------------------------------------------------------------


def test_conllu_text_spans_multiword_tokens_and_empty_nodes() -> None:
    s = sentence()
    assert s.text == '"I don\'t know," she said.'
    assert s.words == ('"', "I", "do", "n't", "know", ",", '"', "she", "said", ".")  # empty node 7.1 left out
    assert s.labels["upos"][2:4] == ("AUX", "PART")
    assert s.labels["xpos"][0] == "``"
    assert [s.text[a:b] for a, b in s.spans] == list(s.words)
    assert s.spans[2] == (3, 5) and s.spans[3] == (5, 8)  # do | n't inside "don't"
    assert s.sent_id == "s1"


def test_multiword_token_that_does_not_concatenate_gives_each_word_the_whole_token() -> None:
    s = sentence(index=1)
    assert s.text == "du!"
    assert s.words == ("de", "le", "!")
    assert s.spans == ((0, 2), (0, 2), (2, 3))


def test_rebuilt_text_equals_the_treebank_text_lines() -> None:
    path = ud_file("dev")
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
    texts = [line[len("# text = ") :] for line in lines if line.startswith("# text")]
    sentences = read_conllu(path)
    assert len(sentences) == len(texts) == 2001
    assert sum(map(len, sentences)) == 25147
    assert [s.text for s in sentences] == texts
    assert all(s.text[a:b] == w for s in sentences for w, (a, b) in zip(s.words, s.spans, strict=True))
    assert sum(map(len, load_ud(1000, UD))) >= 1000


def test_ud_data_ships_inside_the_package_with_its_license() -> None:
    folder = ud_dir()
    assert folder.is_relative_to(Path(lmscope.__file__).resolve().parent)
    assert "Attribution-ShareAlike 4.0" in (folder / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Universal Dependencies English Web Treebank" in (folder / "README.md").read_text(encoding="utf-8")
    assert ud_file("test").name == "en_ewt-ud-test.conllu.gz"
    assert len(read_conllu(ud_file("test"))) == 2077


def test_probe_finds_its_data_from_any_working_directory(tmp_path) -> None:
    """In a fresh clone nothing lies beside the repository: the default data must come from the package."""
    code = (
        "import lmscope.probing as p, lmscope.cli as c; "
        "assert sum(map(len, p.load_ud(50))) >= 50; "
        "raise SystemExit(c.main(['probe', '--model', 'tiny-bert', '--tokens', '60', '--seeds', '1', "
        "'--epochs', '1', '--layers', '0:1', '--json']))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"]


def test_nothing_in_the_repository_reads_a_path_outside_it() -> None:
    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=False).stdout.split()
    files = [root / name for name in tracked] or [p for p in root.rglob("*") if p.is_file() and ".venv" not in p.parts]
    outside = ("../" + "shared", "shared" + "/data", "parents[" + "2]")
    for path in files:
        if path.suffix in {".py", ".md", ".sh", ".ipynb", ".json", ".txt", ".toml", ""}:
            text = path.read_text(encoding="utf-8", errors="replace")
            assert not any(marker in text for marker in outside), f"{path} refers to a path outside the repository"


def test_missing_data_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(lmscope.LmscopeError, match=r"UD English EWT not found.*--data"):
        load_ud(100, tmp_path)
    with pytest.raises(lmscope.LmscopeError, match="unknown probing task"):
        ProbingDataset.build(tiny("bert").tokenizer, [sentence()], "lemma")


# --- alignment -----------------------------------------------------------------------------------------------


def test_alignment_wordpiece_contraction_punctuation() -> None:
    tokens = words_to_tokens(tiny("bert").tokenizer, sentence())  # MiniLM's WordPiece (uncased)
    assert tokens == [['"'], ["I"], ["don"], ["'", "t"], ["know"], [","], ['"'], ["she"], ["said"], ["."]]


def test_alignment_byte_level_bpe_leading_spaces() -> None:
    tokenizer = tiny("llama").tokenizer  # SmolLM2's byte-level BPE: spaces belong to the next token
    s = sentence()
    tokens = words_to_tokens(tokenizer, s)
    assert tokens[1] == ["I"] and tokens[4] == [" know"] and tokens[7] == [" she"]
    assert tokens[2] == [" don"] and tokens[3] == ["'t"]  # the word owns its token, the space does not matter
    assert all(tokens)  # every word has at least one token


def test_alignment_of_ud_words_against_a_character_reference() -> None:
    sentences = load_ud(1500, UD)
    for tokenizer, exact in ((tiny("bert").tokenizer, True), (tiny("llama").tokenizer, False)):
        for s in sentences:
            a = align(tokenizer, s)
            ids = tokenizer(s.text)["input_ids"]
            assert list(a.token_ids) == ids  # the same tokenization as lmscope.collect
            assert a.found.all()
            for w, (start, end) in enumerate(s.spans):
                positions = list(a.tokens_of(w))
                first = a.offsets[positions[0]]
                assert max(first[0], start) < min(first[1], end)  # the first subword overlaps the word
                # reference: the tokens whose first non-space character lies in the word
                owned = [
                    p
                    for p, (ts, te) in enumerate(a.offsets)
                    if te > ts and s.text[ts:te].strip() and start <= ts + _lead(s.text[ts:te]) < end
                ]
                if owned:
                    assert positions == owned, (s.text, s.words[w])
                if exact and not _glued(s, w):  # WordPiece splits at spaces and punctuation
                    assert "".join(s.text[slice(*a.offsets[p])] for p in positions) == s.words[w]


def _lead(piece: str) -> int:
    return len(piece) - len(piece.lstrip())


def _glued(s, w: int) -> bool:
    """Whether word ``w`` shares a surface token with another word (``do|n't``, ``can|not``, ``Today|'s``)."""
    (a, b), alnum = s.spans[w], any(c.isalnum() for c in s.words[w])
    return alnum and any(
        i != w and max(a, c) <= min(b, d) and any(ch.isalnum() for ch in s.words[i]) for i, (c, d) in enumerate(s.spans)
    )


def test_pooling_first_last_mean_against_loops() -> None:
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(12, 5)).astype(np.float32)  # [pos, features]
    words = np.array([[1, 2], [2, 5], [5, 6], [6, 10]])
    assert np.array_equal(pool(acts, words, "first"), acts[[1, 2, 5, 6]])
    assert np.array_equal(pool(acts, words, "last"), acts[[1, 4, 5, 9]])
    mean = np.stack([acts[a:b].mean(0) for a, b in words])
    np.testing.assert_allclose(pool(acts, words, "mean"), mean, rtol=1e-6)
    with pytest.raises(lmscope.LmscopeError, match="pooling must be one of"):
        pool(acts, words, "max")


# --- control tasks and probes ----------------------------------------------------------------------------------


def test_control_labels_are_per_type_and_follow_the_label_distribution() -> None:
    rng = np.random.default_rng(1)
    types = [f"w{i}" for i in rng.integers(0, 4000, 40_000)]
    labels = rng.choice(4, size=len(types), p=[0.5, 0.3, 0.15, 0.05])
    control = control_labels(types, labels, 4, seed=3)
    by_type: dict[str, set[int]] = {}
    for t, c in zip(types, control, strict=True):
        by_type.setdefault(t, set()).add(int(c))
    assert all(len(v) == 1 for v in by_type.values())  # same type, same label
    per_type = Counter(next(iter(v)) for v in by_type.values())
    share = np.array([per_type[k] for k in range(4)]) / len(by_type)
    np.testing.assert_allclose(share, np.bincount(labels) / len(labels), atol=0.03)  # types draw from p(y)
    assert np.array_equal(control, control_labels(types, labels, 4, seed=3))
    assert not np.array_equal(control, control_labels(types, labels, 4, seed=4))


def _synthetic(n: int = 2400, d: int = 24, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    linear = (x @ rng.normal(size=(d, classes))).argmax(1)  # the label is a linear function of x
    shuffled = rng.integers(0, classes, n)  # labels unrelated to x
    return x, np.stack([linear, shuffled])


def _fit(x, y, classes=5, **kwargs):
    tr, dv = slice(0, 1600), slice(1600, 1900)
    te = slice(1900, None)
    return train_probes(x[tr], y[:, tr], x[dv], y[:, dv], x[te], y[:, te], classes, **kwargs)


def test_probe_learns_linear_labels_and_stays_at_chance_on_random_ones() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _synthetic()
    fit = _fit(x, y, epochs=30)
    assert fit.test_accuracy[0] > 0.95
    assert abs(fit.test_accuracy[1] - 1 / 5) < 0.07
    reference = LogisticRegression(C=100.0, max_iter=5000).fit(x[:1600], y[0, :1600]).score(x[1900:], y[0, 1900:])
    assert fit.test_accuracy[0] > reference - 0.03


def test_probes_trained_side_by_side_equal_probes_trained_alone_with_torch_adam() -> None:
    x, y = _synthetic(n=2400, d=8, classes=3)
    joint = _fit(x, y, classes=3, epochs=4, learning_rates=(0.01,))
    alone = _fit(x, y[:1], classes=3, epochs=4, learning_rates=(0.01,))
    assert joint.test_accuracy[0] == pytest.approx(alone.test_accuracy[0], abs=1e-6)
    assert joint.epoch[0] == alone.epoch[0]
    # reference: torch.nn.Linear + autograd + torch.optim.Adam, same start, same minibatches
    reference = _torch_adam_reference(x, y[0], classes=3, epochs=4, lr=0.01)
    assert alone.test_accuracy[0] == pytest.approx(reference, abs=1e-6)


def _torch_adam_reference(x, y, classes, epochs, lr, seed=0, batch_size=64) -> float:
    tx = torch.as_tensor(x)
    mean, std = tx[:1600].mean(0), tx[:1600].std(0)
    tx = (tx - mean) / std
    ty = torch.as_tensor(y)
    d = tx.shape[1]
    init = (torch.rand(1, 1, d, classes, generator=torch.Generator().manual_seed(seed)) * 2 - 1) / d**0.5
    weight = init[0, 0].clone().requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    order_generator = torch.Generator().manual_seed(seed)
    best_dev, best_test = -1.0, 0.0
    for _ in range(epochs):
        order = torch.randperm(1600, generator=order_generator)
        for start in range(0, 1600, batch_size):
            batch = order[start : start + batch_size]
            loss = torch.nn.functional.cross_entropy(tx[batch] @ weight + bias, ty[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            predicted = (tx @ weight + bias).argmax(1)
        dev = (predicted[1600:1900] == ty[1600:1900]).float().mean().item()
        if dev > best_dev:
            best_dev, best_test = dev, (predicted[1900:] == ty[1900:]).float().mean().item()
    return best_test


# --- the UD study ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> lmscope.LM:
    return lmscope.from_pretrained("minilm-l6")


@pytest.fixture(scope="module")
def study(minilm) -> ProbingResult:
    return probe(minilm, tokens=1000, data=UD, layers=[1, 4], seeds=2, epochs=20)


def test_ud_study_end_to_end_on_minilm(study) -> None:
    assert [(r.site, r.layer) for r in study.rows] == [
        ("embeddings", 0),
        ("resid_post", 1),
        ("mlp_act", 1),
        ("resid_post", 4),
        ("mlp_act", 4),
    ]
    assert study.n_words >= 1000 and study.n_train + study.n_dev + study.n_test == study.n_words
    assert study.n_test / study.n_words == pytest.approx(0.33, abs=0.03)
    upos = {"ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT"}
    upos |= {"SCONJ", "SYM", "VERB", "X"}
    assert set(study.label_names) <= upos and len(study.label_names) >= 14
    for row in study.rows:
        assert len(row.accuracies) == 2
        assert row.accuracy > study.majority + 0.3  # part of speech is linearly decodable
        assert row.control_accuracy < row.accuracy
        assert row.selectivity == pytest.approx(row.accuracy - row.control_accuracy)
        assert row.selectivity_std == pytest.approx(np.std(np.subtract(row.accuracies, row.control_accuracies), ddof=1))
    hidden = study.row("resid_post", 4)
    assert hidden.selectivity > study.row("embeddings").selectivity  # context adds what types alone cannot


def test_study_text_json_and_plot(study, tmp_path) -> None:
    text = str(study)
    assert text.startswith("Probing upos on minilm-l6: ")
    lines = text.splitlines()
    groups = [f"{group} {column}" for group in ("hidden", "FFN") for column in ("acc", "control", "selectivity")]
    assert lines[2].split() == ["layer", *" ".join(groups).split()]
    emb = study.row("embeddings")
    assert lines[4].startswith(f"emb    {100 * emb.accuracy:.1f} ± {100 * emb.accuracy_std:.1f}")
    data = json.loads(json.dumps(study.to_dict()))
    assert data["kind"] == "ProbingResult"
    assert {"site", "layer", "accuracy", "control_accuracy", "selectivity", "accuracy_std"} <= set(data["rows"][0])
    figure = study.plot(tmp_path / "probing.png")
    assert (tmp_path / "probing.png").read_bytes()[:4] == b"\x89PNG"
    assert len(figure.axes) == 2


def test_causal_model_and_cli(tmp_path, capsys) -> None:
    plot = tmp_path / "p.png"
    argv = ["probe", "--model", "tiny-llama", "--tokens", "300", "--seeds", "1", "--epochs", "3"]
    assert main([*argv, "--data", str(UD), "--sites", "resid_post,mlp_act", "--json", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [(r["site"], r["layer"]) for r in data["rows"]] == [
        (s, i) for i in range(3) for s in ("resid_post", "mlp_act")
    ]
    assert "probe: 100%" in captured.err  # the progress bar over layers and seeds
    assert plot.is_file()
    assert main([*argv, "--data", str(tmp_path)]) == 2
    assert "UD English EWT not found" in capsys.readouterr().err
    assert main([*argv, "--data", str(UD), "--sites", "attn_probs"]) == 2
    assert "probing sites must be among" in capsys.readouterr().err


def test_collection_with_another_tokenization_is_refused(minilm) -> None:
    sentences = load_ud(30, UD)
    dataset = ProbingDataset.build(tiny("llama").tokenizer, sentences, "upos")
    collection = lmscope.collect(minilm, dataset.texts, sites=["resid_post"], layers=[0], progress=False)
    with pytest.raises(lmscope.LmscopeError, match="tokenized differently"):
        dataset.check(collection)


# --- the HTML view -----------------------------------------------------------------------------------------------


def _row(site: str, layer: int, acc: float) -> ProbeRow:
    return ProbeRow(site, layer, acc, 0.01, acc - 0.3, 0.02, 0.3, 0.01, (acc, acc), (acc - 0.3, acc - 0.3))


@pytest.mark.browser
def test_html_view_draws_and_escapes(browser) -> None:
    from browser import open_html

    evil = "<img src=x onerror=alert(1)>"
    result = ProbingResult(
        model=evil,
        task="upos",
        pool="first",
        label_names=("NOUN", "VERB"),
        n_words=100,
        n_sentences=5,
        n_train=60.0,
        n_dev=7.0,
        n_test=33.0,
        seeds=(0, 1),
        majority=0.2,
        rows=(_row("embeddings", 0, 0.8), _row("resid_post", 0, 0.85), _row("mlp_act", 0, 0.83)),
        seconds=1.0,
    )
    opened = open_html(browser, lmscope.views.page(result.to_html()))
    page = opened.page
    assert page.locator(".lmscope svg polyline").count() == 2 * 2 + 2  # accuracy + control per group, selectivity
    cells = page.locator(".lms-probing-table tr").all_inner_texts()
    assert cells[1].split("\t")[:2] == ["emb", "80.0 ± 1.0"]
    assert evil in page.locator(".lms-title").inner_text()
    assert page.locator("img").count() == 0
    opened.assert_clean()
