"""Float32 matrix products through oneDNN, for gradient passes on CPUs where that is faster.

PyTorch's CPU builds multiply float32 matrices with MKL. On AMD processors MKL runs kernels
narrower than the CPU's vector units, while oneDNN, which PyTorch bundles as well, uses the full
width: on a 2-core AMD EPYC with AVX-512, a ``[240, 1536] @ [1536, 576]`` product runs at about
450 GFLOPS through oneDNN against about 200 through MKL. Saliency's batched backward pass is made
of such products (one row per target and token position).

:func:`onednn_matmuls` is a context in which the 2-D float32 CPU ``mm`` and ``addmm`` calls that
PyTorch actually runs go to oneDNN's inner-product primitive. It is a ``TorchDispatchMode``: it
sees the products below autograd and below vmap (a batched backward arrives with every target's
rows already folded into one product) and, like any dispatch mode, it is local to the thread that
enters it. It also costs a Python call for every operation it sees (about 10 µs; a batched
backward pass through a 30-layer model runs about 5,500), so it is entered around the batched
backward only, never around a whole analysis; its handler is kept out of the ``torch.compile``
guard that PyTorch puts around every dispatch mode's handler by default (it is never compiled,
and the guard adds about 1 µs to each of those calls). The results are float32 products summed
in another order (they differ from MKL's at the ~1e-6 relative level, as any two BLAS libraries
do), so capture never uses them, since its logits must equal the model's bit for bit.

Whether oneDNN pays is decided from the workload itself, not from a product measured apart
(:func:`routed`): a faster product does not make a faster pass once the mode's own cost is paid.
The first time a class of workload is seen in a process (the caller names it: the model's shape,
the rows of the pass, the thread count), the caller's pass runs three times: through oneDNN
untimed (oneDNN builds its kernels for new shapes on first use), then timed through PyTorch's
products, then timed through oneDNN. oneDNN is kept for that class only if its result agrees with
PyTorch's to float32 precision and its pass, the mode's cost included, took at most 95 % of
PyTorch's; every later pass of the class runs once, the chosen way. :func:`choices` lists what
was decided, with both timings.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Choice", "available", "choices", "forget_choices", "matmul_backend", "onednn_matmuls", "routed"]

T = TypeVar("T")

_MM = torch.ops.aten.mm.default
_ADDMM = torch.ops.aten.addmm.default
_BACKENDS = ("auto", "onednn", "torch")
_MARGIN = 0.95  # oneDNN's trial pass must take at most this share of PyTorch's
_backend: ContextVar[str] = ContextVar("lmscope_matmul_backend", default="auto")


def available() -> bool:
    """Whether this PyTorch build has oneDNN's inner product."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


class _OneDnnMatmuls(TorchDispatchMode):
    """Routes eligible ``mm`` and ``addmm`` (``beta = alpha = 1``, a bias per column) to oneDNN.

    Every other operation goes straight back to PyTorch (the first test below is the only work it
    costs). A product oneDNN refuses (it raises) is left to PyTorch, which computes the same thing.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # no torch.compile guard around the handler (see the module docstring)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _MM:
            if not kwargs:
                a, b = args
                if _eligible(a, b):
                    try:
                        return _linear(a, b.t(), None)
                    except RuntimeError:
                        pass
        elif func is _ADDMM and not kwargs:
            bias, a, b = args
            if (
                _eligible(a, b)
                and bias.dim() == 1
                and bias.dtype is torch.float32
                and bias.shape[0] == b.shape[1]
                and bias.is_contiguous()
            ):
                try:
                    return _linear(a, b.t(), bias)
                except RuntimeError:
                    pass
        return func(*args, **kwargs) if kwargs else func(*args)


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


def _timed(run: Callable[[], T], onednn: bool) -> tuple[T, float]:
    start = time.perf_counter()
    if onednn:
        with _OneDnnMatmuls():
            result = run()
    else:
        result = run()
    return result, time.perf_counter() - start


def routed(run: Callable[[], T], workload: Hashable, device: torch.device, dtype: torch.dtype = torch.float32) -> T:
    """``run()``, with its float32 CPU products routed as the backend in force says.

    ``run`` must give the same result when called twice (a backward pass keeps its graph for
    this), since under ``"auto"`` the first pass of each ``workload`` class is a trial (see
    the module docstring). ``device`` and ``dtype`` are the model's: for a model in another
    precision or on another device ``run`` runs once, untouched.
    """
    backend = _backend.get()
    if backend == "torch" or device.type != "cpu" or dtype is not torch.float32 or not available():
        return run()
    if backend == "onednn":
        with _OneDnnMatmuls():
            return run()
    with _lock:
        choice = _choices.get(workload)
    if choice is not None:
        return _timed(run, choice.onednn)[0]
    fast = _timed(run, True)[0]  # oneDNN builds its kernels for these shapes: not timed
    plain, plain_s = _timed(run, False)
    fast_s = _timed(run, True)[1]
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
def onednn_matmuls() -> Iterator[None]:
    """Run this scope's eligible float32 CPU products through oneDNN, unconditionally."""
    with _OneDnnMatmuls():
        yield
