"""``lmscope`` command line: the library's verbs over text, printing text twins or JSON.

Every problem a user can fix is one line on stderr (``lmscope: error: ...``) and exit status 2, never
a traceback: bad option values are refused by the parser (each option's type says its range), paths
are checked before a model loads, and errors from the library arrive as :class:`LmscopeError`.

Text and files: a positional ``TEXT`` is always the text itself. ``nmf`` and ``collect`` read texts
from files with ``--file PATH`` (one text per line, or the sentences of a ``.conllu`` file). A
``TEXT`` that looks like a file name (one word ending in ``.txt``, ``.conllu`` and the like, or the
name of an existing file) is refused with a pointer to ``--file``, so a mistyped path is never run
through the model as text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmscope.errors import LmscopeError

__all__ = ["main"]

# Suffixes that make a one-word TEXT a file name typed by mistake (see the module docstring).
_FILE_SUFFIXES = (".txt", ".conllu", ".gz", ".csv", ".tsv", ".json", ".jsonl", ".md", ".text", ".tok")
MAX_TOPK = 100  # lens: a table of more candidates per layer is unreadable (use the Python API for more)
MAX_GENERATE = 1024


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``lmscope lens: error: ...``) with exit status 2."""

    def error(self, message: str) -> Any:  # argparse's own prints the whole usage first
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer within ``[low, high]`` (either bound may be None)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if (low is not None and number < low) or (high is not None and number > high):
            span = f"{low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{number} is out of range: give {span}")
        return number

    parse.__name__ = "integer"
    return parse


