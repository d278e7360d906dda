"""CoNLL-U sentences with their surface text rebuilt, so every word has a character span.

A CoNLL-U sentence (Universal Dependencies) lists *syntactic words*, one per line:
``ID FORM LEMMA UPOS XPOS FEATS HEAD DEPREL DEPS MISC``. Two kinds of line are not ordinary words:

- a *multi-word token* range ``3-4  don't`` gives the surface form of the words 3 and 4
  (``do`` + ``n't``); its MISC column carries ``SpaceAfter=No`` for the whole token;
- an *empty node* ``5.1`` (enhanced dependencies only) has no surface form at all.

The text a model reads is rebuilt from surface tokens (multi-word tokens and plain words), each
followed by a space unless its MISC says ``SpaceAfter=No``. Each syntactic word gets the character
span of its part of the surface token: inside a multi-word token whose word forms concatenate to the
surface form (``do`` + ``n't`` = ``don't``, true of every token in English EWT) each word gets its own
slice; otherwise (French ``du`` = ``de`` + ``le``) every word gets the whole token.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmscope.errors import LmscopeError

__all__ = ["TASKS", "Sentence", "load_ud", "parse_conllu", "read_conllu", "ud_dir", "ud_file"]

# task name -> CoNLL-U column holding its label
TASKS: dict[str, int] = {"upos": 3, "xpos": 4, "deprel": 7}

UD_FILES = ("en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu")
# UD English EWT (CC BY-SA 4.0) as it ships inside lmscope: gzip-compressed, with its license and attribution
PACKAGED_UD = Path(__file__).resolve().parent / "data" / "ud-english-ewt"


@dataclass(frozen=True)
class Sentence:
    """One CoNLL-U sentence: its syntactic words, their labels, and where each word sits in ``text``."""

    sent_id: str
    words: tuple[str, ...]  # FORM of each syntactic word
    labels: dict[str, tuple[str, ...]]  # task ("upos", "xpos", "deprel") -> one label per word
    text: str  # the surface text rebuilt from the tokens and SpaceAfter=No
    spans: tuple[tuple[int, int], ...]  # [word] -> (start, end) character offsets into text

    def __len__(self) -> int:
        return len(self.words)


def _space_after(misc: str) -> bool:
    return "SpaceAfter=No" not in misc.split("|")


def _sentence(sent_id: str, rows: list[list[str]], where: str) -> Sentence:
    words: list[str] = []
    labels: dict[str, list[str]] = {task: [] for task in TASKS}
    spans: list[tuple[int, int]] = []
    text = ""
    pending: list[str] = []  # forms of the words inside the current multi-word token
    token_start = token_end = 0
    for row in rows:
        if len(row) != 10:
            raise LmscopeError(f"{where}: a CoNLL-U line must have 10 tab-separated columns, not {len(row)}")
        ident = row[0]
        if "." in ident:  # empty node: no surface form, not a word
            continue
        if "-" in ident:  # multi-word token: its surface form goes into the text
            first, last = (int(part) for part in ident.split("-"))
            token_start, token_end = len(text), len(text) + len(row[1])
            text += row[1] + (" " if _space_after(row[9]) else "")
            pending = [""] * (last - first + 1)
            continue
        words.append(row[1])
        for task, column in TASKS.items():
            labels[task].append(row[column])
        if pending:  # a word inside the current multi-word token
            pending[pending.index("")] = row[1] or "_"
            if "" not in pending:
                spans.extend(_split(pending, text[token_start:token_end], token_start))
                pending = []
            continue
        spans.append((len(text), len(text) + len(row[1])))
        text += row[1] + (" " if _space_after(row[9]) else "")
    if pending:
        raise LmscopeError(f"{where}: sentence {sent_id!r} ends inside a multi-word token")
    return Sentence(
        sent_id=sent_id,
        words=tuple(words),
        labels={task: tuple(values) for task, values in labels.items()},
        text=text.rstrip(" "),
        spans=tuple(spans),
    )


def _split(forms: Sequence[str], surface: str, start: int) -> list[tuple[int, int]]:
    """Character spans of the words of one multi-word token whose surface text starts at ``start``."""
    if "".join(forms).lower() != surface.lower():
        return [(start, start + len(surface))] * len(forms)  # no way to split: each word gets it all
    spans, position = [], start
    for form in forms:
        spans.append((position, position + len(form)))
        position += len(form)
    return spans


def parse_conllu(text: str, where: str = "<text>") -> list[Sentence]:
    """Every sentence in CoNLL-U ``text`` (``where`` names the source in error messages)."""
    sentences: list[Sentence] = []
    rows: list[list[str]] = []
    sent_id = ""
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if rows:
                sentences.append(_sentence(sent_id or str(len(sentences)), rows, where))
            rows, sent_id = [], ""
        elif line.startswith("#"):
            key, _, value = line[1:].partition("=")
            if key.strip() == "sent_id":
                sent_id = value.strip()
        else:
            rows.append(line.split("\t"))
    return sentences


def read_text(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of a file, decompressed if its name ends in ``.gz``."""
    path = Path(path)
    if path.name.endswith(".gz"):
        with gzip.open(path, "rt", encoding="utf-8") as file:
            return file.read()
    return path.read_text(encoding="utf-8")


def read_conllu(path: str | os.PathLike[str]) -> list[Sentence]:
    """Every sentence of a CoNLL-U file (``.conllu``, or gzip-compressed ``.conllu.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise LmscopeError(f"{path} not found: give the path of a CoNLL-U file")
    return parse_conllu(read_text(path), str(path))


def _find(folder: Path, name: str) -> Path | None:
    """``folder/name``, or its gzip-compressed twin ``folder/name.gz``."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def ud_dir(data: str | os.PathLike[str] | None = None) -> Path:
    """The UD English EWT folder: ``data`` if given, else the copy that ships inside lmscope."""
    folder = PACKAGED_UD if data is None else Path(data)
    if _find(folder, UD_FILES[0]) is None:
        raise LmscopeError(
            f"UD English EWT not found ({UD_FILES[0]} or {UD_FILES[0]}.gz is not in {folder}): "
            "pass the folder that holds it as data= (--data on the command line)"
        )
    return folder


def ud_file(split: str = "dev", data: str | os.PathLike[str] | None = None) -> Path:
    """The CoNLL-U file of one UD English EWT split (``"dev"`` or ``"test"``), by default the packaged one."""
    names = {name.split("-")[-1].split(".")[0]: name for name in UD_FILES}
    if split not in names:
        raise LmscopeError(f"UD English EWT has the splits {sorted(names)}, not {split!r}")
    path = _find(ud_dir(data), names[split])
    if path is None:
        raise LmscopeError(f"{names[split]} is not in {ud_dir(data)}")
    return path


def load_ud(tokens: int = 10_000, data: str | os.PathLike[str] | None = None) -> list[Sentence]:
    """Whole sentences of UD English EWT (dev, then test), in file order, until they hold ``tokens`` words."""
    if tokens < 1:
        raise LmscopeError(f"tokens must be at least 1, not {tokens}")
    folder = ud_dir(data)
    chosen: list[Sentence] = []
    count = 0
    for name in UD_FILES:
        path = _find(folder, name)
        if path is None:
            continue
        for sentence in read_conllu(path):
            chosen.append(sentence)
            count += len(sentence)
            if count >= tokens:
                return chosen
    raise LmscopeError(f"{folder} holds only {count} words, fewer than the {tokens} asked for: ask for fewer")
