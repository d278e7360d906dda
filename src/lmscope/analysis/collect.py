"""Corpus collection: per-token activations of many texts, batched, streamed to disk, read back lazily.

API (stable; the probing and NMF analyses build on it)::

    col = lmscope.collect(lm, texts, sites=("resid_post",), layers=None, batch_size=16,
                          out_dir=None, progress=True)          # -> Collection
    col = lmscope.collect(lm, sources, targets=targets)         # encoder-decoder: the decoder's states
    col = lmscope.load_collection(out_dir)                      # the same Collection, read lazily

    col.texts        tuple of the input strings, in order
    col.tokens       list per text of token strings (each token decoded alone, as Trace.tokens)
    col.token_ids    list per text of lists of token ids
    col.offsets      start of each text on the concatenated token axis (len == number of texts)
    col.n_tokens     total number of tokens (padding excluded)
    col.span(i)      slice of text i on the concatenated token axis
    col.sites        captured sites, e.g. ("resid_post",)
    col.layers       captured layers (model layer numbers, ascending)
    col.model        ModelInfo of the model (of the collected stack) that produced it
    col.stack        "encoder" / "decoder" for an encoder-decoder model, else ""
    col.targets      the decoder's targets, one per text (stack "decoder"), else None
    col.get(site, layer) -> np.ndarray [n_tokens, features], float32, texts concatenated in input
                     order, padding removed (features: d_model, or neuron for mlp_act)

Each text is tokenized exactly as ``lm.tokenizer(text)`` does (special tokens included), so
``col.token_ids[i]`` equals ``lm.trace(texts[i]).token_ids``. Texts are sorted by length and run
``batch_size`` at a time, right-padded with an attention mask, so padded positions never influence
real ones (causal models: right padding leaves every real token's prefix and position unchanged;
BERT-family: the mask hides padding from every query). Padded positions are dropped before storing.
The user's tokenizer is never touched: padding is done here, with the pad id (else EOS, else 0).

Capture uses the same hooks as ``lm.trace`` (:func:`lmscope.capture.recording`) on a batch; the
forward pass stops after the last requested layer (later layers and the LM head are skipped).
Per-token sites only: ``resid_pre, resid_mid, resid_post, attn_out, mlp_out, mlp_act`` and
``q, k, v`` (heads flattened into the feature axis); attention probabilities are not per token.

Storage: activations are buffered until about ``shard_mb`` and written as one safetensors shard
(``shard-00000.safetensors``: tensors ``"<site>.<layer>"`` ``[row, features]`` plus ``"dest"``, the
row's place on the concatenated token axis), with ``collection.json`` holding tokens and metadata.
Memory stays bounded by one shard plus one batch however large the corpus; ``get`` reads one
tensor from each shard. With ``out_dir=None`` the shards stay in memory.

Encoder-decoder models (T5, BART, Marian, ...): the texts are sources. ``stack="encoder"`` (the
default without targets) collects the encoder: it runs alone, each text tokenized as
``lm.trace(text, target=...)`` tokenizes its source, and layers are the encoder's. ``stack="decoder"``
(the default with ``targets``, one target per text) collects the decoder, teacher-forced on each
(source, target) pair as ``lm.trace(source, target=target)`` runs it: the tokens are the decoder's
(its start token first, then the target as the tokenizer makes labels of it), layers are the
decoder's, and the decoder's sites include ``resid_cross``, ``cross_attn_out`` and ``cross_q``.
Sources and targets are right-padded separately; the encoder's attention mask hides padded sources
from every query, and the decoder's causal mask keeps padded targets behind the real ones.
``collection.json`` records the stack (``col.stack``; ``col.model`` describes that stack, so
``col.model.n_layers`` is its layer count) and, for the decoder, the targets (``col.targets``)
and the source token ids (``col.source_token_ids``).

Engines: ``engine="local"`` (the default) runs every batch in this process; ``engine="ray"`` splits
the same batches into the same shards and has Ray workers collect them, on this machine or on a
cluster (:mod:`lmscope.distributed`; needs ``pip install 'lmscope[distributed]'``). Both write the
same shards, so a collection reads the same whichever engine made it (bit for bit where this process
and each worker run torch on as many threads: for some shapes, T5's decoder among them, torch's sums
differ in their last bits between thread counts); ``collection.json`` also records the engine, the
workers, the tokens of each shard and the timings.

Files are written atomically and ``collection.json`` last. A collection that stopped half-way (an
error, a full disk, Ctrl+C) leaves ``collection.partial.json`` and its finished shards: calling
``collect`` again with the same texts and settings resumes after the last finished shard, and
``restart=True`` discards it and starts over. A folder that holds a finished collection is never
written into.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from lmscope._files import TEMP_PREFIX, file_error
from lmscope.analysis._collection import (
    FORMAT,
    META,
    PARTIAL,
    VERSION,
    Collection,
    load_collection,
    write_json,
    write_shard,
)
from lmscope.capture import (
    check_length,
    encode_target,
    model_info,
    recording,
    resolve_layers,
    resolve_sites,
    token_strings,
)
from lmscope.errors import LmscopeError

__all__ = [
    "DECODER_SITES",
    "TOKEN_SITES",
    "Collection",
    "Job",
    "batch_part",
    "collect",
    "collected_stack",
    "load_collection",
    "manifest",
    "read_texts",
]

TOKEN_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_act", "q", "k", "v")
DECODER_SITES = (*TOKEN_SITES, "resid_cross", "cross_attn_out", "cross_q")
"""Per-token sites of an encoder-decoder model's decoder (``cross_k``/``cross_v`` run over source tokens)."""


