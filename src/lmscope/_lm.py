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
    encode,
    encode_pair,
    generate_ids,
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
        return self.loaded.arch

    @cached_property
    def unembed(self) -> Unembed:
        return Unembed.from_model(self.loaded)

    def __repr__(self) -> str:
        arch = self.arch
        return (
            f"LM({self.name!r}, family={arch.family.name}, layers={arch.n_layers}, "
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
        sites: Sites = None,
        layers: Layers = None,
        interventions: Sequence[Intervention] | None = None,
    ) -> Output:
        """One forward pass over ``text`` with capture; no generation.

        ``text_pair``: a second text (sentence pairs, BERT's segment B); the Trace records where it
        begins (``segment_b``) and models with segment embeddings get the matching token types.
        ``interventions``: :class:`lmscope.Intervention` objects applied for this run only (checked
        before the model runs) and recorded in the Trace.
        """
        segment_b = None
        if text_pair is not None:
            ids, segment_b = encode_pair(self.loaded, text, text_pair, self.max_tokens)
        else:
            ids = self.encode(text)
        plan = prepare(self.loaded, interventions, len(ids))
        return Output(trace_ids(self.loaded, ids, sites=sites, layers=layers, segment_b=segment_b, plan=plan), self)

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
    ) -> Output:
        """Generate ``generate`` tokens after ``text`` (Ecco's signature), then trace the whole sequence.

        ``interventions`` apply while generating and to the traced pass; positions name input tokens.
        """
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
        return Output(trace_ids(self.loaded, full, n_input=len(ids), sites=sites, layers=layers, plan=plan), self)

    def causal_trace(self, text: str | Sequence[int], subject: str | Sequence[int], target: str | int | None = None,
                     **options: Any) -> CausalTrace:  # fmt: skip
        """Causal tracing (Meng et al. 2022): see :func:`lmscope.analysis.causal_tracing.causal_trace`."""
        from lmscope.analysis.causal_tracing import causal_trace

        return causal_trace(self, text, subject, target, **options)

    def activation_patching(self, clean: str, corrupted: str, answer: str | int, wrong: str | int | None = None,
                            **options: Any) -> Patching:  # fmt: skip
        """Exact and attribution patching: see :func:`lmscope.analysis.patching.activation_patching`."""
        from lmscope.analysis.patching import activation_patching

        return activation_patching(self, clean, corrupted, answer, wrong, **options)

    def faithfulness(self, text: str, method: str = "flow", **options: Any) -> Faithfulness:
        """Top-k vs random k units of ``method`` (``"flow"``: graph edges; a saliency method: tokens)
        removed: see :func:`lmscope.analysis.faithfulness.faithfulness`."""
        from lmscope.analysis.faithfulness import faithfulness

        return faithfulness(self, text, method, **options)

    def load_trace(self, path: str | os.PathLike[str]) -> Output:
        """A saved trace, checked to come from this model, with the model attached."""
        return self.attach(read_trace(path), where=str(path))

    def attach(self, trace: Trace, where: str = "the trace") -> Output:
        """``trace`` with this model attached, after checking that this model recorded it."""
        mismatch = model_info(self.loaded).mismatch(trace.model)
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
    trust_remote_code: bool = False,
    max_tokens: int | None = None,
    **kwargs: Any,
) -> LM:
    """Load a model for lmscope.

    ``name`` is one of: nothing (the embedded SmolLM2-135M-Instruct), ``"minilm-l6"``,
    ``"tiny-<family>"`` (seeded random models), a local model directory, a ``.gguf`` file, or a
    Hugging Face id. ``dtype``, ``device`` and ``device_map`` pass through to transformers;
    ``trust_remote_code`` stays off unless asked for here.
    """
    loaded = load_model(
        name,
        dtype=dtype,
        device=device,
        device_map=device_map,
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

    label = name or getattr(model.config, "_name_or_path", None) or type(model).__name__
    model.eval()
    return _checked(LM(LoadedModel(label, model, tokenizer, bind_architecture(model)), max_tokens=max_tokens))


def load_trace(path: str | os.PathLike[str]) -> Output:
    """A saved trace without a model: analyses that need only captured tensors work on it."""
    return Output(read_trace(path))
