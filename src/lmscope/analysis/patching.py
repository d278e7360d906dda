"""Activation patching and attribution patching between a clean and a corrupted prompt.

Activation patching (Vig et al. 2020; Meng et al. 2022; Wang et al. 2023, IOI) runs the corrupted
prompt with one component's activation taken from the clean run and measures how much of the
clean behaviour returns: the metric is the logit difference ``logit(answer) − logit(wrong)`` at
the last position (the answer's logit when no ``wrong`` token is given), and each cell holds
``metric(corrupted, component := clean) − metric(corrupted)``.

Attribution patching (Nanda 2023; Syed, Rager & Conmy 2023) approximates every cell at once to
first order: ``∂metric/∂a |corrupted · (a_clean − a_corrupted)``, summed over the component's
entries, from one forward and one backward pass of the corrupted prompt.

Components (``kind``): ``"heads"`` (a head's output, the output projection's input, at every
position: ``[layer, head]``), ``"positions"`` (the residual stream entering a layer at one
position: ``[layer, pos]``), ``"neurons"`` (an FFN neuron at every position; exact patching only
for the ``top`` neurons by attribution). Exact patching runs are batched, one row per component,
through the same hooks as :class:`~lmscope.Intervention`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._result import Result
from lmscope.capture import token_strings
from lmscope.capture._interventions import Plan, _Item, intervening, site_values
from lmscope.errors import LmscopeError

__all__ = ["PATCHING_KINDS", "Patching", "activation_patching", "spearman"]

PATCHING_KINDS = {"heads": "head_out", "positions": "resid_pre", "neurons": "mlp_act"}


@dataclass(frozen=True)
class Patching(Result):
    """Exact and attribution patching of one kind of component, side by side.

    ``exact`` and ``attribution`` are ``[layer, head]``, ``[layer, pos]`` or, for neurons,
    ``[candidate]`` over ``cells`` (``(layer, neuron)``); ``exact`` is NaN where not computed.
    """

    _view = "lmscope.views.interventions"

    kind: str
    clean_tokens: tuple[str, ...]
    corrupted_tokens: tuple[str, ...]
    answer: str
    wrong: str | None
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    exact: np.ndarray
    attribution: np.ndarray
    cells: tuple[tuple[int, int], ...]
    clean_metric: float
    corrupted_metric: float
    spearman: float
    exact_seconds: float
    attribution_seconds: float

    def top(self, k: int = 10, by: str = "exact") -> list[tuple[int, int, float]]:
        """The ``k`` cells with the largest values of ``by`` (``exact`` or ``attribution``)."""
        values = np.nan_to_num(getattr(self, by), nan=-np.inf).reshape(-1)
        order = np.argsort(-values)[:k]
        if self.kind == "neurons":
            return [(*self.cells[i], float(values[i])) for i in order]
        width = self.exact.shape[1]
        return [(int(i) // width, int(i) % width, float(values[i])) for i in order]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two arrays over their finite pairs (average ranks for ties)."""
    a, b = np.asarray(a, float).reshape(-1), np.asarray(b, float).reshape(-1)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[keep]), _ranks(b[keep])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _token(lm: Any, token: str | int | None) -> int | None:
    if token is None or isinstance(token, int):
        return token
    ids = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LmscopeError(f"{token!r} is no token")
    return int(ids[0])


def _metric(logits: torch.Tensor, answer: int, wrong: int | None) -> torch.Tensor:
    last = logits[:, -1].float()  # [batch, vocab]
    return last[:, answer] - (last[:, wrong] if wrong is not None else 0)


def _cell_selector(kind: str, cell: tuple[int, int]) -> tuple[Any, ...]:
    """Where in one layer's ``[pos, *unit]`` value a cell lies."""
    return {"heads": (slice(None), cell[1]), "positions": (cell[1],), "neurons": (slice(None), cell[1])}[kind]


@torch.no_grad()
def _exact(lm: Any, ids: torch.Tensor, kind: str, cells: list[tuple[int, int]], clean: dict[int, torch.Tensor],
           answer: int, wrong: int | None, chunk: int) -> np.ndarray:  # fmt: skip
    """``metric`` of the corrupted run with each cell patched from ``clean``: one batch row per cell."""
    loaded, site = lm.loaded, PATCHING_KINDS[kind]
    out = np.empty(len(cells))
    layers = tuple(sorted({layer for layer, _ in cells}))
    for start in range(0, len(cells), chunk):
        block = cells[start : start + chunk]

        def patch(region: torch.Tensor, layer: int, block=block) -> torch.Tensor:
            for row, cell in enumerate(block):
                if cell[0] == layer:
                    where = _cell_selector(kind, cell)
                    region[(row, *where)] = clean[layer][where].to(region.dtype)
            return region

        item = _Item(site, "apply", layers, None, None, None, {}, 1.0, patch)
        batch = ids[None].repeat(len(block), 1).to(loaded.device)
        with intervening(loaded, Plan((item,), ())):
            logits = loaded.model(input_ids=batch, use_cache=False).logits
        out[start : start + len(block)] = _metric(logits, answer, wrong).cpu().numpy()
    return out


