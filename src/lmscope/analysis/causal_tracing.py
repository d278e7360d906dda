"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

The subject tokens' embeddings are corrupted with Gaussian noise of ``noise`` × the standard
deviation of the embedding matrix (3, as the paper); then each state of the clean run is
restored in turn into the corrupted run, and the probability of the correct next token measures
how much that one state carries: ``scores[site, layer, pos] = P(target | corrupted, state(site,
layer, pos) := clean)``, averaged over ``samples`` noise draws. Sites are the residual stream
(the block outputs, with the embedding as an extra first row), the attention output and the MLP
output; ``window`` restores a run of that many layers around each layer for the attention and
MLP sites (10 in the paper).

Speed. Restoring (layer l, position p) leaves every position before p as in the corrupted run
(the model is causal): for each p, one corrupted run over the prefix fills a KV cache, and one
batched run over positions p.. computes every restoration at p at once (all layers and sites,
all noise samples as rows). Positions before the first subject token are never corrupted, so
restoring them is the corrupted run itself and costs nothing. :func:`causal_trace_loop` is the
straightforward loop of one full forward pass per restoration, kept as the reference the fast
path is tested against.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._result import Result
from lmscope.capture import trace_ids
from lmscope.capture._interventions import site_values
from lmscope.errors import LmscopeError

__all__ = ["CAUSAL_SITES", "CausalTrace", "causal_trace", "causal_trace_loop"]

CAUSAL_SITES: tuple[str, ...] = ("resid", "attn_out", "mlp_out")


