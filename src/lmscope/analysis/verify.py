"""``lmscope.verify``: the fidelity report to run before trusting lmscope on a model.

Each check compares what lmscope computes against what the model itself computes, on one input,
and passes or fails against a tolerance stated for the model's dtype:

* **logits**: the logits of a forward pass under full capture against a plain forward pass of the
  same model: the largest absolute difference, top-1 agreement, and the largest total variation
  distance ``½ Σ |softmax(a) − softmax(b)|`` over positions;
* **generation**: greedy generation through lmscope against ``model.generate``, and the captured
  pass's argmax at every generated position against the token generated there;
* **lens**: the final-layer logit lens (final norm and unembedding of the last block's output)
  against the model's own logits;
* **blocks**: each block's output is its input plus its attention and MLP updates (post-norm blocks:
  the norms of those sums); the attention update is the sum of its (source, head) terms
  ``A[h,q,k]·v[k,h]·W_O[h]`` plus the output bias; the MLP update is the sum of its neuron terms
  ``act[n]·W_out[:, n]`` plus bias: the decompositions the flow graph and components are built on;
* **attention**: captured attention probabilities against those the model returns with eager
  attention (``output_attentions=True``).

Encoder-decoder models are checked on the source ``text`` and ``generate`` greedy target tokens:
logits, generation and lens as above; blocks of both stacks (input + self-attention, cross-attention
and MLP updates, or their norms); and the encoder's, decoder's and cross-attention probabilities.

Errors are measured in float32. A check that does not apply (no LM head, a post-norm family's
per-head terms, ...) is reported as ``n/a`` with the reason, and does not fail the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from lmscope.analysis._result import Result
from lmscope.errors import LmscopeError
from lmscope.models._placement import tensor_of

__all__ = ["TOLERANCES", "Check", "VerifyReport", "accept_guessed", "verify"]

TEXT = "The keys to the cabinet are on the table, said Mrs. O'Neill."

# dtype -> (logits: max |Δ logit|, probabilities: max |Δ p| and total variation, relative: block sums)
TOLERANCES: dict[str, tuple[float, float, float]] = {
    "float32": (1e-5, 1e-5, 1e-5),
    "float16": (5e-2, 5e-3, 5e-3),
    "bfloat16": (2e-1, 2e-2, 2e-2),
}


@dataclass(frozen=True)
class Check:
    """One comparison: what was measured, its value, the tolerance, and the verdict.

    ``status`` is ``"pass"``, ``"fail"`` or ``"n/a"`` (``detail`` says why it does not apply).
    """

    name: str
    measure: str
    value: float | None
    tolerance: float | None
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "fail"


@dataclass(frozen=True)
class VerifyReport(Result):
    """Every check of :func:`verify` on one model; ``passed`` when none failed."""

    _view: ClassVar[str] = "lmscope.views.verify"

    model: str
    model_type: str
    family: str
    layout: str  # "architecture table", or the guessed layout
    dtype: str
    device: str
    text: str
    n_tokens: int
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the failed checks."""
        return tuple(f"{c.name}: {c.measure}" for c in self.checks if c.status == "fail")

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "passed": self.passed, "failed": list(self.failed)}


def _check(name: str, measure: str, value: float, tolerance: float, detail: str = "") -> Check:
    ok = value <= tolerance
    return Check(name, measure, float(value), float(tolerance), "pass" if ok else "fail", detail)


def _skip(name: str, measure: str, why: str) -> Check:
    return Check(name, measure, None, None, "n/a", why)


def _relative(error: torch.Tensor, whole: torch.Tensor) -> float:
    """``max |error| / max(max |whole|, 1)`` in float32."""
    return float(error.float().abs().max()) / max(float(whole.float().abs().max()), 1.0)


