"""Input saliency: how much each input token contributed to each output token (Ecco's ``primary_attributions``).

For an output token at position ``t`` the inputs are the tokens at ``s < t`` with embeddings
``e_s`` (``inputs_embeds``), and the target is ``f_t``: the token's probability
``p(x_t | x_<t)`` (Ecco), its logit, or a contrast ``logit(x_t) − logit(foil)`` ("why this token
rather than that one", Yin & Neubig 2022, "Interpreting Language Models with Contrastive
Explanations"). With ``g_s = ∂f_t/∂e_s``, the methods are:

- ``grad_x_input`` (Ecco's default): ``‖g_s ⊙ e_s‖₂``, normalized to sum to 1 over ``s``
  (Shrikumar et al. 2016, aggregated per token by the L2 norm as Ecco does).
- ``gradient`` (Simonyan et al. 2014, "saliency"): ``‖g_s‖₂``, normalized to sum to 1.
- ``input_x_gradient``: the signed first-order term ``g_s · e_s``, not normalized.
- ``integrated_gradients`` (Sundararajan et al. 2017): with a baseline ``b``,
  ``a_s = Σ_d (e_s − b_s)_d ∫₀¹ ∂f_t/∂e_{s,d}(b + α(e − b)) dα``, signed and not normalized; by
  completeness ``Σ_s a_s = f_t(e) − f_t(b)`` up to the quadrature error, which the result reports.
- ``occlusion`` (Zeiler & Fergus 2014): ``a_s = f_t(e) − f_t(e with e_s := b_s)``, the drop of the
  target when token ``s`` is erased (zero baseline) or replaced (a token's embedding), signed and
  not normalized. Gradients measure sensitivity around the actual input and can under-credit a
  token the prediction depends on decisively (" France" for " Paris"); occlusion measures the
  effect of taking it away (see :mod:`lmscope.analysis._occlusion`).

Every output token's attributions come from one forward pass and one batched backward pass
(see :mod:`lmscope.analysis._gradients`), not a forward and backward pass per output token;
occlusion needs no backward pass: one batched forward pass of one variant per input token.
Where it is faster on the workload, the forward and batched backward run their float32 CPU
products through oneDNN (:mod:`lmscope.analysis._onednn`, decided per class of workload from a
trial pass each way); the attributions agree with PyTorch's own products to float32 rounding.
Teacher forcing is implicit: the attributed tokens are whatever the trace holds, generated or not.
Positions name the explained token, as in Ecco: output ``t`` is predicted from the state at
``t − 1``. ``"next"`` (or ``len(tokens)``) explains the prediction after the last token, whose
token is the model's top prediction there (``Saliency.next_token``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmscope.analysis._gradients import (
    Targets,
    default_rows,
    frozen_parameters,
    gradients,
    input_embeddings,
    integrated_gradients,
    scores,
)
from lmscope.analysis._occlusion import occlusion
from lmscope.analysis._result import Result
from lmscope.capture import Trace
from lmscope.capture._interventions import Plan, intervening
from lmscope.errors import LmscopeError
from lmscope.models import LoadedModel

__all__ = ["METHODS", "Saliency", "primary_attributions"]

METHODS = ("grad_x_input", "gradient", "input_x_gradient", "integrated_gradients", "occlusion")
_ALIASES = {"saliency": "gradient", "ig": "integrated_gradients", "grad": "gradient"}
_SIGNED = ("input_x_gradient", "integrated_gradients", "occlusion")
STYLES = ("minimal", "detailed")
DEFAULT_STEPS = 50

Positions = int | str | slice | range | Sequence[int | str] | None
TokenLike = str | int


@dataclass(frozen=True)
class Saliency(Result):
    """Attributions of output tokens to the tokens before them.

    ``attributions[i][s]`` is the attribution of output ``positions[i]`` (call it ``t``) to the
    input token at ``s`` for ``s < t``. ``values[i]`` is ``f_t`` (probability, logit or logit
    difference, per ``target``). Integrated gradients also give ``baseline_values`` (``f_t`` at
    the baseline) and ``completeness_error`` (``|Σ_s a_s − (f_t(e) − f_t(b))|``).
    """

    _view = "lmscope.views.saliency"

    method: str
    target: str  # "prob", "logit" or "contrast"
    style: str
    tokens: tuple[str, ...]  # [pos]
    token_ids: np.ndarray  # [pos]
    n_input: int
    positions: tuple[int, ...]  # [output]
    attributions: tuple[np.ndarray, ...]  # [output][pos < positions[output]]
    values: np.ndarray  # [output]
    signed: bool
    normalized: bool
    contrast: tuple[str, ...] | None = None  # [output] the foil token of each output
    steps: int | None = None
    baseline_values: np.ndarray | None = None  # [output]
    completeness_error: np.ndarray | None = None  # [output]
    next_token: str | None = None  # the top prediction after the last token, explained as output len(tokens)

    def plot(self) -> object:
        """A matplotlib ``Figure``: one row per explained token, one column per input token."""
        from lmscope.views._figure import plot_saliency

        return plot_saliency(self)

    def matrix(self) -> np.ndarray:
        """Attributions as ``[output, pos]``, zero at and after each output's own position."""
        out = np.zeros((len(self.positions), len(self.tokens)), dtype=np.float32)
        for i, row in enumerate(self.attributions):
            out[i, : len(row)] = row
        return out

    def top(self, index: int, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` input positions with the largest attribution (by magnitude) for output ``index``."""
        row = self.attributions[index]
        order = np.argsort(-np.abs(row), kind="stable")[:k]
        return [(int(s), float(row[s])) for s in order]


def _method(attr_method: str) -> str:
    name = _ALIASES.get(attr_method, attr_method)
    if name not in METHODS:
        raise LmscopeError(f"unknown attribution method {attr_method!r}: use one of {', '.join(METHODS)}")
    return name


def _output_positions(trace: Trace, positions: Positions) -> list[int]:
    """Output positions: the generated tokens by default, else every token after the first.

    ``"next"`` or ``len(tokens)`` is the prediction after the last token (output position ``n``).
    """
    n = trace.n_pos
    if positions is None:
        chosen = range(trace.n_input, n) if trace.n_input < n else range(1, n)
    elif isinstance(positions, (int, str)):
        chosen = [positions]
    elif isinstance(positions, slice):
        chosen = range(n)[positions]
    else:
        chosen = list(positions)
    resolved = sorted({_output_position(trace, p) for p in chosen})
    if not resolved:
        raise LmscopeError("no output positions selected: choose positions from 1 to the last token")
    if resolved[0] == 0:
        raise LmscopeError("position 0 has no tokens before it to attribute to: choose positions from 1 on")
    return resolved


def _output_position(trace: Trace, position: int | str) -> int:
    if isinstance(position, str):
        if position.strip().lower() != "next":
            raise LmscopeError(f"position {position!r} is not a token index or 'next'")
        return trace.n_pos
    return trace.n_pos if position == trace.n_pos else trace.position(int(position))


def _token_id(lm: LoadedModel, token: TokenLike, what: str) -> int:
    vocab = int(lm.model.config.vocab_size)
    if isinstance(token, str):
        ids = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise LmscopeError(f"{what} {token!r} is {len(ids)} tokens, not one: give a single token (or its id)")
        return int(ids[0])
    if not 0 <= int(token) < vocab:
        raise LmscopeError(f"{what} id {token} is outside the vocabulary 0..{vocab - 1}")
    return int(token)


def _foils(lm: LoadedModel, contrast: TokenLike | Sequence[TokenLike], n: int) -> list[int]:
    if isinstance(contrast, (str, int)):
        return [_token_id(lm, contrast, "the contrast token")] * n
    foils = [_token_id(lm, c, "the contrast token") for c in contrast]
    if len(foils) != n:
        raise LmscopeError(f"give one contrast token, or one per output token ({n}), not {len(foils)}")
    return foils


def _baseline(lm: LoadedModel, baseline: str | int | torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        try:
            return baseline.to(embeds).expand_as(embeds)
        except RuntimeError as error:
            raise LmscopeError(
                f"a baseline tensor must be [d_model] or [pos, d_model] = {list(embeds.shape)}, "
                f"not {list(baseline.shape)}"
            ) from error
    if baseline in ("zero", "zeros"):
        return torch.zeros_like(embeds)
    token = _token_id(lm, baseline, "the baseline token")
    return input_embeddings(lm, torch.tensor([token])).expand_as(embeds)


def primary_attributions(
    trace: Trace,
    lm: LoadedModel,
    attr_method: str = "grad_x_input",
    *,
    style: str = "minimal",
    positions: Positions = None,
    target: str = "prob",
    contrast: TokenLike | Sequence[TokenLike] | None = None,
    steps: int = DEFAULT_STEPS,
    baseline: str | int | torch.Tensor = "zero",
    batch_size: int | None = None,
    plan: Plan | None = None,
) -> Saliency:
    """Attribute each output token of ``trace`` to the tokens before it (see the module docstring).

    Args:
        attr_method: ``grad_x_input``, ``gradient`` (alias ``saliency``), ``input_x_gradient``,
            ``integrated_gradients`` (alias ``ig``) or ``occlusion``.
        style: the view, ``minimal`` (hover an output, inputs coloured) or ``detailed`` (bars).
        positions: output positions; by default the generated tokens, else every token after the first.
        target: ``prob`` (Ecco) or ``logit``; ignored with ``contrast``, which uses the logit difference.
        contrast: a foil token (string or id), or one per output: attribute ``logit(x_t) − logit(foil)``.
        steps, baseline: integrated gradients' quadrature points and baseline (``"zero"``, a
            token whose embedding fills every position, or a ``[d_model]``/``[pos, d_model]`` tensor);
            occlusion replaces each token's embedding by the baseline's (``"zero"`` erases it).
        batch_size: the most token positions in one batched pass (bounds memory); by default
            chosen for the machine and model (:func:`lmscope.analysis._gradients.default_rows`).
        plan: the interventions of an intervened run (``Output.plan``), applied to every pass, so
            the attributions explain the intervened model (``embed`` ones edit the embeddings).
    """
    method = _method(attr_method)
    if style not in STYLES:
        raise LmscopeError(f"unknown style {style!r}: use one of {', '.join(STYLES)}")
    if target not in ("prob", "logit"):
        raise LmscopeError(f"unknown target {target!r}: use 'prob' (probability) or 'logit'")
    if lm.arch.lm_head is None or not lm.model.can_generate():
        raise LmscopeError(
            f"{lm.name} is not a causal language model, and saliency explains next-token predictions: "
            "use a causal LM such as the embedded default"
        )
    if steps < 1:
        raise LmscopeError(f"steps must be at least 1, not {steps}")
    if getattr(trace, "encoder", None) is not None:  # encoder-decoder: over the source and the decoder prefix
        from lmscope.analysis._seq2seq_saliency import seq2seq_attributions

        return seq2seq_attributions(trace, lm, method, style=style, positions=positions, target=target,
                                    contrast=contrast, steps=steps, baseline=baseline,
                                    batch_size=batch_size)  # fmt: skip
    out_pos = _output_positions(trace, positions)
    ids = trace.token_ids
    next_id = trace.logits[-1].argmax().reshape(1).to(ids)  # [1] the top prediction after the last token
    foil = None if contrast is None else torch.tensor(_foils(lm, contrast, len(out_pos)))
    kind = "contrast" if foil is not None else target
    targets = Targets(torch.tensor(out_pos), torch.cat([ids, next_id])[out_pos], foil, kind)

    embeds, plan = (plan or Plan((), ())).on_embeddings(input_embeddings(lm, ids))  # [pos, d_model]
    e = embeds.float()
    rows: list[np.ndarray] = [np.zeros(0)] * len(out_pos)
    values = np.zeros(len(out_pos), dtype=np.float32)
    base_values = errors = None
    batch_size = default_rows(lm) if batch_size is None else batch_size
    with frozen_parameters(lm.model), intervening(lm, plan):
        if method == "occlusion":
            base = _baseline(lm, baseline, embeds)  # [pos, d_model]
            drops = torch.zeros(len(out_pos), max(out_pos), dtype=torch.float32)  # [n, pos']
            for variants, drop, vals in occlusion(lm, embeds, base, targets, batch_size):
                drops[:, variants] = drop.t().cpu()
                values[:] = vals.cpu().numpy()
            _store(rows, slice(0, len(out_pos)), drops, out_pos)
        elif method == "integrated_gradients":
            base = _baseline(lm, baseline, embeds)  # [pos, d_model]
            base_values, errors = np.zeros_like(values), np.zeros_like(values)
            for sl, path in integrated_gradients(lm, embeds, base, targets, steps, batch_size):
                length = path.shape[1]
                per_token = (path * (e[:length] - base[:length].float())).sum(-1)  # [n, pos']
                with torch.no_grad():
                    ends = scores(lm, torch.stack([embeds[:length], base[:length]]), targets.chunk(sl))  # [2, n]
                values[sl], base_values[sl] = ends[0].cpu().numpy(), ends[1].cpu().numpy()
                errors[sl] = (per_token.sum(-1) - (ends[0] - ends[1])).abs().cpu().numpy()
                _store(rows, sl, per_token, out_pos)
        else:
            for sl, grads, vals in gradients(lm, embeds, targets, batch_size):
                length = grads.shape[1]
                if method == "grad_x_input":
                    per_token = (grads * e[:length]).norm(dim=-1)  # [n, pos']
                elif method == "gradient":
                    per_token = grads.norm(dim=-1)
                else:
                    per_token = (grads * e[:length]).sum(-1)
                values[sl] = vals.cpu().numpy()
                _store(rows, sl, per_token, out_pos)
    normalized = method not in _SIGNED
    if normalized:
        rows = [r / r.sum() if r.sum() > 0 else r for r in rows]
    return Saliency(
        method=method,
        target=kind,
        style=style,
        tokens=trace.tokens,
        token_ids=ids.cpu().numpy(),
        n_input=trace.n_input,
        positions=tuple(out_pos),
        attributions=tuple(rows),
        values=values,
        signed=method in _SIGNED,
        normalized=normalized,
        contrast=None if foil is None else _strings(lm, foil.tolist()),
        steps=steps if method == "integrated_gradients" else None,
        baseline_values=base_values,
        completeness_error=errors,
        next_token=_strings(lm, next_id.tolist())[0] if out_pos[-1] == trace.n_pos else None,
    )


def _store(rows: list[np.ndarray], sl: slice, per_token: torch.Tensor, out_pos: list[int]) -> None:
    """Keep each output's attributions over its own prefix ``s < t``."""
    data = per_token.detach().cpu().numpy()  # [n, pos']
    for i, index in enumerate(range(sl.start, sl.stop)):
        rows[index] = data[i, : out_pos[index]].astype(np.float32)


def _strings(lm: LoadedModel, ids: list[int]) -> tuple[str, ...]:
    return tuple(lm.tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False))