def _float(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number within ``[low, high]``."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
        if not low <= number <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a number from {low:g} to {high:g}")
        return number

    parse.__name__ = "number"
    return parse


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmscope")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _text_arg(parser: argparse.ArgumentParser, corpus: bool = False) -> None:
    """The positional TEXT (optional where ``--file`` can give the texts instead)."""
    if corpus:
        parser.add_argument("text", nargs="?", default=None, metavar="TEXT", help="the text itself (or use --file)")
        parser.add_argument(
            "--file",
            action="append",
            default=[],
            metavar="PATH",
            help="read texts from a file: one per line, or the sentences of a .conllu(.gz) file (repeatable)",
        )
    else:
        parser.add_argument("text", metavar="TEXT", help="the text itself (not a file name)")


def _check_text(text: str, command: str, corpus: bool) -> None:
    """Refuse a TEXT that is evidently a file name (see the module docstring)."""
    from pathlib import Path

    word = text.strip()
    if not word or any(c.isspace() for c in word):
        return
    exists = Path(word).expanduser().is_file()
    if not exists and not word.lower().endswith(_FILE_SUFFIXES):
        return
    found = "" if exists else " (no such file here)"
    if corpus:
        raise LmscopeError(f"{word!r} looks like a file name{found}: to read texts from a file, use --file {word}")
    raise LmscopeError(
        f"{word!r} looks like a file name{found}: lmscope {command} takes the text itself; "
        'to use a file\'s contents, pass "$(cat FILE)"'
    )


def _check_device(device: str | None) -> None:
    """A one-line error for a device this machine or this PyTorch build does not have."""
    if device is None:
        return
    import torch

    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise LmscopeError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cpu":
        return
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            build = "this PyTorch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise LmscopeError(f"--device {device}: {build}: use --device cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            raise LmscopeError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return
    if chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise LmscopeError(f"--device {device}: Apple's MPS is not available here: use --device cpu")
        return
    backend = getattr(torch, chosen.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise LmscopeError(f"--device {device}: not available on this machine: use cpu, cuda or mps")


def _check_outputs(args: argparse.Namespace) -> None:
    """Check output paths and the device before any model loads, so a typo fails at once."""
    from pathlib import Path

    from lmscope._files import check_writable
    from lmscope.capture._store import parse_size, store_path

    if getattr(args, "max_memory", None) is not None:
        parse_size(args.max_memory)
    if getattr(args, "store", None) is not None:
        store_path(args.store)
    for name in ("html", "plot"):
        if getattr(args, name, None):
            check_writable(getattr(args, name))
    out = getattr(args, "out", None)
    if out is not None:
        folder = Path(out)
        if folder.exists() and not folder.is_dir():
            raise LmscopeError(f"--out {out} is a file: give a folder for the collection's shards")
        if not (folder.exists() or folder.parent.exists()):
            raise LmscopeError(f"--out {out}: the folder {folder.parent} does not exist: create it first")
    _check_device(getattr(args, "device", None))
    text = getattr(args, "text", None)
    if isinstance(text, str):
        _check_text(text, args.command, corpus=hasattr(args, "file"))


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name, directory, .gguf file or HF id (default: embedded)")
    parser.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:N or mps (default: cpu)")
    parser.add_argument(
        "--dtype", default=None, choices=("float32", "float16", "bfloat16"), help="weights' dtype (default: float32)"
    )
    parser.add_argument("--device-map", default=None, choices=("auto", "balanced", "balanced_low_0", "sequential"),
                        help="spread the layers over devices with accelerate (CPU, disk offload too)")  # fmt: skip
    parser.add_argument("--device-memory", default=None, metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. 0=20GiB,cpu=60GiB")  # fmt: skip
    parser.add_argument("--offload-folder", default=None, metavar="DIR",
                        help="with --device-map: where layers offloaded to disk are kept")  # fmt: skip


def _device_memory(spec: str | None) -> dict[Any, str] | None:
    """``0=20GiB,cpu=60GiB`` as accelerate's ``max_memory`` (GPU indices as integers)."""
    if spec is None:
        return None
    memory: dict[Any, str] = {}
    for item in spec.split(","):
        device, _, size = item.strip().partition("=")
        if not device or not size:
            raise LmscopeError(f"--device-memory {spec}: write DEVICE=SIZE pairs, e.g. 0=20GiB,cpu=60GiB")
        memory[int(device) if device.isdigit() else device] = size
    return memory


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", metavar="FILE", help="also write the view as a standalone HTML file")


def _target_arg(parser: argparse.ArgumentParser, *names: str) -> None:
    """``--target TEXT``: the decoder's forced text (teacher forcing) of an encoder-decoder model."""
    parser.add_argument(
        *(names or ("--target", "--target-text")),
        dest="target_text",
        default=None,
        metavar="TEXT",
        help="encoder-decoder models (T5, BART, ...): the target the decoder reads (teacher forcing); TEXT: the source",
    )
    _memory_args(parser)  # every command that traces one text takes --target, and these


def _memory_args(parser: argparse.ArgumentParser) -> None:
    """``--max-memory SIZE`` and ``--store PATH``: a disk-backed trace when memory would not do."""
    parser.add_argument("--max-memory", default=None, metavar="SIZE",
                        help="keep the trace on disk (memory-mapped) if it would be over SIZE (e.g. 4GiB)")  # fmt: skip
    parser.add_argument("--store", default=None, metavar="PATH",
                        help="write the trace to this .safetensors file or folder (with --max-memory: only when "
                        "over the limit; without, a temporary folder removed at exit)")  # fmt: skip


def _store_for(lm: Any, args: argparse.Namespace, sites: Any, generate: int, options: dict[str, Any]) -> Any:
    """Where the trace goes under ``--max-memory`` / ``--store``: None (memory) or a path (says why on stderr)."""
    from lmscope.capture._store import memory_or_disk, parse_size

    limit = getattr(args, "max_memory", None)
    store = getattr(args, "store", None)
    if limit is None and store is None:
        return None
    limit = None if limit is None else parse_size(limit)
    n_pos = len(lm.encode(args.text, options.get("text_pair"))) + generate
    folder, line = memory_or_disk(lm, n_pos, sites, options.get("layers"), limit, store)
    if folder is not None and lm.is_seq2seq:
        raise LmscopeError(f"{lm.name} is an encoder-decoder model: --max-memory and --store do not support those yet")
    if folder is not None and store is None:
        import atexit
        import shutil

        atexit.register(shutil.rmtree, folder, True)
    if line:
        print(f"lmscope: {line}", file=sys.stderr)
    return folder


def _traced(lm: Any, args: argparse.Namespace, sites: Any, generate: int = 0, **options: Any) -> Any:
    """``lm.trace`` (or ``lm.generate``) of TEXT, with ``--target`` for an encoder-decoder model."""
    if getattr(args, "target_text", None) is not None:
        options["target"] = args.target_text
    store = _store_for(lm, args, sites, generate, options)
    if store is not None:
        options["store"] = store
    if generate:
        return lm.generate(args.text, generate=generate, sites=sites, **options)
    return lm.trace(args.text, sites=sites, **options)


def _one_stack(lm: Any, what: str) -> None:
    """A clear error where a command does not handle encoder-decoder models yet."""
    if lm.is_seq2seq:
        raise LmscopeError(
            f"{what} does not support encoder-decoder models ({lm.name}) yet: use lens, rankings, watch, saliency, "
            "attention, flow, nmf or collect (either stack), or probe (the encoder) on them"
        )


def _load(args: argparse.Namespace) -> Any:
    from lmscope import from_pretrained

    placement = {}
    if getattr(args, "device_map", None) is not None:
        placement = {"device_map": args.device_map, "max_memory": _device_memory(args.device_memory),
                     "offload_folder": args.offload_folder}  # fmt: skip
    elif getattr(args, "device_memory", None) is not None or getattr(args, "offload_folder", None) is not None:
        raise LmscopeError("--device-memory and --offload-folder need --device-map (e.g. --device-map auto)")
    return from_pretrained(args.model, device=args.device, dtype=args.dtype, **placement)


def _emit(result: Any, args: argparse.Namespace) -> None:
    if getattr(args, "html", None):
        path = result.save_html(args.html)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        print(result)


def _add_models(commands: Any) -> None:
    parser = commands.add_parser("models", help="list embedded and tiny models")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--all", action="store_true", help="every text model type of the installed transformers, with its status"
    )
    parser.set_defaults(run=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> None:
    from lmscope import available_models

    if args.all:
        from lmscope.models._support import model_support

        rows = model_support()
        if args.json:
            print(json.dumps([vars(row) for row in rows]))
            return
        width = max(len(row.model_type) for row in rows)
        for row in rows:
            print(f"{row.model_type.ljust(width)}  {row.kind:<6}  {row.status:<11}  {row.note}")
        counts = {s: sum(r.status == s for r in rows) for s in ("table", "fallback", "unsupported", "untried")}
        print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(rows)} model types")
        return
    models = available_models()
    if args.json:
        print(json.dumps(models))
        return
    width = max(map(len, models))
    for name, description in models.items():
        print(f"{name.ljust(width)}  {description}")


def _position(value: str) -> int | str:
    """A ``--position``: a token index (Ecco's meaning) or ``next``."""
    if value.strip().lower() == "next":
        return "next"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a token index or 'next'") from None


POSITION_HELP = (
    "the token explained, as in Ecco: P is predicted from the state at P-1; "
    "'next' (also the token count, or -1) is the prediction after the last token (default: next)"
)


def _add_lens(commands: Any) -> None:
    parser = commands.add_parser("lens", help="logit lens: top tokens after every layer for one prediction")
    _text_arg(parser)
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
    parser.add_argument("--layer", type=int, default=None, help="only this layer (default: every layer)")
    parser.add_argument(
        "--topk", type=_int(1, MAX_TOPK), default=5, help=f"candidates per layer, 1 to {MAX_TOPK} (default 5)"
    )
    parser.add_argument("--no-norm", action="store_true", help="skip the final norm before unembedding")
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_lens)


def _cmd_lens(args: argparse.Namespace) -> None:
    lm = _load(args)
    out = _traced(lm, args, ["resid_post"])
    result = out.layer_predictions(position=args.position, layer=args.layer, topk=args.topk, norm=not args.no_norm)
    _emit(result, args)


def _add_rankings(commands: Any) -> None:
    parser = commands.add_parser("rankings", help="rank of each generated (else next) token after every layer")
    _text_arg(parser)
    parser.add_argument(
        "--generate", type=_int(0, MAX_GENERATE), default=0, metavar="N", help="generate N tokens first and rank them"
    )
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_rankings)


