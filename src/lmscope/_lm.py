"""``LM``: a loaded model with the verbs users call (``trace``, ``generate``, ``load_trace``)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from lmscope._output import Output
from lmscope.capture import (
    Trace,
    check_length,
    decoder_start,
    encode,
    encode_pair,
    encode_target,
    generate_ids,
    generate_seq2seq,
    model_info,
    trace_ids,
)
from lmscope.capture import load_trace as read_trace
from lmscope.capture._interventions import Intervention, prepare
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel, Unembed, load_model

if TYPE_CHECKING:
    from lmscope.analysis.causal_tracing import CausalTrace
    from lmscope.analysis.faithfulness import Faithfulness
    from lmscope.analysis.patching import Patching

__all__ = ["LM", "from_pretrained", "load_trace", "wrap"]

Sites = Iterable[str] | str | None
Layers = Iterable[int] | int | slice | None


class LM:
    """A model and its tokenizer, ready to trace.

    ``max_tokens`` caps input length beyond the model's own context (the web app sets it).
    """

    def __init__(self, loaded: LoadedModel, max_tokens: int | None = None):
        self.loaded = loaded
        self.max_tokens = max_tokens

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def name(self) -> str:
        return self.loaded.name

    @property
    def arch(self) -> Any:
        """The architecture (of the decoder stack, for an encoder-decoder model: ``arch.encoder`` is the encoder's)."""
        return self.loaded.arch

    @property
    def is_seq2seq(self) -> bool:
        """Whether this is an encoder-decoder model (T5, BART, Marian, ...): ``trace(source, target=...)``."""
        return self.loaded.is_seq2seq

    @cached_property
    def unembed(self) -> Unembed:
        return Unembed.from_model(self.loaded)

    def __repr__(self) -> str:
        arch = self.arch
        layers = f"{arch.encoder.n_layers}+{arch.n_layers}" if arch.encoder is not None else arch.n_layers
        return (
            f"LM({self.name!r}, family={arch.family.name}, layers={layers}, "
            f"heads={arch.n_heads}/{arch.n_kv_heads}, d_model={arch.d_model}, "
            f"device={self.loaded.device}, dtype={str(self.loaded.dtype).removeprefix('torch.')})"
        )

    def encode(self, text: str | Sequence[int], text_pair: str | None = None) -> torch.Tensor:
        """Token ids ``[pos]`` of a text (or given ids), checked for emptiness and length.

        ``text_pair`` joins a second text as the tokenizer does for sentence pairs (BERT's
        ``[CLS] A [SEP] B [SEP]``).
        """
        if text_pair is not None:
            return encode_pair(self.loaded, text, text_pair, self.max_tokens)[0]
        if isinstance(text, str):
            return encode(self.loaded, text, self.max_tokens)
        ids = torch.as_tensor(list(text), dtype=torch.long)
        if ids.ndim != 1 or len(ids) == 0:
            raise LmscopeError("token ids must be a non-empty flat sequence of integers")
        vocab = int(self.model.config.vocab_size)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise LmscopeError(f"token ids must lie in 0..{vocab - 1}")
        check_length(self.loaded, len(ids), self.max_tokens)
        return ids

    def trace(
        self,
        text: str | Sequence[int],
        *,
        text_pair: str | None = None,
        target: str | Sequence[int] | None = None,
        sites: Sites = None,
        layers: Layers = None,
        encoder_layers: Layers = None,
        interventions: Sequence[Intervention] | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> Output:
        """One forward pass over ``text`` with capture; no generation.

        ``store``: a ``.safetensors`` file (or an existing folder, for a new file in it) that the
        captured tensors are written to, layer by layer, while the model runs; the Trace then reads
        them memory-mapped, so a trace larger than RAM works with every analysis. The file is a
        trace file (:func:`lmscope.load_trace` reads it); it stays when the Output is gone.

        ``text_pair``: a second text (sentence pairs, BERT's segment B); the Trace records where it
        begins (``segment_b``) and models with segment embeddings get the matching token types.
        ``interventions``: :class:`lmscope.Intervention` objects applied for this run only (checked
        before the model runs) and recorded in the Trace.

        Encoder-decoder models: ``text`` is the source and ``target`` the text the decoder is
        forced to read (teacher forcing; without it the decoder reads only its start token).
        ``layers`` are the decoder's, ``encoder_layers`` the encoder's (all by default); the
        Trace is the decoder's and ``out.trace.encoder`` the encoder's.
        """
        if self.is_seq2seq:
            if store is not None:
                raise LmscopeError(f"{self.name} is an encoder-decoder model: store= does not support those yet")
            if text_pair is not None:
                encode_pair(self.loaded, text, text_pair)  # raises: the second text is the target
            source = self.encode(text)
            decoder = self._decoder_ids(target)
            if interventions:
                raise LmscopeError("interventions on encoder-decoder models are not supported yet")
            trace = trace_ids(self.loaded, decoder, sites=sites, layers=layers, source_ids=source,
                              encoder_layers=encoder_layers)  # fmt: skip
            return Output(trace, self)
        if target is not None:
            raise LmscopeError(
                f"{self.name} is not an encoder-decoder model, so it takes no target: append the text to the prompt"
            )
        segment_b = None
        if text_pair is not None:
            ids, segment_b = encode_pair(self.loaded, text, text_pair, self.max_tokens)
        else:
            ids = self.encode(text)
        plan = prepare(self.loaded, interventions, len(ids))
        trace = trace_ids(self.loaded, ids, sites=sites, layers=layers, segment_b=segment_b, plan=plan, store=store)
        return Output(trace, self, plan)

    def generate(
        self,
        text: str | Sequence[int],
        generate: int = 1,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        sites: Sites = None,
        layers: Layers = None,
        interventions: Sequence[Intervention] | None = None,
        target: str | Sequence[int] | None = None,
        encoder_layers: Layers = None,
        store: str | os.PathLike[str] | None = None,
    ) -> Output:
        """Generate ``generate`` tokens after ``text`` (Ecco's signature), then trace the whole sequence.

        ``store``: as in :meth:`trace`. Generation itself (KV-cached, nothing captured) runs in
        memory; the one traced pass over the whole sequence afterwards writes to the store.

        ``interventions`` apply while generating and to the traced pass; positions name input tokens.

        Encoder-decoder models: ``text`` is the source; the decoder generates from its start token
        (or continues ``target``, a forced prefix) with the KV cache, then one pass traces both
        stacks. ``out.n_input`` counts the decoder tokens given (start token and prefix).
        """
        if self.is_seq2seq:
            if interventions:
                raise LmscopeError("interventions on encoder-decoder models are not supported yet")
            if store is not None:
                raise LmscopeError(f"{self.name} is an encoder-decoder model: store= does not support those yet")
            return self._generate_seq2seq(text, target, generate, sites, layers, encoder_layers,
                                          do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                          seed=seed)  # fmt: skip
        if target is not None:
            raise LmscopeError(
                f"{self.name} is not an encoder-decoder model, so it takes no target: append the text to the prompt"
            )
        ids = self.encode(text)
        plan = prepare(self.loaded, interventions, len(ids))
        if self.max_tokens is not None:
            check_length(self.loaded, len(ids) + generate, self.max_tokens)
        full = generate_ids(
            self.loaded,
            ids,
            generate=generate,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            plan=plan,
        )
        trace = trace_ids(self.loaded, full, n_input=len(ids), sites=sites, layers=layers, plan=plan, store=store)
        return Output(trace, self, plan)

    def _decoder_ids(self, target: str | Sequence[int] | None) -> torch.Tensor:
        """The decoder's tokens: its start token, then ``target`` if given."""
        if target is None:
            return torch.tensor([decoder_start(self.loaded)])
        return encode_target(self.loaded, target, self.max_tokens)

    def _generate_seq2seq(self, text: str | Sequence[int], target: str | Sequence[int] | None, generate: int,
                          sites: Sites, layers: Layers, encoder_layers: Layers, **sampling: Any) -> Output:  # fmt: skip
        source = self.encode(text)
        prefix = self._decoder_ids(target)
        eos = self.tokenizer.eos_token_id
        if target is not None and len(prefix) > 1 and eos is not None and int(prefix[-1]) == eos:
            prefix = prefix[:-1]  # continue the target, not after its end
        full = generate_seq2seq(self.loaded, source, prefix, generate=generate, max_tokens=self.max_tokens,
                                **sampling)  # fmt: skip
        trace = trace_ids(self.loaded, full, n_input=len(prefix), sites=sites, layers=layers, source_ids=source,
                          encoder_layers=encoder_layers)  # fmt: skip
        return Output(trace, self)

    def causal_trace(self, text: str | Sequence[int], subject: str | Sequence[int], target: str | int | None = None,
                     **options: Any) -> CausalTrace:  # fmt: skip
        """Causal tracing (Meng et al. 2022): see :func:`lmscope.analysis.causal_tracing.causal_trace`."""
        from lmscope.analysis.causal_tracing import causal_trace

        self._one_stack("causal tracing")
        return causal_trace(self, text, subject, target, **options)

    def activation_patching(self, clean: str, corrupted: str, answer: str | int, wrong: str | int | None = None,
                            **options: Any) -> Patching:  # fmt: skip
        """Exact and attribution patching: see :func:`lmscope.analysis.patching.activation_patching`."""
        from lmscope.analysis.patching import activation_patching

        self._one_stack("activation patching")
        return activation_patching(self, clean, corrupted, answer, wrong, **options)

    def faithfulness(self, text: str, method: str = "flow", **options: Any) -> Faithfulness:
        """Top-k vs random k units of ``method`` (``"flow"``: graph edges; a saliency method: tokens)
        removed: see :func:`lmscope.analysis.faithfulness.faithfulness`."""
        from lmscope.analysis.faithfulness import faithfulness

        self._one_stack("the faithfulness test")
        return faithfulness(self, text, method, **options)

    def _one_stack(self, what: str) -> None:
        if self.is_seq2seq:
            raise LmscopeError(f"{what} does not support encoder-decoder models ({self.name}) yet")

    def load_trace(self, path: str | os.PathLike[str]) -> Output:
        """A saved trace, checked to come from this model, with the model attached."""
        return self.attach(read_trace(path), where=str(path))

    def attach(self, trace: Trace, where: str = "the trace") -> Output:
        """``trace`` with this model attached, after checking that this model recorded it."""
        if self.is_seq2seq != trace.is_seq2seq:
            kinds = ("a decoder-only or encoder-only", "an encoder-decoder")
            raise LmscopeError(
                f"{where} is a trace of {kinds[trace.is_seq2seq]} model ({trace.model.name!r}) and {self.name} is "
                f"{kinds[self.is_seq2seq]} model: load it with the model that made it, or without a model"
            )
        mismatch = model_info(self.loaded).mismatch(trace.model)
        if trace.encoder is not None and not mismatch:
            mismatch = model_info(self.loaded, "encoder").mismatch(trace.encoder.model)
        if mismatch:
            raise LmscopeError(
                f"{where} was traced with {trace.model.name!r}, not {self.name!r} ({mismatch}): "
                "load it with that model, or without a model"
            )
        return Output(trace, self)


def from_pretrained(
    name: str | os.PathLike[str] | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: Any = None,
    max_memory: dict[Any, int | str] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    capture_device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    max_tokens: int | None = None,
    **kwargs: Any,
) -> LM:
    """Load a model for lmscope.

    ``name`` is one of: nothing (the embedded SmolLM2-135M-Instruct), ``"minilm-l6"``,
    ``"tiny-<family>"`` (seeded random models), a local model directory, a ``.gguf`` file, or a
    Hugging Face id. ``dtype``, ``device`` and ``device_map`` pass through to transformers;
    ``trust_remote_code`` stays off unless asked for here.

    Big models: ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"`` or a dict from module
    names to devices, ``"cpu"`` and ``"disk"`` included) places layers with accelerate, bounded by
    ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}``), with disk-offloaded weights in
    ``offload_folder``. Every analysis works on such a model; captured tensors are gathered on
    ``capture_device`` (default: the CPU for a placed model).
    """
    loaded = load_model(
        name,
        dtype=dtype,
        device=device,
        device_map=device_map,
        max_memory=max_memory,
        offload_folder=offload_folder,
        capture_device=capture_device,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    return _checked(LM(loaded, max_tokens=max_tokens))


def _checked(lm: LM) -> LM:
    """A layout guessed for a model type the table lacks is kept only if ``lmscope.verify`` passes."""
    from lmscope.models._fallback import is_guessed

    if is_guessed(lm.arch):
        from lmscope.analysis.verify import accept_guessed

        accept_guessed(lm)
    return lm


def wrap(model: Any, tokenizer: Any, name: str | None = None, max_tokens: int | None = None) -> LM:
    """An ``LM`` around a model object the caller already has (the model is not modified)."""
    from lmscope.models._fallback import bind_architecture
    from lmscope.models._placement import capture_device

    label = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    model.eval()
    loaded = LoadedModel(label, model, tokenizer, bind_architecture(model), capture_device=capture_device(model))
    return _checked(LM(loaded, max_tokens=max_tokens))


def load_trace(path: str | os.PathLike[str]) -> Output:
    """A saved trace without a model: analyses that need only captured tensors work on it."""
    return Output(read_trace(path))