class _Stop(Exception):
    """Raised by a hook after the last requested layer to skip the rest of the forward pass."""


def _tokenize(loaded: Any, texts: Sequence[str], max_tokens: int | None) -> list[list[int]]:
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise LmscopeError(f"text {i} is empty or not a string: give non-empty strings to collect")
        ids = [int(t) for t in loaded.tokenizer(text)["input_ids"]]
        try:
            check_length(loaded, len(ids), max_tokens)
        except LmscopeError as error:
            raise LmscopeError(f"text {i}: {error}") from None
        out.append(ids)
    return out


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _batches(ids: list[list[int]], batch_size: int) -> Iterable[list[int]]:
    """Text indices grouped into batches of similar length (longest first), so little is padded."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def collected_stack(loaded: Any, stack: str | None, targets: Sequence[Any] | None = None) -> str | None:
    """The stack a collection reads: ``"encoder"`` or ``"decoder"`` for an encoder-decoder model (the decoder
    when ``targets`` are given), else ``None`` (the only one); a one-line error for a combination that cannot be."""
    if not getattr(loaded, "is_seq2seq", False):
        if stack is not None:
            raise LmscopeError(f"stack={stack!r} applies to encoder-decoder models; {loaded.name} has one stack")
        if targets is not None:
            raise LmscopeError(
                f"targets apply to encoder-decoder models (the decoder's tokens); {loaded.name} has one stack: "
                "leave targets out (or append each target to its text)"
            )
        return None
    if stack not in (None, "encoder", "decoder"):
        raise LmscopeError(f"stack must be 'encoder' or 'decoder', not {stack!r}")
    if stack == "encoder" and targets is not None:
        raise LmscopeError(
            "targets are the decoder's tokens, and stack='encoder' reads the sources alone: leave targets out, "
            "or collect stack='decoder'"
        )
    if stack == "decoder" and targets is None:
        raise LmscopeError(
            "the decoder of an encoder-decoder model needs a target for each text (it runs teacher-forced on "
            "each pair): give targets=[...] (lmscope collect --targets FILE), or collect stack='encoder'"
        )
    return stack or ("decoder" if targets is not None else "encoder")


def _tokenize_targets(loaded: Any, targets: Sequence[Any], n_texts: int, max_tokens: int | None) -> list[list[int]]:
    """Decoder token ids of each target (the start token, then the target as labels), as ``lm.trace`` makes them."""
    if len(targets) != n_texts:
        raise LmscopeError(f"{n_texts} texts but {len(targets)} targets: give one target per text, in the same order")
    out = []
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not target.strip():
            raise LmscopeError(f"target {i} is empty or not a string: give a non-empty target for every text")
        try:
            out.append([int(t) for t in encode_target(loaded, target, max_tokens)])
        except LmscopeError as error:
            raise LmscopeError(f"target {i}: {error}") from None
    return out


def _padded(ids: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[batch, pos]`` token ids and their attention mask."""
    longest = max(map(len, ids))
    batch = torch.full((len(ids), longest), pad, dtype=torch.long)  # [batch, pos]
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        batch[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return batch, mask


def _run_batch(
    loaded: Any, ids: list[list[int]], sites: tuple[str, ...], layers: tuple[int, ...], pad: int,
    stack: str | None = None, sources: list[list[int]] | None = None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Forward one right-padded batch; returns ``site -> [batch, layer, pos, features]`` (float32, CPU).

    ``stack="encoder"``: the encoder of an encoder-decoder model runs alone, and its sites are returned.
    ``stack="decoder"``: ``ids`` are decoder tokens and ``sources`` the encoder's, one per row; the model
    runs teacher-forced (as ``lm.trace(source, target=...)``) and the decoder's sites are returned.
    """
    batch, mask = _padded(ids, pad)
    encoder = stack == "encoder"
    last = (loaded.arch.encoder if encoder else loaded.arch).blocks[layers[-1]]
    if stack == "decoder":
        if sources is None or len(sources) != len(ids):
            raise LmscopeError("the decoder stack needs one source per target")
        source, source_mask = _padded(sources, pad)
        inputs = {"input_ids": source.to(loaded.device), "attention_mask": source_mask.to(loaded.device)}
        inputs["decoder_input_ids"] = batch.to(loaded.device)  # causal: padding after a target never reaches it
    else:
        inputs = {"input_ids": batch.to(loaded.device), "attention_mask": mask.to(loaded.device)}
    # the encoder's sites ride on an empty recorder of the decoder, which never runs
    plan = ((), (0,), (sites, layers)) if encoder else (sites, layers, None)
    with recording(loaded, *plan) as recorder:

        def stop(module, args, output):
            raise _Stop

        handle = last.register_forward_hook(stop)
        try:
            if encoder:
                loaded.model.get_encoder()(**inputs)
            else:
                loaded.model(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
    stacked = (recorder.encoder if encoder else recorder).stacked()  # site -> [batch, layer, pos, ...]
    return {site: t.flatten(3).float().cpu() for site, t in stacked.items()}


@torch.no_grad()
def collect(
    lm: Any,
    texts: Iterable[str],
    sites: Iterable[str] | str = ("resid_post",),
    layers: Iterable[int] | int | slice | None = None,
    batch_size: int = 16,
    out_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    shard_mb: float = 64.0,
    restart: bool = False,
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    worker_cpus: int = 1,
    worker_gpus: float = 0,
    stack: str | None = None,
    targets: Iterable[str] | None = None,
) -> Collection:
    """Collect per-token activations of ``sites`` at ``layers`` for every text (see the module docstring).

    ``lm`` is an :class:`lmscope.LM` (or a ``LoadedModel``). ``out_dir`` (created if missing, must not
    hold a finished collection) receives the shards; ``None`` keeps them in memory. An unfinished
    collection in ``out_dir`` is resumed if it was started with the same texts and settings;
    ``restart=True`` discards it instead.

    ``engine="ray"`` runs the collection on Ray workers (see :func:`lmscope.distributed.collect_on_ray`):
    ``address`` joins a running cluster (``"auto"``, ``"HOST:PORT"``), else a local one starts for the
    job; ``workers`` (default: as many as the cluster's CPUs or GPUs allow) each hold the model and use
    ``worker_cpus`` CPUs (and torch threads) and ``worker_gpus`` GPUs. ``out_dir`` is required and
    must be a folder every worker sees.

    Encoder-decoder models: the texts are sources; ``stack="encoder"`` (the default without
    ``targets``) collects the encoder, ``stack="decoder"`` (the default with ``targets``, one non-empty
    target per text) the decoder teacher-forced on each pair, as ``lm.trace(text, target=target)``.
    """
    if engine not in ("local", "ray"):
        raise LmscopeError(f"engine must be 'local' or 'ray', not {engine!r}")
    if engine == "ray":
        from lmscope.distributed import require_ray

        require_ray()
        if out_dir is None:
            raise LmscopeError("engine='ray' writes shards to a folder: give out_dir, a folder every worker sees")
    elif (address, workers, worker_cpus, worker_gpus) != (None, None, 1, 0):
        raise LmscopeError("address, workers, worker_cpus and worker_gpus apply to engine='ray' only")
    loaded, max_tokens = getattr(lm, "loaded", lm), getattr(lm, "max_tokens", None)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if targets is not None:
        targets = [targets] if isinstance(targets, str) else list(targets)
    stack = collected_stack(loaded, stack, targets)
    if not texts:
        raise LmscopeError("no texts to collect: give a list of strings")
    if batch_size < 1:
        raise LmscopeError(f"batch_size must be at least 1, not {batch_size}")
    chosen_sites = resolve_sites(sites, ("resid_post",))
    allowed = DECODER_SITES if stack == "decoder" else TOKEN_SITES
    other = [s for s in chosen_sites if s not in allowed]
    if other:
        raise LmscopeError(f"collect stores per-token sites ({', '.join(allowed)}), not {', '.join(other)}")
    chosen_layers = resolve_layers(layers, (loaded.arch.encoder if stack == "encoder" else loaded.arch).n_layers)
    if not chosen_layers:
        raise LmscopeError("no layers chosen: give layers within the model's range")

    sources = None
    if stack == "decoder":  # the rows are the decoder's tokens; the texts are the encoder's sources
        assert targets is not None
        sources = _tokenize(loaded, texts, max_tokens)
        ids = _tokenize_targets(loaded, targets, len(texts), max_tokens)
    else:
        ids = _tokenize(loaded, texts, max_tokens)
    root = None if out_dir is None else _prepare(Path(out_dir))
    lengths = np.array([len(seq) for seq in ids], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    flat = token_strings(loaded, [t for seq in ids for t in seq])
    pad = _pad_id(loaded.tokenizer)

    info = model_info(loaded, stack)
    plan = _plan(info, chosen_sites, chosen_layers, batch_size, shard_mb, ids, sources)
    job = Job(loaded, texts, ids, flat, chosen_sites, chosen_layers, batch_size, shard_mb, pad, info, plan,
              stack, sources, targets)  # fmt: skip
    if engine == "ray":
        from lmscope.distributed import collect_on_ray

        options = dict(address=address, workers=workers, worker_cpus=worker_cpus, worker_gpus=worker_gpus)
        return collect_on_ray(job, root, restart=restart, progress=progress, **options)
    began = time.perf_counter()
    record = _resume(root, plan, restart) if root is not None else {"plan": plan, "shards": [], "batches": 0}
    features: dict[str, int] = dict(record.get("features", {}))
    shards: list[Any] = [root / name for name in record["shards"]] if root is not None else []
    batches = list(_batches(ids, batch_size))
    done = int(record["batches"])
    buffer: list[dict[str, np.ndarray]] = []
    buffered = 0
    limit = shard_mb * 2**20
    rows: list[int] = list(record.get("shard_tokens", []))  # tokens of each shard

    def flush(finished: int) -> None:
        nonlocal buffer, buffered
        if buffer:
            shards.append(write_shard(buffer, root, len(shards)))
            rows.append(sum(len(part["dest"]) for part in buffer))
            if root is not None:  # the shard is complete on disk: record it, so a rerun can resume after it
                names = [p.name for p in shards]
                record.update(shards=names, batches=finished, features=features, shard_tokens=rows)
                write_json(root / PARTIAL, record)
        buffer, buffered = [], 0

    from tqdm.auto import tqdm

    bar = tqdm(total=len(texts), desc="collect", unit="text", disable=not progress)
    bar.update(sum(len(group) for group in batches[:done]))
    try:
        for number, group in enumerate(batches[done:], start=done):
            group_ids, group_starts = [ids[i] for i in group], [int(starts[i]) for i in group]
            group_sources = None if sources is None else [sources[i] for i in group]
            part = batch_part(loaded, group_ids, group_starts, chosen_sites, chosen_layers, pad, stack, group_sources)
            features.update({site: part[f"{site}.{chosen_layers[0]}"].shape[1] for site in chosen_sites})
            buffer.append(part)
            buffered += sum(a.nbytes for a in part.values())
            if buffered >= limit:
                flush(number + 1)
            bar.update(len(group))
        flush(len(batches))
    finally:
        bar.close()

    names = [p.name for p in shards] if root is not None else []
    seconds = time.perf_counter() - began
    rows = rows if root is not None and len(rows) == len(names) else []  # (a record of an older lmscope lacks them)
    run: dict[str, Any] = {"engine": "local", "workers": 1, "shard_tokens": rows}
    run["timings"] = {"seconds": round(seconds, 3), "tokens_per_second": round(int(lengths.sum()) / seconds, 1)}
    meta = manifest(job, features, names, run)
    if root is not None:
        write_json(root / META, meta)  # last: the folder now holds a finished collection
        (root / PARTIAL).unlink(missing_ok=True)
    return Collection(meta, shards, root)


class Job(NamedTuple):
    """Everything that decides a collection's contents, tokenized and checked (shared by the engines)."""

    loaded: Any
    texts: list[str]
    ids: list[list[int]]  # per text: the token ids whose rows are stored (the decoder's for stack="decoder")
    flat: list[str]  # token strings of all texts, concatenated
    sites: tuple[str, ...]
    layers: tuple[int, ...]
    batch_size: int
    shard_mb: float
    pad: int
    info: Any  # ModelInfo
    plan: str
    stack: str | None = None  # "encoder" / "decoder" for an encoder-decoder model
    sources: list[list[int]] | None = None  # per text: the encoder's token ids (stack="decoder")
    targets: list[str] | None = None  # per text (stack="decoder")

    def batch(self, group: list[int], starts: Sequence[int]) -> list[tuple[Any, ...]]:
        """Texts ``group`` as a worker receives them: ``(start, ids)``, or ``(start, ids, source ids)``."""
        if self.sources is None:
            return [(int(starts[i]), self.ids[i]) for i in group]
        return [(int(starts[i]), self.ids[i], self.sources[i]) for i in group]


def manifest(job: Job, features: dict[str, int], shards: list[str], run: dict[str, Any]) -> dict[str, Any]:
    """The contents of ``collection.json`` (``run``: how it was made: engine, workers, timings...)."""
    lengths = [len(seq) for seq in job.ids]
    split = np.split(np.array(job.flat, dtype=object), np.cumsum(lengths)[:-1])
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": asdict(job.info),
        "sites": list(job.sites),
        "layers": list(job.layers),
        "features": features,
        "texts": job.texts,
        "token_ids": job.ids,
        "tokens": [list(t) for t in split],
        "shards": shards,
    }
    if job.stack is not None:
        meta["stack"] = job.stack
    if job.stack == "decoder":
        meta.update(targets=job.targets, source_token_ids=job.sources)
    return {**meta, **run}


def batch_part(
    loaded: Any,
    ids: list[list[int]],
    starts: list[int],
    sites: tuple[str, ...],
    layers: tuple[int, ...],
    pad: int,
    stack: str | None = None,
    sources: list[list[int]] | None = None,
) -> dict[str, np.ndarray]:
    """One batch's rows, as a shard stores them: ``"dest"`` ``[row]`` and ``"<site>.<layer>"`` ``[row, features]``.

    ``ids`` are the batch's texts (token ids) and ``starts`` their places on the concatenated token axis;
    ``stack``: ``"encoder"`` or ``"decoder"`` for a stack of an encoder-decoder model (the decoder's
    ``ids`` are decoder tokens, and ``sources`` the encoder's token ids of each row).
    """
    captured = _run_batch(loaded, ids, sites, layers, pad, stack, sources)
    part = {
        "dest": np.concatenate([np.arange(start, start + len(seq)) for start, seq in zip(starts, ids, strict=True)])
    }
    for site, tensor in captured.items():  # [batch, layer, pos, features]
        for li, layer in enumerate(layers):
            rows = [tensor[b, li, : len(seq)] for b, seq in enumerate(ids)]  # [pos, features] each
            part[f"{site}.{layer}"] = torch.cat(rows).numpy()
    return part


def _prepare(root: Path) -> Path:
    """``root`` created if missing; a clear error if it is a file, unwritable or holds a finished collection."""
    if root.exists() and not root.is_dir():
        raise LmscopeError(f"{root} is a file, not a folder: give a folder for the collection's shards")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise file_error(root, error, "create the folder") from error
    if not os.access(root, os.W_OK | os.X_OK):
        raise LmscopeError(f"cannot write into {root}: permission denied: choose a folder you may write to")
    if (root / META).exists():
        raise LmscopeError(
            f"{root} already holds a collection{_of_model(root / META)}: choose a new folder, or delete it first"
        )
    return root


def _of_model(path: Path) -> str:
    """`` of MODEL`` for the finished collection whose manifest is ``path`` (empty if it cannot be read)."""
    try:
        return f" of {json.loads(path.read_text(encoding='utf-8'))['model']['name']}"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _plan(info: Any, sites: tuple[str, ...], layers: tuple[int, ...], batch_size: int, shard_mb: float,
          ids: list[list[int]], sources: list[list[int]] | None = None) -> str:  # fmt: skip
    """A hash of everything that decides the shards' contents (a resumed run must match it exactly)."""
    digest = hashlib.sha256()
    settings = {"model": asdict(info), "sites": sites, "layers": layers, "batch_size": batch_size, "shard_mb": shard_mb}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for part in (ids,) if sources is None else (ids, sources):  # (the decoder's rows depend on their sources)
        digest.update(np.array([len(seq) for seq in part], dtype=np.int64).tobytes())
        digest.update(np.array([t for seq in part for t in seq], dtype=np.int64).tobytes())
    return digest.hexdigest()


def _resume(root: Path, plan: str, restart: bool) -> dict[str, Any]:
    """Where to start in ``root``: an unfinished collection's record if it matches ``plan``, else a fresh one."""
    fresh: dict[str, Any] = {"format": f"{FORMAT}-partial", "plan": plan, "shards": [], "batches": 0}
    record: dict[str, Any] | None = None
    path = root / PARTIAL
    if path.is_file():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            names = record["shards"]
            ok = all(isinstance(n, str) and Path(n).name == n and (root / n).is_file() for n in names)
            ok = ok and isinstance(record["batches"], int) and isinstance(record.get("features", {}), dict)
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok and record["plan"] == plan and not restart:
            return record
        if not restart:
            why = "of other texts or settings" if ok else "whose record is damaged"
            raise LmscopeError(
                f"{root} holds an unfinished collection {why}: run collect with the same texts and settings "
                "to resume it, or restart it (restart=True, lmscope collect --restart) to discard it"
            )
    stale = sorted(root.glob("shard-*.safetensors"))
    if stale and not restart and record is None:
        raise LmscopeError(
            f"{root} holds shard files but no collection: delete them, choose a new folder, or restart "
            "(restart=True, lmscope collect --restart) to replace them"
        )
    for old in [*stale, *root.glob(f"{TEMP_PREFIX}*shard-*.safetensors"), path]:
        old.unlink(missing_ok=True)
    return fresh


def read_texts(path: str | os.PathLike[str], limit: int | None = None) -> list[str]:
    """Texts of a file (gzip-compressed if it ends in ``.gz``): the ``# text = ...`` sentences of a CoNLL-U
    file, else each non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise LmscopeError(f"text file not found: {path}")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as file:
                lines = file.read().splitlines()
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise LmscopeError(f"{path} is not UTF-8 text (byte {error.start}): save it as UTF-8") from None
    except (OSError, EOFError) as error:  # unreadable, or a damaged .gz
        raise LmscopeError(f"cannot read {path}: {error}") from None
    if any("\x00" in line for line in lines):
        raise LmscopeError(f"{path} is not a text file (it holds NUL bytes): give a file of texts, one a line")
    if path.name.endswith((".conllu", ".conllu.gz")):
        texts = [line.split("=", 1)[1].strip() for line in lines if line.startswith("# text =")]
    else:
        texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise LmscopeError(f"{path} holds no texts: give a file of texts, one a line (or a .conllu file)")
    return texts[:limit] if limit is not None else texts
