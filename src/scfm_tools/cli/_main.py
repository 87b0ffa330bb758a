"""Argument parsing, logging, progress and exit codes of the ``scfm-tools`` command."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from ._commands import COMMANDS, UsageError

__all__ = ["build_parser", "main"]

#: Exit status of a run that failed on its input or its arguments (argparse uses 2 as well).
EXIT_USAGE = 2
#: Exit status of any other failure.
EXIT_FAILURE = 1

# Failures that are the input's or the arguments' fault: their message says what to fix, so the
# command prints it on one line, without a traceback. (UnknownModelError is a KeyError;
# ManualDownloadError a FileNotFoundError.)
_USAGE_ERRORS = (
    UsageError,
    ValueError,
    KeyError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotImplementedError,
)


def _common(parser: argparse.ArgumentParser, *, output_required: bool = True) -> None:
    parser.add_argument("input", metavar="IN.h5ad", help="input AnnData file (raw counts)")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.h5ad",
        required=output_required,
        help="file to write: the input plus the results (refused if it exists)",
    )
    parser.add_argument(
        "--model",
        help="registered model name or checkpoint path (default: the sft.tl function's default)",
    )
    parser.add_argument("--layer", help="layer holding the counts (default: X)")
    parser.add_argument("--gene-key", help="var column with gene symbols or Ensembl IDs")
    parser.add_argument("--device", help="cpu, cuda, auto ... (default: sft.settings.device)")
    parser.add_argument("--seed", type=int, default=0, help="random_state (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def _inference(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--key-added", help="key of the result (default: per model family)")
    parser.add_argument("--batch-size", type=int, help="cells per forward pass")
    parser.add_argument("--chunk-size", type=int, help="cells read at a time (default 2000)")
    parser.add_argument(
        "--backed",
        action="store_true",
        help="read IN from disk in chunks instead of loading it (bounded memory)",
    )
    parser.add_argument(
        "--model-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option of the model family (VALUE read as JSON when it parses), e.g. "
        "batch_key=batch; repeatable",
    )


def _fine_tune(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fine-tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fine-tune a copy of the (CellPLM) model on the cells first (default: only "
        "without --model)",
    )


def _output_flags(parser: argparse.ArgumentParser, *, default) -> None:
    def value(v):
        return v if default is None else default

    parser.add_argument(
        "-v", "--verbose", action="count", default=value(0), help="more messages (-vv: debug)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=value(False), help="errors only, no bars"
    )
    parser.add_argument(
        "--debug", action="store_true", default=value(False), help="show tracebacks of failures"
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``scfm-tools`` argument parser (one subcommand per task)."""
    parser = argparse.ArgumentParser(
        prog="scfm-tools",
        description="Run single-cell foundation models on .h5ad files.",
    )
    _output_flags(parser, default=None)
    # The same flags after the command name; SUPPRESS keeps them from resetting the ones before.
    flags = argparse.ArgumentParser(add_help=False)
    _output_flags(flags, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[flags])

    embed = add("embed", "cell embeddings (sft.tl.embed_cells) -> obsm['X_<family>']")
    _common(embed)
    _inference(embed)
    embed.add_argument("--max-length", type=int, help="most genes per cell (tokens)")
    embed.add_argument("--batch-key", help="CellPLM: obs column naming each cell's sample")
    _fine_tune(embed)

    impute = add("impute", "imputed expression (sft.tl.impute) -> layers['<family>_...']")
    _common(impute)
    _inference(impute)
    impute.add_argument(
        "--target-depth", help="scFoundation: depth to predict at, e.g. t4, f10, a1 or 1e4"
    )
    impute.add_argument("--batch-key", help="CellPLM: obs column naming each cell's sample")
    impute.add_argument("--max-cells", type=int, help="CellPLM: most cells per sequence")
    _fine_tune(impute)

    annotate = add(
        "annotate", "cell types (sft.tl.annotate) -> obs['<family>_label'], ['..._score']"
    )
    _common(annotate)
    _inference(annotate)
    annotate.add_argument("--reference", metavar="REF.h5ad", help="labelled cells to train on")
    annotate.add_argument("--label-key", help="obs column of REF with the cell types")
    annotate.add_argument("--reference-layer", help="layer of REF with its counts")
    annotate.add_argument(
        "--method",
        choices=["auto", "expression", "knn", "logreg", "finetune"],
        help="with --reference: measure the ways below by cross-validation and take the best "
        "(auto), logistic regression on the expression, kNN or logistic regression on "
        "embeddings, or fine-tuning (scBERT); default: auto without --model, finetune where "
        "the given model can, else knn",
    )
    annotate.add_argument("--threshold", type=float, help="score below which cells are Unassigned")
    annotate.add_argument(
        "--majority-voting",
        action="store_true",
        default=None,
        help="give every cell of an over-cluster its most common label (CellTypist)",
    )
    annotate.add_argument("--over-clustering", help="obs column of IN with the clusters to vote in")
    annotate.add_argument(
        "--min-prop", type=float, help="share of a cluster the top label needs (else Heterogeneous)"
    )
    annotate.add_argument("--max-epochs", type=int, help="fine-tuning epochs over REF")

    pretrain = add("pretrain", "train a model on IN (scGPT), save it, optionally embed IN with it")
    _common(pretrain, output_required=False)
    pretrain.add_argument(
        "--save-model", metavar="DIR", required=True, help="folder to write the trained model to"
    )
    pretrain.add_argument(
        "--family", choices=["scgpt"], default="scgpt", help="model family (default scgpt)"
    )
    pretrain.add_argument("--max-epochs", type=int, default=10, help="default 10")
    pretrain.add_argument("--batch-size", type=int, default=64, help="default 64")
    pretrain.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    pretrain.add_argument("--batch-key", help="obs column of batch labels")
    for flag, default in (
        ("--d-model", 64),
        ("--n-layers", 2),
        ("--n-heads", 4),
        ("--d-hid", 128),
        ("--max-seq-len", 1200),
    ):
        pretrain.add_argument(flag, type=int, help=f"from scratch: model size (default {default})")
    return parser


def _configure_output(args: argparse.Namespace) -> None:
    from .._settings import settings

    settings.verbosity = 0 if args.quiet else min(1 + args.verbose, 3)
    settings.progress_bar = not args.quiet
    level = logging.WARNING if args.verbose else logging.ERROR
    # Lightning reports its hardware and tips at INFO; keep them for -v.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.INFO if args.verbose else level)
    if not args.verbose and not args.debug:
        # Library deprecation notices are for developers, not for users of the command.
        warnings.simplefilter("ignore")


def _one_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``scfm-tools`` command; return its exit status (0 ok, 2 bad input, 1 failure)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, message printed)
        return int(stop.code or 0)
    from .._settings import settings

    before = settings.verbosity, settings.progress_bar
    _configure_output(args)
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("scfm-tools: interrupted; no output was written.", file=sys.stderr)
        return 130
    except _USAGE_ERRORS as err:
        if args.debug:
            raise
        print(f"scfm-tools {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if args.debug:
            raise
        print(
            f"scfm-tools {args.command}: failed ({type(err).__name__}): {_one_line(err)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:  # the command ran inside a Python session too (tests, notebooks)
        settings.verbosity, settings.progress_bar = before