def _cmd_rankings(args: argparse.Namespace) -> None:
    lm = _load(args)
    _emit(_traced(lm, args, ["resid_post"], args.generate).rankings(), args)


def _add_watch(commands: Any) -> None:
    parser = commands.add_parser("watch", help="rank of chosen words for one prediction after every layer")
    _text_arg(parser)
    parser.add_argument("--words", nargs="+", required=True, help='words to rank, e.g. --words " is" " are"')
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_watch)


def _cmd_watch(args: argparse.Namespace) -> None:
    lm = _load(args)
    out = _traced(lm, args, ["resid_post"])
    _emit(out.rankings_watch(args.words, position=args.position), args)


def _add_saliency(commands: Any) -> None:
    parser = commands.add_parser("saliency", help="input saliency of each generated (else next) token (Ecco)")
    _text_arg(parser)
    parser.add_argument(
        "--generate", type=_int(0, MAX_GENERATE), default=0, metavar="N", help="generate N tokens first, explain them"
    )
    parser.add_argument(
        "--method",
        default="grad_x_input",
        choices=("grad_x_input", "gradient", "input_x_gradient", "integrated_gradients", "occlusion"),
        help="attribution method (default grad_x_input)",
    )
    parser.add_argument("--target", choices=("prob", "logit"), default="prob", help="probability (default) or logit")
    parser.add_argument("--contrast", metavar="TOKEN", help="why each output rather than TOKEN (logit difference)")
    parser.add_argument(
        "--steps",
        type=_int(1, 1024),
        default=50,
        help="integrated gradients: quadrature points, 1 to 1024 (default 50)",
    )
    parser.add_argument("--style", choices=("minimal", "detailed"), default="minimal", help="HTML view style")
    _target_arg(parser, "--target-text")  # --target already names what is explained (prob or logit)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_saliency)


def _cmd_saliency(args: argparse.Namespace) -> None:
    lm = _load(args)
    # saliency runs its own forward passes: capture nothing but the logits
    out = _traced(lm, args, [], args.generate)
    _emit(out.saliency(args.method, args.style, target=args.target, contrast=args.contrast, steps=args.steps), args)


def _add_serve(commands: Any) -> None:
    parser = commands.add_parser("serve", help="start the web app (interactive explorer) on the embedded model")
    parser.add_argument("--config", default=None, help="app config JSON file (default: the one shipped)")
    parser.add_argument("--print-config", action="store_true", help="print the default config (JSON) and exit")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=_int(1, 65535), default=8000, help="port to listen on (default 8000)")
    parser.set_defaults(run=_cmd_serve)


