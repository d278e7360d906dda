"""The probing study: linear probes with control tasks on every layer's hidden states and FFN activations.

The Ecco paper's case study (Alammar 2021, Section 5) probes BERT for part of speech on Universal Dependencies
English EWT, at every layer, on the hidden states (the residual stream after each block) and on the FFN
activations (the MLP's hidden units), and reports selectivity against control tasks (Hewitt & Liang 2019).
:func:`probe` runs that study on any model lmscope loads: for each (site, layer) and each seed it draws a
split by sentence, gives every word type a control label, trains the task and control probes, and reports
mean ± standard deviation over seeds.

Sites: ``embeddings`` (the input of the first block, ``resid_pre`` of layer 0), ``resid_post`` (hidden
states after each block) and ``mlp_act`` (FFN activations: the input of each MLP's output projection).
Activations come from :func:`lmscope.collect`, a few layers at a time so memory stays bounded.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmscope.analysis._result import Result
from lmscope.analysis.collect import collect, collected_stack
from lmscope.capture import resolve_layers
from lmscope.errors import LmscopeError
from lmscope.probing._align import POOLING
from lmscope.probing._conllu import load_ud
from lmscope.probing._dataset import ProbingDataset
from lmscope.probing._probe import LEARNING_RATES, control_labels, train_probes

__all__ = ["SITES", "ProbeRow", "ProbingResult", "probe"]

SITES = ("embeddings", "resid_post", "mlp_act")


@dataclass(frozen=True)
class ProbeRow:
    """Probe accuracies for one (site, layer), mean and standard deviation over seeds (fractions in 0..1)."""

    site: str
    layer: int  # model layer; 0 for embeddings (the input of layer 0)
    accuracy: float
    accuracy_std: float
    control_accuracy: float
    control_accuracy_std: float
    selectivity: float  # accuracy − control accuracy
    selectivity_std: float
    accuracies: tuple[float, ...]  # [seed]
    control_accuracies: tuple[float, ...]  # [seed]


@dataclass(frozen=True)
class ProbingResult(Result):
    """A probing study: one row per (site, layer); ``str()`` prints the layer × site table."""

    _view = "lmscope.views.probing"

    model: str
    task: str
    pool: str
    label_names: tuple[str, ...]
    n_words: int
    n_sentences: int
    n_train: float  # words, mean over seeds (splits are by sentence)
    n_dev: float
    n_test: float
    seeds: tuple[int, ...]
    majority: float  # test accuracy of always answering the most frequent training label (mean over seeds)
    rows: tuple[ProbeRow, ...]
    seconds: float

    def row(self, site: str, layer: int = 0) -> ProbeRow:
        for row in self.rows:
            if row.site == site and row.layer == layer:
                return row
        raise LmscopeError(f"no probe for {site} at layer {layer} in this result")

    def plot(self, path: str | os.PathLike[str] | None = None) -> Any:
        """Accuracy, control accuracy and selectivity by layer (a matplotlib Figure; saved if ``path`` is given)."""
        return self._view_module().plot(self, path)


def _std(values: np.ndarray) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _row(site: str, layer: int, task: np.ndarray, control: np.ndarray) -> ProbeRow:
    selectivity = task - control
    return ProbeRow(
        site=site,
        layer=layer,
        accuracy=float(task.mean()),
        accuracy_std=_std(task),
        control_accuracy=float(control.mean()),
        control_accuracy_std=_std(control),
        selectivity=float(selectivity.mean()),
        selectivity_std=_std(selectivity),
        accuracies=tuple(float(a) for a in task),
        control_accuracies=tuple(float(a) for a in control),
    )


def _chunks(layers: Sequence[int], per_layer_bytes: float, memory_mb: float) -> list[tuple[int, ...]]:
    size = max(1, int(memory_mb * 2**20 // max(per_layer_bytes, 1)))
    return [tuple(layers[i : i + size]) for i in range(0, len(layers), size)]


def probe(
    lm: Any,
    dataset: ProbingDataset | None = None,
    *,
    task: str = "upos",
    sites: Iterable[str] | str = SITES,
    layers: Iterable[int] | int | slice | None = None,
    tokens: int = 10_000,
    data: str | os.PathLike[str] | None = None,
    seeds: int | Sequence[int] = 5,
    pool: str = "first",
    test_fraction: float = 0.33,
    dev_fraction: float = 0.1,
    epochs: int = 50,
    learning_rates: Sequence[float] = LEARNING_RATES,
    batch_size: int = 64,
    collect_batch_size: int = 16,
    memory_mb: float = 1024,
    progress: bool = False,
    stack: str | None = None,
) -> ProbingResult:
    """Probe ``lm`` for ``task`` at every chosen (site, layer), with control tasks, over several seeds.

    Args:
        lm: an :class:`lmscope.LM` with a fast tokenizer.
        dataset: words to probe; by default the first ``tokens`` words of UD English EWT (dev, then test)
            from ``data`` (default: the copy inside lmscope), labelled for ``task``.
        sites: any of ``embeddings``, ``resid_post`` (hidden states), ``mlp_act`` (FFN activations).
        layers: model layers for ``resid_post``/``mlp_act`` (default: all).
        seeds: how many seeds (0, 1, ...) or which; each seed draws its own split, control labels and probe init.
        pool: which subword stands for a word: ``first``, ``last`` or ``mean``.
        test_fraction: share of words (whole sentences) held out for testing (the paper's 67/33 split);
            ``dev_fraction`` of the remaining words pick the learning rate and epoch.
        epochs, learning_rates, batch_size: probe training (Adam; defaults follow the Ecco paper).
        memory_mb: bound on the activations held at once (layers are collected a few at a time).
        progress: show a progress bar over (site, layer) × seed on stderr.
        stack: for an encoder-decoder model, ``"encoder"`` (the default): the sentences are its
            sources and the encoder's layers are probed (the decoder would need targets).
    """
    started = time.perf_counter()
    chosen_sites = [sites] if isinstance(sites, str) else list(sites)
    unknown = [s for s in chosen_sites if s not in SITES]
    if unknown or not chosen_sites:
        raise LmscopeError(f"probing sites must be among {', '.join(SITES)}, not {', '.join(unknown) or 'none'}")
    if pool not in POOLING:
        raise LmscopeError(f"pooling must be one of {', '.join(POOLING)}, not {pool!r}")
    seed_list = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seed_list:
        raise LmscopeError("give at least one seed")
    if dataset is None:
        dataset = ProbingDataset.build(lm.tokenizer, load_ud(tokens, data), task)
    stack = collected_stack(getattr(lm, "loaded", lm), stack)
    arch = lm.arch.encoder if stack == "encoder" else lm.arch
    chosen_layers = resolve_layers(layers, arch.n_layers)
    layer_sites = [s for s in SITES[1:] if s in chosen_sites]
    configs = [("embeddings", 0)] if "embeddings" in chosen_sites else []
    configs += [(site, layer) for layer in chosen_layers for site in layer_sites]

    n_classes = len(dataset.label_names)
    splits = [dataset.split(seed, test_fraction, dev_fraction) for seed in seed_list]
    # [seed] label sets: row 0 the task, row 1 its control (one random label per word type)
    label_sets = [
        np.stack([dataset.labels, control_labels(dataset.types, dataset.labels, n_classes, s)]) for s in seed_list
    ]
    accuracies: dict[tuple[str, int], list[np.ndarray]] = {config: [] for config in configs}

    from tqdm.auto import tqdm

    bar = tqdm(total=len(configs) * len(seed_list), desc="probe", unit="probe", file=sys.stderr, disable=not progress)

    def fit(site: str, layer: int, x: np.ndarray) -> None:  # x [word, features]
        for seed, split, labels in zip(seed_list, splits, label_sets, strict=True):
            bar.set_postfix_str(f"{site} layer {layer} seed {seed}")
            result = train_probes(
                x[split.train],
                labels[:, split.train],
                x[split.dev],
                labels[:, split.dev],
                x[split.test],
                labels[:, split.test],
                n_classes,
                epochs=epochs,
                learning_rates=learning_rates,
                batch_size=batch_size,
                seed=seed,
            )
            accuracies[site, layer].append(result.test_accuracy)
            bar.update()

    try:
        texts = dataset.texts
        if "embeddings" in chosen_sites:
            bar.set_postfix_str("collecting embeddings")
            col = collect(lm, texts, sites=("resid_pre",), layers=[0], batch_size=collect_batch_size, progress=False,
                          stack=stack)  # fmt: skip
            dataset.check(col)
            fit("embeddings", 0, dataset.features(col, "resid_pre", 0, pool))
            del col
        n_tokens = sum(len(a.token_ids) for a in dataset.alignments)
        config = lm.model.config
        neurons = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * arch.d_model
        width = sum(neurons if site == "mlp_act" else arch.d_model for site in layer_sites)
        for chunk in _chunks(chosen_layers, n_tokens * width * 4, memory_mb) if layer_sites else []:
            bar.set_postfix_str(f"collecting layers {chunk[0]}-{chunk[-1]}")
            col = collect(lm, texts, sites=layer_sites, layers=chunk, batch_size=collect_batch_size, progress=False,
                          stack=stack)  # fmt: skip
            dataset.check(col)
            for layer in chunk:
                for site in layer_sites:
                    fit(site, layer, dataset.features(col, site, layer, pool))
            del col
    finally:
        bar.close()

    majority = [
        float(np.mean(dataset.labels[s.test] == np.bincount(dataset.labels[s.train], minlength=n_classes).argmax()))
        for s in splits
    ]
    rows = []
    for site, layer in configs:
        per_seed = np.stack(accuracies[site, layer])  # [seed, label_set]
        rows.append(_row(site, layer, per_seed[:, 0], per_seed[:, 1]))
    return ProbingResult(
        model=lm.name,
        task=dataset.task,
        pool=pool,
        label_names=dataset.label_names,
        n_words=len(dataset),
        n_sentences=len(dataset.sentences),
        n_train=float(np.mean([s.train.sum() for s in splits])),
        n_dev=float(np.mean([s.dev.sum() for s in splits])),
        n_test=float(np.mean([s.test.sum() for s in splits])),
        seeds=seed_list,
        majority=float(np.mean(majority)),
        rows=tuple(rows),
        seconds=time.perf_counter() - started,
    )
