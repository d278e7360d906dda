"""Corpus jobs on encoder-decoder models: collecting the encoder, probing it, and layer similarity by stack.

References: each text traced alone with ``lm.trace(source, target=...)`` (its encoder Trace), and
the similarity measures of :mod:`lmscope.analysis.similarity` applied to arrays built from traces.
"""

from __future__ import annotations

import numpy as np
import pytest

import lmscope
from lmscope import LmscopeError
from lmscope.analysis import cka, layer_similarity, load_collection, stack_similarity
from lmscope.probing import probe

TEXTS = [
    "The old lighthouse keeper climbed the stairs",
    "A cat.",
    "Translate this short sentence, please",
    "Rain fell on the quiet harbour all night",
]
PAIRS = [
    ("The keeper climbed the stairs", "Der Wärter stieg die Treppe hinauf"),
    ("A cat sleeps", "Eine Katze schläft"),
    ("Rain fell all night", "Es regnete die ganze Nacht"),
    ("The harbour was quiet", "Der Hafen war ruhig"),
    ("She reads a book", "Sie liest ein Buch"),
    ("We walked home", "Wir gingen nach Hause"),
]


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq(request: pytest.FixtureRequest) -> lmscope.LM:
    return lmscope.from_pretrained(f"tiny-{request.param}")


def test_collect_reads_the_encoder_as_tracing_each_source(seq2seq: lmscope.LM, tmp_path) -> None:
    lm = seq2seq
    col = lmscope.collect(lm, TEXTS, sites=("resid_post", "mlp_act"), batch_size=3, out_dir=tmp_path, progress=False)
    assert col.model.stack == "encoder" and col.layers == tuple(range(lm.arch.encoder.n_layers))
    again = load_collection(tmp_path)
    for i, text in enumerate(TEXTS):
        encoder = lm.trace(text, target="Hallo").trace.encoder
        assert col.token_ids[i] == encoder.token_ids.tolist() and col.tokens[i] == list(encoder.tokens)
        for site in col.sites:
            for layer in col.layers:
                expected = encoder.at(site, layer).float().reshape(encoder.n_pos, -1).numpy()
                np.testing.assert_allclose(col.get(site, layer)[col.span(i)], expected, atol=1e-5, rtol=0)
                np.testing.assert_array_equal(again.get(site, layer), col.get(site, layer))


def test_collect_refuses_the_decoder_in_one_line(seq2seq: lmscope.LM) -> None:
    with pytest.raises(LmscopeError, match="needs a target for each text") as error:
        lmscope.collect(seq2seq, TEXTS, stack="decoder", progress=False)
    assert "\n" not in str(error.value)
    with pytest.raises(LmscopeError, match="encoder-decoder"):
        lmscope.collect(lmscope.from_pretrained("tiny-gpt2"), TEXTS, stack="encoder", progress=False)


def test_probing_reads_the_encoder_layers() -> None:
    lm = lmscope.from_pretrained("tiny-t5")
    result = probe(lm, tokens=300, seeds=1, epochs=3, sites=("embeddings", "resid_post"))
    layers = [row.layer for row in result.rows if row.site == "resid_post"]
    assert layers == list(range(lm.arch.encoder.n_layers))
    assert all(0 <= row.accuracy <= 1 and 0 <= row.control_accuracy <= 1 for row in result.rows)
    with pytest.raises(LmscopeError, match="needs a target"):
        probe(lm, tokens=50, seeds=1, stack="decoder")


def test_layer_similarity_within_one_stack(seq2seq: lmscope.LM) -> None:
    out = seq2seq.trace(TEXTS[0], target="Der alte Leuchtturm")
    for stack, trace in (("encoder", out.trace.encoder), ("decoder", out.trace)):
        ours = layer_similarity(out.trace, "cka", "resid_post", "resid_post", stack=stack)
        np.testing.assert_array_equal(ours.matrix, layer_similarity(trace, "cka", "resid_post", "resid_post").matrix)
        assert (
            out.layer_similarity(stack=stack, site_a="resid_post", site_b="resid_post").matrix.shape
            == (trace.model.n_layers,) * 2
        )
    col = lmscope.collect(seq2seq, TEXTS, progress=False)
    assert (
        layer_similarity(col, "cka", "resid_post", "resid_post", stack="encoder").matrix.shape[0] == col.model.n_layers
    )
    for source in (out.trace, col):
        with pytest.raises(LmscopeError, match="stack_similarity") as error:
            layer_similarity(source, "cka", stack="encoder", other_stack="decoder")
        assert "\n" not in str(error.value)
    with pytest.raises(LmscopeError, match="holds the encoder stack, not the decoder"):
        layer_similarity(col, "cka", stack="decoder")


@pytest.mark.parametrize("method", ["cka", "svcca"])
def test_stack_similarity_compares_sentence_means(seq2seq: lmscope.LM, method: str) -> None:
    lm = seq2seq
    result = stack_similarity(lm, PAIRS, method, dims=2) if method == "svcca" else stack_similarity(lm, PAIRS)
    n_enc, n_dec = lm.arch.encoder.n_layers, lm.arch.n_layers
    assert result.matrix.shape == (n_enc, n_dec) and result.n_tokens == len(PAIRS)
    assert result.site_a == "encoder resid_post" and result.site_b == "decoder resid_post"
    assert np.all(np.isfinite(result.matrix))
    if method == "cka":  # the reference: debiased CKA of mean-pooled [pair, d_model] matrices
        enc, dec = [], []
        for source, target in PAIRS:
            trace = lm.trace(source, target=target).trace
            enc.append([trace.encoder.at("resid_post", i).float().mean(0).numpy() for i in range(n_enc)])
            dec.append([trace.at("resid_post", j).float().mean(0).numpy() for j in range(n_dec)])
        enc_a, dec_a = np.array(enc), np.array(dec)  # [pair, layer, d_model]
        expected = [[cka(enc_a[:, i], dec_a[:, j], debiased=True) for j in range(n_dec)] for i in range(n_enc)]
        np.testing.assert_allclose(result.matrix, np.array(expected), atol=1e-6)
    assert "encoder resid_post" in str(result)
    with pytest.raises(LmscopeError, match="at least 5"):
        stack_similarity(lm, PAIRS[:4])
    with pytest.raises(LmscopeError, match="one stack"):
        stack_similarity(lmscope.from_pretrained("tiny-gpt2"), PAIRS)


def test_command_line_collects_probes_and_compares_the_encoder(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lmscope.cli import main

    corpus = tmp_path / "texts.txt"
    corpus.write_text("\n".join(TEXTS * 4), encoding="utf-8")  # more tokens than d_model, for CKA
    model = ["--model", "tiny-t5"]
    encoder_layers = list(range(lmscope.from_pretrained("tiny-t5").arch.encoder.n_layers))
    assert main(["collect", "--file", str(corpus), "--out", str(tmp_path / "acts"), "--json", *model]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["texts"] == 4 * len(TEXTS) and summary["layers"] == encoder_layers
    assert main(["similarity", str(tmp_path / "acts"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers_a"] == encoder_layers
    probe_args = ["--tokens", "40", "--seeds", "1", "--epochs", "1", "--sites", "resid_post", "--json"]
    assert main(["probe", *probe_args, *model]) == 0
    assert [row["layer"] for row in json.loads(capsys.readouterr().out)["rows"]] == encoder_layers
