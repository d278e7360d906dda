"""Encoder-decoder models (T5, BART, mBART, Marian, Pegasus): capture, generation, lens, files, bad input.

Every check is against Hugging Face's own forward pass, ``generate`` or ``output_attentions``
on seeded tiny models (3 encoder and 2 decoder layers), so that mixing up the stacks fails.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

import lmscope
from lmscope.errors import LmscopeError
from lmscope.models._tiny import build_seq2seq

SOURCE = "The keys to the cabinet are on the table."
TARGET = "Die Schlüssel zum Schrank"

_SMALL = {"d_model": 64, "encoder_layers": 3, "decoder_layers": 2, "encoder_attention_heads": 4,
          "decoder_attention_heads": 4, "encoder_ffn_dim": 128, "decoder_ffn_dim": 96,
          "max_position_embeddings": 128}  # fmt: skip
# Families built from config here (no seeded name): mBART and Pegasus (pre-norm with final norms), T5 v1.1
# (gated GELU: wi_0, wi_1, wo; untied unembedding, so no rescale).
EXTRA: dict[str, tuple[str, dict]] = {
    "t5-gated": (
        "t5",
        {
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 96,
            "num_layers": 3,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
        },
    ),
    "umt5": ("umt5", {"d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 3, "num_decoder_layers": 2, "num_heads": 4}),
    "mbart": ("mbart", _SMALL),
    "pegasus": ("pegasus", _SMALL),
}
NAMES = ("tiny-t5", "tiny-bart", "tiny-marian", *EXTRA)


@cache
def load(name: str) -> lmscope.LM:
    if name.startswith("tiny-"):
        lm = lmscope.from_pretrained(name)
    else:
        base = lmscope.from_pretrained("tiny-bart")  # for its tokenizer
        model_type, overrides = EXTRA[name]
        special = {"pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2}
        model = build_seq2seq(model_type, len(base.tokenizer), special, **overrides)
        lm = lmscope.wrap(model, base.tokenizer, name=name)
    bias = getattr(lm.model, "final_logits_bias", None)
    if bias is not None and not bias.any():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            bias.normal_()  # a nonzero logits bias, so the lens must add it
    return lm


def ids(lm: lmscope.LM, text: str) -> torch.Tensor:
    return lm.tokenizer(text, return_tensors="pt")["input_ids"]


def hf_forward(lm: lmscope.LM, source: torch.Tensor, decoder: torch.Tensor, **options):
    with torch.no_grad():
        return lm.model(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=decoder,
                        use_cache=False, **options)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_logits_under_capture_equal_the_plain_forward(name: str) -> None:
    lm = load(name)
    assert lm.is_seq2seq and lm.arch.encoder is not None and lm.arch.stack == "decoder"
    out = lm.trace(SOURCE, target=TARGET, sites=lmscope.capture.ALL_SITES)
    trace = out.trace
    assert trace.encoder is not None and trace.encoder.model.stack == "encoder"
    assert trace.encoder.tokens == tuple(lm.tokenizer.batch_decode([[i] for i in ids(lm, SOURCE)[0].tolist()]))
    assert int(trace.token_ids[0]) == lm.model.generation_config.decoder_start_token_id
    reference = hf_forward(lm, ids(lm, SOURCE), trace.token_ids[None])
    assert (out.logits - reference.logits[0]).abs().max() <= 1e-5
    assert trace.layers == (0, 1) and trace.encoder.layers == (0, 1, 2)
    # The encoder's last block output, through its final norm, is what the decoder attends to.
    encoder_out = trace.encoder.get("resid_post")[-1]
    norm = lm.arch.encoder.final_norm
    encoder_out = norm(encoder_out) if norm is not None else encoder_out
    assert torch.allclose(encoder_out, reference.encoder_last_hidden_state[0], atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_block_parts_add_up_to_each_block_output(name: str) -> None:
    lm = load(name)
    trace = lm.trace(SOURCE, target=TARGET).trace
    for stack in (trace, trace.encoder):
        pre, post = stack.get("resid_pre"), stack.get("resid_post")
        assert torch.equal(pre[1:], post[:-1])  # each block reads the previous one's output
        if lm.arch.family.post_norm:
            continue  # BART, Marian: each sum is normalized; the parts are checked by the norms' inputs
        cross = stack.get("cross_attn_out") if stack is trace else 0
        total = pre + stack.get("attn_out") + cross + stack.get("mlp_out")
        assert torch.allclose(total, post, atol=1e-5)
        assert torch.allclose(stack.get("resid_mid"), pre + stack.get("attn_out"), atol=1e-6)
    if not lm.arch.family.post_norm:
        mid, cross = trace.get("resid_mid"), trace.get("cross_attn_out")
        assert torch.allclose(trace.get("resid_cross"), mid + cross, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_attention_and_cross_attention_equal_output_attentions(name: str) -> None:
    lm = load(name)
    out = lm.trace(SOURCE, target=TARGET)
    saved = {id(c): c._attn_implementation_internal for c in _configs(lm.model)}
    try:
        for config in _configs(lm.model):
            config._attn_implementation_internal = "eager"
        reference = hf_forward(lm, ids(lm, SOURCE), out.token_ids[None], output_attentions=True)
    finally:
        for config in _configs(lm.model):
            config._attn_implementation_internal = saved[id(config)]
    trace = out.trace
    for layer in range(2):
        assert torch.allclose(trace.at("attn_probs", layer), reference.decoder_attentions[layer][0], atol=1e-5)
        assert torch.allclose(trace.at("cross_attn_probs", layer), reference.cross_attentions[layer][0], atol=1e-5)
    for layer in range(3):
        assert torch.allclose(trace.encoder.at("attn_probs", layer), reference.encoder_attentions[layer][0],
                              atol=1e-5)  # fmt: skip
    assert trace.get("cross_attn_probs").shape == (2, lm.arch.n_heads, trace.n_pos, trace.encoder.n_pos)
    expected = 1.0 if lm.arch.family.name == "t5" else lm.arch.d_head**-0.5
    assert trace.attn_scaling == (expected,) * 2 and trace.encoder.attn_scaling == (expected,) * 3


def _configs(model):
    seen = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            seen[id(config)] = config
    return list(seen.values())


def test_t5_records_its_relative_position_bias() -> None:
    lm = load("tiny-t5")
    trace = lm.trace(SOURCE, target=TARGET, sites=["q", "k", "attn_probs", "position_bias"]).trace
    for stack in (trace, trace.encoder):
        for layer in stack.layers:
            q, k = stack.at("q", layer).transpose(0, 1), stack.at("k", layer).transpose(0, 1)  # [head, pos, d_head]
            scores = q @ k.transpose(1, 2) + stack.at("position_bias", layer)  # T5: no 1/sqrt(d)
            if stack is trace:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            assert torch.allclose(scores.softmax(-1), stack.at("attn_probs", layer), atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_last_layer_lens_is_the_models_distribution(name: str) -> None:
    lm = load(name)
    out = lm.trace(SOURCE, target=TARGET)
    lens = lm.unembed(out.trace.get("resid_post")[-1])
    assert (lens - out.logits).abs().max() <= 1e-5
    position = 3
    predictions = out.layer_predictions(position=position, topk=5)
    expected = out.logits[position - 1].softmax(-1).topk(5)
    assert list(predictions.probs[-1]) == pytest.approx(expected.values.tolist(), abs=1e-6)
    ranks = out.rankings()
    assert ranks.ranks.shape == (2, out.trace.n_pos - 1)
    top = out.logits[:-1].argmax(-1)  # the model's own top prediction is ranked 1 where it is the token read
    actual = out.token_ids[1:]
    assert all(ranks.ranks[-1, i] == 1 for i in range(len(actual)) if top[i] == actual[i])
    watch = out.rankings_watch([" table"], position=-1)
    assert watch.ranks.shape[0] == 2


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart", "tiny-marian"])
def test_greedy_generate_equals_hugging_face(name: str) -> None:
    lm = load(name)
    out = lm.generate(SOURCE, generate=5)
    with torch.no_grad():
        reference = lm.model.generate(ids(lm, SOURCE), max_new_tokens=5, do_sample=False, num_beams=1)[0]
    assert out.token_ids.tolist() == reference.tolist() and out.n_input == 1
    assert out.trace.encoder is not None and out.logits.shape[0] == len(reference)


def test_sampling_is_seeded_and_a_target_prefix_is_continued() -> None:
    lm = load("tiny-t5")
    first = lm.generate(SOURCE, generate=4, do_sample=True, seed=3, top_k=50)
    again = lm.generate(SOURCE, generate=4, do_sample=True, seed=3, top_k=50)
    assert first.token_ids.tolist() == again.token_ids.tolist()
    forced = lm.generate(SOURCE, generate=2, target="Die")
    assert forced.n_input == 2 and forced.tokens[1] == "Die"


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart"])
def test_trace_files_hold_both_stacks(name: str, tmp_path: Path) -> None:
    lm = load(name)
    out = lm.trace(SOURCE, target=TARGET, sites=lmscope.capture.ALL_SITES)
    back = lm.load_trace(out.save(tmp_path / "s2s.safetensors")).trace
    assert back.tokens == out.tokens and back.encoder is not None and back.encoder.tokens == out.trace.encoder.tokens
    for original, loaded in ((out.trace, back), (out.trace.encoder, back.encoder)):
        assert loaded.model == original.model and loaded.layers == original.layers
        assert set(loaded.tensors) == set(original.tensors)
        assert all(torch.equal(loaded.tensors[s], original.tensors[s]) for s in original.tensors)
    alone = lmscope.load_trace(tmp_path / "s2s.safetensors")
    assert alone.activations(stack="encoder").tokens == out.trace.encoder.tokens
    decoder_only = lmscope.from_pretrained("tiny-gpt2").trace("Hello there")
    path = decoder_only.save(tmp_path / "gpt2.safetensors")
    with pytest.raises(LmscopeError, match="decoder-only or encoder-only") as error:
        lm.load_trace(path)
    assert "\n" not in str(error.value)
    with pytest.raises(LmscopeError, match="encoder-decoder"):
        lmscope.from_pretrained("tiny-gpt2").load_trace(tmp_path / "s2s.safetensors")


def test_activations_and_factors_of_both_stacks() -> None:
    lm = load("tiny-bart")
    out = lm.trace(SOURCE, target=TARGET)
    encoder = out.activations(stack="encoder")
    assert encoder.tokens == out.trace.encoder.tokens and encoder.values.shape[:2] == (3, 128)
    decoder = out.activations()
    assert decoder.tokens == out.tokens and decoder.values.shape[:2] == (2, 96)  # fc2's input, not fc1's
    assert out.run_nmf(n_components=2, stack="encoder").components.shape[0] == 2
    assert out.layer_similarity(stack="encoder").matrix.shape == (3, 3)


def test_bad_input_is_one_clear_line() -> None:
    lm = load("tiny-bart")
    cases = [
        (lambda: lm.trace(SOURCE, target=""), "target is empty"),
        (lambda: lm.trace(SOURCE, target="   "), "target is empty"),
        (lambda: lm.trace(SOURCE, text_pair="second"), "not a sentence pair"),
        (lambda: lm.trace("word " * 300), "context"),
        (lambda: lm.trace(SOURCE, target="word " * 300), "the target is .* tokens"),
        (lambda: lm.generate(SOURCE, generate=400), "context"),
        (lambda: lm.trace(SOURCE, target=TARGET, sites=["nonsense"]), "unknown site"),
        (lambda: lmscope.from_pretrained("tiny-gpt2").trace("Hi", target="there"), "no target"),
    ]
    for call, message in cases:
        with pytest.raises(LmscopeError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_other_encoder_decoder_types_are_refused_clearly() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("prophetnet", vocab_size=64, hidden_size=32, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, num_encoder_layers=1, num_decoder_layers=1,
                                  num_encoder_attention_heads=2, num_decoder_attention_heads=2)  # fmt: skip
    model = AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(LmscopeError, match="unsupported architecture 'prophetnet'"):
        lmscope.wrap(model, load("tiny-t5").tokenizer)


def test_tiny_seq2seq_models_are_listed() -> None:
    names = lmscope.models.available_models()
    for name in ("tiny-t5", "tiny-bart", "tiny-marian"):
        assert "encoder-decoder" in names[name]


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-marian"])  # pre-norm, post-norm
def test_lmscope_verify_passes_on_encoder_decoder_models(name: str) -> None:
    from lmscope.analysis.verify import verify

    report = verify(load(name), generate=3)
    assert report.passed, report.failed
    assert {check.name for check in report.checks} == {"logits", "generation", "lens", "blocks", "attention"}


def test_command_line_takes_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lmscope.cli import main

    assert main(["lens", SOURCE, "--position", "2", "--model", "tiny-t5", "--target", TARGET, "--json"]) == 0
    lens = json.loads(capsys.readouterr().out)
    assert lens["tokens"] and len(lens["layers"]) == 2  # the decoder's layers
    assert main(["nmf", SOURCE, "--components", "2", "--model", "tiny-t5", "--json"]) == 0  # the encoder's
    assert len(json.loads(capsys.readouterr().out)["tokens"]) == len(ids(load("tiny-t5"), SOURCE)[0])
    assert main(["causal-trace", SOURCE, "--subject", "old", "--model", "tiny-t5"]) == 2
    assert "encoder-decoder" in capsys.readouterr().err


def test_a_model_directory_loads_as_an_encoder_decoder(tmp_path: Path) -> None:
    lm = load("tiny-bart")
    lm.model.save_pretrained(tmp_path / "bart")
    lm.tokenizer.save_pretrained(tmp_path / "bart")
    again = lmscope.from_pretrained(str(tmp_path / "bart"))
    assert again.is_seq2seq and type(again.model).__name__ == "BartForConditionalGeneration"
    out, reference = again.trace(SOURCE, target=TARGET), lm.trace(SOURCE, target=TARGET)
    assert torch.allclose(out.logits, reference.logits, atol=1e-5)
    assert "source tokens" in repr(out)
