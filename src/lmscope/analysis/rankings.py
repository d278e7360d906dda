"""Rankings: where a token stands in the logit lens after every layer.

Alammar (2021), "Finding the words to say: hidden state visualizations for language models"
(Ecco's ``rankings`` and ``rankings_watch``). For a residual state ``h_l`` after layer ``l`` at a
position, the logit lens gives ``z_l = W_U · final_norm(h_l)`` (see :mod:`lmscope.analysis.lens`),
and the rank of token ``t`` is

    rank_l(t) = 1 + #{v in vocab : z_l[v] > z_l[t]}        (rank 1 = the top prediction)

Ranks are counted, never sorted: one comparison pass over the vocabulary per (layer, pos) row,
instead of an ``O(vocab log vocab)`` sort. Rows are unembedded in chunks of about
``CHUNK_ELEMENTS`` logits, so ``[layer, pos, vocab]`` is never held at once (a 128-token input on a
30-layer, 49k-vocabulary model would be 755 MB of float32 logits). Chunks stay large because each
one reads all of ``W_U``: small chunks would make the unembedding memory-bound.

``rankings`` ranks each output token: in a causal LM the token at ``pos + 1`` among the
predictions at ``pos`` (the generated tokens after ``generate``, every next token after a plain
``trace``); in a masked LM the token at ``pos`` among the predictions at ``pos``.
``rankings_watch`` ranks chosen tokens among the predictions of one token, named as in Ecco
(``position=p``: the token at ``p``, predicted from the state at ``p − 1``; ``"next"``: the token
after the last one; see :mod:`lmscope.analysis._predicted`).

Watch words are words. A word typed without a leading space (``"are"``) is ranked as the word
appears mid-sentence, where the tokenizer spells it with its space (``" are"``), since that is
the candidate a prediction after a word ranks; the result notes the change, and a token id ranks
a token exactly. The word is taken as given when it already starts with whitespace, does not
start with a letter or digit, or when the tokenizer writes the space as a token of its own
(SmolLM2's digits: ``" 1"`` is ``" "``, ``"1"``). A word of several tokens is ranked by its
first token, with a note. The command line and the app pass words to this rule unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmscope.analysis._predicted import Position, prediction
from lmscope.analysis._result import Result
from lmscope.analysis.lens import RESIDUAL_SITES
from lmscope.capture import Trace
from lmscope.errors import LmscopeError
from lmscope.models import Unembed

__all__ = [
    "CHUNK_ELEMENTS",
    "Rankings",
    "RankingsWatch",
    "WatchToken",
    "rank_rows",
    "rankings",
    "rankings_watch",
    "watch_token",
]

CHUNK_ELEMENTS = 24 * 2**20  # logits per unembedding chunk: 96 MB of float32 (512 rows of a 49k vocabulary)
_COMPARE_ROWS = 16  # rows compared at once: a [16, vocab] boolean temporary fits in cache (5x faster than 512)


class _RankTable(Result):
    """What both rank results share: ``ranks [layer, column]`` and a static figure."""

    _view = "lmscope.views.rankings"

    def plot(self, **kwargs: Any) -> Any:
        """A matplotlib ``Figure`` of the heatmap (log colour scale), for ``savefig`` as PNG or SVG."""
        return self._view_module().plot(self, **kwargs)


@dataclass(frozen=True)
class Rankings(_RankTable):
    """The rank of every output token after every layer.

    ``columns[j]`` (id ``column_ids[j]``) is the token at sequence position ``targets[j]``, ranked
    among the lens predictions at position ``positions[j]``; ``ranks[i, j]`` is its rank after
    ``layers[i]`` (1 = top, ``vocab_size`` = bottom).
    """

    layers: tuple[int, ...]
    columns: tuple[str, ...]
    column_ids: np.ndarray  # [column]
    positions: tuple[int, ...]  # [column] where the prediction is read
    targets: tuple[int, ...]  # [column] where the ranked token sits
    ranks: np.ndarray  # [layer, column]
    input_tokens: tuple[str, ...]
    n_input: int
    vocab_size: int
    site: str
    norm: bool


@dataclass(frozen=True)
class RankingsWatch(_RankTable):
    """The rank of chosen tokens among the lens predictions of one token, after every layer.

    ``position`` is the explained token (Ecco's meaning; ``None``: the prediction after the last
    token), read from the residual state at ``state_position``. ``words`` are the words as asked;
    ``columns`` the tokens actually ranked (see the module docstring); ``notes`` say, one line
    each, which words were changed or split. ``ranks[i, j]`` is the rank of ``columns[j]`` after
    ``layers[i]``.
    """

    position: int | None
    state_position: int
    words: tuple[str, ...]
    layers: tuple[int, ...]
    columns: tuple[str, ...]
    column_ids: np.ndarray  # [column]
    ranks: np.ndarray  # [layer, column]
    input_tokens: tuple[str, ...]
    n_input: int
    vocab_size: int
    site: str
    norm: bool
    notes: tuple[str, ...] = ()


@torch.no_grad()
def rank_rows(
    hidden: torch.Tensor,  # [row, d_model]
    targets: torch.Tensor,  # [row, column]
    unembed: Unembed,
    vocab_size: int,
    norm: bool = True,
    chunk_elements: int | None = None,
) -> torch.Tensor:  # [row, column] int64
    """``1 + #{v : z[row, v] > z[row, targets[row, c]]}`` with ``z = unembed(hidden)``, chunked over rows."""
    step = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size)
    ranks = torch.empty(targets.shape, dtype=torch.long)
    for start in range(0, hidden.shape[0], step):
        logits = unembed(hidden[start : start + step], norm=norm)  # [row, vocab]
        index = targets[start : start + step].to(logits.device)  # [row, column]
        target = logits.gather(-1, index)  # [row, column]
        above = torch.empty(index.shape, dtype=torch.int32, device=logits.device)  # [row, column]
        for r in range(0, len(logits), _COMPARE_ROWS):  # small blocks: the boolean temporary stays in cache
            block, bar = logits[r : r + _COMPARE_ROWS], target[r : r + _COMPARE_ROWS]  # [block, vocab], [block, column]
            for c in range(index.shape[1]):
                above[r : r + _COMPARE_ROWS, c] = (block > bar[:, c, None]).sum(-1, dtype=torch.int32)
        ranks[start : start + step] = above.cpu().long() + 1
        del logits  # free this chunk before the next is allocated
    return ranks


