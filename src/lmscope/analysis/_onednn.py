"""Float32 matrix products through oneDNN, for gradient passes on CPUs where that is faster.

PyTorch's CPU builds multiply float32 matrices with MKL. On AMD processors MKL runs kernels
narrower than the CPU's vector units, while oneDNN, which PyTorch bundles as well, uses the full
width: on a 2-core AMD EPYC with AVX-512, a ``[240, 1536] @ [1536, 576]`` product runs at about
450 GFLOPS through oneDNN against about 200 through MKL. Saliency's batched backward pass is made
of exactly such products (one row per target and token position), so its speed is set by them.

:func:`onednn_matmuls` is a context in which the 2-D float32 CPU ``mm`` and ``addmm`` calls that
PyTorch actually runs go to oneDNN's inner-product primitive. It is a ``TorchDispatchMode``: it
sees the products below autograd and below vmap (a batched backward arrives with every target's
rows already folded into one product) and, like any dispatch mode, it is local to the thread that
enters it. The results are float32 products summed in another order (they differ from MKL's at
the ~1e-6 relative level, as any two BLAS libraries do), so capture never uses them, since its
logits must equal the model's bit for bit; saliency's gradient passes do.

Whether oneDNN pays is measured once per process (:func:`onednn_pays`): both libraries multiply
one matrix pair, and oneDNN is kept only if it agrees to float32 precision and is clearly faster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["available", "matmul_backend", "onednn_matmuls", "onednn_pays"]

_aten = torch.ops.aten
_BACKENDS = ("auto", "onednn", "torch")
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

    A product oneDNN refuses (it raises) is left to PyTorch, which computes the same thing.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        routed = None
        if func is _aten.mm.default and not kwargs:
            a, b = args
            if _eligible(a, b):
                routed = (a, b.t(), None)
        elif func is _aten.addmm.default and not kwargs:
            bias, a, b = args
            if (
                _eligible(a, b)
                and bias.dim() == 1
                and bias.dtype is torch.float32
                and bias.shape[0] == b.shape[1]
                and bias.is_contiguous()
            ):
                routed = (a, b.t(), bias)
        if routed is not None:
            try:
                return _linear(*routed)
            except RuntimeError:
                pass
        return func(*args, **(kwargs or {}))


@cache
def onednn_pays() -> bool:
    """Whether oneDNN's float32 products agree with PyTorch's and are at least 1.25× faster here.

    Measured once per process on a ``[256, 1024] @ [1024, 1024]`` product, best of five runs each.
    """
    if not available():
        return False
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 1024, generator=generator)
    w = torch.randn(1024, 1024, generator=generator)
    try:
        fast = _linear(a, w, None)
    except RuntimeError:
        return False
    plain = a @ w.t()
    if float((fast - plain).abs().max()) > 1e-5 * float(plain.abs().max()):
        return False

    def best(product) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        return min(times)

    return best(lambda: _linear(a, w, None)) * 1.25 <= best(lambda: a @ w.t())


@contextmanager
def matmul_backend(name: str) -> Iterator[None]:
    """Choose the float32 CPU products of :func:`onednn_matmuls` in this scope.

    ``"auto"`` (the default) uses oneDNN where :func:`onednn_pays`; ``"onednn"`` uses it wherever
    it is available; ``"torch"`` keeps PyTorch's own.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown matmul backend {name!r}: use one of {', '.join(_BACKENDS)}")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


@contextmanager
def onednn_matmuls(device: torch.device, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Run this scope's float32 CPU products through oneDNN, if the backend says so.

    ``device`` and ``dtype`` are the model's: for a model in another precision or on another
    device the scope changes nothing (and costs nothing, as no mode is entered).
    """
    choice = _backend.get()
    wanted = choice == "onednn" or (choice == "auto" and onednn_pays())
    use = device.type == "cpu" and dtype is torch.float32 and available() and wanted
    if not use:
        yield
        return
    with _OneDnnMatmuls():
        yield
