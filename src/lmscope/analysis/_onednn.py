"""Float32 matrix products through oneDNN, for gradient passes on CPUs where that is faster.

PyTorch's CPU builds multiply float32 matrices with MKL. On AMD processors MKL runs kernels
narrower than the CPU's vector units, while oneDNN, which PyTorch bundles as well, uses the full
width: on a 2-core AMD EPYC with AVX-512, a ``[240, 1536] @ [1536, 576]`` product runs at about
450 GFLOPS through oneDNN against about 200 through MKL. Saliency's passes are made of such
products: the forward over the sequence (one row per position) and the batched backward (one row
per target and position). :func:`onednn_matmuls` is a context in which the 2-D float32 CPU ``mm``
and ``addmm`` calls that PyTorch actually runs go to oneDNN's inner-product primitive. It registers
kernels of its own over PyTorch's CPU kernels of ``aten::mm`` and ``aten::addmm`` for the length of
the scope (:func:`_routing`), so it sees the products below autograd and below vmap (a batched
backward arrives with every target's rows already folded into one product) and costs a Python call
per product only. A ``TorchDispatchMode`` would see the same products, but it costs a Python call
for every operation (about 10 µs; a batched backward through a 30-layer model runs about 5,500 of
them, against about 400 products in the whole pass): measured on SmolLM2-135M, 10 targets, one
thread, the batched backward took 441 ms of CPU time under such a mode and 383 ms under these
kernels (both skipping zero rows), with equal results. The kernels route only the products of the
threads that opened a scope; every other thread's products go to PyTorch's own kernels (their
``out=`` forms). The results are float32 products summed in another order (they differ from MKL's
at the ~1e-6 relative level, as any two BLAS libraries do), so capture never uses them, since its
logits must equal the model's bit for bit.

Products of a batched backward have rows that are zero by construction: a target's gradient is
zero at every position after the one that predicts it. Given those rows (:class:`ZeroRows`), a
product multiplies only the others, after checking that the dropped rows are indeed zero (a zero
row gives a zero row of the product, so the result is exactly the full product's; where the check
fails the product is done in full). For 10 targets after a 15-token prompt that is 195 of 240 rows.

Whether oneDNN pays is decided from the workload itself, not from a product measured apart
(:func:`routed`): a faster product does not make a faster pass once the routing's own cost is paid.
The first time a class of workload is seen in a process (the caller names it: the model's shape,
the rows of the pass, the thread count), the caller's pass runs three times: through oneDNN
untimed (oneDNN builds its kernels for new shapes on first use), then timed through PyTorch's
products, then timed through oneDNN. oneDNN is kept for that class only if its result agrees with
PyTorch's to float32 precision and its pass, the kernels' cost included, took at most 95 % of
PyTorch's; every later pass of the class runs once, the chosen way. :func:`choices` lists what
was decided, with both timings.
"""

from __future__ import annotations

import itertools
import threading
import time
import warnings
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch

__all__ = [
    "Choice",
    "ZeroRows",
    "available",
    "choices",
    "forget_choices",
    "keep_kernels",
    "matmul_backend",
    "onednn_matmuls",
    "routed",
]

T = TypeVar("T")

_BACKENDS = ("auto", "onednn", "torch")
_MARGIN = 0.95  # oneDNN's trial pass must take at most this share of PyTorch's
_backend: ContextVar[str] = ContextVar("lmscope_matmul_backend", default="auto")


def available() -> bool:
    """Whether this PyTorch build has oneDNN's inner product (and can take a kernel back, see :func:`_routing`)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.library.Library, "_destroy")
    )


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN, for ``x [m, k]``, ``weight [n, k]``, ``bias [n]``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _eligible(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a @ b`` is a plain 2-D float32 CPU product that oneDNN takes without copies."""
    return (
        a.dtype is torch.float32
        and b.dtype is torch.float32
        and a.device.type == "cpu"
        and b.device.type == "cpu"
        and a.layout is torch.strided
        and b.layout is torch.strided
        and a.dim() == 2
        and b.dim() == 2
        and a.numel() > 0
        and b.numel() > 0
        and a.is_contiguous()
        and (b.is_contiguous() or b.t().is_contiguous())
    )