def _default_config() -> str:
    """The default app config as one self-contained JSON object: every key, the sample prompts inlined."""
    import dataclasses
    from importlib import resources

    package = resources.files("lmscope.app")
    raw = json.loads(package.joinpath("default_config.json").read_text(encoding="utf-8"))
    if isinstance(raw.get("sample_prompts"), str):  # a file next to the default config: inline its prompts
        raw["sample_prompts"] = json.loads(package.joinpath(raw["sample_prompts"]).read_text(encoding="utf-8"))
    with contextlib.suppress(ImportError):  # the config's own defaults for the keys the file leaves out
        from lmscope.app.config import AppConfig

        for item in dataclasses.fields(AppConfig):
            if item.name not in raw and item.default is not dataclasses.MISSING and item.default is not None:
                raw[item.name] = list(item.default) if isinstance(item.default, tuple) else item.default
    return json.dumps(raw, indent=2, ensure_ascii=False) + "\n"


def _check_listen(host: str, port: int) -> None:
    """A one-line error if ``host:port`` cannot be listened on (bad address, port taken)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as error:
        raise LmscopeError(f"--host {host!r} is not an address of this machine ({error}): try 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            why = " ".join((error.strerror or str(error)).split())
            raise LmscopeError(f"cannot listen on {host}:{port} ({why}): choose another --port or --host") from None


def _cmd_serve(args: argparse.Namespace) -> None:
    import threading
    from pathlib import Path

    if args.print_config:
        print(_default_config(), end="")
        return
    if args.config is not None and not Path(args.config).expanduser().is_file():
        what = "is a folder" if Path(args.config).is_dir() else "does not exist"
        raise LmscopeError(
            f"the app config {args.config} {what}: a config is a JSON object such as "
            '{"default_model": "tiny-gpt2", "models": {"tiny-gpt2": {"source": "tiny-gpt2"}}, '
            '"max_input_tokens": 128}; '
            "start from the default with: lmscope serve --print-config > app.json"
        )

    try:
        import uvicorn

        from lmscope.app import create_app
        from lmscope.app.server import GRACEFUL_SHUTDOWN_S
    except ImportError as error:
        raise LmscopeError(f"the web app needs FastAPI and uvicorn ({error}): pip install 'lmscope[app]'") from error
    _check_listen(args.host, args.port)
    app = create_app(args.config)
    state = app.state.lmscope
    # Load the default model while the server starts, so the first run does not wait for it.
    threading.Thread(target=state.preload, name="lmscope-preload", daemon=True).start()
    print(f"lmscope: serving on http://{args.host}:{args.port}/ (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


LAYERS_HELP = "layer range A:B (B excluded; either may be left out) or one layer A (default: all)"


def _layer_range(text: str | None) -> slice:
    """``"A:B"`` (B excluded, either may be empty) or ``"A"`` as a slice of layers."""
    if not text:
        return slice(None)
    try:
        if ":" in text:
            start, stop = (int(part) if part.strip() else None for part in text.split(":", 1))
        else:
            layer = int(text)
            return slice(layer, layer + 1 if layer != -1 else None)
    except ValueError:
        raise LmscopeError(f"--layers takes A:B (B excluded) or one layer number, not {text!r}") from None
    if start is not None and stop is not None and (start >= 0) == (stop >= 0) and start >= stop:
        raise LmscopeError(f"--layers {text} is empty: A:B takes layers A to B-1, so A must be below B")
    return slice(start, stop)


def _layers(lm: Any, text: str | None, stack: str | None = None) -> tuple[int, ...]:
    """The model's layers that ``--layers`` selects (at least one, else a clear error); ``stack``: of an
    encoder-decoder model, ``"encoder"`` or ``"decoder"``."""
    from lmscope.capture import resolve_layers

    n_layers = (lm.loaded.arch.encoder if stack == "encoder" else lm.loaded.arch).n_layers
    chosen = resolve_layers(_layer_range(text), n_layers)
    if not chosen:
        held = f"this model's {stack}" if stack else "this model"
        raise LmscopeError(f"--layers {text} selects no layer: {held} has layers 0..{n_layers - 1}")
    return chosen


def _sites(text: str) -> list[str]:
    """``--sites``: a comma-separated list of at least one site."""
    sites = [site.strip() for site in text.split(",") if site.strip()]
    if not sites:
        raise LmscopeError("--sites is empty: name at least one site, e.g. --sites resid_post,mlp_act")
    return sites


def _texts(args: argparse.Namespace) -> list[str]:
    """The texts of ``nmf``/``collect``: TEXT and the texts of each ``--file`` (a missing file is an error)."""
    from lmscope.analysis.collect import read_texts

    texts = [args.text] if args.text is not None else []
    for path in args.file:
        texts += read_texts(path)
    if not texts:
        raise LmscopeError(f"no text given: lmscope {args.command} TEXT, or --file PATH to read texts from a file")
    return texts[: args.limit] if args.limit is not None else texts


def _targets(args: argparse.Namespace) -> list[str] | None:
    """``--targets FILE``: the decoder's target of each text, read as ``--file`` reads texts (``--limit`` applies)."""
    if args.targets is None:
        return None
    from lmscope.analysis.collect import read_texts

    targets = read_texts(args.targets)
    return targets[: args.limit] if args.limit is not None else targets


