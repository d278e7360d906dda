"""Linear probes and control tasks (Hewitt & Liang 2019, "Designing and Interpreting Probes with Control Tasks").

A *probe* is a linear classifier ``p(y | x) = softmax(W x + b)`` trained on frozen representations ``x``
(one per word) to predict a label ``y`` (part of speech). High accuracy alone does not show that the
representation encodes the property: a probe can memorize. A *control task* keeps the inputs and the
label space but gives every word **type** one random label ``C(v)``, drawn once from the empirical
label distribution, so it can only be solved by memorizing types. **Selectivity** = task accuracy −
control accuracy: high when the representation, not the probe, carries the property.

Training follows the Ecco paper's case study (Alammar 2021): a linear layer trained with Adam for 50 epochs
at learning rates 0.1, 0.001 and 1e-5, keeping the (learning rate, epoch) with the best accuracy on a dev
split, and reporting test accuracy there. Features are standardized with the training split's mean and
standard deviation (an invertible affine map, so the probe family stays "all linear maps"; it only
conditions the optimization, as raw residual streams hold a few very large coordinates).

All probes over one input (the task and its control, at every learning rate) train side by side as one wide
linear layer: each probe's columns get exactly its own cross-entropy gradient, and Adam is elementwise (with a
per-column learning rate), so this equals training them one by one on the same minibatches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from lmscope.errors import LmscopeError

__all__ = ["LEARNING_RATES", "ProbeFit", "control_labels", "fit_blocks", "train_probes"]

LEARNING_RATES = (0.1, 1e-3, 1e-5)


def control_labels(types: Sequence[str], labels: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Control-task labels ``[word]``: one random label per word type, from the empirical label distribution.

    Hewitt & Liang (2019), Section 2: ``C(v) ~ p(y)`` independently for each type ``v``, fixed for all of
    its tokens, where ``p(y)`` is the frequency of ``y`` among ``labels`` (the task's labels per word).
    """
    labels = np.asarray(labels)
    if len(types) != len(labels):
        raise LmscopeError(f"{len(types)} word types for {len(labels)} labels: give one type per labelled word")
    vocabulary, index = np.unique(np.asarray(types, dtype=object).astype(str), return_inverse=True)
    distribution = np.bincount(labels, minlength=n_classes) / len(labels)  # p(y)
    rng = np.random.default_rng(seed)
    per_type = rng.choice(n_classes, size=len(vocabulary), p=distribution)  # [type]
    return per_type[index]  # [word]


@dataclass(frozen=True)
class ProbeFit:
    """Accuracies of probes trained on one set of inputs, one entry per label set (task, control, ...)."""

    test_accuracy: np.ndarray  # [label_set]
    dev_accuracy: np.ndarray  # [label_set]
    learning_rate: np.ndarray  # [label_set] the learning rate chosen on the dev split
    epoch: np.ndarray  # [label_set] the epoch chosen on the dev split (1-based)


def _standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean = train.mean(0)
    std = train.std(0).clamp_min(1e-6)  # dead units (all zero) stay zero
    return [(x - mean) / std for x in (train, *others)]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Small matmuls run fastest on one thread (more threads spin-wait on a busy machine); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def train_probes(
    train_x: np.ndarray,  # [word, features]
    train_y: np.ndarray,  # [label_set, word]
    dev_x: np.ndarray,
    dev_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    n_classes: int,
    *,
    epochs: int = 50,
    learning_rates: Sequence[float] = LEARNING_RATES,
    batch_size: int = 64,
    seed: int = 0,
) -> ProbeFit:
    """Train one linear probe per label set (rows of ``*_y``) on the same inputs; test accuracy at the best dev
    (learning rate, epoch).

    Minibatch softmax regression with Adam (Kingma & Ba 2015; beta 0.9/0.999, eps 1e-8), written out: for a
    batch ``X [batch, d]`` the mean cross-entropy's gradient is ``Xᵀ (softmax(X W + b) − onehot(y)) / batch``.
    """
    if len(train_x) == 0 or len(dev_x) == 0 or len(test_x) == 0:
        raise LmscopeError("a probe needs training, dev and test words: give more tokens")
    if epochs < 1 or not learning_rates:
        raise LmscopeError("a probe needs at least one epoch and one learning rate")
    with _one_thread():
        return _train(
            *(torch.as_tensor(x, dtype=torch.float32) for x in (train_x, dev_x, test_x)),
            *(torch.as_tensor(np.atleast_2d(y), dtype=torch.long) for y in (train_y, dev_y, test_y)),
            n_classes,
            epochs,
            tuple(learning_rates),
            batch_size,
            seed,
        )