def _logit_checks(logits: torch.Tensor, plain: torch.Tensor, tol: tuple[float, float, float]) -> list[Check]:
    logits, plain = logits.float(), plain.float()  # [pos, vocab]
    diff = float((logits - plain).abs().max())
    top2 = plain.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tol[0]  # positions whose top-1 is not a near-tie
    agree = logits.argmax(-1) == plain.argmax(-1)
    disagree = int((~agree & decided).sum())
    tv = 0.5 * (logits.softmax(-1) - plain.softmax(-1)).abs().sum(-1).max()
    return [
        _check("logits", "max |Δ logit| under capture vs a plain forward", diff, tol[0]),
        _check(
            "logits",
            "positions whose top-1 token differs",
            disagree,
            0,
            f"top-1 agreement {100 * float(agree.float().mean()):.1f}% of {len(agree)} positions",
        ),
        _check("logits", "max total variation of softmax", float(tv), tol[1]),
    ]


def _generation_checks(lm: Any, ids: torch.Tensor, n: int, tol: tuple[float, float, float]) -> list[Check]:
    measure = f"greedy tokens differing from model.generate ({n} new)"
    if lm.arch.lm_head is None or not lm.model.can_generate() or lm.arch.family.post_norm:
        return [_skip("generation", measure, "the model does not generate text (no causal LM head)")]
    out = lm.generate(ids.tolist(), generate=n)
    batch = ids[None].to(lm.loaded.device)
    tokenizer = lm.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        reference = lm.model.generate(
            batch,
            attention_mask=torch.ones_like(batch),
            max_new_tokens=n,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )[0].cpu()
    ours = out.token_ids.cpu()
    length = min(len(ours), len(reference))
    differ = int((ours[:length] != reference[:length]).sum()) + abs(len(ours) - len(reference))
    logits = out.logits.float()  # [pos, vocab]: the captured pass over prompt + generated tokens
    n_in = len(ids)
    chosen = logits[n_in - 1 : len(ours) - 1]  # the predictions of the generated tokens
    top2 = chosen.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * tol[0]
    wrong = int(((chosen.argmax(-1) != ours[n_in:].to(chosen.device)) & decided).sum())
    return [
        _check("generation", measure, differ, 0),
        _check("generation", "generated tokens that are not the captured pass's argmax", wrong, 0),
    ]


def _lens_check(lm: Any, trace: Any, plain: torch.Tensor | None, tol: tuple[float, float, float]) -> list[Check]:
    measure = "final-layer lens vs the model's logits: max |Δ| / max(1, max |logit|)"
    if plain is None or lm.arch.lm_head is None:
        return [_skip("lens", measure, "the model has no LM head")]
    lens = lm.unembed(trace.get("resid_post")[-1]).float()  # [pos, vocab]
    plain = plain.float().to(lens.device)
    error = _relative(lens - plain, plain)
    tv = float(0.5 * (lens.softmax(-1) - plain.softmax(-1)).abs().sum(-1).max())
    return [
        _check("lens", measure, error, tol[2] * 10),
        _check("lens", "final-layer lens vs the model: max total variation", tv, tol[1]),
    ]


def _moe_total(trace: Any, arch: Any, layer: int) -> torch.Tensor:
    """A mixture-of-experts layer's FFN output rebuilt from its experts' updates (a dense layer: its neurons')."""
    from lmscope.analysis._experts import dense_activations, expert_parts

    parts = expert_parts(trace, arch, layer)
    if parts is not None:
        return parts.updates.sum(1)  # [pos, d_model]: every routed and shared expert's update
    act, down = dense_activations(arch, layer, trace.at("mlp_act", layer))  # [pos, neuron]
    total = act @ down.weight.detach().float().T.to(act.device)
    return (total if down.bias is None else total + down.bias.detach().float().to(act.device)) * arch.residual_scale