def _stack_args(parser: argparse.ArgumentParser, default: str) -> None:
    """``--stack`` and ``--targets FILE``: which stack of an encoder-decoder model a corpus command reads."""
    parser.add_argument(
        "--stack", choices=("encoder", "decoder"), default=None, help=f"encoder-decoder models: the stack ({default})"
    )
    parser.add_argument(
        "--targets",
        default=None,
        metavar="FILE",
        help="encoder-decoder models: the decoder's target of each text, one per line in the texts' order "
        "(the decoder runs teacher-forced on each pair)",
    )


def _add_nmf(commands: Any) -> None:
    parser = commands.add_parser("nmf", help="factor explorer: NMF (or PCA/ICA) of FFN activations")
    _text_arg(parser, corpus=True)
    parser.add_argument(
        "--components", type=_int(1, 1000), default=8, help="number of factors, at most the tokens (default 8)"
    )
    parser.add_argument("--layers", default=None, help=LAYERS_HELP)
    parser.add_argument("--method", choices=("nmf", "pca", "ica"), default="nmf", help="factorization (default nmf)")
    parser.add_argument("--site", default="mlp_act", help="mlp_act (default) or a residual site")
    parser.add_argument("--nonneg", choices=("clip", "shift", "error"), default="clip", help="negative values (NMF)")
    parser.add_argument("--seed", type=_int(0, 2**32 - 1), default=0, help="random seed (default 0)")
    parser.add_argument("--limit", type=_int(1), default=None, help="use at most this many texts")
    _stack_args(parser, "default: the decoder with --target or --targets, else the encoder")
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_nmf)


def _cmd_nmf(args: argparse.Namespace) -> None:
    from lmscope.analysis import collect, factorize

    texts, targets = _texts(args), _targets(args)
    _layer_range(args.layers)  # a malformed range fails before the model loads
    lm = _load(args)
    options = dict(method=args.method, site=args.site, nonneg=args.nonneg, seed=args.seed)
    progress = sys.stderr.isatty()
    if lm.is_seq2seq:
        given = args.target_text is not None or targets is not None
        stack = args.stack or ("decoder" if given else "encoder")
        layers = _layers(lm, args.layers, stack)  # the layers of the stack read
        if len(texts) > 1 or targets is not None:  # a corpus: collected
            if args.target_text is not None:
                raise LmscopeError(
                    "--target is the target of one text: give several texts their targets with --targets"
                )
            source = collect(lm, texts, [args.site], layers, progress=progress, stack=stack, targets=targets)
        else:
            chosen = {"layers": layers} if stack == "decoder" else {"encoder_layers": layers}
            args.text = texts[0]
            source = _traced(lm, args, [args.site], **chosen).trace.stack(stack)
    elif args.stack is not None or args.target_text is not None or targets is not None:
        raise LmscopeError(f"--stack, --target and --targets apply to encoder-decoder models, and {lm.name} is not one")
    else:
        layers = _layers(lm, args.layers)
        if len(texts) == 1:
            source = lm.trace(texts[0], sites=[args.site], layers=layers).trace
        else:
            source = collect(lm, texts, sites=[args.site], layers=layers, progress=progress)
    _emit(factorize(source, args.components, layers[0], layers[-1] + 1, **options), args)


def _add_collect(commands: Any) -> None:
    parser = commands.add_parser("collect", help="collect per-token activations of a corpus into safetensors shards")
    _text_arg(parser, corpus=True)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the shards (a stopped run there resumes)"
    )
    parser.add_argument("--restart", action="store_true", help="discard an unfinished collection in --out first")
    parser.add_argument("--sites", default="resid_post", help="comma-separated sites (default resid_post)")
    parser.add_argument("--layers", default=None, help=LAYERS_HELP)
    parser.add_argument("--batch-size", type=_int(1, 4096), default=16, help="texts per forward pass (default 16)")
    parser.add_argument("--limit", type=_int(1), default=None, help="use at most this many texts")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    parser.add_argument("--engine", choices=("local", "ray"), default="local", help="local (default) or ray workers")
    parser.add_argument("--address", default=None, help="Ray cluster to join (auto, HOST:PORT); default: a local one")
    parser.add_argument("--workers", type=_int(1, 10000), default=None, help="Ray workers (default: as CPUs allow)")
    parser.add_argument("--worker-cpus", type=_int(1, 1024), default=1, help="CPUs and threads per Ray worker")
    parser.add_argument("--worker-gpus", type=_float(0, 64), default=0, help="GPUs per Ray worker (default 0)")
    parser.add_argument(
        "--shard-mb", type=_float(0.001, 1e6), default=64.0, help="activations per shard in MB (default 64)"
    )
    _stack_args(parser, "default: the decoder with --targets, else the encoder")
    _model_args(parser)
    parser.set_defaults(run=_cmd_collect)


