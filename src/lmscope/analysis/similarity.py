"""Representation similarity: CCA, SVCCA, PWCCA and CKA between two sets of activations.

Inputs are ``[tokens, features]`` arrays (rows are samples: the same tokens run through two layers
or models; columns are neurons or residual dimensions). Pass ``neurons_first=True`` for the
``[neurons, tokens]`` layout of Ecco and Google's SVCCA code. Both inputs must have the same
number of tokens; features may differ. Everything is computed in float64 after centering, but
the rank of each input is judged at the precision it came in: singular values below
``s_max · eps(dtype) · ½√(tokens + features + 1)`` (Press et al., Numerical Recipes §2.6) are
rounding noise. A float32 LayerNorm output, whose features sum to 0 only up to rounding, is
rank-deficient by one; judged at float64 precision its rounding direction was kept and added a
spurious canonical correlation (minilm-l6, layers 2 and 4 over 3,165 tokens: mean CCA 0.62195
instead of the float64 model's 0.62280; now 0.62280).

Comparing many pairs (every layer against every layer) decomposes each input once:
:func:`prepare` centers an input and caches its SVD-based bases, and :func:`compare` takes two
prepared inputs; ``cca``, ``svcca``, ``pwcca`` and ``cka`` are ``compare(prepare(a), prepare(b))``.
Over a collection too large to load, :mod:`lmscope.analysis.streaming` computes linear CKA, CCA,
SVCCA and PWCCA from covariances accumulated shard by shard, equal to these.

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

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmscope.errors import LmscopeError

__all__ = ["MEASURES", "Prepared", "cca", "cca_correlations", "cka", "compare", "prepare", "pwcca", "ready", "svcca"]

MEASURES = ("cka", "cca", "svcca", "pwcca")


def _precision(x: Any) -> float:
    """Machine epsilon of the input's own dtype (float64 for integers and other inputs)."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and hasattr(x, "detach"):  # a torch tensor: bfloat16 has no numpy twin
        import torch

        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(np.finfo(np.float64).eps)
    dtype = np.asarray(x).dtype
    return float(np.finfo(dtype).eps) if np.issubdtype(dtype, np.floating) else float(np.finfo(np.float64).eps)


@dataclass(frozen=True, eq=False)
class Prepared:
    """One input ``[tokens, features]``, centered, in float64, with its decompositions cached.

    ``eps`` is the machine epsilon of the dtype it came in (it sets the rank tolerance). Reuse a
    Prepared input across many :func:`compare` calls: each SVD is computed once.
    """

    x: np.ndarray  # [tokens, features], centered float64
    eps: float
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def _svd(self) -> tuple[np.ndarray, np.ndarray]:
        if "svd" not in self._cache:
            u, s, _ = np.linalg.svd(self.x, full_matrices=False)
            self._cache["svd"] = (u, s)
        return self._cache["svd"]

    def basis(self, epsilon: float) -> np.ndarray:
        """``Q [tokens, rank]``: the whitened input ``x·(xᵀx + λI)^(-1/2)`` (orthonormal when ``λ = 0``).

        Directions with singular values below the input dtype's precision are dropped (dead or
        duplicate neurons, or rounding-level directions).
        """
        key = ("basis", epsilon)
        if key not in self._cache:
            u, s = self._svd()
            tol = s[0] * self.eps * 0.5 * np.sqrt(sum(self.x.shape) + 1) if s.size else 0.0
            keep = s > tol if s.size and s[0] > 0 else np.zeros(0, bool)
            u, s = u[:, keep], s[keep]
            if epsilon > 0:
                ridge = epsilon * float((s**2).sum()) / self.x.shape[1]
                u = u * (s / np.sqrt(s**2 + ridge))  # shrunk columns: ridge-regularized whitening
            self._cache[key] = u
        return self._cache[key]

    def loadings(self, epsilon: float) -> np.ndarray:
        """``Qᵀx [rank, features]``: how much each basis direction accounts for each feature (PWCCA)."""
        key = ("loadings", epsilon)
        if key not in self._cache:
            self._cache[key] = self.basis(epsilon).T @ self.x
        return self._cache[key]

    def reduced(self, dims: int | None, variance: float) -> Prepared:
        """The input projected on its top ``dims`` singular directions (or enough for ``variance``)."""
        key = ("reduced", dims, variance)
        if key not in self._cache:
            u, s = self._svd()
            k = dims
            if k is None:
                share = np.cumsum(s**2) / max(float((s**2).sum()), np.finfo(np.float64).tiny)
                k = int(np.searchsorted(share, variance) + 1)
            if not 1 <= k <= s.size:
                raise LmscopeError(f"svcca: dims must lie in 1..{s.size} for an input of shape {self.x.shape}, not {k}")
            reduced = Prepared(u[:, :k] * s[:k], self.eps)  # [tokens, dims]
            reduced._cache[key] = reduced  # already this reduction: svcca on it uses it as is
            self._cache[key] = reduced
        return self._cache[key]

    def self_norm(self) -> float:
        """``‖xᵀx‖_F`` (linear CKA's denominator)."""
        if "self_norm" not in self._cache:
            self._cache["self_norm"] = float(np.linalg.norm(self.x.T @ self.x))
        return self._cache["self_norm"]


def prepare(x: object, *, neurons_first: bool = False, name: str = "a", what: str = "similarity") -> Prepared:
    """``x`` as a :class:`Prepared` input: checked, centered, float64, its dtype's precision kept."""
    eps = _precision(x)
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise LmscopeError(f"{what}: {name} must be 2-D [tokens, features], not shape {x.shape}")
    if neurons_first:
        x = x.T
    if not np.isfinite(x).all():
        raise LmscopeError(f"{what}: {name} holds NaN or infinite values")
    return Prepared(x - x.mean(axis=0, keepdims=True), eps)


