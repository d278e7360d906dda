"""``lmscope`` command line: the library's verbs over text, printing text twins or JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lmscope.errors import LmscopeError

__all__ = ["main"]


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model name, directory, .gguf file or HF id (default: embedded)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")


def _output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--html", metavar="FILE", help="also write the view as a standalone HTML file")


def _load(args: argparse.Namespace) -> Any:
    from lmscope import from_pretrained

    return from_pretrained(args.model, device=args.device, dtype=args.dtype)


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
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> None:
    from lmscope import available_models

    models = available_models()
    if args.json:
        print(json.dumps(models))
        return
    width = max(map(len, models))
    for name, description in models.items():
        print(f"{name.ljust(width)}  {description}")


def _add_lens(commands: Any) -> None:
    parser = commands.add_parser("lens", help="logit lens: top tokens after every layer at a position")
    parser.add_argument("text")
    parser.add_argument("--position", type=int, default=-1)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--no-norm", action="store_true", help="skip the final norm before unembedding")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_lens)


def _cmd_lens(args: argparse.Namespace) -> None:
    lm = _load(args)
    out = lm.trace(args.text, sites=["resid_post"])
    result = out.layer_predictions(position=args.position, layer=args.layer, topk=args.topk, norm=not args.no_norm)
    _emit(result, args)


# One entry per subcommand, in the order `lmscope --help` lists them.
_COMMANDS: tuple[Callable[[Any], None], ...] = (
    _add_models,
    _add_lens,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmscope", description="See inside Transformer language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 with a one-line message on bad input)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except LmscopeError as error:
        print(f"lmscope: error: {error}", file=sys.stderr)
        return 2
    return 0