@dataclass(frozen=True)
class CausalTrace(Result):
    """``scores[site, layer, pos]``: probability of ``target`` with that clean state restored.

    ``layers`` index the rows of every site (``-1`` is the embedding: restored only for
    ``resid``; NaN for the other sites). ``clean_prob`` and ``corrupted_prob`` bound the scale.
    """

    _view = "lmscope.views.interventions"

    tokens: tuple[str, ...]
    subject: tuple[int, ...]
    target: str
    target_id: int
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    scores: np.ndarray  # [site, layer, pos]
    clean_prob: float
    corrupted_prob: float
    noise: float  # the noise's standard deviation (``noise_scale`` × the embeddings')
    samples: int
    window: int

    def peak(self, site: str = "resid") -> tuple[int, int]:
        """The (layer, position) whose restoration recovers most (layer -1: the embedding)."""
        grid = self.scores[self.sites.index(site)]
        row, pos = np.unravel_index(np.nanargmax(grid), grid.shape)
        return self.layers[int(row)], int(pos)

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib ``Figure`` of the three heatmaps."""
        return self._view_module().plot(self, **kwargs)


def subject_positions(tokens: Sequence[str], subject: str | Sequence[int]) -> tuple[int, ...]:
    """Positions of the tokens that overlap the first occurrence of ``subject`` (or given positions)."""
    n = len(tokens)
    if not isinstance(subject, str):
        chosen = sorted({int(p) % n for p in subject if -n <= int(p) < n})
        if not chosen or len(chosen) != len(set(subject)):
            raise LmscopeError(f"subject positions must lie in 0..{n - 1}")
        return tuple(chosen)
    text = "".join(tokens)
    start = text.find(subject)
    if not subject.strip() or start < 0:
        raise LmscopeError(f"the subject {subject!r} is not in the text {text!r}")
    end, out, at = start + len(subject), [], 0
    for pos, token in enumerate(tokens):
        if at < end and at + len(token) > start:
            out.append(pos)
        at += len(token)
    return tuple(out)


class _Setup:
    """What both the batched and the loop computation need: ids, clean states, noise, target."""

    def __init__(self, lm: Any, text: Any, subject: Any, target: Any, noise: float, samples: int, seed: int):
        loaded = lm.loaded
        if not loaded.model.can_generate() or loaded.arch.lm_head is None:
            raise LmscopeError(f"{lm.name} is not a causal language model: causal tracing needs one")
        if samples < 1:
            raise LmscopeError(f"samples must be at least 1, not {samples}")
        self.lm, self.loaded, self.arch = lm, loaded, loaded.arch
        self.ids = lm.encode(text)
        n_layers = self.arch.n_layers
        clean = trace_ids(loaded, self.ids, sites=("resid_post", "attn_out", "mlp_out"))
        self.tokens = clean.tokens
        self.subject = subject_positions(self.tokens, subject)
        logits = clean.logits[-1].float()
        if target is None:
            self.target_id = int(logits.argmax())
        else:
            ids = lm.tokenizer(target, add_special_tokens=False)["input_ids"] if isinstance(target, str) else [target]
            if not ids:
                raise LmscopeError(f"the target {target!r} is no token")
            self.target_id = int(ids[0])
        self.target = lm.unembed.token_strings([self.target_id])[0]
        self.clean_prob = float(torch.softmax(logits, -1)[self.target_id])
        embed = site_values(loaded, self.ids, "embed", (0,))[0]  # [pos, d_model]
        self.clean = {
            "embed": embed[None],  # [1, pos, d_model]
            "resid": clean.get("resid_post"),  # [layer, pos, d_model]
            "attn_out": clean.get("attn_out"),
            "mlp_out": clean.get("mlp_out"),
        }
        self.n_layers, self.samples = n_layers, samples
        weight = self.arch.embed.weight
        self.noise_std = float(noise * weight.float().std())
        generator = torch.Generator().manual_seed(seed)
        full = torch.zeros(samples, len(self.ids), self.arch.d_model)
        full[:, list(self.subject)] = torch.randn(samples, len(self.subject), self.arch.d_model, generator=generator)
        self.noise = (full * self.noise_std).to(device=embed.device, dtype=embed.dtype)  # [sample, pos, d_model]

    def rows(self, window: int) -> list[tuple[str, int, tuple[int, ...]]]:
        """Every restoration at one position: (site, layer, layers restored)."""
        out = [("resid", -1, (-1,))]
        out += [("resid", layer, (layer,)) for layer in range(self.n_layers)]
        for site in ("attn_out", "mlp_out"):
            for layer in range(self.n_layers):
                low = max(0, layer - window // 2)
                high = min(self.n_layers, layer - (-window // 2))
                out.append((site, layer, tuple(range(low, high)) if window > 1 else (layer,)))
        return out

    @contextmanager
    def hooks(self, offset: int, restore: dict[tuple[str, int], torch.Tensor], position: int, repeat: int):
        """Corrupt the subject (rows are ``sample × repeat``); restore ``position`` for the given rows."""
        arch, family = self.arch, self.arch.family
        noise = self.noise.repeat_interleave(repeat, dim=0)  # [row, pos, d_model]
        rel = position - offset
        handles = []

        none = torch.tensor([], dtype=torch.long)

        def replacing(key: tuple[str, int], value: torch.Tensor, first: bool = False):
            rows = restore.get(key, none)

            def hook(module, args, output):
                x = output[0] if isinstance(output, tuple) else output
                if first:
                    x = x + noise[:, offset : offset + x.shape[1]]
                if len(rows):
                    x = x.clone() if not first else x
                    x[rows, rel] = value.to(x.dtype)
                return (x, *output[1:]) if isinstance(output, tuple) else x

            return hook

        try:
            key = ("resid", -1)
            handles.append(arch.embed.register_forward_hook(replacing(key, self.clean["embed"][0, position], True)))
            for (site, layer), rows in restore.items():
                if site == "resid" and layer >= 0 and len(rows):
                    module = arch.blocks[layer]
                elif site in ("attn_out", "mlp_out") and len(rows):
                    module = arch.block_part(layer, family.attn_out if site == "attn_out" else family.mlp_out)
                else:
                    continue
                handles.append(
                    module.register_forward_hook(replacing((site, layer), self.clean[site][layer, position]))
                )
            yield
        finally:
            for handle in handles:
                handle.remove()

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """``[sample·row, vocab]`` last-position logits → the target's probability ``[row]`` (sample mean)."""
        p = torch.softmax(logits.float(), -1)[:, self.target_id]
        return p.reshape(self.samples, -1).mean(0)

    def result(self, scores: np.ndarray, corrupted: float, window: int) -> CausalTrace:
        return CausalTrace(
            tokens=self.tokens,
            subject=self.subject,
            target=self.target,
            target_id=self.target_id,
            sites=CAUSAL_SITES,
            layers=(-1, *range(self.n_layers)),
            scores=scores,
            clean_prob=self.clean_prob,
            corrupted_prob=corrupted,
            noise=self.noise_std,
            samples=self.samples,
            window=window,
        )