@dataclass(frozen=True)
class ZeroRows:
    """Rows of a pass's products that are known to be zero: of every ``mm`` whose left operand has
    ``total`` rows, only the rows ``keep`` can be nonzero (the others are ``drop``).

    In a batched backward the rows of a product are the targets' gradients at every position,
    target by target, and under the causal mask a target's gradient is exactly zero at the
    positions after the one that predicts it (see :mod:`lmscope.analysis._gradients`).
    """

    total: int
    keep: torch.Tensor  # [kept] row indices, ascending
    drop: torch.Tensor  # [total - kept] the other rows
    runs: tuple[int, ...]  # lengths of the runs of kept and dropped rows, alternating, a kept run first

    @classmethod
    def of(cls, keep: torch.Tensor) -> ZeroRows | None:
        """From a mask ``[total]`` of the rows that can be nonzero; ``None`` if that is every row."""
        keep = keep.cpu()
        if bool(keep.all()):
            return None
        edges = (keep[1:] != keep[:-1]).nonzero()[:, 0] + 1
        bounds = [0, *edges.tolist(), keep.numel()]
        runs = [b - a for a, b in itertools.pairwise(bounds)]
        if not bool(keep[0]):
            runs.insert(0, 0)
        return cls(keep.numel(), keep.nonzero()[:, 0], (~keep).nonzero()[:, 0], tuple(runs))