def rankings(
    trace: Trace,
    unembed: Unembed,
    site: str = "resid_post",
    norm: bool = True,
    next_token: bool = True,
) -> Rankings:
    """Rank of each output token after every captured layer.

    Args:
        next_token: the model predicts the next token (causal LM). ``False`` for a masked LM,
            which predicts the token at the same position.
    """
    hidden = _residual(trace, site)  # [layer, pos, d_model]
    n = trace.n_pos
    if next_token:
        first = trace.n_input if trace.n_input < n else 1  # generated tokens, else every next one
        if first >= n:
            raise LmscopeError("rankings need at least two tokens: a single token has no next token to rank")
        targets = list(range(first, n))
        positions = [t - 1 for t in targets]
    else:
        targets = positions = list(range(n))
    ids = trace.token_ids[targets]  # [column]
    picked = hidden[:, positions]  # [layer, column, d_model]
    layers = picked.shape[0]
    flat_targets = ids.repeat(layers)[:, None]  # [layer·column, 1]
    ranks = rank_rows(picked.reshape(-1, picked.shape[-1]), flat_targets, unembed, trace.model.vocab_size, norm)
    return Rankings(
        layers=tuple(trace.layers),
        columns=tuple(trace.tokens[t] for t in targets),
        column_ids=ids.numpy(),
        positions=tuple(positions),
        targets=tuple(targets),
        ranks=ranks.reshape(layers, len(targets)).numpy(),
        input_tokens=trace.tokens,
        n_input=trace.n_input,
        vocab_size=trace.model.vocab_size,
        site=site,
        norm=norm,
    )


