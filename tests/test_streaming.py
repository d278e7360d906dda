"""Analyses that stream over a collection equal the in-memory ones, with memory bounded by a shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import lmscope
from lmscope.analysis import streaming
from lmscope.analysis._collection import FORMAT, META, VERSION, load_collection, write_json, write_shard
from lmscope.analysis.layer_similarity import layer_similarity
from lmscope.analysis.similarity import cca, cka, pwcca, svcca


def write_collection(root: Path, layers: int = 3, d: int = 8, texts: int = 40, length: int = 12, *,
                     per_shard: int = 7, seed: int = 0, neurons: int = 0) -> Path:  # fmt: skip
    """A collection in lmscope's on-disk format with related layers (each the last plus noise), a large
    first-token activation and a large mean, written as several shards of texts in a shuffled order."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(length // 2, length + 1, size=texts)
    n = int(lengths.sum())
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    first = np.isin(np.arange(n), starts)
    base = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    values = {}
    for layer in range(layers):
        base = base @ (np.eye(d) + 0.5 * rng.normal(size=(d, d)) / np.sqrt(d)) + 0.3 * rng.normal(size=(n, d))
        x = base + 5.0  # a mean far from 0
        x[first] *= 6.0  # an attention sink on every first token
        values[f"resid_post.{layer}"] = x.astype(np.float32)
        if neurons:
            values[f"mlp_act.{layer}"] = np.tanh(x @ rng.normal(size=(d, neurons))).astype(np.float32)
    root.mkdir(parents=True)
    order = rng.permutation(texts)
    shards = []
    for start in range(0, texts, per_shard):
        rows = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in order[start : start + per_shard]])
        part = {"dest": rows.astype(np.int64), **{name: x[rows] for name, x in values.items()}}
        shards.append(write_shard([part], root, len(shards)).name)
    sites = ["resid_post", "mlp_act"] if neurons else ["resid_post"]
    model = {"name": "synthetic", "model_type": "llama", "family": "llama", "n_layers": layers, "n_heads": 1,
             "n_kv_heads": 1, "d_model": d, "d_head": d, "vocab_size": 10, "parallel": False, "post_norm": False,
             "dtype": "float32", "n_neurons": neurons or None}  # fmt: skip
    ids = [[1] * int(k) for k in lengths]
    meta = {"format": FORMAT, "version": VERSION, "model": model, "sites": sites, "layers": list(range(layers)),
            "features": {"resid_post": d, **({"mlp_act": neurons} if neurons else {})},
            "texts": [f"text {i}" for i in range(texts)], "token_ids": ids,
            "tokens": [[f"t{j}" for j in range(len(seq))] for seq in ids], "shards": shards}  # fmt: skip
    write_json(root / META, meta)
    return root


@pytest.fixture(scope="module")
def col(tmp_path_factory):
    return load_collection(write_collection(tmp_path_factory.mktemp("stream") / "col", neurons=5))


@pytest.mark.parametrize(
    "method, measure, options",
    [("cka", cka, {}), ("cca", cca, {}), ("svcca", svcca, {}), ("svcca", svcca, {"dims": 3}),
     ("pwcca", pwcca, {}), ("cca", cca, {"epsilon": 1e-2}), ("pwcca", pwcca, {"epsilon": 1e-2})],
)  # fmt: skip
def test_measures_equal_in_memory(col, method, measure, options):
    for a, b in [(("resid_post", 0), ("resid_post", 2)), (("resid_post", 1), ("mlp_act", 1))]:
        expected = measure(col.get(*a), col.get(*b), **options)
        got = streaming.similarity(col, a, b, method, **options)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-9), (method, a, b)
    x = col.get("resid_post", 1)
    got = streaming.similarity(col, ("resid_post", 1), ("resid_post", 1), method, **options)
    assert got == pytest.approx(measure(x, x, **options), rel=1e-5)


def test_skip_first_equals_in_memory(col):
    a, b = col.get("resid_post", 0, skip_first=True), col.get("resid_post", 2, skip_first=True)
    got = streaming.similarity(col, ("resid_post", 0), ("resid_post", 2), "pwcca", skip_first=True)
    assert got == pytest.approx(pwcca(a, b), rel=1e-5)


@pytest.mark.parametrize("method", ["cka", "cca", "svcca", "pwcca"])
@pytest.mark.parametrize("memory_mb", [768.0, 0.0])  # one pass; one block per pass
def test_layer_similarity_equals_in_memory(col, method, memory_mb):
    for site_b, skip in (("resid_post", False), ("mlp_act", True)):
        expected = layer_similarity(col, method, "resid_post", site_b, skip_first=skip, stream=False)
        got = layer_similarity(col, method, "resid_post", site_b, skip_first=skip, memory_mb=memory_mb)
        np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-5, atol=1e-9)
        assert (got.n_tokens, got.selection, got.layers_a) == (expected.n_tokens, expected.selection, expected.layers_a)
        same = [[(d.pos, d.token, d.text, d.n_texts, d.where) for d in r.dominance] for r in (got, expected)]
        assert same[0] == same[1]
        for mine, theirs in zip(got.dominance, expected.dominance, strict=True):
            assert mine.share == pytest.approx(theirs.share, rel=1e-6)
    assert str(got)  # the same result type, with its text twin