def _block_checks(lm: Any, trace: Any, tol: tuple[float, float, float]) -> list[Check]:
    from lmscope.analysis._contributions import _output_projection, check_decomposable, head_updates

    arch, family = lm.arch, lm.arch.family
    pre, post, mlp = trace.get("resid_pre"), trace.get("resid_post"), trace.get("mlp_out")
    if family.attn is None:  # a state-space model: each block adds its mixer's update only
        mid, attn = pre, torch.zeros_like(pre)
    else:
        mid, attn = trace.get("resid_mid"), trace.get("attn_out")
    checks = []
    worst = 0.0
    with torch.no_grad():
        for layer in range(arch.n_layers):
            if family.post_norm:
                ln_attn = arch.block_part(layer, family.ln_attn)
                ln_mlp = arch.block_part(layer, family.ln_mlp)
                worst = max(worst, _relative(ln_attn(pre[layer] + attn[layer]) - mid[layer], mid[layer]))
                worst = max(worst, _relative(ln_mlp(mid[layer] + mlp[layer]) - post[layer], post[layer]))
            else:
                worst = max(worst, _relative(pre[layer] + attn[layer] + mlp[layer] - post[layer], post[layer]))
            if layer + 1 < arch.n_layers:  # the residual stream runs on into the next block
                worst = max(worst, _relative(pre[layer + 1] - post[layer], post[layer]))
    shape = "norms of input + update" if family.post_norm else "input + attention + MLP updates"
    checks.append(_check("blocks", f"block outputs vs {shape}: max relative error", worst, tol[2]))

    measure = "attention updates vs Σ (source, head) terms + bias: max relative error"
    try:
        check_decomposable(arch)
    except LmscopeError as error:
        why = "post-norm blocks" if family.post_norm else "updates are transformed (e.g. normed) before the residual"
        why = "quantized weights" if "quantized" in str(error) else why
        why = "no attention (a state-space model)" if family.attn is None else why
        checks.append(_skip("blocks", measure, f"{why}: no per-head and per-neuron parts"))
        checks.append(_skip("blocks", "MLP updates vs Σ neuron terms + bias", "as above"))
        return checks
    worst = 0.0
    for layer in range(arch.n_layers):
        updates = head_updates(trace, arch, layer)  # [pos_k, head, d_model]
        probs = trace.attention(layer)  # [head, pos_q, pos_k]
        total = torch.einsum("hqk,khd->qd", probs, updates.to(probs.device))
        _, bias = _output_projection(arch, layer)  # scaled as the block adds it (Granite)
        if bias is not None:
            total = total + bias.to(total.device)
        worst = max(worst, _relative(total - attn[layer].float(), attn[layer]))
    checks.append(_check("blocks", measure, worst, tol[2]))
    worst = 0.0
    for layer in range(arch.n_layers):
        if family.experts is not None:  # a mixture of experts: Σ experts' updates (dense layers: Σ neuron terms)
            worst = max(worst, _relative(_moe_total(trace, arch, layer) - mlp[layer].float(), mlp[layer]))
            continue
        down = arch.mlp_down(layer)
        scale = getattr(arch, "residual_scale", 1.0)  # what the block multiplies the MLP output by (Granite)
        weight = arch.linear_weight(down).detach().float() * scale  # [d_model, neuron]
        act = trace.at("mlp_act", layer).float()  # [pos, neuron]
        total = act @ weight.T.to(act.device)
        bias = tensor_of(down, "bias")  # where accelerate offloaded it, too
        if bias is not None:
            total = total + bias.detach().float().to(total.device) * scale
        worst = max(worst, _relative(total - mlp[layer].float(), mlp[layer]))
    checks.append(_check("blocks", "MLP updates vs Σ neuron terms + bias: max relative error", worst, tol[2]))
    return checks


