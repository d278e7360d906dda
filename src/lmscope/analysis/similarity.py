"""Representation similarity: CCA, SVCCA, PWCCA and CKA between two sets of activations.

Inputs are ``[tokens, features]`` arrays (rows are samples: the same tokens run through two layers
or models; columns are neurons or residual dimensions). Pass ``neurons_first=True`` for the
``[neurons, tokens]`` layout of Ecco and Google's SVCCA code. Both inputs must have the same
number of tokens; features may differ. Everything is computed in float64 after centering.

- **CCA** (Hotelling 1936): canonical correlations ``ρ_i``, the singular values of ``Q_aᵀ Q_b`` where
  ``Q`` is an orthonormal basis of each centered input's column space. ``cca`` returns their mean.
  Invariant to any invertible linear map of either input.
- **SVCCA** (Raghu et al. 2017): keep the top ``dims`` singular directions of each input (or enough
  for ``variance`` of it), then mean CCA. Invariant to orthogonal maps and isotropic scaling.
- **PWCCA** (Morcos et al. 2018): ``Σ_i α_i ρ_i`` with ``α_i ∝ Σ_j |⟨h_i, a_j⟩|``, ``h_i`` the i-th
  canonical variate of ``a`` and ``a_j`` its neurons, so directions ``a`` uses much weigh more.
  Asymmetric (weights from ``a``); invariant to isotropic scaling and neuron permutations.
- **CKA** (Kornblith et al. 2019): ``HSIC(K, L) / sqrt(HSIC(K, K)·HSIC(L, L))`` with Gram matrices
  ``K, L`` of the centered inputs. Linear CKA is computed in feature space,
  ``‖bᵀa‖²_F / (‖aᵀa‖_F ‖bᵀb‖_F)``, never forming the ``tokens × tokens`` Gram matrix; the RBF kernel
  ``exp(−‖x−y‖² / (2σ²))`` with ``σ = sigma · median distance`` needs the Gram form. Invariant to
  orthogonal maps and isotropic scaling.

Too few samples give confident wrong numbers: with ``tokens − 1 < features_a + features_b`` some
canonical correlations are exactly 1 whatever the data, and CKA of independent inputs with more
features than tokens approaches 1. So ``cca``/``pwcca`` raise unless ``epsilon > 0`` asks for ridge-
regularized CCA (``Σ_aa + ε·tr(Σ_aa)/p·I``), and ``cka`` raises unless ``debiased=True`` asks for the
unbiased HSIC estimator (Song et al. 2012), which stays near 0 for independent inputs.
"""

from __future__ import annotations

import numpy as np

from lmscope.errors import LmscopeError

__all__ = ["cca", "cca_correlations", "cka", "pwcca", "svcca"]


def _pair(a: object, b: object, neurons_first: bool, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as centered float64 ``[tokens, features]``, shapes checked."""
    arrays = []
    for name, x in (("a", a), ("b", b)):
        if hasattr(x, "detach"):
            x = x.detach().cpu().float().numpy()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise LmscopeError(f"{what}: {name} must be 2-D [tokens, features], not shape {x.shape}")
        if neurons_first:
            x = x.T
        if not np.isfinite(x).all():
            raise LmscopeError(f"{what}: {name} holds NaN or infinite values")
        arrays.append(x - x.mean(axis=0, keepdims=True))
    a, b = arrays
    if a.shape[0] != b.shape[0]:
        layout = "[neurons, tokens]" if neurons_first else "[tokens, features]"
        raise LmscopeError(
            f"{what}: a and b must cover the same tokens, got {a.shape[0]} and {b.shape[0]} "
            f"(arrays are {layout}; pass neurons_first={not neurons_first} for the other layout)"
        )
    if a.shape[0] < 3:
        raise LmscopeError(f"{what} needs at least 3 tokens, got {a.shape[0]}")
    return a, b


def _basis(x: np.ndarray, epsilon: float) -> np.ndarray:
    """``Q [tokens, rank]``: the whitened input ``x·(xᵀx + λI)^(-1/2)`` (orthonormal when ``λ = 0``).

    Directions with singular values below float64 precision are dropped (dead or duplicate neurons).
    """
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    keep = s > s[0] * max(x.shape) * np.finfo(np.float64).eps if s.size and s[0] > 0 else np.zeros(0, bool)
    u, s = u[:, keep], s[keep]
    if epsilon > 0:
        ridge = epsilon * float((s**2).sum()) / x.shape[1]
        return u * (s / np.sqrt(s**2 + ridge))  # shrunk columns: ridge-regularized whitening
    return u


def _check_samples(a: np.ndarray, b: np.ndarray, what: str) -> None:
    n, pa, pb = a.shape[0], a.shape[1], b.shape[1]
    if n - 1 < pa + pb:
        raise LmscopeError(
            f"{what} needs more tokens than features of both inputs together ({n} tokens, {pa} + {pb} features): "
            "some canonical correlations would be 1 whatever the data. Use more tokens, reduce with "
            "svcca(dims=...), or pass epsilon=1e-3 for regularized CCA"
        )


def _canonical(a: np.ndarray, b: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``(ρ [r], canonical variates of a in sample space [tokens, r])``."""
    qa, qb = _basis(a, epsilon), _basis(b, epsilon)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        raise LmscopeError("CCA: an input is constant (every feature has zero variance)")
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), qa @ u


