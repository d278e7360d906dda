"""oneDNN float32 products for gradient passes: routed only where eligible and chosen, equal to
PyTorch's to float32 precision, local to the thread, decided from a trial of the workload itself,
and saliency equal to the loop under every routing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from conftest import tiny
from lmscope.analysis import _onednn
from lmscope.analysis._onednn import choices, forget_choices, matmul_backend, onednn_matmuls, routed
from test_saliency import PROMPT, assert_equal_to_loop, loop_gradients

CPU = torch.device("cpu")
HAS_ONEDNN = _onednn.available()
needs_onednn = pytest.mark.skipif(not HAS_ONEDNN, reason="this PyTorch build has no oneDNN inner product")


@pytest.fixture
def to_onednn(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of the products that went to oneDNN; every decision is forgotten before and after."""
    calls: list[tuple[int, ...]] = []
    linear = _onednn._linear

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append((*x.shape, weight.shape[0]))
        return linear(x, weight, bias)

    monkeypatch.setattr(_onednn, "_linear", counting)
    forget_choices()
    yield calls
    forget_choices()


@needs_onednn
def test_products_go_to_onednn_and_agree(to_onednn) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(5, generator=g)
    x.requires_grad_(True)
    plain = torch.nn.functional.linear(x, w, b)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    with onednn_matmuls():
        fast = torch.nn.functional.linear(x, w, b)  # addmm [7, 16] @ [16, 5]
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)  # mm [7, 5] @ [5, 16]
        product = x.detach() @ w.t()  # mm
    assert to_onednn == [(7, 16, 5), (7, 5, 16), (7, 16, 5)]
    torch.testing.assert_close(fast, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(product, x.detach() @ w.t(), rtol=1e-6, atol=1e-6)


@needs_onednn
def test_other_products_are_left_to_torch(to_onednn) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(8, 4, generator=g)
    with onednn_matmuls():
        a.double() @ b.double()  # float64
        a.t().contiguous().t() @ b  # a column-major left operand
        torch.randn(3, 6, 8) @ torch.randn(3, 8, 4)  # bmm
        torch.addmm(torch.zeros(4), a, b, beta=0.5)  # scaled bias
        a.half() @ b.half()
    assert to_onednn == []
    product = lambda: a @ b  # noqa: E731
    with matmul_backend("torch"):
        routed(product, "test", CPU)
    with matmul_backend("onednn"):
        routed(product, "test", torch.device("meta"))  # the model is not on the CPU
        routed(product, "test", CPU, torch.bfloat16)  # nor in float32
    assert to_onednn == [] and choices() == {}


@needs_onednn
def test_the_mode_is_local_to_its_thread(to_onednn) -> None:
    a, b = torch.randn(4, 8), torch.randn(8, 4)
    with onednn_matmuls():
        worker = threading.Thread(target=lambda: a @ b)
        worker.start()
        worker.join()
        assert to_onednn == []
        a @ b
    assert len(to_onednn) == 1


def mm_kernel() -> str:
    """Where the CPU kernel of ``aten::mm`` now in force was registered."""
    return next(line for line in torch._C._dispatch_dump_table("aten::mm").splitlines() if line.startswith("CPU:"))


def drop_kept_kernels() -> None:
    """Remove kernels that an app made earlier in this process keeps (``keep_kernels``)."""
    with _onednn._kernels_lock:
        if _onednn._open_scopes == 0 and _onednn._kernels:
            _onednn._kernels.pop()._destroy()


@needs_onednn
def test_kernels_are_registered_only_while_a_scope_is_open(to_onednn, monkeypatch) -> None:
    monkeypatch.setattr(_onednn, "_keep", False)  # an app created earlier in this process keeps them
    drop_kept_kernels()
    pytorch_kernel = mm_kernel()
    assert "_onednn.py" not in pytorch_kernel
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(8, 16, generator=g), torch.randn(16, 5, generator=g)
    expected = a @ b
    with onednn_matmuls():
        assert "_onednn.py" in mm_kernel()
        with onednn_matmuls():
            pass
        assert "_onednn.py" in mm_kernel()  # the outer scope is still open
        other = []  # another thread's products are PyTorch's own, bit for bit
        thread = threading.Thread(target=lambda: other.append(a @ b))
        thread.start()
        thread.join()
        assert torch.equal(other[0], expected) and not to_onednn
    assert mm_kernel() == pytorch_kernel
    with pytest.raises(ValueError, match="inside"), onednn_matmuls():
        raise ValueError("inside")
    assert mm_kernel() == pytorch_kernel


@needs_onednn
def test_kept_kernels_stay_and_route_only_inside_a_scope(to_onednn, monkeypatch) -> None:
    """The app's choice (model workers are threads): registered once, never removed."""
    monkeypatch.setattr(_onednn, "_keep", False)
    drop_kept_kernels()
    _onednn.keep_kernels()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(8, 16, generator=g), torch.randn(16, 5, generator=g)
    expected = a @ b
    try:
        with onednn_matmuls():
            a @ b
        assert "_onednn.py" in mm_kernel() and len(to_onednn) == 1
        assert torch.equal(a @ b, expected) and len(to_onednn) == 1
    finally:
        drop_kept_kernels()
    assert "_onednn.py" not in mm_kernel()


@needs_onednn
def test_products_multiply_only_the_rows_that_can_be_nonzero(to_onednn) -> None:
    keep = torch.tensor([True, True, False, True, False, False, True, True])
    rows = _onednn.ZeroRows.of(keep)
    assert rows.runs == (2, 1, 1, 2, 2) and rows.total == 8
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 16, generator=g) * keep[:, None], torch.randn(16, 5, generator=g)
    with onednn_matmuls(rows):
        pruned = a @ b
        other = a[:6] @ b  # another number of rows: in full
    torch.testing.assert_close(other, a[:6] @ b, rtol=1e-6, atol=1e-6)
    assert to_onednn == [(5, 16, 5), (6, 16, 5)]
    torch.testing.assert_close(pruned, a @ b, rtol=1e-6, atol=1e-6)
    assert not pruned[~keep].any()
    a[2, 0] = 1.0  # a row said to be zero is not: the product is done in full
    with onednn_matmuls(rows):
        full = a @ b
    assert to_onednn[-1] == (8, 16, 5)
    torch.testing.assert_close(full, a @ b, rtol=1e-6, atol=1e-6)
    assert _onednn.ZeroRows.of(torch.ones(4, dtype=torch.bool)) is None