def ready(x: Prepared, method: str, **options: Any) -> Prepared:
    """``x`` with what ``method`` needs computed and the rest let go (for comparing many pairs).

    SVCCA keeps only the reduced input; CCA/PWCCA keep the basis (and PWCCA its loadings) and drop
    the full SVD. Results are identical to comparing unprepared inputs.
    """
    epsilon = float(options.get("epsilon", 0.0))
    if method == "svcca":
        x = x.reduced(options.get("dims"), float(options.get("variance", 0.99)))
    if method in ("cca", "svcca", "pwcca"):
        x.basis(epsilon)
        if method == "pwcca":
            x.loadings(epsilon)
        x._cache.pop("svd", None)
    elif method == "cka" and options.get("kernel", "linear") == "linear" and not options.get("debiased"):
        x.self_norm()
    return x


def _pair(a: object, b: object, neurons_first: bool, what: str) -> tuple[Prepared, Prepared]:
    """Both inputs prepared, with the same tokens checked."""
    pa = a if isinstance(a, Prepared) else prepare(a, neurons_first=neurons_first, name="a", what=what)
    pb = b if isinstance(b, Prepared) else prepare(b, neurons_first=neurons_first, name="b", what=what)
    if pa.n_tokens != pb.n_tokens:
        layout = "[neurons, tokens]" if neurons_first else "[tokens, features]"
        raise LmscopeError(
            f"{what}: a and b must cover the same tokens, got {pa.n_tokens} and {pb.n_tokens} "
            f"(arrays are {layout}; pass neurons_first={not neurons_first} for the other layout)"
        )
    if pa.n_tokens < 3:
        raise LmscopeError(f"{what} needs at least 3 tokens, got {pa.n_tokens}")
    return pa, pb


def _check_samples(a: Prepared, b: Prepared, what: str) -> None:
    n, pa, pb = a.n_tokens, a.n_features, b.n_features
    if n - 1 < pa + pb:
        raise LmscopeError(
            f"{what} needs more tokens than features of both inputs together ({n} tokens, {pa} + {pb} features): "
            "some canonical correlations would be 1 whatever the data. Use more tokens, reduce with "
            "svcca(dims=...), or pass epsilon=1e-3 for regularized CCA"
        )


def _canonical(a: Prepared, b: Prepared, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """``(ρ [r], u [rank a, r])``: canonical correlations and the rotation of ``a``'s basis onto its variates."""
    qa, qb = a.basis(epsilon), b.basis(epsilon)
    if qa.shape[1] == 0 or qb.shape[1] == 0:
        raise LmscopeError("CCA: an input is constant (every feature has zero variance)")
    u, rho, _ = np.linalg.svd(qa.T @ qb, full_matrices=False)
    return np.clip(rho, 0.0, 1.0), u


def cca_correlations(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> np.ndarray:
    """The canonical correlations ``ρ_1 ≥ ρ_2 ≥ … ≥ 0`` (``min(rank a, rank b)`` of them)."""
    a, b = _pair(a, b, neurons_first, "cca")
    if epsilon <= 0:
        _check_samples(a, b, "cca")
    return _canonical(a, b, epsilon)[0]


def cca(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> float:
    """Mean canonical correlation (1 for inputs that are invertible linear maps of each other)."""
    return float(cca_correlations(a, b, epsilon=epsilon, neurons_first=neurons_first).mean())


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
    ra, rb = a.reduced(dims, variance), b.reduced(dims, variance)
    if epsilon <= 0:
        _check_samples(ra, rb, "svcca")
    return float(_canonical(ra, rb, epsilon)[0].mean())


def pwcca(a: object, b: object, *, epsilon: float = 0.0, neurons_first: bool = False) -> float:
    """PWCCA: canonical correlations weighted by how much of ``a``'s neurons each direction accounts for."""
    a, b = _pair(a, b, neurons_first, "pwcca")
    if epsilon <= 0:
        _check_samples(a, b, "pwcca")
    rho, u = _canonical(a, b, epsilon)  # the canonical variates of a are h = Q_a·u [tokens, r]
    weights = np.abs(u.T @ a.loadings(epsilon)).sum(axis=1)  # α_i ∝ Σ_j |⟨h_i, a_j⟩|, hᵀa = uᵀ(Q_aᵀa)
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
    pa, pb = _pair(a, b, neurons_first, "cka")
    a, b = pa.x, pb.x
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
        denom = pa.self_norm() * pb.self_norm()
        return float(cross / denom) if denom > 0 else 0.0
    center = np.eye(n) - 1.0 / n
    k, m = center @ _gram(a, kernel, sigma) @ center, center @ _gram(b, kernel, sigma) @ center  # [tokens, tokens]
    denom = np.linalg.norm(k) * np.linalg.norm(m)
    return float((k * m).sum() / denom) if denom > 0 else 0.0


def compare(a: Prepared, b: Prepared, method: str = "cka", **options: Any) -> float:
    """``method`` (``cka``, ``cca``, ``svcca``, ``pwcca``) of two :func:`prepare`-d inputs, with ``options``."""
    measures = {"cka": cka, "cca": cca, "svcca": svcca, "pwcca": pwcca}
    if method not in measures:
        raise LmscopeError(f"unknown similarity {method!r}: choose from {', '.join(measures)}")
    return measures[method](a, b, **options)
