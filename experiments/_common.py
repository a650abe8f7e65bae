"""What the experiment scripts (``python experiments/NAME.py``) share: constants, argument checks,
the preamble every ``main`` runs first, measuring helpers, and writing results.

The scripts import this module as ``_common``: Python puts the running script's folder
(experiments/) first on ``sys.path``. Whoever loads a script another way (the tests) puts that
folder there too. Nothing here runs at import: no JAX computation, no process setting.

The preamble. A script's ``main`` calls ``setup`` before any JAX computation: it applies graphduo's
process settings (``graphduo.cli.apply_process_settings``: the ``XLA_FLAGS`` entry for XLA:CPU's
convolutions, read once when JAX's backend starts, and the host memory policy) and returns what it
applied, which ``environment`` records in every ``results.json``, so each figure says what ran it.

Argument checks. Each script checks its arguments right after parsing, before any measurement: a
bad value stops it within seconds with argparse's usage and one ``error:`` line (exit status 2),
never with a traceback after minutes of work. The ``type=`` functions below raise
``argparse.ArgumentTypeError``, which argparse reports as ``NAME.py: error: argument --OPTION:
MESSAGE``.

The measuring helpers that are not graphduo's (the matmul ceiling, page faults, timing a call)
live here, beside ``graphduo.timing``'s step timer, which the scripts share with ``graphduo compare``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import shutil
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from graphduo import cli, runtime

INPUT_SHAPE = (28, 28, 1)  # the experiments' images: MNIST's shape, synthetic values
NUM_CLASSES = 10
LR = 1e-3  # Adam's learning rate in every timed step
MODELS = ("mlp", "cnn")  # the models every script knows how to build (and to copy into PyTorch)
ALL_MODELS = ("mlp", "cnn", "resnet", "rnn", "vit")  # graphduo's built-ins, for the scripts that take any
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def default_out(script: str) -> pathlib.Path:
    """A script's default ``--out``: next to the scripts, wherever they are run from."""
    return RESULTS / script


# ---------------------------------------------------------------------------------------------
# The preamble.


def setup(cpu_convolutions: str = runtime.DEFAULT_CPU_CONVOLUTIONS,
          host_memory: str = runtime.DEFAULT_HOST_MEMORY) -> runtime.ProcessSettings:
    """A script's first call in ``main``, before any JAX computation: graphduo's process settings
    (default: the CLI's), applied as an entry point applies them; what was applied is returned for
    ``environment``. Too late (JAX already started), the settings' notes say so."""
    return cli.apply_process_settings(cpu_convolutions, host_memory)


def environment(settings: runtime.ProcessSettings) -> dict[str, Any]:
    """``graphduo.timing.environment`` with the process settings ``setup`` applied: what every
    ``results.json`` records about the machine, the versions and the settings a figure came from."""
    from graphduo import timing

    return timing.environment(settings.record())


def describe_machine(env: dict[str, Any]) -> str:
    """One line naming what ``environment`` recorded, for the summaries results come with. Results
    recorded before the process settings were (their notes then stood apart) still read."""
    device = f"; {env['device_kind']}" if env.get("backend", "cpu") != "cpu" else ""
    settings = env.get("process_settings")
    if isinstance(settings, dict):
        notes = "; ".join(settings.get("notes", ())) or "process settings: none noted"
    else:
        notes = "; ".join(env[k] for k in ("convolutions", "host_memory") if k in env) or \
            "process settings: not recorded"
    return (f"{env['cpu']}, {env['cpu_count']} cores{device}; jax {env['jax']} ({env['backend']}), "
            f"python {env['python']}, XLA_FLAGS={env['xla_flags'] or '(none)'}; {notes}")


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, quoted so it can be pasted back into a shell."""
    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


# ---------------------------------------------------------------------------------------------
# Argument checks.


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


def models(text: str, choices: Sequence[str] = MODELS) -> list[str]:
    """``type=`` for a comma list of distinct model names out of ``choices`` (``MODELS``)."""
    names = _items(text, str, "model names", distinct=True)
    unknown = [n for n in names if n not in choices]
    if unknown:
        _fail(f"unknown model {unknown[0]!r}: choose from {', '.join(choices)}")
    return names


def any_models(text: str) -> list[str]:
    """``type=`` for a comma list of graphduo's built-in models (``ALL_MODELS``)."""
    return models(text, ALL_MODELS)