def test_collection_method_streams(col):
    got = col.layer_similarity("cka", site_b="resid_post", stream=True)
    expected = col.layer_similarity("cka", site_b="resid_post", stream=False)
    np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
def test_pca_equals_in_memory(col, skip):
    from lmscope.analysis.neurons import factorize

    expected = factorize(col, 3, 0, 2, method="pca", site="resid_post", skip_first=skip)
    got = streaming.factorize(col, 3, 0, 2, method="pca", site="resid_post", skip_first=skip)
    for name in ("components", "loadings"):
        np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-4, atol=1e-4)
    for name in ("reconstruction_error", "relative_error", "negative_fraction"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-5)
    assert (got.tokens, got.offsets, got.layers, got.selection) == (
        expected.tokens,
        expected.offsets,
        expected.layers,
        expected.selection,
    )
    assert (got.dominance.pos, got.dominance.text) == (expected.dominance.pos, expected.dominance.text)
    assert got.dominance.share == pytest.approx(expected.dominance.share, rel=1e-6)


def test_nmf_in_mini_batches(col):
    from lmscope.analysis.neurons import factorize

    expected = factorize(col, 3, site="mlp_act")
    got = streaming.factorize(col, 3, method="nmf", site="mlp_act", batch_size=64, epochs=20)
    assert got.components.shape == expected.components.shape and (got.components >= 0).all()
    assert (got.loadings >= 0).all()
    assert got.relative_error < max(1.5 * expected.relative_error, expected.relative_error + 0.05)
    assert got.negative_fraction == pytest.approx(expected.negative_fraction)