def _cmd_collect(args: argparse.Namespace) -> None:
    from lmscope.analysis import collect
    from lmscope.analysis.collect import collected_stack

    texts, sites, targets = _texts(args), _sites(args.sites), _targets(args)
    _layer_range(args.layers)
    ray = {}
    if args.engine == "ray":  # a missing package or an address that does not answer fails before the model loads
        from lmscope.distributed import check_address, require_ray

        require_ray()
        check_address(args.address)
        ray = dict(address=args.address, workers=args.workers, worker_cpus=args.worker_cpus)
        ray.update(worker_gpus=args.worker_gpus, engine="ray")
    elif (args.address, args.workers, args.worker_cpus, args.worker_gpus) != (None, None, 1, 0):
        raise LmscopeError("--address, --workers, --worker-cpus and --worker-gpus need --engine ray")
    lm = _load(args)
    stack = collected_stack(lm.loaded, args.stack, targets)  # bad combinations fail before any work
    layers = _layers(lm, args.layers, stack)  # the layers of the stack collected
    progress = sys.stderr.isatty()
    options = dict(progress=progress, restart=args.restart, shard_mb=args.shard_mb, stack=stack, targets=targets)
    col = collect(lm, texts, sites, layers, args.batch_size, args.out, **options, **ray)
    summary = {"out": str(col.root), "texts": len(col), "tokens": col.n_tokens, "sites": list(col.sites)}
    summary.update(layers=list(col.layers), **({"stack": col.stack} if col.stack else {}))
    print(json.dumps(summary) if args.json else repr(col))


def _add_similarity(commands: Any) -> None:
    parser = commands.add_parser(
        "similarity", help="similarity of every pair of layers over a collection, streamed shard by shard"
    )
    parser.add_argument("collection", metavar="DIR", help="a collection folder written by lmscope collect")
    parser.add_argument("--method", choices=("cka", "cca", "svcca", "pwcca"), default="cka", help="default cka")
    parser.add_argument("--site", default="resid_post", help="site of the rows (default resid_post)")
    parser.add_argument("--site-b", default=None, help="site of the columns (default: the same as --site)")
    parser.add_argument("--layers", default=None, help=LAYERS_HELP.replace("all", "all collected"))
    parser.add_argument("--skip-first", action="store_true", help="leave out each text's first token (attention sink)")
    parser.add_argument("--dims", type=_int(1), default=None, help="svcca: directions kept (default: 99%% variance)")
    parser.add_argument("--epsilon", type=_float(0, 1e6), default=0.0, help="cca, svcca, pwcca: ridge (default 0)")
    parser.add_argument(
        "--memory-mb", type=_float(0.001, 1e9), default=512.0, help="bound on the statistics held (default 512)"
    )
    parser.add_argument("--threads", type=_int(1, 1024), default=None, help="BLAS threads (default: numpy's)")
    _output_args(parser)
    parser.set_defaults(run=_cmd_similarity)


def _cmd_similarity(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lmscope.analysis import load_collection, streaming
    from lmscope.capture import resolve_layers

    folder = Path(args.collection)
    if not folder.exists():
        raise LmscopeError(f"collection folder not found: {folder}: give a folder written by lmscope collect --out")
    if not folder.is_dir():
        raise LmscopeError(f"{folder} is a file, not a collection folder: give a folder written by lmscope collect")
    if args.dims is not None and args.method != "svcca":
        raise LmscopeError("--dims applies to --method svcca only")
    if args.epsilon and args.method == "cka":
        raise LmscopeError("--epsilon applies to --method cca, svcca and pwcca, not cka")
    layer_range = _layer_range(args.layers)
    col = load_collection(folder)
    layers = None
    if args.layers is not None:  # (col.model describes the stack collected: an encoder-decoder's encoder or decoder)
        layers = resolve_layers(layer_range, col.model.n_layers)
        if not layers:
            held = f"the collection's {col.stack} stack" if col.stack else "the model"
            raise LmscopeError(
                f"--layers {args.layers} selects no layer: {held} has layers 0..{col.model.n_layers - 1}"
            )
    options: dict[str, Any] = {"dims": args.dims} if args.dims is not None else {}
    if args.epsilon:
        options["epsilon"] = args.epsilon
    result = streaming.layer_similarity(
        col, args.method, args.site, args.site_b or args.site, layers, skip_first=args.skip_first,
        memory_mb=args.memory_mb, progress=sys.stderr.isatty(), threads=args.threads, **options,
    )  # fmt: skip
    _emit(result, args)


def _add_attention(commands: Any) -> None:
    parser = commands.add_parser("attention", help="attention head view, model view or neuron view (BertViz)")
    _text_arg(parser)
    parser.add_argument("--text-pair", default=None, help="a second sentence (BERT-style sentence pairs)")
    parser.add_argument("--layer", type=int, default=None, help="one layer (default: all; pick one for long texts)")
    parser.add_argument(
        "--view", choices=("head", "model", "neuron"), default="head", help="BertViz view (default head)"
    )
    parser.add_argument(
        "--kind",
        choices=("weights", "rollout", "value_norm"),
        default="weights",
        help="attention weights (default), rollout, or weights times value norms",
    )
    parser.add_argument("--head", type=_int(0), default=0, help="neuron view: the head to start on")
    parser.add_argument("--query", type=int, default=-1, help="the query position to start on (default: last)")
    parser.add_argument("--top-k", type=_int(1), default=None, help="show only the strongest K keys per query")
    parser.add_argument(
        "--part",
        choices=("encoder", "decoder", "cross"),
        default=None,
        help="encoder-decoder models: one kind of attention (default: Encoder, Decoder and Cross)",
    )
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_attention)