def _pruned(a: torch.Tensor, b: torch.Tensor, rows: ZeroRows) -> torch.Tensor | None:
    """``a @ b`` from ``a``'s kept rows only, or ``None`` where a row of ``rows.drop`` is not zero
    after all (then the product is done in full). A zero row of ``a`` gives a zero row of the
    product (``b`` is finite), so the result is the full product's."""
    if bool(a.index_select(0, rows.drop).any()):
        return None
    kept = _linear(a.index_select(0, rows.keep), b.t(), None)  # [kept, n]
    blocks = kept.split(rows.runs[0::2])
    zeros = kept.new_zeros(max(rows.runs[1::2]), kept.shape[1])
    gaps = [zeros[:gap] for gap in rows.runs[1::2]]
    return torch.cat([part for pair in itertools.zip_longest(blocks, gaps) for part in pair if part is not None])


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``aten::mm`` on CPU while a routing scope is open: oneDNN in the threads that opened one."""
    scopes = getattr(_local, "scopes", None)
    if scopes and _eligible(a, b):
        _local.scopes = []  # any product inside is PyTorch's
        try:
            rows = scopes[-1]
            if rows is not None and a.shape[0] == rows.total:
                product = _pruned(a, b, rows)
                if product is not None:
                    return product
            return _linear(a, b.t(), None)
        except RuntimeError:
            pass
        finally:
            _local.scopes = scopes
    return torch.ops.aten.mm.out(a, b, out=a.new_empty((a.shape[0], b.shape[1])))


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    """``aten::addmm`` on CPU while a routing scope is open: oneDNN in the threads that opened one,
    for ``beta = alpha = 1`` and a bias per column."""
    scopes = getattr(_local, "scopes", None)
    if (
        scopes
        and beta == 1
        and alpha == 1
        and _eligible(a, b)
        and bias.dim() == 1
        and bias.dtype is torch.float32
        and bias.shape[0] == b.shape[1]
        and bias.is_contiguous()
    ):
        _local.scopes = []  # any product inside is PyTorch's
        try:
            return _linear(a, b.t(), bias)
        except RuntimeError:
            pass
        finally:
            _local.scopes = scopes
    out = a.new_empty((a.shape[0], b.shape[1]))
    return torch.ops.aten.addmm.out(bias, a, b, beta=beta, alpha=alpha, out=out)


_local = threading.local()  # .scopes: this thread's open routing scopes, innermost last (their ZeroRows or None)
_kernels_lock = threading.Lock()
_kernels: list[object] = []  # [the torch.library.Library that holds _mm and _addmm] while registered
_open_scopes = 0
_keep = False  # set by keep_kernels(): never remove the kernels (processes that run torch in several threads)


def keep_kernels() -> None:
    """Keep the routing kernels registered once they are, for the rest of the process.

    PyTorch's dispatcher is not safe against a kernel being removed while another thread runs it,
    so a process that computes saliency while other threads run PyTorch (the web app's model
    workers) calls this at start. The price: once registered, every CPU ``mm``/``addmm`` of the
    process passes through a Python call (PyTorch's own kernel outside a routing scope).
    """
    global _keep
    _keep = True


@contextmanager
def _routing(rows: ZeroRows | None = None) -> Iterator[None]:
    """Route this thread's eligible float32 CPU ``mm`` and ``addmm`` to oneDNN in this scope.

    The first scope opened in the process registers :func:`_mm` and :func:`_addmm` over PyTorch's
    CPU kernels of ``aten::mm`` and ``aten::addmm``; the last one closed removes them (unless
    :func:`keep_kernels` was called). Other threads' products, and products that are not
    eligible, go to PyTorch's own kernels (their ``out=`` forms, which compute the same thing), so
    only this thread's products change.
    """
    global _open_scopes
    with _kernels_lock:
        if not _kernels:
            library = torch.library.Library("aten", "IMPL")
            with warnings.catch_warnings():  # PyTorch warns that a kernel is overridden: that is the point
                warnings.simplefilter("ignore")
                library.impl("mm", _mm, "CPU")
                library.impl("addmm", _addmm, "CPU")
            _kernels.append(library)
        _open_scopes += 1
    scopes = getattr(_local, "scopes", None)
    if scopes is None:
        scopes = _local.scopes = []
    scopes.append(rows)
    try:
        yield
    finally:
        scopes.pop()
        with _kernels_lock:
            _open_scopes -= 1
            if _open_scopes == 0 and not _keep:
                _kernels.pop()._destroy()


@dataclass(frozen=True)
class Choice:
    """What :func:`routed` decided for one class of workload, from one trial pass each way."""

    workload: Hashable
    onednn: bool  # whether this class's passes run their products through oneDNN
    onednn_seconds: float  # the timed trial pass through oneDNN (after an untimed one)
    torch_seconds: float  # the trial pass through PyTorch's products
    agree: bool  # whether the two results agreed to float32 precision

    def __str__(self) -> str:
        chosen = "oneDNN" if self.onednn else "PyTorch's products"
        agreed = "" if self.agree else ", results disagreed"
        return (
            f"{chosen} (trial pass: oneDNN {1000 * self.onednn_seconds:.1f} ms, "
            f"PyTorch {1000 * self.torch_seconds:.1f} ms{agreed})"
        )


_choices: dict[Hashable, Choice] = {}
_lock = threading.Lock()


def choices() -> dict[Hashable, Choice]:
    """The routing decided so far in this process, per class of workload."""
    with _lock:
        return dict(_choices)


def forget_choices() -> None:
    """Forget every decision, so that the next pass of each class is tried both ways again."""
    with _lock:
        _choices.clear()


def _agree(fast: object, plain: object) -> bool:
    """Whether two results (tensors, or tuples of them) agree to float32 precision."""
    if isinstance(plain, torch.Tensor):
        if not isinstance(fast, torch.Tensor) or fast.shape != plain.shape:
            return False
        if plain.numel() == 0:
            return True
        scale = float(plain.abs().max())
        return bool(torch.isfinite(fast).all()) and float((fast - plain).abs().max()) <= 1e-3 * scale
    if isinstance(plain, (tuple, list)):
        return len(fast) == len(plain) and all(_agree(f, p) for f, p in zip(fast, plain, strict=True))
    return fast == plain


def _timed(run: Callable[[], T], onednn: bool, rows: ZeroRows | None = None) -> tuple[T, float]:
    start = time.perf_counter()
    if onednn:
        with _routing(rows):
            result = run()
    else:
        result = run()
    return result, time.perf_counter() - start


def routed(
    run: Callable[[], T],
    workload: Hashable,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    rows: ZeroRows | None = None,
) -> T:
    """``run()``, with its float32 CPU products routed as the backend in force says.

    ``run`` must give the same result when called twice (a backward pass keeps its graph for
    this), since under ``"auto"`` the first pass of each ``workload`` class is a trial (see
    the module docstring). ``device`` and ``dtype`` are the model's: for a model in another
    precision or on another device ``run`` runs once, untouched. ``rows`` (where oneDNN runs) are
    the rows of ``run``'s products known to be zero (:class:`ZeroRows`).
    """
    backend = _backend.get()
    if backend == "torch" or device.type != "cpu" or dtype is not torch.float32 or not available():
        return run()
    if backend == "onednn":
        with _routing(rows):
            return run()
    with _lock:
        choice = _choices.get(workload)
    if choice is not None:
        return _timed(run, choice.onednn, rows)[0]
    fast = _timed(run, True, rows)[0]  # oneDNN builds its kernels for these shapes: not timed
    plain, plain_s = _timed(run, False)
    fast_s = _timed(run, True, rows)[1]
    agree = _agree(fast, plain)
    choice = Choice(workload, agree and fast_s <= _MARGIN * plain_s, fast_s, plain_s, agree)
    with _lock:
        _choices.setdefault(workload, choice)
    return fast if choice.onednn else plain


@contextmanager
def matmul_backend(name: str) -> Iterator[None]:
    """Choose how :func:`routed` runs float32 CPU products in this scope.

    ``"auto"`` (the default) decides per class of workload from a trial pass each way;
    ``"onednn"`` uses oneDNN wherever it is available; ``"torch"`` keeps PyTorch's own.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown matmul backend {name!r}: use one of {', '.join(_BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


@contextmanager
def onednn_matmuls(rows: ZeroRows | None = None) -> Iterator[None]:
    """Run this scope's eligible float32 CPU products through oneDNN, unconditionally (``rows``: see
    :class:`ZeroRows`)."""
    with _routing(rows):
        yield
