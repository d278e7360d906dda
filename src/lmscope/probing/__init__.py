"""Probing classifiers with control tasks: what each layer's hidden states and FFN activations encode.

>>> import lmscope
>>> lm = lmscope.from_pretrained("minilm-l6")
>>> result = lmscope.probing.probe(lm, task="upos", tokens=10_000, seeds=5)   # doctest: +SKIP
>>> print(result)                     # layer × {hidden, FFN} accuracy, control accuracy, selectivity
>>> result.plot("probing.png")        # accuracy and selectivity by layer

The pieces work on their own: :func:`read_conllu` / :func:`load_ud` read Universal Dependencies sentences
with their surface text, :func:`align` maps words to subword tokens, :class:`ProbingDataset` labels and
aligns words and pools their activations from a :func:`lmscope.collect` collection, :func:`control_labels`
draws a control task (Hewitt & Liang 2019) and :func:`train_probes` trains linear probes.
:func:`probe_collection` runs the study on a collection on disk of any size, reading it shard by shard.
"""

from lmscope.probing._align import POOLING, Alignment, align, pool
from lmscope.probing._conllu import TASKS, Sentence, load_ud, parse_conllu, read_conllu, ud_dir, ud_file
from lmscope.probing._dataset import ProbingDataset, Split
from lmscope.probing._probe import LEARNING_RATES, ProbeFit, control_labels, train_probes
from lmscope.probing._stream import probe_collection, train_probes_streaming
from lmscope.probing._study import SITES, ProbeRow, ProbingResult, probe

__all__ = [
    "LEARNING_RATES",
    "POOLING",
    "SITES",
    "TASKS",
    "Alignment",
    "ProbeFit",
    "ProbeRow",
    "ProbingDataset",
    "ProbingResult",
    "Sentence",
    "Split",
    "align",
    "control_labels",
    "load_ud",
    "parse_conllu",
    "pool",
    "probe",
    "probe_collection",
    "read_conllu",
    "train_probes",
    "train_probes_streaming",
    "ud_dir",
    "ud_file",
]