def _cmd_attention(args: argparse.Namespace) -> None:
    from lmscope.analysis.attention import needed_sites

    lm = _load(args)
    sites = needed_sites(args.view, args.kind)
    # capture only the layers shown (rollout multiplies every layer up to the chosen one)
    layers = None if args.layer is None else range(args.layer + 1) if args.kind == "rollout" else [args.layer]
    if lm.is_seq2seq:  # the decoder's layers are chosen; cross-attention needs its own sites
        sites = [*sites, *(f"cross_{s}" for s in sites if s in ("attn_probs", "q", "k", "v"))]
        sites += ["position_bias"] if "q" in sites else []  # T5's relative position bias, a term of the score
        out = _traced(lm, args, sites, layers=layers)
    else:
        out = _traced(lm, args, sites, text_pair=args.text_pair, layers=layers)
    result = out.attention(args.layer, args.view, args.kind, args.head, args.query, args.top_k, part=args.part)
    _emit(result, args)


def _add_probe(commands: Any) -> None:
    parser = commands.add_parser("probe", help="linear probes with control tasks at every layer (UD English EWT)")
    parser.add_argument("--task", default="upos", help="upos (default), xpos or deprel")
    parser.add_argument("--sites", default="embeddings,resid_post,mlp_act", help="comma-separated probing sites")
    parser.add_argument("--layers", default=None, help=LAYERS_HELP)
    parser.add_argument(
        "--tokens", type=_int(1), default=10_000, help="words of UD English EWT to probe (default 10000)"
    )
    parser.add_argument("--seeds", type=_int(1, 100), default=5, help="number of seeds (default 5)")
    parser.add_argument("--pool", choices=("first", "last", "mean"), default="first", help="subword(s) of a word")
    parser.add_argument("--epochs", type=_int(1, 10_000), default=50, help="training epochs per probe (default 50)")
    parser.add_argument(
        "--data", default=None, help="folder of en_ewt-ud-*.conllu[.gz] (default: the copy inside lmscope)"
    )
    parser.add_argument("--plot", metavar="FILE", help="write the accuracy/selectivity-by-layer figure (PNG, SVG)")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> None:
    from lmscope.probing import ProbingDataset, load_ud, probe

    sentences = load_ud(args.tokens, args.data)  # fails fast, before the model loads, if the data is missing
    _layer_range(args.layers)
    sites = _sites(args.sites)
    lm = _load(args)
    dataset = ProbingDataset.build(lm.tokenizer, sentences, args.task)
    result = probe(
        lm,
        dataset,
        sites=sites,
        layers=_layers(lm, args.layers, "encoder" if lm.is_seq2seq else None),  # an encoder-decoder's encoder
        seeds=args.seeds,
        pool=args.pool,
        epochs=args.epochs,
        progress=True,
    )
    if args.plot:
        from lmscope._files import write_with

        write_with(args.plot, result.plot)  # atomically (the temporary name keeps the suffix: the format)
        print(f"wrote {args.plot}", file=sys.stderr)
    _emit(result, args)


def _add_flow(commands: Any) -> None:
    parser = commands.add_parser("flow", help="information-flow graph of a prediction (LM Transparency Tool)")
    _text_arg(parser)
    parser.add_argument(
        "--threshold", type=_float(0.0, 1.0), default=0.04, help="prune edges lighter than this, 0 to 1 (default 0.04)"
    )
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
    parser.add_argument(
        "--mode", choices=("prune", "renormalize"), default="prune", help="drop light edges, or also renormalize"
    )
    parser.add_argument(
        "--stack",
        choices=("encoder", "decoder"),
        default=None,
        help="encoder-decoder models: the decoder's graph (default, with cross-attention edges) or the encoder's",
    )
    _target_arg(parser)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_flow)


def _cmd_flow(args: argparse.Namespace) -> None:
    lm = _load(args)
    sites = None if lm.is_seq2seq else ["resid_pre", "resid_post", "attn_out", "mlp_out", "attn_probs", "v", "mlp_act"]
    out = _traced(lm, args, sites)
    _emit(out.flow(threshold=args.threshold, position=args.position, mode=args.mode, stack=args.stack), args)


