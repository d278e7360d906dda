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
    parser.add_argument("text")
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
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


def _add_rankings(commands: Any) -> None:
    parser = commands.add_parser("rankings", help="rank of each generated (else next) token after every layer")
    parser.add_argument("text")
    parser.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens first and rank them")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_rankings)


def _cmd_rankings(args: argparse.Namespace) -> None:
    lm = _load(args)
    if args.generate:
        out = lm.generate(args.text, generate=args.generate, sites=["resid_post"])
    else:
        out = lm.trace(args.text, sites=["resid_post"])
    _emit(out.rankings(), args)


def _add_watch(commands: Any) -> None:
    parser = commands.add_parser("watch", help="rank of chosen words for one prediction after every layer")
    parser.add_argument("text")
    parser.add_argument("--words", nargs="+", required=True, help='words to rank, e.g. --words " is" " are"')
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_watch)


def _cmd_watch(args: argparse.Namespace) -> None:
    lm = _load(args)
    out = lm.trace(args.text, sites=["resid_post"])
    _emit(out.rankings_watch(args.words, position=args.position), args)


def _add_saliency(commands: Any) -> None:
    parser = commands.add_parser("saliency", help="input saliency of each generated (else next) token (Ecco)")
    parser.add_argument("text")
    parser.add_argument("--generate", type=int, default=0, metavar="N", help="generate N tokens first and explain them")
    parser.add_argument(
        "--method",
        default="grad_x_input",
        choices=("grad_x_input", "gradient", "input_x_gradient", "integrated_gradients"),
    )
    parser.add_argument("--target", choices=("prob", "logit"), default="prob", help="probability (default) or logit")
    parser.add_argument("--contrast", metavar="TOKEN", help="why each output rather than TOKEN (logit difference)")
    parser.add_argument("--steps", type=int, default=50, help="integrated gradients: quadrature points (default 50)")
    parser.add_argument("--style", choices=("minimal", "detailed"), default="minimal", help="HTML view style")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_saliency)


def _cmd_saliency(args: argparse.Namespace) -> None:
    lm = _load(args)
    # saliency runs its own forward passes: capture nothing but the logits
    out = lm.generate(args.text, generate=args.generate, sites=[]) if args.generate else lm.trace(args.text, sites=[])
    _emit(out.saliency(args.method, args.style, target=args.target, contrast=args.contrast, steps=args.steps), args)