def writable_folder(path: str | os.PathLike, what: str = "--out") -> pathlib.Path:
    """``path`` as a folder that exists and can be written to, made if missing (with its parents).

    For scripts that write their results at the end of a long run: call it first, so a bad path
    fails in a second with one line, not after the measurement. Raises ``ValueError`` whose message
    names ``what``, the path, the problem and the fix.
    """
    from graphduo import paths

    return paths.output_folder(path, what, create=True)


def check_out(parser: argparse.ArgumentParser, path: pathlib.Path) -> pathlib.Path:
    """``--out`` as a folder that exists and can be written, or ``parser.error`` (exit 2) saying why.

    Makes the folder (``writable_folder``), so call it after every other check.
    """
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


# ---------------------------------------------------------------------------------------------
# Inputs and state.


def host_batch(batch_size: int, *, input_shape: Sequence[int] = INPUT_SHAPE,
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """A synthetic batch in host memory: images uniform in [0, 1) (the range of real pixel values),
    labels uniform over the classes. Timing does not depend on the values, only on the shapes;
    ``rng`` (default: seed 0) makes successive batches differ."""
    rng = np.random.default_rng(0) if rng is None else rng
    return {"image": rng.random((batch_size, *input_shape), dtype=np.float32),
            "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32)}


def make_batch(batch_size: int, *, input_shape: Sequence[int] = INPUT_SHAPE, seed: int = 0) -> dict[str, Any]:
    """``host_batch`` on JAX's default device, already there when returned (nothing timed later
    pays for the transfer)."""
    import jax

    batch = host_batch(batch_size, input_shape=input_shape, rng=np.random.default_rng(seed))
    return jax.block_until_ready(jax.device_put(batch))


def copy_tree(tree):
    """Fresh buffers with the same values: a step that donates its state consumes the buffers."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def steps_for(step_s: float, budget_s: float, lo: int, hi: int) -> int:
    """How many steps of ``step_s`` seconds fill ``budget_s``, within ``[lo, hi]``."""
    return int(min(hi, max(lo, round(budget_s / step_s))))


# ---------------------------------------------------------------------------------------------
# Measuring helpers.


def time_call(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 2):
    """Time a no-argument call ``repeats`` times after ``warmup`` untimed calls (first call apart,
    every call run to completion): a ``graphduo.timing.StepTimes``."""
    import jax

    from graphduo.timing import StepTimes

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return StepTimes(first, tuple(times))


def peak_matmul_size(backend: str | None = None) -> int:
    """The matmul size ``matmul_peak_flops`` uses by default: one that fills the device. 2048 on a
    CPU, where larger ones run no faster; 8192 on a GPU or TPU, where a 2048 product is so short
    that its launch weighs as much as its arithmetic."""
    import jax

    return 2048 if (backend or jax.default_backend()) == "cpu" else 8192


def matmul_peak_flops(n: int | None = None, *, repeats: int = 10) -> float:
    """This machine's practical compute ceiling: FLOP/s of a jitted n x n float32 matmul (median),
    at JAX's default precision (so on a GPU in the precision the models' float32 matmuls use:
    TF32 on NVIDIA's since Ampere). ``n``: ``peak_matmul_size()`` unless given."""
    import jax
    import jax.numpy as jnp

    n = n or peak_matmul_size()
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    times = time_call(lambda: matmul(a, a), repeats=repeats)
    return 2 * n**3 / (times.median_ms / 1e3)


def minor_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``): pages the kernel mapped and zeroed
    on first touch. Around a step, what the ``reuse`` host memory policy (``graphduo.runtime``) is
    meant to keep near zero. POSIX only."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------------------------------------
# Writing results.


def pyplot():
    """matplotlib's ``pyplot`` drawing to files (Agg), or None, with a note on stderr, when
    matplotlib is not installed: a run's results are worth keeping without their plots."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: skipping the plots (pip install -c constraints.txt ".[plots]")',
              file=sys.stderr)
        return None
    return plt


def settings_record(args: argparse.Namespace) -> dict[str, Any]:
    """A script's parsed arguments as JSON can hold them (paths as text)."""
    return {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}


def write_results(out: pathlib.Path, payload: dict[str, Any]) -> pathlib.Path:
    """``out/results.json``: every figure a run measured, with its command and environment."""
    path = out / "results.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def write_summary(out: pathlib.Path, lines: str | Sequence[str]) -> pathlib.Path:
    """``out/SUMMARY.md`` from its text or its lines."""
    path = out / "SUMMARY.md"
    text = lines if isinstance(lines, str) else "\n".join(lines)
    path.write_text(text if text.endswith("\n") else text + "\n")
    return path
