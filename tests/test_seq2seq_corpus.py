"""Corpus jobs on encoder-decoder models: collecting either stack, probing the encoder, layer similarity by stack.

References: each pair traced alone with ``lm.trace(source, target=...)`` (its decoder Trace and its
encoder Trace), and the similarity measures of :mod:`lmscope.analysis.similarity` applied to arrays
built from traces.
"""

from __future__ import annotations

import functools

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


TARGETS = [
    "Der alte Leuchtturmwärter stieg die Treppe hinauf",
    "Eine Katze.",
    "Übersetze bitte diesen kurzen Satz",
    "Regen fiel die ganze Nacht",
]
DECODER_SITES = ("resid_post", "mlp_act", "resid_cross", "cross_attn_out", "cross_q")


@functools.cache
def tiny(family: str) -> lmscope.LM:
    return lmscope.from_pretrained(f"tiny-{family}")


@pytest.fixture(scope="module", params=["t5", "bart"])
def seq2seq(request: pytest.FixtureRequest) -> lmscope.LM:
    return tiny(request.param)


@pytest.mark.parametrize("family", ["t5", "bart", "marian"])
def test_collect_reads_the_decoder_as_tracing_each_pair(family: str, tmp_path) -> None:
    lm = tiny(family)
    col = lmscope.collect(lm, TEXTS, targets=TARGETS, sites=DECODER_SITES, batch_size=3, out_dir=tmp_path,
                          progress=False)  # fmt: skip
    assert col.stack == "decoder" and col.model.stack == "decoder" and col.targets == tuple(TARGETS)
    assert col.layers == tuple(range(lm.arch.n_layers)) and col.model.n_layers == lm.arch.n_layers
    again = load_collection(tmp_path)
    assert again.stack == "decoder" and again.targets == col.targets and again.texts == tuple(TEXTS)
    for i, (source, target) in enumerate(zip(TEXTS, TARGETS, strict=True)):
        trace = lm.trace(source, target=target, sites=DECODER_SITES).trace
        assert col.token_ids[i] == trace.token_ids.tolist() and col.tokens[i] == list(trace.tokens)
        assert col.source_token_ids[i] == trace.encoder.token_ids.tolist()
        for site in col.sites:
            for layer in col.layers:
                expected = trace.at(site, layer).float().reshape(trace.n_pos, -1).numpy()
                np.testing.assert_allclose(col.get(site, layer)[col.span(i)], expected, atol=1e-5, rtol=0)
                np.testing.assert_array_equal(again.get(site, layer)[again.span(i)], col.get(site, layer)[col.span(i)])
    # the stack's own layer count: a negative layer counts from the decoder's last
    np.testing.assert_array_equal(col.get("resid_post", -1), col.get("resid_post", lm.arch.n_layers - 1))


