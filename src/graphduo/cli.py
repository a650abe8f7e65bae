"""The ``graphduo`` command: parse arguments, call the library, report. No training logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing

from graphduo.config import Config, ConfigError
from graphduo.data import DataError

EXIT_USAGE = 2  # bad input: nothing was written
EXIT_FAILED = 1  # the run started and failed (diverged, modes disagree)

DESCRIPTION = """\
graphduo trains the same Flax models in two paradigms and measures what compiling buys:
  eager   op by op, define-by-run (PyTorch's dynamic graph); every op pays dispatch overhead
  traced  the whole step traced once and compiled by XLA with jax.jit (a static graph)

examples:
  graphduo compare                               # default CNN on digits, both modes, side by side
  graphduo compare --model mlp --batch-size 256 --json
  graphduo train --model mlp --mode eager --optimizer sgd --lr 0.05 --epochs 5
  graphduo train --dataset mnist --data-dir ~/data --download --steps 2000 --json
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2), not a usage dump."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(annotation) -> type:
    hint = annotation if not isinstance(annotation, str) else eval(annotation, vars(typing), vars(types))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(parser: argparse.ArgumentParser, *, only: tuple[str, ...] | None = None,
                         defaults: dict | None = None) -> None:
    """Add one flag per ``Config`` field (or the fields in ``only``), help and choices included."""
    defaults = defaults or {}
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        kind = _scalar_type(f.type)
        help_text = meta["help"]
        if kind is bool:
            parser.add_argument(_flag(f.name), action="store_true", default=default, help=help_text)
            continue
        parse = meta.get("parse") or kind
        sep = "x" if meta.get("metavar") == "HxWxC" else ","
        shown = sep.join(map(str, default)) if isinstance(default, tuple) else default
        if default is not None and "default" not in help_text:
            help_text += f" (default: {shown})"
        parser.add_argument(_flag(f.name), type=_checked(parse, f.name), default=default,
                            choices=meta.get("choices"), metavar=meta.get("metavar"), help=help_text)


def _checked(parse, name):
    def convert(text):
        try:
            return parse(text)
        except (ValueError, ConfigError) as err:
            raise argparse.ArgumentTypeError(f"invalid value {text!r} for {_flag(name)}: {err}") from None

    convert.__name__ = getattr(parse, "__name__", name)
    return convert


def _config_from(args, fields) -> Config:
    return Config(**{name: getattr(args, name) for name in fields})


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="graphduo", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    train = sub.add_parser("train", help="train one model in one mode, evaluating every epoch",
                           description="Train a model in eager or traced mode with a live progress bar; "
                                       "evaluate on the held-out split every epoch; write metrics as JSON "
                                       "lines into the run directory.")
    add_config_arguments(train)
    _add_output_flags(train, "print the final summary as one JSON object on stdout")

    compare = sub.add_parser(
        "compare", help="train the same steps in both modes and compare their speed",
        description="Train the same model for the same steps from identical parameters and batches, "
                    "once eagerly and once traced; check both reach the same loss; report time to first "
                    "step, steady-state step time, samples/s, the speedup and the break-even step count.")
    compare_fields = ("model", "dataset", "optimizer", "lr", "batch_size", "steps", "seed",
                      "data_dir", "download", "synthetic_shape", "synthetic_size",
                      "mlp_features", "cnn_channels", "cnn_dense")
    add_config_arguments(compare, only=compare_fields, defaults={"steps": 200})
    _add_output_flags(compare, "print the result as one JSON object on stdout")
    compare.set_defaults(config_fields=compare_fields)
    train.set_defaults(config_fields=tuple(f.name for f in dataclasses.fields(Config)))
    return parser


def _add_output_flags(parser, json_help: str) -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="graphduo: %(message)s", stream=sys.stderr)
    prog = f"graphduo {args.command}"
    try:
        config = _config_from(args, args.config_fields).validate()
        if args.command == "train":
            return _train(config, args)
        return _compare(config, args)
    except (ConfigError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _train(config: Config, args) -> int:
    from graphduo.train import TrainingDiverged, train_and_evaluate

    try:
        summary = train_and_evaluate(config, progress=not args.quiet)
    except TrainingDiverged as err:
        print(f"graphduo train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['model']} ({summary['mode']}) on {summary['dataset']}: {summary['steps']} steps, "
              f"test accuracy {summary['test_accuracy']:.2%}, final loss {summary['final_loss']:.4f}, "
              f"{summary['step_time_ms']:.3f} ms/step ({summary['samples_per_s']:,.0f} samples/s), "
              f"compile {summary['compile_time_s']:.2f} s; metrics in {summary['run_dir']}")
    return 0


def _compare(config: Config, args) -> int:
    from graphduo.compare import compare, format_table

    if not args.quiet:
        print(f"graphduo compare: training {config.model} for {config.steps} steps in eager, then traced "
              f"mode...", file=sys.stderr)
    result = compare(config)
    print(json.dumps(result) if args.json else format_table(result))
    if not result["same_loss"]:
        print(f"graphduo compare: error: eager and traced ended at different losses "
              f"({result['modes']['eager']['final_loss']} vs {result['modes']['traced']['final_loss']})",
              file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