def _attribution(lm: Any, ids: torch.Tensor, site: str, clean: dict[int, torch.Tensor], answer: int,
                 wrong: int | None) -> tuple[dict[int, torch.Tensor], float]:  # fmt: skip
    """``grad · (clean − corrupted)`` per layer, elementwise ``[pos, *unit]``, from one backward pass."""
    loaded = lm.loaded
    kept: dict[int, torch.Tensor] = {}

    def leaf(region: torch.Tensor, layer: int) -> torch.Tensor:
        return region.detach().requires_grad_(True)

    def keep(region: torch.Tensor, layer: int) -> torch.Tensor:
        region = region.clone()
        region.retain_grad()
        kept[layer] = region
        return region

    layers = tuple(sorted(clean))
    items = (
        _Item("embed", "apply", (0,), None, None, None, {}, 1.0, leaf),
        _Item(site, "apply", layers, None, None, None, {}, 1.0, keep),
    )
    with torch.enable_grad(), intervening(loaded, Plan(items, ())):
        logits = loaded.model(input_ids=ids[None].to(loaded.device), use_cache=False).logits
        metric = _metric(logits, answer, wrong)[0]
        metric.backward()
    grads = {layer: (kept[layer].grad[0] * (clean[layer] - kept[layer][0].detach())).float() for layer in layers}
    return grads, float(metric.detach())


def activation_patching(
    lm: Any,
    clean: str,
    corrupted: str,
    answer: str | int,
    wrong: str | int | None = None,
    *,
    kind: str = "heads",
    top: int = 20,
    chunk: int = 64,
) -> Patching:
    """Exact and attribution patching of ``kind`` components from ``clean`` into ``corrupted``.

    ``clean`` and ``corrupted`` must be of equal length in tokens (e.g. "The capital of France
    is" / "... Italy is"); ``answer`` and ``wrong``: the clean and corrupted answers (their first
    tokens).
    """
    if kind not in PATCHING_KINDS:
        raise LmscopeError(f"unknown patching kind {kind!r}: choose from {', '.join(PATCHING_KINDS)}")
    loaded, arch = lm.loaded, lm.arch
    if arch.lm_head is None:
        raise LmscopeError(f"{lm.name} has no language-model head: patching measures a logit difference")
    clean_ids, corrupted_ids = lm.encode(clean), lm.encode(corrupted)
    if len(clean_ids) != len(corrupted_ids):
        raise LmscopeError(
            f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupted_ids)}: "
            "patching needs prompts of equal length"
        )
    answer_id, wrong_id = _token(lm, answer), _token(lm, wrong)
    site, layers = PATCHING_KINDS[kind], tuple(range(arch.n_layers))
    clean_values = site_values(loaded, clean_ids, site, layers)
    start = time.perf_counter()
    grads, corrupted_metric = _attribution(lm, corrupted_ids, site, clean_values, answer_id, wrong_id)
    attribution_seconds = time.perf_counter() - start
    with torch.no_grad():
        clean_metric = float(_metric(loaded.model(input_ids=clean_ids[None].to(loaded.device)).logits, answer_id,
                                     wrong_id)[0])  # fmt: skip
    n_pos = len(clean_ids)
    if kind == "heads":
        attribution = torch.stack([grads[layer].sum((0, 2)) for layer in layers]).cpu().numpy()  # [layer, head]
        cells = [(layer, head) for layer in layers for head in range(arch.n_heads)]
        rows, columns = tuple(map(str, layers)), tuple(f"H{h}" for h in range(arch.n_heads))
    elif kind == "positions":
        attribution = torch.stack([grads[layer].sum(-1) for layer in layers]).cpu().numpy()  # [layer, pos]
        cells = [(layer, pos) for layer in layers for pos in range(n_pos)]
        rows, columns = tuple(map(str, layers)), token_strings(loaded, corrupted_ids.tolist())
    else:
        per = torch.stack([grads[layer].sum(0) for layer in layers]).cpu().numpy()  # [layer, neuron]
        flat = np.argsort(-np.abs(per).reshape(-1))[:top]
        cells = [(int(i) // per.shape[1], int(i) % per.shape[1]) for i in flat]
        attribution = np.array([per[cell] for cell in cells])
        rows, columns = tuple(f"L{layer}.N{n}" for layer, n in cells), ("neuron",)
    start = time.perf_counter()
    exact = _exact(lm, corrupted_ids, kind, cells, clean_values, answer_id, wrong_id, chunk) - corrupted_metric
    exact_seconds = time.perf_counter() - start
    exact = exact.reshape(attribution.shape)
    return Patching(
        kind=kind,
        clean_tokens=token_strings(loaded, clean_ids.tolist()),
        corrupted_tokens=token_strings(loaded, corrupted_ids.tolist()),
        answer=lm.unembed.token_strings([answer_id])[0],
        wrong=None if wrong_id is None else lm.unembed.token_strings([wrong_id])[0],
        rows=rows,
        columns=columns,
        exact=exact,
        attribution=attribution,
        cells=tuple(cells),
        clean_metric=clean_metric,
        corrupted_metric=corrupted_metric,
        spearman=spearman(exact, attribution),
        exact_seconds=exact_seconds,
        attribution_seconds=attribution_seconds,
    )