def rankings_watch(
    trace: Trace,
    unembed: Unembed,
    watch: Sequence[str | int],
    position: Position = -1,
    site: str = "resid_post",
    norm: bool = True,
    causal: bool = True,
) -> RankingsWatch:
    """Rank of each watched word (or token id) among the lens predictions of the token at ``position``, per layer.

    ``position`` names the explained token as in Ecco: ``p`` is read from the state at ``p − 1``;
    the default ``-1`` (Ecco's), ``"next"`` and ``len(tokens)`` rank candidates for the token
    after the last one. ``causal=False`` for a masked LM (the state at ``p`` itself).
    """
    hidden = _residual(trace, site)  # [layer, pos, d_model]
    explained = prediction(trace, position, causal)
    if isinstance(watch, (str, int)) or len(watch) == 0:
        raise LmscopeError('watch must be a non-empty list of words or token ids, e.g. watch=[" is", " are"]')
    chosen = []
    for word in watch:  # a loop, not a comprehension, so warnings point at the caller
        chosen.append(watch_token(unembed, word, trace.model.vocab_size))
    ids = [c.id for c in chosen]
    targets = torch.tensor(ids, dtype=torch.long)  # [column]
    picked = hidden[:, explained.state]  # [layer, d_model]
    targets = targets.expand(picked.shape[0], -1)  # [layer, column]
    ranks = rank_rows(picked, targets, unembed, trace.model.vocab_size, norm)  # [layer, column]
    return RankingsWatch(
        position=explained.token,
        state_position=explained.state,
        words=tuple(w if isinstance(w, str) else unembed.token_strings([w])[0] for w in watch),
        layers=tuple(trace.layers),
        columns=unembed.token_strings(ids),
        column_ids=np.array(ids, dtype=np.int64),
        ranks=ranks.numpy(),
        input_tokens=trace.tokens,
        n_input=trace.n_input,
        vocab_size=trace.model.vocab_size,
        site=site,
        norm=norm,
        notes=tuple(c.note for c in chosen if c.note),
    )


@dataclass(frozen=True)
class WatchToken:
    """The token ranked for one watched word, and a one-line note when it is not the word as typed."""

    id: int
    note: str = ""


def watch_token(unembed: Unembed, word: str | int, vocab_size: int) -> WatchToken:
    """The token to rank for one watched word (the rule is in the module docstring).

    A word of several tokens also warns (``UserWarning``), as its first token stands for it.
    """
    if isinstance(word, (int, np.integer)) and not isinstance(word, bool):
        if not 0 <= int(word) < vocab_size:
            raise LmscopeError(f"watched token id {word} is outside the vocabulary (0..{vocab_size - 1})")
        return WatchToken(int(word))
    if not isinstance(word, str):
        raise LmscopeError(f"watch words must be strings or token ids, not {type(word).__name__}")
    tokenizer = unembed.tokenizer
    if tokenizer is None:
        raise LmscopeError("this model has no tokenizer to encode watch words: pass token ids instead")
    ids = _encode(tokenizer, word)
    as_typed, notes = ids, []
    if word[:1].isalnum():
        spaced = _encode(tokenizer, " " + word)
        if spaced and spaced != ids and unembed.token_strings(spaced[:1])[0].strip():
            ids = spaced
            notes.append(
                f"{word!r} is ranked as the word mid-sentence, {' ' + word!r}"
                + (f" (token id {as_typed[0]} ranks {word!r} itself)" if len(as_typed) == 1 else "")
            )
    unk = tokenizer.unk_token_id
    if not ids or (unk is not None and unk in ids):
        raise LmscopeError(
            f"the tokenizer cannot encode the watch word {word!r}: pick a word from the model's vocabulary"
        )
    if len(ids) > 1:
        split = ", ".join(repr(t) for t in unembed.token_strings(ids))
        first = unembed.token_strings(ids[:1])[0]
        ranked = word if ids is as_typed else " " + word
        message = f"{ranked!r} is {len(ids)} tokens ({split}): ranking its first token {first!r}"
        notes.append(message)
        warnings.warn(f"watch word {message}", UserWarning, stacklevel=4)
    return WatchToken(ids[0], "; ".join(notes))


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _residual(trace: Trace, site: str) -> torch.Tensor:
    if site not in RESIDUAL_SITES:
        raise LmscopeError(f"rankings read residual states: site must be one of {', '.join(RESIDUAL_SITES)}")
    return trace.get(site)