def test_zero_rows_of_a_batched_backward_are_the_positions_after_each_target() -> None:
    from lmscope.analysis._gradients import _zero_rows

    rows = _zero_rows(torch.tensor([2, 4]), batch=2, length=4)  # rows: target, sequence, position
    keep = torch.zeros(16, dtype=torch.bool)
    keep[rows.keep] = True
    expected = [s < t for t in (2, 4) for _ in range(2) for s in range(4)]
    assert keep.tolist() == expected and sorted([*rows.keep.tolist(), *rows.drop.tolist()]) == list(range(16))
    assert _zero_rows(torch.tensor([3, 3]), batch=1, length=3) is None


def test_a_product_onednn_refuses_is_left_to_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    def refusing(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(_onednn, "_linear", refusing)
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with onednn_matmuls():
        product = a @ b
    torch.testing.assert_close(product, a @ b, rtol=0, atol=0)


def timed_linear(monkeypatch: pytest.MonkeyPatch, delay: float, lossy: bool = False) -> list[bool]:
    """Make oneDNN's products take ``delay`` s (or round to bfloat16); the list records each routed product."""
    seen: list[bool] = []

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append(True)
        time.sleep(delay)
        if lossy:  # what a bfloat16 "float32" mode would give
            return (x.bfloat16() @ weight.bfloat16().t()).float()
        return x @ weight.t()

    monkeypatch.setattr(_onednn, "_linear", linear)
    forget_choices()
    return seen


def workload(seen: list[bool], plain_delay: float):
    """A pass of one product, which takes ``plain_delay`` s more when not routed to oneDNN."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(16, 32, generator=g), torch.randn(32, 8, generator=g)

    def run() -> torch.Tensor:
        count = len(seen)
        product = a @ b
        if len(seen) == count:
            time.sleep(plain_delay)
        return product

    return run


@needs_onednn
def test_auto_keeps_pytorch_where_onednn_is_slower_on_the_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = timed_linear(monkeypatch, delay=0.05)
    run = workload(seen, plain_delay=0.0)
    try:
        first = routed(run, "slow", CPU)  # a trial: oneDNN untimed, PyTorch timed, oneDNN timed
        assert len(seen) == 2
        choice = choices()["slow"]
        assert not choice.onednn and choice.agree and choice.onednn_seconds > choice.torch_seconds
        assert "PyTorch's products (trial pass: oneDNN" in str(choice)
        again = routed(run, "slow", CPU)  # decided: runs once, PyTorch's way
        assert len(seen) == 2
        torch.testing.assert_close(first, again, rtol=0, atol=0)
    finally:
        forget_choices()


@needs_onednn
def test_auto_routes_where_onednn_is_faster_on_the_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = timed_linear(monkeypatch, delay=0.0)
    run = workload(seen, plain_delay=0.05)
    try:
        routed(run, ("fast", 256), CPU)
        assert choices()[("fast", 256)].onednn and len(seen) == 2
        routed(run, ("fast", 256), CPU)
        assert len(seen) == 3  # decided: runs once, through oneDNN
        routed(run, ("fast", 512), CPU)  # another class of workload is tried afresh
        assert len(choices()) == 2 and len(seen) == 5
        forget_choices()
        assert choices() == {}
    finally:
        forget_choices()


@needs_onednn
def test_auto_refuses_onednn_when_it_disagrees_however_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = timed_linear(monkeypatch, delay=0.0, lossy=True)
    run = workload(seen, plain_delay=0.05)
    try:
        result = routed(run, "lossy", CPU)
        choice = choices()["lossy"]
        assert not choice.onednn and not choice.agree and "results disagreed" in str(choice)
        torch.testing.assert_close(result, run(), rtol=0, atol=0)  # PyTorch's result is returned
    finally:
        forget_choices()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown matmul backend 'mkl'"), matmul_backend("mkl"):
        pass


@pytest.mark.parametrize("backend", ["auto", "onednn", "torch"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saliency_equals_the_loop_under_every_routing(backend: str, family: str, to_onednn) -> None:
    if backend != "torch" and not HAS_ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN inner product")
    lm = tiny(family)
    out = lm.generate(PROMPT, generate=3)
    positions = range(out.n_input, len(out.tokens))
    loop = loop_gradients(lm, out.token_ids, positions)
    with matmul_backend(backend):
        for _ in range(2):  # under "auto": the trial, then the decided pass
            result = out.saliency("grad_x_input")
            assert_equal_to_loop(result, loop, "grad_x_input")
    np.testing.assert_array_equal(result.positions, list(positions))
    # routed: the pass's forward (a row per position; per target at the head) and its batched backward,
    # whose products multiply only the rows that can be nonzero (target t's positions s < t)
    assert bool(to_onednn) == (backend != "torch")
    backward = {shape[0] for shape in to_onednn} - {max(positions), len(positions)}
    assert backward == ({sum(positions)} if backend != "torch" else set())


@pytest.mark.parametrize("backend", ["auto", "onednn"])
def test_integrated_gradients_agree_under_every_routing(backend: str, to_onednn) -> None:
    if not HAS_ONEDNN:
        pytest.skip("this PyTorch build has no oneDNN inner product")
    out = tiny("llama").generate(PROMPT, generate=2)
    with matmul_backend("torch"):
        plain = out.saliency("ig", steps=6)
    with matmul_backend(backend):
        routed_ig = out.saliency("ig", steps=6)
    assert to_onednn
    for a, b in zip(routed_ig.attributions, plain.attributions, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