def cca_correlations(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> np.ndarray:
    """The canonical correlations ``ρ_1 ≥ ρ_2 ≥ … ≥ 0`` (``min(rank a, rank b)`` of them)."""
    a, b = _pair(a, b, neurons_first, "cca")
    if epsilon <= 0:
        _check_samples(a, b, "cca")
    return _canonical(a, b, epsilon)[0]


def cca(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> float:
    """Mean canonical correlation (1 for inputs that are invertible linear maps of each other)."""
    return float(cca_correlations(a, b, epsilon=epsilon, neurons_first=neurons_first).mean())


def _top_directions(x: np.ndarray, dims: int | None, variance: float) -> np.ndarray:
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    if dims is None:
        share = np.cumsum(s**2) / max(float((s**2).sum()), np.finfo(np.float64).tiny)
        dims = int(np.searchsorted(share, variance) + 1)
    if not 1 <= dims <= s.size:
        raise LmscopeError(f"svcca: dims must lie in 1..{s.size} for an input of shape {x.shape}, not {dims}")
    return u[:, :dims] * s[:dims]  # [tokens, dims]: the input projected on its top directions


def svcca(
    a: object,
    b: object,
    dims: int | None = None,
    *,
    variance: float = 0.99,
    epsilon: float = 0.0,
    neurons_first: bool = False,
) -> float:
    """SVCCA: mean CCA after reducing each input to ``dims`` top singular directions (or ``variance``)."""
    a, b = _pair(a, b, neurons_first, "svcca")
    ra, rb = _top_directions(a, dims, variance), _top_directions(b, dims, variance)
    if epsilon <= 0:
        _check_samples(ra, rb, "svcca")
    return float(_canonical(ra, rb, epsilon)[0].mean())


def pwcca(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> float:
    """PWCCA: canonical correlations weighted by how much of ``a``'s neurons each direction accounts for."""
    a, b = _pair(a, b, neurons_first, "pwcca")
    if epsilon <= 0:
        _check_samples(a, b, "pwcca")
    rho, variates = _canonical(a, b, epsilon)  # variates [tokens, r]
    weights = np.abs(variates.T @ a).sum(axis=1)  # α_i ∝ Σ_j |⟨h_i, a_j⟩|
    return float((weights * rho).sum() / weights.sum())


def _hsic_unbiased(gram_a: np.ndarray, gram_b: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC of two Gram matrices ``[tokens, tokens]`` (diagonals ignored).

    ``[tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2·1ᵀK̃L̃1 / (n−2)] / (n(n−3))``, ``K̃`` = ``K`` with a zero diagonal.
    """
    n = gram_a.shape[0]
    k, m = gram_a.copy(), gram_b.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(m, 0.0)
    sum_k, sum_m = k.sum(0), m.sum(0)  # [tokens]
    term = (k * m).sum() + sum_k.sum() * sum_m.sum() / ((n - 1) * (n - 2)) - 2 * sum_k @ sum_m / (n - 2)
    return float(term / (n * (n - 3)))


def _gram(x: np.ndarray, kernel: str, sigma: float) -> np.ndarray:
    if kernel == "linear":
        return x @ x.T
    sq = (x**2).sum(1)
    dist = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)  # [tokens, tokens] squared distances
    median = float(np.median(np.sqrt(dist[np.triu_indices_from(dist, 1)])))
    width = sigma * median if median > 0 else 1.0
    return np.exp(-dist / (2 * width**2))


def cka(
    a: object,
    b: object,
    *,
    kernel: str = "linear",
    sigma: float = 0.8,
    debiased: bool = False,
    neurons_first: bool = False,
) -> float:
    """Centered kernel alignment; ``kernel="linear"`` (feature-space form) or ``"rbf"``."""
    if kernel not in ("linear", "rbf"):
        raise LmscopeError(f"cka: kernel must be 'linear' or 'rbf', not {kernel!r}")
    a, b = _pair(a, b, neurons_first, "cka")
    n = a.shape[0]
    if debiased:
        if n < 5:
            raise LmscopeError(f"debiased cka needs at least 5 tokens, got {n}")
        k, m = _gram(a, kernel, sigma), _gram(b, kernel, sigma)  # [tokens, tokens] each
        denom = np.sqrt(max(_hsic_unbiased(k, k), 0.0) * max(_hsic_unbiased(m, m), 0.0))
        return float(_hsic_unbiased(k, m) / denom) if denom > 0 else 0.0
    if n < max(a.shape[1], b.shape[1]):
        raise LmscopeError(
            f"cka: {n} tokens but {max(a.shape[1], b.shape[1])} features: CKA is biased toward 1 when features "
            "outnumber tokens. Use more tokens, or pass debiased=True (unbiased HSIC)"
        )
    if kernel == "linear":
        cross = np.linalg.norm(b.T @ a) ** 2  # ‖bᵀa‖²_F = tr(K L) for K = a·aᵀ, L = b·bᵀ
        denom = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
        return float(cross / denom) if denom > 0 else 0.0
    center = np.eye(n) - 1.0 / n
    k, m = center @ _gram(a, kernel, sigma) @ center, center @ _gram(b, kernel, sigma) @ center  # [tokens, tokens]
    denom = np.linalg.norm(k) * np.linalg.norm(m)
    return float((k * m).sum() / denom) if denom > 0 else 0.0