def _add_verify(commands: Any) -> None:
    parser = commands.add_parser("verify", help="check that lmscope reproduces a model exactly (run it on your model)")
    parser.add_argument("name", nargs="?", metavar="MODEL", help="model to check (default: --model, else embedded)")
    _model_args(parser)
    parser.add_argument("--text", default=None, help="input to check on (default: a fixed sentence)")
    parser.add_argument("--generate", type=_int(1, 64), default=4, help="greedy tokens to compare (default 4)")
    _output_args(parser)
    parser.set_defaults(run=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> None:
    from lmscope.analysis.verify import TEXT, verify

    args.model = args.name or args.model
    report = verify(_load(args), text=args.text or TEXT, generate=args.generate)
    _emit(report, args)
    if not report.passed:
        raise LmscopeError(f"verify failed: {'; '.join(report.failed)}")


def _add_causal_trace(commands: Any) -> None:
    parser = commands.add_parser("causal-trace", help="causal tracing (ROME): restore each state into a noised run")
    _text_arg(parser)
    parser.add_argument("--subject", required=True, help="the words to corrupt (as they appear in the text)")
    parser.add_argument("--answer", default=None, help="the correct next token (default: the top prediction)")
    parser.add_argument("--samples", type=_int(1, 64), default=3, help="noise samples to average (default 3)")
    parser.add_argument("--window", type=_int(1, 64), default=1, help="layers restored together (paper: 10)")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_causal_trace)


def _cmd_causal_trace(args: argparse.Namespace) -> None:
    lm = _load(args)
    _emit(lm.causal_trace(args.text, args.subject, args.answer, samples=args.samples, window=args.window), args)


def _add_faithfulness(commands: Any) -> None:
    parser = commands.add_parser(
        "faithfulness", help="remove a method's top-k edges or tokens vs random k (flow graph, saliency)"
    )
    _text_arg(parser)
    parser.add_argument(
        "--method",
        choices=("flow", "grad_x_input", "gradient", "input_x_gradient", "integrated_gradients", "occlusion"),
        default="flow",
        help="flow (the graph's edges, default) or a saliency method (the input's tokens)",
    )
    parser.add_argument(
        "--threshold", type=_float(0.0, 1.0), default=None, help="the flow graph's threshold (default 0.04)"
    )
    parser.add_argument("--draws", type=_int(1, 100), default=None, help="random draws per k (default 3; saliency 8)")
    parser.add_argument(
        "--baseline", default=None, help="saliency: a deleted token's embedding: zero (default), mean or a token"
    )
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_faithfulness)


def _cmd_faithfulness(args: argparse.Namespace) -> None:
    options: dict[str, Any] = {} if args.draws is None else {"draws": args.draws}
    if args.method == "flow" and args.baseline is not None:
        raise LmscopeError("--baseline applies to saliency methods (a deleted token's embedding), not to flow")
    if args.method != "flow" and args.threshold is not None:
        raise LmscopeError("--threshold applies to the flow graph (--method flow), not to saliency")
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.baseline is not None:
        options["baseline"] = args.baseline
    _emit(_load(args).faithfulness(args.text, args.method, **options), args)


# One entry per subcommand, in the order `lmscope --help` lists them.
_COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_models,
    _add_lens,
    _add_rankings,
    _add_watch,
    _add_saliency,
    _add_serve,
    _add_nmf,
    _add_collect,
    _add_similarity,
    _add_attention,
    _add_probe,
    _add_flow,
    _add_causal_trace,
    _add_faithfulness,
    _add_verify,
)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmscope", description="See inside Transformer language models.")
    parser.add_argument("--version", action="version", version=f"lmscope {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(commands)
    return parser


def _fail(message: str, status: int = 2) -> int:
    print(f"lmscope: error: {' '.join(message.split())}", file=sys.stderr)  # always one line
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    for number, value in enumerate(argv, start=1):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes that are not UTF-8 reach Python as lone surrogates
            shown = value.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace")
            return _fail(f"argument {number} ({shown}) is not valid UTF-8: give text in UTF-8")
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a one-line usage error already printed
        return stop.code if isinstance(stop.code, int) else 2
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        _check_outputs(args)
        run(args)
    except LmscopeError as error:
        return _fail(str(error))
    except BrokenPipeError:  # the reader went away (``lmscope ... | head``): stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:
        from lmscope._files import file_error

        if error.filename is None:
            return _fail(error.strerror or str(error))
        return _fail(str(file_error(error.filename, error, "use")))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as error:
        if os.environ.get("LMSCOPE_TRACEBACK"):
            raise
        return _fail(
            f"unexpected {type(error).__name__}: {error} (a bug in lmscope: please report it; "
            "LMSCOPE_TRACEBACK=1 shows where)",
            1,
        )
    return 0
