"""oneDNN float32 products for gradient passes: routed only where eligible and chosen, equal to
PyTorch's to float32 precision, local to the thread, and saliency equal to the loop either way."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from conftest import tiny
from lmscope.analysis import _onednn
from lmscope.analysis._onednn import matmul_backend, onednn_matmuls, onednn_pays
from test_saliency import PROMPT, assert_equal_to_loop, loop_gradients

CPU = torch.device("cpu")
HAS_ONEDNN = _onednn.available()
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this PyTorch build has no oneDNN inner product")


@pytest.fixture
def routed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the products that went to oneDNN."""
    calls: list[tuple[int, ...]] = []
    linear = _onednn._linear

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((*x.shape, weight.shape[0]))
        return linear(x, weight, bias)

    monkeypatch.setattr(_onednn, "_linear", counting)
    return calls


@needs_onednn
def test_products_go_to_onednn_and_agree(routed) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(5, generator=g)
    x.requires_grad_(True)
    plain = torch.nn.functional.linear(x, w, b)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    with matmul_backend("onednn"), onednn_matmuls(CPU):
        fast = torch.nn.functional.linear(x, w, b)  # addmm [7, 16] @ [16, 5]
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)  # mm [7, 5] @ [5, 16]
        product = x.detach() @ w.t()  # mm
    assert routed == [(7, 16, 5), (7, 5, 16), (7, 16, 5)]
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product, x.detach() @ w.t(), rtol=1e-6, atol=1e-6)


@needs_onednn
def test_other_products_are_left_to_torch(routed) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(8, 4, generator=g)
    with matmul_backend("onednn"), onednn_matmuls(CPU):
        a.double() @ b.double()  # float64
        a.t().contiguous().t() @ b  # a column-major left operand
        torch.randn(3, 6, 8) @ torch.randn(3, 8, 4)  # bmm
        torch.addmm(torch.zeros(4), a, b, beta=0.5)  # scaled bias
        a.half() @ b.half()
    assert routed == []
    with matmul_backend("torch"), onednn_matmuls(CPU):
        a @ b
    with matmul_backend("onednn"), onednn_matmuls(torch.device("meta")):
        a @ b  # the model is not on the CPU
    with matmul_backend("onednn"), onednn_matmuls(CPU, torch.bfloat16):
        a @ b  # nor in float32
    assert routed == []


@needs_onednn
def test_the_mode_is_local_to_its_thread(routed) -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with matmul_backend("onednn"), onednn_matmuls(CPU):
        worker = threading.Thread(target=lambda: a @ b)
        worker.start()
        worker.join()
        assert routed == []
        a @ b
    assert len(routed) == 1


def test_a_product_onednn_refuses_is_left_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(_onednn, "_linear", refusing)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with matmul_backend("onednn"), onednn_matmuls(CPU):
        product = a @ b
    torch.testing.assert_close(product, a @ b, rtol=0, atol=0)


def test_onednn_is_refused_when_it_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    def lossy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return (x.bfloat16() @ weight.bfloat16().t()).float()  # what a bfloat16 float32 mode would give

    monkeypatch.setattr(_onednn, "_linear", lossy)
    onednn_pays.cache_clear()
    try:
        assert onednn_pays() is False
    finally:
        onednn_pays.cache_clear()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown matmul backend 'mkl'"), matmul_backend("mkl"):
        pass


@pytest.mark.parametrize("backend", ["onednn", "torch"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saliency_equals_the_loop_with_either_backend(backend: str, family: str, routed) -> None:
    if backend == "onednn" and not HAS_ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN inner product")
    lm = tiny(family)
    out = lm.generate(PROMPT, generate=3)
    positions = range(out.n_input, len(out.tokens))
    with matmul_backend(backend):
        result = out.saliency("grad_x_input")
    assert bool(routed) == (backend == "onednn")
    assert_equal_to_loop(result, loop_gradients(lm, out.token_ids, positions), "grad_x_input")
    np.testing.assert_array_equal(result.positions, list(positions))