def test_memory_stays_bounded(tmp_path):
    """A collection 5× larger than the memory allowed: the statistics stay within ``memory_mb`` over several
    passes, and beside them one shard (smaller than a piece: as read in float32 and stacked in float64, 3× its
    file) and 1 MiB."""
    import tracemalloc

    from lmscope.analysis._moments import fixed_bytes, passes

    layers, d = 6, 128
    root = write_collection(tmp_path / "big", layers=layers, d=d, texts=700, length=16, per_shard=20, seed=1)
    files = [p.stat().st_size for p in root.glob("shard-*.safetensors")]
    col = load_collection(root)
    keys = [("resid_post", layer) for layer in range(layers)]
    features = dict.fromkeys(keys, d)
    results = {}
    for method, memory_mb in (("cka", 1.5), ("pwcca", 3.5)):  # PWCCA keeps each input's decompositions too
        limit = memory_mb * 2**20 + 3 * max(files) + 2**20
        assert sum(files) > (5 if method == "cka" else 3) * limit
        held = fixed_bytes(keys, features, groups=16) + streaming._reserve_mb(col, keys, method) * 2**20
        assert len(passes(streaming._blocks(keys, keys), features, memory_mb, held)) > 1
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            results[method] = layer_similarity(
                col, method, "resid_post", "resid_post", stream=True, memory_mb=memory_mb, threads=1
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < limit, f"{method}: peak {peak / 2**20:.2f} MiB, limit {limit / 2**20:.2f} MiB"
    assert results["cka"].n_tokens == results["pwcca"].n_tokens == col.n_tokens
    assert np.allclose(np.diag(results["cka"].matrix), 1.0)


def test_large_shards_are_read_in_pieces(tmp_path):
    """One shard far larger than a piece: pieces rebuild it exactly, and the statistics and memory follow the
    piece, not the shard."""
    import tracemalloc

    from lmscope.analysis._moments import accumulate

    root = write_collection(tmp_path / "one", layers=3, d=64, texts=600, length=16, per_shard=600, seed=2)
    col = load_collection(root)
    (shard_bytes,) = [p.stat().st_size for p in root.glob("shard-*.safetensors")]
    names = ["dest", "resid_post.0", "resid_post.2"]
    (whole,) = col.shards(names)
    numbers, pieces = zip(*col.pieces(names, 1000), strict=True)
    assert set(numbers) == {0} and len(pieces) == -(-len(whole["dest"]) // 1000)
    for name in names:
        joined = np.concatenate([piece[name] for piece in pieces])
        assert joined.dtype == whole[name].dtype and np.array_equal(joined, whole[name])
    keys = [("resid_post", layer) for layer in range(3)]
    blocks = [(a, b) for i, a in enumerate(keys) for b in keys[i:]]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        small, _ = accumulate(col, keys, blocks, piece_mb=0.25)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.25 * 2**20 + 2**20 < shard_bytes / 3, f"peak {peak / 2**20:.2f} MiB"
    whole_shard, _ = accumulate(col, keys, blocks)
    for a, b in blocks:
        np.testing.assert_allclose(small.centered(a, b), whole_shard.centered(a, b), rtol=1e-9, atol=1e-6)


def test_products_without_scipy_equal_in_memory(col, monkeypatch):
    """Without scipy's in-place BLAS product the statistics are the same (numpy's product, then added)."""
    from lmscope.analysis import _moments

    monkeypatch.setattr(_moments, "_dgemm", lambda: None)
    for method in ("cka", "pwcca"):
        expected = layer_similarity(col, method, "resid_post", "mlp_act", stream=False)
        got = layer_similarity(col, method, "resid_post", "mlp_act", memory_mb=0.0)
        np.testing.assert_allclose(got.matrix, expected.matrix, rtol=1e-5, atol=1e-9)


def test_passes_count_what_stays_held():
    """The auto-products and what the caller keeps stay held in every pass: later passes get what is left."""
    from lmscope.analysis._moments import passes

    keys = [("resid_post", layer) for layer in range(4)]
    features = dict.fromkeys(keys, 256)  # a block is 0.5 MiB in float64
    blocks = streaming._blocks(keys, keys)  # 4 auto-products, 6 cross-products
    assert [len(p) for p in passes(blocks, features, 5.0)] == [10]
    assert [len(p) for p in passes(blocks, features, 5.0, held=2 * 2**20)] == [4 + 6]
    assert [len(p) for p in passes(blocks, features, 5.0, held=3.5 * 2**20)] == [4 + 3, 3]
    assert [len(p) for p in passes(blocks, features, 0.0, held=2 * 2**20)] == [4 + 1, 1, 1, 1, 1, 1]


# --- probes trained shard by shard ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def probing_collection(tmp_path_factory):
    from lmscope.probing import ProbingDataset, load_ud, ud_dir

    lm = lmscope.from_pretrained("minilm-l6")
    dataset = ProbingDataset.build(lm.tokenizer, load_ud(600, ud_dir()), "upos")
    root = tmp_path_factory.mktemp("probing") / "col"
    lmscope.collect(lm, dataset.texts, sites=("resid_post",), layers=[2], out_dir=root, progress=False,
                          shard_mb=0.1, batch_size=4)  # fmt: skip
    return dataset, load_collection(root)


def test_probe_streamed_equals_in_memory_when_one_block_holds_the_split(probing_collection):
    from lmscope.probing import control_labels, train_probes
    from lmscope.probing._stream import ShardWords, probe_collection

    dataset, col = probing_collection
    assert len(col._shards) > 3
    x = dataset.features(col, "resid_post", 2)  # [word, d_model], in memory
    result = probe_collection(col, dataset, layers=[2], seeds=2, epochs=6)
    row = result.rows[0]
    for seed, row_accuracy, control in zip((0, 1), row.accuracies, row.control_accuracies, strict=True):
        split = dataset.split(seed)
        labels = np.stack(
            [dataset.labels, control_labels(dataset.types, dataset.labels, len(dataset.label_names), seed)]
        )
        fit = train_probes(x[split.train], labels[:, split.train], x[split.dev], labels[:, split.dev], x[split.test],
                           labels[:, split.test], len(dataset.label_names), epochs=6, seed=seed)  # fmt: skip
        assert (row_accuracy, control) == pytest.approx(tuple(fit.test_accuracy), rel=1e-5)
    source = ShardWords(dataset, col, "resid_post", 2, "mean")
    words, pooled = source.read(range(len(col._shards)), np.ones(len(dataset), bool))
    np.testing.assert_array_equal(words, np.arange(len(dataset)))
    np.testing.assert_allclose(pooled, dataset.features(col, "resid_post", 2, "mean"), rtol=1e-6)


def test_probe_in_blocks_of_shards_learns_and_its_control_task_stays_low(probing_collection):
    from lmscope.probing._stream import probe_collection

    dataset, col = probing_collection
    whole = probe_collection(col, dataset, layers=[2], seeds=1, epochs=6).rows[0]
    blocks = probe_collection(col, dataset, layers=[2], seeds=1, epochs=6, block_words=60).rows[0]
    assert blocks.accuracy == pytest.approx(whole.accuracy, abs=0.08)
    assert blocks.selectivity > 0.2 and blocks.control_accuracy < blocks.accuracy


def test_what_does_not_stream_says_so(col):
    with pytest.raises(lmscope.LmscopeError, match="stream=True needs a collection and a measure that streams"):
        layer_similarity(col, "cka", "resid_post", "resid_post", stream=True, debiased=True)
    with pytest.raises(lmscope.LmscopeError, match="linear and not debiased"):
        streaming.similarity(col, ("resid_post", 0), ("resid_post", 1), "cka", kernel="rbf")
    with pytest.raises(lmscope.LmscopeError, match="not 'ica'"):
        streaming.factorize(col, 2, method="ica", site="resid_post")
    with pytest.raises(lmscope.LmscopeError, match="layer 7 was not collected"):
        streaming.similarity(col, ("resid_post", 0), ("resid_post", 7))