def _add_serve(commands: Any) -> None:
    parser = commands.add_parser("serve", help="start the web app (interactive explorer) on the embedded model")
    parser.add_argument("--config", default=None, help="app config JSON file (default: the one shipped)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.set_defaults(run=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> None:
    import threading

    try:
        import uvicorn

        from lmscope.app import create_app
        from lmscope.app.server import GRACEFUL_SHUTDOWN_S
    except ImportError as error:
        raise LmscopeError(f"the web app needs FastAPI and uvicorn ({error}): pip install 'lmscope[app]'") from error
    app = create_app(args.config)
    state = app.state.lmscope
    # Load the default model while the server starts, so the first run does not wait for it.
    threading.Thread(target=state.preload, name="lmscope-preload", daemon=True).start()
    print(f"lmscope: serving on http://{args.host}:{args.port}/ (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def _layer_range(text: str | None) -> slice:
    """``"A:B"`` (B excluded, either may be empty) or ``"A"`` as a slice of layers."""
    if not text:
        return slice(None)
    try:
        if ":" in text:
            start, stop = (int(part) if part.strip() else None for part in text.split(":", 1))
            return slice(start, stop)
        layer = int(text)
    except ValueError:
        raise LmscopeError(f"--layers takes A:B (B excluded) or one layer number, not {text!r}") from None
    return slice(layer, layer + 1 if layer != -1 else None)


def _texts(source: str, limit: int | None = None) -> list[str]:
    """A file's texts (CoNLL-U sentences, else non-empty lines), or ``source`` itself as one text."""
    from pathlib import Path

    from lmscope.analysis.collect import read_texts

    return read_texts(source, limit) if Path(source).is_file() else [source]


def _add_nmf(commands: Any) -> None:
    parser = commands.add_parser("nmf", help="factor explorer: NMF (or PCA/ICA) of FFN activations")
    parser.add_argument("text", help="a text, or a file (one text per line, or a .conllu file) for a corpus")
    parser.add_argument("--components", type=int, default=8, help="number of factors (default 8)")
    parser.add_argument("--layers", default=None, help="layer range A:B, B excluded (default: all)")
    parser.add_argument("--method", choices=("nmf", "pca", "ica"), default="nmf")
    parser.add_argument("--site", default="mlp_act", help="mlp_act (default) or a residual site")
    parser.add_argument("--nonneg", choices=("clip", "shift", "error"), default="clip", help="negative values (NMF)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many texts of a file")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_nmf)


def _cmd_nmf(args: argparse.Namespace) -> None:
    from lmscope.analysis import collect, factorize

    texts, layers = _texts(args.text, args.limit), _layer_range(args.layers)
    lm = _load(args)
    options = dict(method=args.method, site=args.site, nonneg=args.nonneg, seed=args.seed)
    if len(texts) == 1:
        source = lm.trace(texts[0], sites=[args.site], layers=layers).trace
    else:
        source = collect(lm, texts, sites=[args.site], layers=layers, progress=sys.stderr.isatty())
    _emit(factorize(source, args.components, layers.start, layers.stop, **options), args)


def _add_collect(commands: Any) -> None:
    parser = commands.add_parser("collect", help="collect per-token activations of a corpus into safetensors shards")
    parser.add_argument("text", help="a file with one text per line, or a .conllu file (or a single text)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new directory for the shards")
    parser.add_argument("--sites", default="resid_post", help="comma-separated sites (default resid_post)")
    parser.add_argument("--layers", default=None, help="layer range A:B, B excluded (default: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="use at most this many texts")
    parser.add_argument("--json", action="store_true", help="print a JSON summary")
    _model_args(parser)
    parser.set_defaults(run=_cmd_collect)


def _cmd_collect(args: argparse.Namespace) -> None:
    from lmscope.analysis import collect

    texts, layers = _texts(args.text, args.limit), _layer_range(args.layers)
    lm = _load(args)
    col = collect(lm, texts, args.sites, layers, args.batch_size, args.out, progress=sys.stderr.isatty())
    summary = {"out": str(col.root), "texts": len(col), "tokens": col.n_tokens, "sites": list(col.sites)}
    summary["layers"] = list(col.layers)
    print(json.dumps(summary) if args.json else repr(col))


def _add_attention(commands: Any) -> None:
    parser = commands.add_parser("attention", help="attention head view, model view or neuron view (BertViz)")
    parser.add_argument("text")
    parser.add_argument("--text-pair", default=None, help="a second sentence (BERT-style sentence pairs)")
    parser.add_argument("--layer", type=int, default=None, help="one layer (default: all; pick one for long texts)")
    parser.add_argument("--view", choices=("head", "model", "neuron"), default="head")
    parser.add_argument("--kind", choices=("weights", "rollout", "value_norm"), default="weights")
    parser.add_argument("--head", type=int, default=0, help="neuron view: the head to start on")
    parser.add_argument("--query", type=int, default=-1, help="the query position to start on (default: last)")
    parser.add_argument("--top-k", type=int, default=None, help="show only the strongest K keys per query")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_attention)


def _cmd_attention(args: argparse.Namespace) -> None:
    from lmscope.analysis.attention import needed_sites

    lm = _load(args)
    sites = needed_sites(args.view, args.kind)
    # capture only the layers shown (rollout multiplies every layer up to the chosen one)
    layers = None if args.layer is None else range(args.layer + 1) if args.kind == "rollout" else [args.layer]
    out = lm.trace(args.text, text_pair=args.text_pair, sites=sites, layers=layers)
    result = out.attention(args.layer, args.view, args.kind, args.head, args.query, args.top_k)
    _emit(result, args)


def _add_probe(commands: Any) -> None:
    parser = commands.add_parser("probe", help="linear probes with control tasks at every layer (UD English EWT)")
    parser.add_argument("--task", default="upos", help="upos (default), xpos or deprel")
    parser.add_argument("--sites", default="embeddings,resid_post,mlp_act", help="comma-separated probing sites")
    parser.add_argument("--layers", default=None, help="layer range A:B, B excluded (default: all)")
    parser.add_argument("--tokens", type=int, default=10_000, help="words of UD English EWT to probe (default 10000)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--pool", choices=("first", "last", "mean"), default="first", help="subword(s) of a word")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--data", default=None, help="folder of en_ewt-ud-*.conllu (default ../shared/data/...)")
    parser.add_argument("--plot", metavar="FILE", help="write the accuracy/selectivity-by-layer figure (PNG, SVG)")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_probe)


def _cmd_probe(args: argparse.Namespace) -> None:
    from lmscope.probing import ProbingDataset, load_ud, probe

    sentences = load_ud(args.tokens, args.data)  # fails fast, before the model loads, if the data is missing
    lm = _load(args)
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    dataset = ProbingDataset.build(lm.tokenizer, sentences, args.task)
    result = probe(
        lm,
        dataset,
        sites=sites,
        layers=_layer_range(args.layers),
        seeds=args.seeds,
        pool=args.pool,
        epochs=args.epochs,
        progress=True,
    )
    if args.plot:
        result.plot(args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    _emit(result, args)


def _add_flow(commands: Any) -> None:
    parser = commands.add_parser("flow", help="information-flow graph of a prediction (LM Transparency Tool)")
    parser.add_argument("text")
    parser.add_argument("--threshold", type=float, default=0.04, help="prune edges lighter than this (default 0.04)")
    parser.add_argument("--position", type=_position, default="next", help=POSITION_HELP)
    parser.add_argument("--mode", choices=("prune", "renormalize"), default="prune")
    _model_args(parser)
    _output_args(parser)
    parser.set_defaults(run=_cmd_flow)


def _cmd_flow(args: argparse.Namespace) -> None:
    lm = _load(args)
    out = lm.trace(args.text, sites=["resid_pre", "resid_post", "attn_out", "mlp_out", "attn_probs", "v", "mlp_act"])
    _emit(out.flow(threshold=args.threshold, position=args.position, mode=args.mode), args)


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
    _add_attention,
    _add_probe,
    _add_flow,
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