def _attention_check(lm: Any, ids: torch.Tensor, trace: Any, tol: tuple[float, float, float]) -> list[Check]:
    measure = "attention probabilities vs eager attention: max |Δ p|"
    if lm.arch.family.attn is None:
        return [_skip("attention", measure, "no attention (a state-space model)")]
    if lm.arch.family.eager_differs:  # the blocks check compares its probabilities with the attention output
        return [_skip("attention", measure, f"transformers' eager attention {lm.arch.family.eager_differs}")]
    model = lm.model
    original = model.config._attn_implementation
    try:
        if original != "eager":
            model.set_attn_implementation("eager")
        with torch.no_grad():
            eager = model(ids[None].to(lm.loaded.device), output_attentions=True, use_cache=False).attentions
    except (ValueError, NotImplementedError, TypeError, AttributeError) as error:
        return [_skip("attention", measure, f"eager attention is not available ({error})".split("\n")[0])]
    finally:
        if model.config._attn_implementation != original:
            model.set_attn_implementation(original)
    if not eager or any(a is None for a in eager) or len(eager) != lm.arch.n_layers:
        return [_skip("attention", measure, "the model does not return attention probabilities")]
    worst = max(
        float((probs - a[0].float().to(probs.device)).abs().max())
        for probs, a in ((trace.attention(layer), a) for layer, a in zip(trace.layers, eager, strict=True))
    )
    return [_check("attention", measure, worst, tol[1])]


def verify(lm: Any, text: str = TEXT, generate: int = 4) -> VerifyReport:
    """Check that lmscope's capture, lens, decompositions and attention match the model (see module doc).

    ``lm`` is an :class:`lmscope.LM`. The report's ``passed`` is false when any check failed;
    ``lmscope verify`` exits non-zero then.
    """
    from lmscope.capture import ALL_SITES
    from lmscope.models._fallback import describe, is_guessed

    loaded = lm.loaded
    dtype = str(loaded.dtype).removeprefix("torch.")
    tol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    ids = lm.encode(text)
    if getattr(lm, "is_seq2seq", False):
        checks = _seq2seq_checks(lm, ids, generate, tol)
        return VerifyReport(model=lm.name, model_type=str(lm.model.config.model_type), family=lm.arch.family.name,
                            layout="architecture table", dtype=dtype, device=str(loaded.device), text=text,
                            n_tokens=len(ids), checks=tuple(checks))  # fmt: skip
    with torch.no_grad():
        plain = getattr(lm.model(ids[None].to(loaded.device), use_cache=False), "logits", None)
    plain = None if plain is None else plain[0]
    out = lm.trace(ids.tolist(), sites=ALL_SITES)
    trace = out.trace
    checks: list[Check] = []
    if plain is None:
        checks.append(_skip("logits", "max |Δ logit| under capture vs a plain forward", "the model has no LM head"))
    else:
        checks += _logit_checks(out.logits, plain.to(out.logits.device), tol)
    checks += _generation_checks(lm, ids, generate, tol)
    checks += _lens_check(lm, trace, plain, tol)
    checks += _block_checks(lm, trace, tol)
    checks += _attention_check(lm, ids, trace, tol)
    return VerifyReport(
        model=lm.name,
        model_type=str(lm.model.config.model_type),
        family=lm.arch.family.name,
        layout=f"guessed: {describe(lm.arch)}" if is_guessed(lm.arch) else "architecture table",
        dtype=dtype,
        device=str(loaded.device),
        text=text,
        n_tokens=len(ids),
        checks=tuple(checks),
    )


