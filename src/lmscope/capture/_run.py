"""Running a model with capture: one traced forward pass, or generation then one traced pass.

Generation uses the model's KV cache (Hugging Face ``generate``) and captures nothing; the whole
sequence, prompt and generated tokens, is then run once under capture, so every token, the last
generated one included, has its internals.

Encoder-decoder models run the source through the encoder and the decoder tokens (the decoder
start token, then a teacher-forced target or generated tokens) through the decoder, both stacks
captured in the same pass (see ``_trace``'s module docstring).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch

from lmscope.capture._hooks import recording, resolve_layers, resolve_sites
from lmscope.capture._interventions import Plan, intervening
from lmscope.capture._store import open_store, stored_trace
from lmscope.capture._trace import ALL_SITES, CROSS_SITES, DEFAULT_SITES, SEQ2SEQ_SITES, ModelInfo, Trace
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel
from lmscope.models._architectures import NO_ATTENTION

__all__ = [
    "check_finite",
    "check_length",
    "context_length",
    "decoder_start",
    "encode",
    "encode_pair",
    "encode_target",
    "generate_ids",
    "generate_seq2seq",
    "model_info",
    "token_strings",
    "trace_ids",
]

ATTENTION_FREE_ABSENT = frozenset({"resid_mid", "attn_out", "attn_probs", "v", "q", "k", "position_bias"})
"""Sites a state-space model (no attention) does not have."""


def context_length(lm: LoadedModel) -> int | None:
    """The longest input the model accepts, if its config says."""
    config = lm.model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa reserves positions for padding_idx + 1.
            return value - 2 if config.model_type in ("roberta", "xlm-roberta") else value
    return None


def encode(lm: LoadedModel, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[pos]`` for ``text``, with the tokenizer's special tokens, checked for length."""
    if not isinstance(text, str):
        raise LmscopeError(f"text must be a string, not {type(text).__name__}")
    if not text.strip():
        raise LmscopeError("the text is empty: give some text to run the model on")
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"][0]
    check_length(lm, len(ids), max_tokens)
    return ids