def test_a_stopped_decoder_collection_resumes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    module = sys.modules["lmscope.analysis.collect"]  # (the package's name "collect" is the function)
    lm, out = tiny("t5"), tmp_path / "acts"
    options = dict(targets=TARGETS, batch_size=1, shard_mb=0.0001, progress=False)  # one shard per pair
    real, calls = module._run_batch, []

    def stops(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_run_batch", stops)
    with pytest.raises(KeyboardInterrupt):
        lmscope.collect(lm, TEXTS, out_dir=out, **options)
    monkeypatch.setattr(module, "_run_batch", real)
    assert len(list(out.glob("shard-*"))) == 2 and (out / "collection.partial.json").is_file()
    other = [*TEXTS[:-1], "Another source"]  # the same targets over other sources: another plan
    with pytest.raises(LmscopeError, match="unfinished collection of other texts or settings"):
        lmscope.collect(lm, other, out_dir=out, **options)
    col = lmscope.collect(lm, TEXTS, out_dir=out, **options)
    fresh = lmscope.collect(lm, TEXTS, **options)
    assert col.tokens == fresh.tokens and len(col._shards) == len(TEXTS)
    np.testing.assert_array_equal(col.get("resid_post", 1), fresh.get("resid_post", 1))


def test_decoder_collection_bad_input_is_one_clear_error(tmp_path) -> None:
    lm = tiny("t5")
    cases = [
        (dict(stack="decoder"), "needs a target for each text"),
        (dict(targets=TARGETS, stack="encoder"), "targets are the decoder's tokens"),
        (dict(targets=TARGETS[:3]), "4 texts but 3 targets: give one target per text"),
        (dict(targets=[*TARGETS[:3], " "]), "target 3 is empty"),
        (dict(targets=[*TARGETS[:3], None]), "target 3 is empty or not a string"),
        (dict(targets=TARGETS, sites=("cross_k",)), "collect stores per-token sites"),
        (dict(sites=("cross_attn_out",)), "collect stores per-token sites"),
        (dict(stack="both"), "stack must be 'encoder' or 'decoder'"),
        (dict(targets=TARGETS, layers=[2]), "out of range"),
    ]
    for options, message in cases:
        with pytest.raises(LmscopeError, match=message) as error:
            lmscope.collect(lm, TEXTS, out_dir=tmp_path / "acts", progress=False, **options)
        assert "\n" not in str(error.value)
    assert not (tmp_path / "acts").exists() or not list((tmp_path / "acts").iterdir())
    with pytest.raises(LmscopeError, match="targets apply to encoder-decoder models") as error:
        lmscope.collect(lmscope.from_pretrained("tiny-gpt2"), TEXTS, targets=TARGETS, progress=False)
    assert "\n" not in str(error.value)


def test_streaming_similarity_reads_either_stack(seq2seq: lmscope.LM, tmp_path) -> None:
    from lmscope.analysis import streaming

    lm = seq2seq
    sources, targets = [s for s, _ in PAIRS] * 3, [t for _, t in PAIRS] * 3  # more tokens than d_model
    for stack, options in (("encoder", {}), ("decoder", {"targets": targets})):
        col = lmscope.collect(lm, sources, out_dir=tmp_path / stack, progress=False, shard_mb=0.002, **options)
        assert col.stack == stack and len(col._shards) > 1
        n_layers = (lm.arch.encoder if stack == "encoder" else lm.arch).n_layers
        assert col.model.n_layers == n_layers and col.layers == tuple(range(n_layers))
        streamed = streaming.layer_similarity(col, "cka", "resid_post", "resid_post")
        loaded = layer_similarity(col, "cka", "resid_post", "resid_post", stack=stack)
        np.testing.assert_allclose(streamed.matrix, loaded.matrix, rtol=1e-5, atol=1e-6)
        assert streamed.matrix.shape == (n_layers, n_layers)
        with pytest.raises(LmscopeError, match=f"holds the {stack} stack"):
            layer_similarity(col, "cka", stack="decoder" if stack == "encoder" else "encoder")


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


def test_collect_refuses_the_decoder_without_targets_in_one_line(seq2seq: lmscope.LM) -> None:
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


def test_command_line_collects_the_decoder_and_reads_layers_of_the_stack_held(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lmscope.cli import main

    lm = tiny("t5")
    n_enc, n_dec = lm.arch.encoder.n_layers, lm.arch.n_layers
    assert n_enc > n_dec  # so a layer only the encoder has tells the stacks apart
    corpus, targets = tmp_path / "texts.txt", tmp_path / "targets.txt"
    corpus.write_text("\n".join(TEXTS * 5), encoding="utf-8")
    targets.write_text("\n".join(TARGETS * 5), encoding="utf-8")
    model, files = ["--model", "tiny-t5"], ["--file", str(corpus)]
    argv = ["collect", *files, "--targets", str(targets), "--out", str(tmp_path / "dec"), "--json", *model]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stack"] == "decoder" and summary["layers"] == list(range(n_dec)) and summary["texts"] == 20
    col = load_collection(tmp_path / "dec")
    for i in (0, 5):  # the pairs in file order
        trace = lm.trace(TEXTS[i % 4], target=TARGETS[i % 4]).trace
        assert col.token_ids[i] == trace.token_ids.tolist()
        np.testing.assert_allclose(
            col.get("resid_post", 1)[col.span(i)], trace.at("resid_post", 1).numpy(), atol=1e-5, rtol=0
        )
    # --layers of the stack collected: the encoder's last layer, which the decoder does not have
    last = str(n_enc - 1)
    assert main(["collect", *files, "--out", str(tmp_path / "enc"), "--layers", last, "--json", *model]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [n_enc - 1]
    assert main(["collect", *files, "--out", str(tmp_path / "all"), "--stack", "encoder", "--json", *model]) == 0
    capsys.readouterr()
    assert main(["similarity", str(tmp_path / "all"), "--layers", f"1:{n_enc}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers_a"] == list(range(1, n_enc))
    assert main(["similarity", str(tmp_path / "dec"), "--layers", last]) == 2
    assert "the collection's decoder stack has layers 0..1" in capsys.readouterr().err
    assert main(["nmf", *files, "--layers", last, "--components", "2", "--json", *model]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == [n_enc - 1]
    assert main(["nmf", *files, "--targets", str(targets), "--components", "2", "--json", *model]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == list(range(n_dec))
    # bad combinations: one line each, before any shard is written
    short = tmp_path / "short.txt"
    short.write_text("Ein Satz.\n", encoding="utf-8")
    bad = [
        (["--targets", str(targets), "--stack", "encoder"], "targets are the decoder's tokens"),
        (["--stack", "decoder"], "needs a target for each text"),
        (["--targets", str(short)], "20 texts but 1 targets"),
        (["--targets", str(targets), "--layers", last], f"this model's decoder has layers 0..{n_dec - 1}"),
    ]
    for extra, message in bad:
        assert main(["collect", *files, "--out", str(tmp_path / "bad"), *extra, *model]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
    gpt2 = ["--model", "tiny-gpt2"]
    assert main(["collect", *files, "--targets", str(targets), "--out", str(tmp_path / "bad"), *gpt2]) == 2
    assert "targets apply to encoder-decoder models" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").iterdir())


def test_probing_a_collection_reads_the_encoder_layers_collected(tmp_path) -> None:
    from lmscope.probing import ProbingDataset, load_ud, ud_dir
    from lmscope.probing._stream import probe_collection

    lm = tiny("t5")
    dataset = ProbingDataset.build(lm.tokenizer, load_ud(60, ud_dir()), "upos")
    last = lm.arch.encoder.n_layers - 1  # a layer the decoder does not have
    col = lmscope.collect(lm, dataset.texts, layers=[last], out_dir=tmp_path / "enc", batch_size=2, shard_mb=0.001,
                          progress=False)  # fmt: skip
    assert len(col._shards) > 1
    result = probe_collection(col, dataset, layers=[last], seeds=1, epochs=2)
    assert [(row.site, row.layer) for row in result.rows] == [("resid_post", last)]
    assert 0 <= result.rows[0].accuracy <= 1
    decoder = lmscope.collect(lm, dataset.texts, targets=dataset.texts, progress=False)  # the decoder's tokens
    with pytest.raises(LmscopeError, match="tokenized differently") as error:
        probe_collection(decoder, dataset, seeds=1, epochs=1)
    assert "\n" not in str(error.value)