def _seq2seq_checks(lm: Any, ids: torch.Tensor, generate: int, tol: tuple[float, float, float]) -> list[Check]:
    """The checks of an encoder-decoder model: ``ids`` is the source, the target is generated greedily."""
    from lmscope.capture import ALL_SITES

    out = lm.generate(ids.tolist(), generate=generate, sites=ALL_SITES)
    trace, device = out.trace, lm.loaded.device
    source, decoder = ids[None].to(device), out.token_ids[None].to(device)
    run = dict(input_ids=source, attention_mask=torch.ones_like(source), decoder_input_ids=decoder, use_cache=False)
    with torch.no_grad():
        plain = lm.model(**run).logits[0]
        reference = lm.model.generate(source, attention_mask=torch.ones_like(source), max_new_tokens=generate,
                                      do_sample=False, num_beams=1)[0].cpu()  # fmt: skip
    checks = _logit_checks(out.logits, plain.to(out.logits.device), tol)
    differ = int((out.token_ids != reference).sum()) if len(reference) == len(out.token_ids) else len(reference)
    checks.append(_check("generation", f"greedy tokens differing from model.generate ({generate} new)", differ, 0))
    checks += _lens_check(lm, trace, plain, tol)
    worst = 0.0
    for stack, arch in ((trace.encoder, lm.arch.encoder), (trace, lm.arch)):
        family, get = arch.family, stack.get
        pre, post, attn, mlp = get("resid_pre"), get("resid_post"), get("attn_out"), get("mlp_out")
        with torch.no_grad():
            for layer in range(arch.n_layers):
                parts = [(family.ln_attn, attn[layer], get("resid_mid")[layer])]
                if family.cross_attn:
                    parts.append((family.ln_cross, get("cross_attn_out")[layer], get("resid_cross")[layer]))
                parts.append((family.ln_mlp, mlp[layer], post[layer]))
                state = pre[layer]
                for norm, update, after in parts:
                    total = state + update
                    if family.post_norm:
                        total = arch.block_part(layer, norm)(total)
                    worst = max(worst, _relative(total - after, after))
                    state = after
                if layer + 1 < arch.n_layers:
                    worst = max(worst, _relative(pre[layer + 1] - post[layer], post[layer]))
    shape = "norms of input + update" if lm.arch.family.post_norm else "input + self-, cross-attention, MLP updates"
    checks.append(_check("blocks", f"both stacks' block outputs vs {shape}: max relative error", worst, tol[2]))
    measure = "encoder, decoder and cross-attention probabilities vs eager attention: max |Δ p|"
    configs = {id(c): c for m in lm.model.modules() if (c := getattr(m, "config", None)) is not None}.values()
    saved = [(c, c._attn_implementation_internal) for c in configs]
    try:
        for config, _ in saved:
            config._attn_implementation_internal = "eager"
        with torch.no_grad():
            eager = lm.model(**run, output_attentions=True)
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation
    worst = 0.0
    for name, captured, returned in (
        ("attn_probs", trace.encoder, eager.encoder_attentions),
        ("attn_probs", trace, eager.decoder_attentions),
        ("cross_attn_probs", trace, eager.cross_attentions),
    ):
        if name not in captured.sites:
            captured.get(name)  # the clear error: not captured
        for layer, a in zip(captured.layers, returned, strict=True):
            probs = captured.attention(layer, cross=name == "cross_attn_probs")  # [head, pos_q, pos_k]
            worst = max(worst, float((probs - a[0].float().to(probs.device)).abs().max()))
    checks.append(_check("attention", measure, worst, tol[1]))
    return checks


def accept_guessed(lm: Any) -> VerifyReport:
    """Verify a layout guessed by the structural fallback: warn (one line) if it passes, else raise.

    The error names the failed checks and how to add the model type to the architecture table.
    """
    import warnings

    from lmscope.models._fallback import GuessedLayoutWarning, describe

    model_type = lm.model.config.model_type
    report = verify(lm)
    if not report.passed:
        raise LmscopeError(
            f"model type {model_type!r} is not in lmscope's architecture table, and the layout guessed from its "
            f"modules ({describe(lm.arch)}) failed lmscope verify ({'; '.join(report.failed)}): add an entry for "
            "it to lmscope's architecture table (README: 'Models the table does not know')"
        )
    warnings.warn(
        f"lmscope: model type {model_type!r} is not in the architecture table; using the layout guessed from its "
        f"modules, which passed lmscope verify: {describe(lm.arch)}",
        GuessedLayoutWarning,
        stacklevel=4,  # the user's call of from_pretrained or wrap
    )
    return report