def _restore_map(rows: list[tuple[str, int, tuple[int, ...]]], device: Any) -> dict[tuple[str, int], torch.Tensor]:
    table: dict[tuple[str, int], list[int]] = {}
    for r, (site, _, restored) in enumerate(rows):
        for layer in restored:
            table.setdefault((site, layer), []).append(r)
    return {key: torch.tensor(value, dtype=torch.long, device=device) for key, value in table.items()}


def _expand(
    rows: dict[tuple[str, int], torch.Tensor], n_rows: int, samples: int
) -> dict[tuple[str, int], torch.Tensor]:
    """Row indices within one sample's block → indices over all ``sample × row`` batch rows."""
    return {
        k: (v[None, :] + n_rows * torch.arange(samples, device=v.device)[:, None]).reshape(-1) for k, v in rows.items()
    }


def _scores(setup: _Setup, rows, values: dict[int, torch.Tensor], corrupted: float) -> np.ndarray:
    n_pos = len(setup.ids)
    scores = np.full((len(CAUSAL_SITES), setup.n_layers + 1, n_pos), np.nan)
    for p in range(n_pos):
        for r, (site, layer, _) in enumerate(rows):
            scores[CAUSAL_SITES.index(site), layer + 1, p] = corrupted if p not in values else float(values[p][r])
    return scores


@torch.no_grad()
def _corrupted(setup: _Setup) -> tuple[float, Any]:
    model = setup.loaded.model
    batch = setup.ids[None].repeat(setup.samples, 1).to(setup.loaded.device)
    with setup.hooks(0, {}, 0, 1):
        logits = model(input_ids=batch, use_cache=False).logits[:, -1]
    return float(setup.probs(logits)[0]), None


@torch.no_grad()
def causal_trace(
    lm: Any,
    text: Any,
    subject: str | Sequence[int],
    target: str | int | None = None,
    *,
    noise: float = 3.0,
    samples: int = 3,
    window: int = 1,
    seed: int = 0,
) -> CausalTrace:
    """Causal tracing of ``lm`` on ``text`` with ``subject`` corrupted (see the module docstring).

    ``target``: the correct next token (a string, whose first token is used, or an id); default the
    clean run's top prediction at the last position.
    """
    setup = _Setup(lm, text, subject, target, noise, samples, seed)
    model, device = setup.loaded.model, setup.loaded.device
    corrupted, _ = _corrupted(setup)
    rows = setup.rows(window)
    n_rows = len(rows)
    restore = _expand(_restore_map(rows, device), n_rows, samples)
    values: dict[int, torch.Tensor] = {}
    ids = setup.ids.to(device)
    # transformers renamed ``past_key_values`` to ``cache`` (5.x); pass it by the name the model takes.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    for p in range(min(setup.subject), len(ids)):
        cache = None
        if p > 0:  # the prefix is as in the corrupted run for every restoration at p
            with setup.hooks(0, {}, p, 1):
                out = model(input_ids=ids[None, :p].repeat(samples, 1), use_cache=True)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            cache.batch_repeat_interleave(n_rows)
        suffix = ids[None, p:].repeat(samples * n_rows, 1)
        extra = {} if cache is None else {cache_arg: cache}
        with setup.hooks(p, restore, p, n_rows):
            logits = model(input_ids=suffix, use_cache=cache is not None, **extra).logits[:, -1]
        values[p] = setup.probs(logits).cpu()
    return setup.result(_scores(setup, rows, values, corrupted), corrupted, window)


@torch.no_grad()
def causal_trace_loop(
    lm: Any,
    text: Any,
    subject: str | Sequence[int],
    target: str | int | None = None,
    *,
    noise: float = 3.0,
    samples: int = 3,
    window: int = 1,
    seed: int = 0,
) -> CausalTrace:
    """The same as :func:`causal_trace` by one full forward pass per restoration (the reference)."""
    setup = _Setup(lm, text, subject, target, noise, samples, seed)
    model, device = setup.loaded.model, setup.loaded.device
    corrupted, _ = _corrupted(setup)
    rows = setup.rows(window)
    batch = setup.ids[None].repeat(samples, 1).to(device)
    values: dict[int, torch.Tensor] = {}
    for p in range(len(setup.ids)):
        found = torch.empty(len(rows))
        for r, row in enumerate(rows):
            restore = _expand(_restore_map([row], device), 1, samples)
            with setup.hooks(0, restore, p, 1):
                logits = model(input_ids=batch, use_cache=False).logits[:, -1]
            found[r] = setup.probs(logits)[0]
        values[p] = found
    return setup.result(_scores(setup, rows, values, corrupted), corrupted, window)
