"""Command-line checks shared by the experiment scripts (``python experiments/NAME.py``).

Each script checks its arguments right after parsing, before any measurement: a bad value stops it
within seconds with argparse's usage and one ``error:`` line (exit status 2), never with a traceback
after minutes of work. The ``type=`` functions below raise ``argparse.ArgumentTypeError``, which
argparse reports as ``NAME.py: error: argument --OPTION: MESSAGE``.

The scripts import this module as ``_args``: Python puts the running script's folder (experiments/)
first on ``sys.path``. Whoever loads a script another way (the tests) puts that folder there too.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import textwrap

MODELS = ("mlp", "cnn")  # the models every script knows how to build (28x28x1 inputs, 10 classes)


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def _int_at_least(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        _fail(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """``type=`` for a count or size: an integer of at least 1."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """``type=`` for a count that may be 0 (warm-up steps)."""
    return _int_at_least(text, 0, "an integer of at least 0")


def positive_float(text: str) -> float:
    """``type=`` for seconds, a bandwidth, a scale: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        _fail(f"expected a positive number, got {text!r}")
    return value


def _items(text: str, parse, what: str, distinct: bool) -> list:
    parts = [p.strip() for p in text.split(",")]
    if not all(parts):
        _fail(f"expected comma-separated {what}, got {text!r}")
    values = []
    for p in parts:
        try:
            values.append(parse(p))
        except argparse.ArgumentTypeError:
            _fail(f"expected comma-separated {what}, got {p!r}" + (f" in {text!r}" if len(parts) > 1 else ""))
    if distinct and len(set(values)) < len(values):
        repeated = next(p for p, v in zip(parts, values) if values.count(v) > 1)
        _fail(f"{repeated!r} appears twice in {text!r}")
    return values


def positive_ints(text: str) -> list[int]:
    """``type=`` for a comma list of positive integers, repeats allowed (layer widths: ``512,512``)."""
    return _items(text, positive_int, "positive integers", distinct=False)


def batch_sizes(text: str) -> list[int]:
    """``type=`` for a comma list of distinct positive integers (``1,8,64``)."""
    return _items(text, positive_int, "positive integers", distinct=True)


def positive_floats(text: str) -> list[float]:
    """``type=`` for a comma list of distinct positive numbers (``0.1,2,10``)."""
    return _items(text, positive_float, "positive numbers", distinct=True)


def models(text: str) -> list[str]:
    """``type=`` for a comma list of distinct model names out of ``MODELS``."""
    names = _items(text, str, "model names", distinct=True)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        _fail(f"unknown model {unknown[0]!r}: choose from {', '.join(MODELS)}")
    return names


def check_out(parser: argparse.ArgumentParser, path: pathlib.Path) -> pathlib.Path:
    """``--out`` as a folder that exists and can be written, or ``parser.error`` (exit 2) saying why.

    Makes the folder (``graphduo.timing.writable_folder``), so call it after every other check.
    """
    from graphduo.timing import writable_folder

    try:
        return writable_folder(path, "--out")
    except ValueError as err:
        parser.error(str(err))


def examples(doc: str | None) -> str | None:
    """The ``Run:`` block of a script's docstring (up to the next blank line), for ``--help``."""
    lines = (doc or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Run:"), None)
    if start is None:
        return None
    block = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        block.append(line)
    return "examples (from the repository root):\n" + textwrap.indent(textwrap.dedent("\n".join(block)), "  ")


def make_parser(doc: str | None, description: str) -> argparse.ArgumentParser:
    """A parser whose help shows ``description`` (wrapped) and the docstring's ``Run:`` examples as
    written. Options state their own defaults in their help text (no ArgumentDefaultsHelpFormatter,
    which would repeat them and add ``(default: None)`` to the ones that depend on ``--quick``)."""
    width = max(40, min(shutil.get_terminal_size().columns - 2, 100))
    return argparse.ArgumentParser(description=textwrap.fill(description, width), epilog=examples(doc),
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def out_help(what: str, default: pathlib.Path) -> str:
    return f"folder for {what}, made if missing (default {default})"