def _train(x_train, x_dev, x_test, y_train, y_dev, y_test, n_classes, epochs, rates, batch_size, seed) -> ProbeFit:
    """``train_probes`` on tensors: x ``[word, features]``, y ``[label_set, word]``."""
    x_train, x_dev, x_test = _standardize(x_train, x_dev, x_test)
    return fit_blocks(
        lambda generator: [(x_train, y_train)],
        lambda: [(x_dev, y_dev)],
        lambda: [(x_test, y_test)],
        x_train.shape[1],
        y_train.shape[0],
        n_classes,
        epochs,
        rates,
        batch_size,
        seed,
    )


def fit_blocks(train, dev, test, d, n_sets, n_classes, epochs, rates, batch_size, seed) -> ProbeFit:
    """Probes trained on blocks of words. ``train(generator)`` gives one epoch's training blocks
    ``(x [word, d] standardized float32, y [label_set, word])`` (a source of several blocks shuffles
    their order with ``generator``); ``dev()`` and ``test()`` give their splits' blocks.

    Each epoch visits each block's words in a random order, in minibatches of ``batch_size`` (the last
    of a block may be smaller). With one block this is exactly the in-memory training of
    :func:`train_probes`; :mod:`lmscope.probing._stream` reads the blocks shard by shard, so one block
    is in memory at a time.
    """
    generator = torch.Generator().manual_seed(seed)  # minibatch order
    n_rates = len(rates)
    shape = (n_rates, n_sets, n_classes)  # one probe per (learning rate, label set), side by side
    width = n_rates * n_sets * n_classes

    # uniform ±1/√d like torch.nn.Linear; drawn label set by label set, so a probe's start does not depend on
    # which other probes train beside it
    init = (torch.rand(n_sets, n_rates, d, n_classes, generator=torch.Generator().manual_seed(seed)) * 2 - 1) / d**0.5
    weight = init.permute(2, 1, 0, 3).reshape(d, width).contiguous()  # [d, rate·set·class]
    bias = torch.zeros(width)
    lr = torch.tensor(rates, dtype=torch.float32).repeat_interleave(n_sets * n_classes)  # [rate·set·class]

    moments = [torch.zeros_like(weight), torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros_like(bias)]
    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def accuracy(blocks) -> torch.Tensor:  # [rate, set]
        correct, total = torch.zeros(n_rates, n_sets), 0
        for x, y in blocks():
            predicted = (x @ weight + bias).view(len(x), *shape).argmax(-1)  # [word, rate, set]
            correct += (predicted == y.T[:, None, :]).float().sum(0)
            total += len(x)
        return correct / total

    best_dev = torch.full((n_rates, n_sets), -1.0)
    best_test = torch.zeros(n_rates, n_sets)
    best_epoch = torch.zeros(n_rates, n_sets, dtype=torch.long)
    step = 0
    for epoch in range(1, epochs + 1):
        for x_train, y_train in train(generator):
            # one-hot targets of every probe: [word, rate·set·class]
            onehot = torch.nn.functional.one_hot(y_train.T, n_classes).float()  # [word, set, class]
            onehot = onehot[:, None].expand(-1, n_rates, -1, -1).reshape(len(x_train), width)
            order = torch.randperm(len(x_train), generator=generator)
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                xb = x_train[batch]  # [batch, d]
                probs = torch.softmax((xb @ weight + bias).view(len(batch), -1, n_classes), -1)  # [batch, probe, class]
                error = (probs.view(len(batch), width) - onehot[batch]) / len(batch)  # d loss / d logits
                step += 1
                # bias corrections folded into the step size and epsilon (the same update as m̂ / (√v̂ + eps))
                correction1, correction2 = 1 - beta1**step, (1 - beta2**step) ** 0.5
                for param, grad, m, v in ((weight, xb.T @ error, *moments[:2]), (bias, error.sum(0), *moments[2:])):
                    m.lerp_(grad, 1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denominator = v.sqrt().add_(eps * correction2)
                    param.addcdiv_(m * (lr * (correction2 / correction1)), denominator, value=-1)
        dev_accuracy, test_accuracy = accuracy(dev), accuracy(test)
        better = dev_accuracy > best_dev
        best_dev = torch.where(better, dev_accuracy, best_dev)
        best_test = torch.where(better, test_accuracy, best_test)
        best_epoch = torch.where(better, epoch, best_epoch)
    chosen = best_dev.argmax(0)  # [set] the learning rate with the best dev accuracy
    sets = torch.arange(n_sets)
    return ProbeFit(
        test_accuracy=best_test[chosen, sets].numpy(),
        dev_accuracy=best_dev[chosen, sets].numpy(),
        learning_rate=np.asarray(rates, dtype=np.float64)[chosen.numpy()],
        epoch=best_epoch[chosen, sets].numpy(),
    )