def encode_pair(lm: LoadedModel, text: str, text_pair: str, max_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Token ids ``[pos]`` of a sentence pair as the tokenizer joins them, and where ``text_pair`` begins."""
    if lm.arch.is_seq2seq:
        raise LmscopeError(
            f"{lm.name} is an encoder-decoder model, which takes a source and a target, not a sentence pair: "
            "pass the second text as target="
        )
    for part in (text, text_pair):
        if not isinstance(part, str) or not part.strip():
            raise LmscopeError("both texts of a sentence pair must be non-empty strings")
    encoding = lm.tokenizer(text, text_pair, return_tensors="pt")
    ids = encoding["input_ids"][0]
    check_length(lm, len(ids), max_tokens)
    if encoding.get("token_type_ids") is not None and int(encoding["token_type_ids"].max()) > 0:
        segment_b = int(encoding["token_type_ids"][0].argmax())
    elif getattr(lm.tokenizer, "is_fast", False):
        sequence = encoding.sequence_ids(0)
        segment_b = sequence.index(1)
    else:
        raise LmscopeError(f"{lm.name}'s tokenizer does not say where the second text begins: use a fast tokenizer")
    return ids, segment_b


def check_length(lm: LoadedModel, n: int, max_tokens: int | None = None, what: str = "the text") -> None:
    limit = context_length(lm)
    if limit is not None and n > limit:
        raise LmscopeError(f"{what} is {n} tokens, more than {lm.name}'s context of {limit}: shorten it")
    if max_tokens is not None and n > max_tokens:
        raise LmscopeError(f"{what} is {n} tokens, more than the limit of {max_tokens}: shorten it")


def decoder_start(lm: LoadedModel) -> int:
    """The token an encoder-decoder model's decoder starts from (``decoder_start_token_id``)."""
    for config in (lm.model.generation_config, lm.model.config):
        start = getattr(config, "decoder_start_token_id", None)
        if isinstance(start, int):
            return start
    raise LmscopeError(f"{lm.name}'s config names no decoder_start_token_id, so its decoder has no first token")


def encode_target(lm: LoadedModel, target: str | Iterable[int], max_tokens: int | None = None) -> torch.Tensor:
    """Decoder token ids ``[pos]``: the start token, then ``target`` as the tokenizer makes labels of it.

    ``target`` may also be token ids (taken as given, after the start token).
    """
    if isinstance(target, str):
        if not target.strip():
            raise LmscopeError("the target is empty: give the text the decoder should be forced to produce, or leave "
                               "target out to start from the decoder's first token")  # fmt: skip
        ids = lm.tokenizer(text_target=target, return_tensors="pt")["input_ids"][0]
    else:
        ids = torch.as_tensor(list(target), dtype=torch.long)
        vocab = int(lm.model.config.vocab_size)
        if ids.ndim != 1 or len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise LmscopeError(f"target token ids must be a non-empty flat sequence of integers in 0..{vocab - 1}")
    ids = torch.cat([torch.tensor([decoder_start(lm)]), ids.long()])
    check_length(lm, len(ids), max_tokens, what="the target")
    return ids


def token_strings(lm: LoadedModel, ids: Iterable[int]) -> tuple[str, ...]:
    """Each token decoded on its own, as Ecco shows them (`` keys``, not ``Ġkeys``)."""
    return tuple(lm.tokenizer.batch_decode([[int(i)] for i in ids], clean_up_tokenization_spaces=False))


def model_info(lm: LoadedModel, stack: str | None = None) -> ModelInfo:
    """What a Trace records of ``lm`` (of its encoder stack for ``stack="encoder"``)."""
    arch = lm.arch.encoder if stack == "encoder" else lm.arch
    return ModelInfo(
        name=lm.name,
        model_type=lm.model.config.model_type,
        family=arch.family.name,
        n_layers=arch.n_layers,
        n_heads=arch.n_heads,
        n_kv_heads=arch.n_kv_heads,
        d_model=arch.d_model,
        d_head=arch.d_head,
        vocab_size=int(lm.model.config.vocab_size),
        parallel=arch.parallel,
        post_norm=arch.family.post_norm,
        dtype=str(lm.dtype).removeprefix("torch."),
        n_neurons=arch.n_neurons,
        stack=arch.stack,
    )


def check_finite(lm: LoadedModel, tensors: dict[str, torch.Tensor], layers: tuple[int, ...]) -> None:
    """Raise if the run produced NaN or infinite values, naming where they first appear.

    Half-precision models overflow (float16 tops out at 65,504) on some inputs; analyses of such
    a run would be meaningless, so the user is told which layer broke and what dtype to use.
    Only the logits (or the last captured site) are scanned on the normal path.
    """
    final = tensors.get("logits")
    if final is None and tensors:
        final = next(reversed(tensors.values()))
    if final is None or all(_finite(block) for block in final.split(_FINITE_ROWS)):  # bounded memory
        return
    where, first = "the logits", None
    order = ("resid_pre", "attn_out", "resid_mid", "mlp_act", "mlp_out", "resid_post")  # as computed in a block
    for rank, site in enumerate(order):
        if site in tensors:
            bad = (~torch.isfinite(tensors[site])).flatten(1).any(-1).nonzero()  # [layer index]
            if len(bad) and (first is None or (int(bad[0]), rank) < first):
                first = (int(bad[0]), rank)
                where = f"{site} of layer {layers[first[0]]}"
    dtype = str(lm.dtype).removeprefix("torch.")
    hint = "load the model with dtype='float32' or 'bfloat16'" if dtype == "float16" else "check the model's weights"
    raise LmscopeError(f"{lm.name} in {dtype} produced NaN or infinite values (first in {where}): {hint}")


_FINITE_ROWS = 256


def _finite(block: torch.Tensor) -> bool:
    """Whether every value of ``block`` is finite: its sum is (NaN and infinities carry into it; no
    temporary the size of the block), or, where the sum overflows, each value is."""
    return bool(torch.isfinite(block.sum())) or bool(torch.isfinite(block).all())


@torch.no_grad()
def trace_ids(
    lm: LoadedModel,
    ids: torch.Tensor,  # [pos]
    *,
    n_input: int | None = None,
    sites: Iterable[str] | str | None = None,
    layers: Iterable[int] | int | slice | None = None,
    segment_b: int | None = None,
    plan: Plan | None = None,
    source_ids: torch.Tensor | None = None,  # [enc_pos]
    encoder_layers: Iterable[int] | int | slice | None = None,
    store: str | os.PathLike[str] | None = None,
) -> Trace:
    """One forward pass over ``ids`` under capture.

    ``store``: a trace file (or a folder for a new one) that the captured tensors are written to
    layer by layer as the model runs; the Trace reads them back memory-mapped (see ``_store``).

    ``segment_b`` is where the second text of a sentence pair begins (see :func:`encode_pair`);
    models with segment embeddings get the matching ``token_type_ids``. ``plan``: interventions
    prepared by :func:`~lmscope.capture._interventions.prepare`, applied and recorded in the Trace.

    Encoder-decoder models: ``ids`` are the decoder tokens and ``source_ids`` the encoder's; the
    Trace is the decoder's, with the encoder stack's (``encoder_layers``, all by default) as
    ``trace.encoder``.
    """
    if ids.ndim != 1 or len(ids) == 0:
        raise LmscopeError("expected a non-empty 1-D sequence of token ids")
    if lm.arch.is_seq2seq:
        if store is not None:
            raise LmscopeError(f"{lm.name} is an encoder-decoder model: store= does not support those yet")
        return _trace_seq2seq(lm, ids, source_ids, n_input, sites, layers, encoder_layers, plan)
    requested = resolve_sites(sites, DEFAULT_SITES)
    if lm.arch.family.attn is None:  # a state-space model (Mamba): no attention, so no attention sites
        absent = [s for s in requested if s in ATTENTION_FREE_ABSENT]
        if absent and sites is not None and tuple(requested) != resolve_sites(ALL_SITES, DEFAULT_SITES):
            raise LmscopeError(f"{lm.name} {NO_ATTENTION}: it has no site {absent[0]!r}")
        requested = tuple(s for s in requested if s not in ATTENTION_FREE_ABSENT)
    chosen_sites = tuple(s for s in requested if s not in CROSS_SITES)  # ALL_SITES: all this model has
    if requested and not chosen_sites:
        raise LmscopeError(f"{lm.name} has no cross-attention, so it has no site {requested[0]!r}")
    chosen_layers = resolve_layers(layers, lm.arch.n_layers)
    batch = ids[None].to(lm.device)  # [batch=1, pos]
    extra = {}
    if segment_b is not None and getattr(lm.model.config, "type_vocab_size", 0) > 1:
        # BERT's segment embeddings: type 0 for [CLS] A [SEP], type 1 for B [SEP].
        extra["token_type_ids"] = (torch.arange(len(ids), device=lm.device) >= segment_b).long()[None]
    plan = plan or Plan((), ())
    skeleton = Trace(token_ids=ids.cpu(), tokens=token_strings(lm, ids.tolist()),
                     n_input=len(ids) if n_input is None else n_input, model=model_info(lm), layers=chosen_layers,
                     tensors={}, segment_b=segment_b, interventions=plan.records)  # fmt: skip
    writer = None if store is None else open_store(store, skeleton, chosen_sites)
    head = _HeadInput(lm) if writer is not None and _logits_by_blocks(lm) else None
    try:
        with recording(lm, chosen_sites, chosen_layers) as recorder, intervening(lm, plan), head or nullcontext():
            recorder.sink = writer
            if head is not None:
                extra["logits_to_keep"] = 1  # the head runs on the last position; all are written in blocks below
            output = lm.model(input_ids=batch, use_cache=False, **extra)
        logits = getattr(output, "logits", None)  # None for models without an LM head
        tensors = {} if writer else {site: t[0] for site, t in recorder.stacked().items()}  # drop the batch axis
        if head is not None:  # (only with a writer)
            writer.add_blocks("logits", len(ids), head.logits(logits[0, -1], chosen_layers))
        elif logits is not None:
            tensors["logits"] = logits[0].to(lm.capture_device or logits.device)  # [pos, vocab]
        check_finite(lm, tensors, chosen_layers)
        attn = [layer for layer in chosen_layers if layer in recorder.attn_scaling]
        skeleton = replace(skeleton, attn_scaling=tuple(recorder.attn_scaling[layer] for layer in attn),
                           attn_softcap=tuple(recorder.attn_softcap[layer] for layer in attn),
                           attn_recipe=recorder.attn_recipe())  # fmt: skip
        if writer is not None:
            del output
            return stored_trace(writer, skeleton, {**recorder.extra_tensors(), **tensors})
    except BaseException:
        if writer is not None:
            writer.abort()  # no partial file is left behind
        raise
    return replace(skeleton, tensors=tensors)


_LOGIT_ROWS = 512
"""Positions whose logits a disk-backed trace computes and writes at a time (``[rows, vocab]``)."""


def _logits_by_blocks(lm: LoadedModel) -> bool:
    """Whether a disk-backed trace can take the logits from the model's LM head applied to the final
    normed states a block of positions at a time: the model takes ``logits_to_keep`` and applies nothing
    to its head's output (no soft-capping, scale or bias), and is not placed over devices."""
    arch, config = lm.arch, lm.model.config
    if arch.lm_head is None or arch.final_norm is None or getattr(lm.model, "hf_device_map", None):
        return False
    if getattr(config, "final_logit_softcapping", None) or arch.logit_scale != 1.0 or arch.unembed_scale != 1.0:
        return False
    if arch.logits_bias is not None:
        return False
    return "logits_to_keep" in inspect.signature(lm.model.forward).parameters


class _HeadInput:
    """Records the final norm's output ``[pos, d_model]`` and the LM head's input during the run (hooks
    removed on exit), then gives the logits ``[pos, vocab]`` a block of positions at a time."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm, self.normed, self.head_input = lm, [], []
        self.handles: list[Any] = []

    def __enter__(self) -> _HeadInput:
        arch = self.lm.arch
        self.handles = [
            arch.final_norm.register_forward_hook(lambda module, args, output: self.normed.append(output.detach())),
            arch.lm_head.register_forward_pre_hook(lambda module, args: self.head_input.append(args[0].detach())),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def logits(self, last: torch.Tensor, layers: tuple[int, ...]) -> Iterator[torch.Tensor]:
        """``[rows, vocab]`` blocks of ``lm_head(final norm output)``, checked against ``last``, the model's
        own logits of the last position (its head's input must be the final norm's output)."""
        if len(self.normed) != 1 or len(self.head_input) != 1:
            raise LmscopeError(f"{self.lm.name}'s final norm or LM head ran {len(self.normed)} and "
                               f"{len(self.head_input)} times: trace without store=")  # fmt: skip
        normed, head_input = self.normed.pop()[0], self.head_input.pop()[0]  # [pos, d_model], [1, d_model]
        if head_input.shape[0] != 1 or not torch.equal(head_input[-1], normed[-1]):
            raise LmscopeError(f"{self.lm.name}'s LM head does not take its final norm's output: trace "
                               "without store=")  # fmt: skip
        device, n = self.lm.capture_device, normed.shape[0]
        # CPU BLAS takes another kernel, whose sums can differ in the last bit from the whole input's, for
        # products of fewer than 8 rows (see ``_lazy_attention``): blocks have 8 rows or more, and a short
        # last block starts earlier
        rows = max(8, _LOGIT_ROWS)
        for start in range(0, n, rows):
            end = min(n, start + rows)
            low = max(0, min(start, end - 8))
            block = self.lm.arch.lm_head(normed[None, low:end])[0, start - low :]  # [rows, vocab]
            block = block if device is None else block.to(device)
            if end == n:
                mine = block[-1].float()
                if not torch.allclose(mine, last.float().to(mine.device), rtol=1e-4, atol=1e-4):
                    raise LmscopeError(f"{self.lm.name} changes its LM head's output before returning logits, "
                                       "which a stored trace cannot reproduce: trace without store=")  # fmt: skip
            check_finite(self.lm, {"logits": block}, layers)
            yield block


def _trace_seq2seq(
    lm: LoadedModel,
    ids: torch.Tensor,  # [pos]
    source_ids: torch.Tensor | None,  # [enc_pos]
    n_input: int | None,
    sites: Iterable[str] | str | None,
    layers: Iterable[int] | int | slice | None,
    encoder_layers: Iterable[int] | int | slice | None,
    plan: Plan | None,
) -> Trace:
    """Both stacks of an encoder-decoder model in one forward pass: the decoder Trace holding the encoder's."""
    if source_ids is None or source_ids.ndim != 1 or len(source_ids) == 0:
        raise LmscopeError(f"{lm.name} is an encoder-decoder model: give the source text (the encoder's input)")
    if plan:
        raise LmscopeError("interventions on encoder-decoder models are not supported yet")
    encoder = lm.arch.encoder
    chosen_sites = resolve_sites(sites, (*DEFAULT_SITES, *SEQ2SEQ_SITES))
    encoder_sites = tuple(s for s in chosen_sites if s not in CROSS_SITES)
    chosen_layers = resolve_layers(layers, lm.arch.n_layers)
    chosen_encoder_layers = resolve_layers(encoder_layers, encoder.n_layers)
    source = source_ids[None].to(lm.device)  # [batch=1, enc_pos]
    batch = ids[None].to(lm.device)  # [batch=1, pos]
    with recording(lm, chosen_sites, chosen_layers, encoder=(encoder_sites, chosen_encoder_layers)) as recorder:
        output = lm.model(
            input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=batch, use_cache=False
        )
    tensors = {site: t[0] for site, t in recorder.stacked().items()}  # drop the batch axis
    tensors["logits"] = output.logits[0].to(lm.capture_device or output.logits.device)  # [pos, vocab]
    assert recorder.encoder is not None
    encoder_tensors = {site: t[0] for site, t in recorder.encoder.stacked().items()}
    check_finite(lm, encoder_tensors, chosen_encoder_layers)
    check_finite(lm, tensors, chosen_layers)
    return Trace(
        token_ids=ids.cpu(),
        tokens=token_strings(lm, ids.tolist()),
        n_input=len(ids) if n_input is None else n_input,
        model=model_info(lm),
        layers=chosen_layers,
        tensors=tensors,
        attn_scaling=_factors(recorder.attn_scaling, chosen_layers),
        attn_softcap=_factors(recorder.attn_softcap, chosen_layers),
        attn_recipe=recorder.attn_recipe(),
        encoder=Trace(
            token_ids=source_ids.cpu(),
            tokens=token_strings(lm, source_ids.tolist()),
            n_input=len(source_ids),
            model=model_info(lm, "encoder"),
            layers=chosen_encoder_layers,
            tensors=encoder_tensors,
            attn_scaling=_factors(recorder.encoder.attn_scaling, chosen_encoder_layers),
            attn_softcap=_factors(recorder.encoder.attn_softcap, chosen_encoder_layers),
            attn_recipe=recorder.encoder.attn_recipe(),
        ),
    )


def _factors(values: dict[int, Any], layers: tuple[int, ...]) -> tuple[Any, ...]:
    return tuple(values[layer] for layer in layers if layer in values)


@torch.no_grad()
def generate_seq2seq(
    lm: LoadedModel,
    source_ids: torch.Tensor,  # [enc_pos]
    prefix: torch.Tensor | None = None,  # [pos]: decoder tokens to continue (start token first)
    *,
    generate: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:  # [pos + new]
    """Decoder tokens: the start token (or ``prefix``) extended by up to ``generate`` tokens.

    Runs the model's KV-cached ``generate`` with its own generation config (forced tokens,
    banned tokens), greedy or sampled as asked, one beam.
    """
    if generate < 1:
        raise LmscopeError(f"generate must be at least 1, not {generate}")
    if prefix is None:
        prefix = torch.tensor([decoder_start(lm)])
    check_length(lm, len(prefix) + generate, max_tokens, what="the target with the generated tokens")
    config = copy.deepcopy(lm.model.generation_config)
    config.update(max_new_tokens=generate, max_length=None, min_length=0, min_new_tokens=None, do_sample=do_sample,
                  num_beams=1, num_beam_groups=1, num_return_sequences=1)  # fmt: skip
    if do_sample:
        config.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    else:
        config.update(temperature=None, top_k=None, top_p=None)
    tokenizer = lm.tokenizer
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if seed is not None:
        torch.manual_seed(seed)
    source = source_ids[None].to(lm.device)
    out = lm.model.generate(
        input_ids=source,
        attention_mask=torch.ones_like(source),
        decoder_input_ids=prefix[None].to(lm.device),
        generation_config=config,
    )
    return out[0].cpu()


@torch.no_grad()
def generate_ids(
    lm: LoadedModel,
    ids: torch.Tensor,  # [pos]
    *,
    generate: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    plan: Plan | None = None,
) -> torch.Tensor:  # [pos + new]
    """Extend ``ids`` by up to ``generate`` tokens with the model's KV-cached generation.

    Under interventions (``plan``) every step runs over the whole sequence without the KV cache,
    so interventions at given positions see the positions they name.
    """
    if lm.arch.lm_head is None or not lm.model.can_generate():
        raise LmscopeError(f"{lm.name} cannot generate text: use trace() for a forward pass")
    if generate < 1:
        raise LmscopeError(f"generate must be at least 1, not {generate}")
    check_length(lm, len(ids) + generate)
    from transformers import GenerationConfig

    tokenizer = lm.tokenizer
    settings = dict(max_new_tokens=generate, do_sample=do_sample, num_beams=1)
    if do_sample:
        settings.update(temperature=temperature, top_k=top_k or 0, top_p=top_p or 1.0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(**settings, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    if seed is not None:
        torch.manual_seed(seed)
    batch = ids[None].to(lm.device)
    if plan:
        config.use_cache = False
    with intervening(lm, plan or Plan((), ())):
        out = lm.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), generation_config=config)
    return out[0].cpu()
