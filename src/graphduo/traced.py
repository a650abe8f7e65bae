"""Traced mode: the static-graph paradigm. The step is traced once into a jaxpr and compiled by XLA.

``TracedStep`` is the only place graphduo calls ``jax.jit`` on a training or evaluation step. It
compiles ahead of time, stage by stage (trace -> lower -> compile), so each stage's time and
artefact is on record: the jaxpr, the StableHLO, XLA's cost and memory analyses. Compiled
executables are cached by input signature; a new signature (a new batch shape, say) compiles again,
and that second compile is counted and announced, never silent.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

MODE = "traced"
log = logging.getLogger(__name__)


class TracingError(TypeError):
    """The step cannot be traced: it branches in Python on a value that is only known at run time."""


@dataclasses.dataclass(frozen=True)
class CompileRecord:
    """One compilation of the step for one input signature, with each stage's wall time."""

    signature: tuple
    trace_s: float
    lower_s: float
    compile_s: float

    @property
    def total_s(self) -> float:
        return self.trace_s + self.lower_s + self.compile_s


@dataclasses.dataclass
class Stages:
    """The ahead-of-time artefacts of one compilation."""

    traced: Any  # jax.stages.Traced
    lowered: Any  # jax.stages.Lowered
    compiled: Any  # jax.stages.Compiled
    record: CompileRecord

    @property
    def jaxpr(self):
        return getattr(self.traced, "jaxpr", None)

    def cost_analysis(self) -> dict[str, float]:
        """XLA's estimate for one call: ``flops``, ``transcendentals``, ``bytes accessed``."""
        cost = self.compiled.cost_analysis()
        if isinstance(cost, list):  # older jaxlibs return one dict per device
            cost = cost[0]
        return {k: float(v) for k, v in cost.items() if k in ("flops", "transcendentals", "bytes accessed")}

    def memory_analysis(self) -> dict[str, int]:
        """Bytes of arguments, outputs, temporaries and generated code, as XLA planned them."""
        stats = self.compiled.memory_analysis()
        names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes")
        return {n: int(getattr(stats, n)) for n in names if hasattr(stats, n)}


def signature(args) -> tuple:
    """What an executable is specialised on: the tree structure, shapes and dtypes of ``args``."""
    leaves, treedef = jax.tree.flatten(args)
    return (treedef, *((getattr(x, "shape", ()), getattr(x, "dtype", type(x))) for x in leaves))


class TracedStep:
    """Compile ``fn`` with ``jax.jit`` once per input signature and call the executable.

    Args:
      fn: a pure step function.
      donate_argnums: arguments whose buffers XLA may reuse for the outputs (the train state:
        the update then happens in place, as in PyTorch).
      on_recompile: called with each ``CompileRecord`` after the first (default: log a warning).
    """

    mode = MODE

    def __init__(self, fn: Callable[..., Any], *, donate_argnums: int | tuple[int, ...] = (),
                 on_recompile: Callable[[CompileRecord], None] | None = None,
                 transform: Callable[..., Any] | None = None, **jit_options):
        self.fn = fn
        self.name = getattr(fn, "__name__", "step")
        # ``transform`` replaces jax.jit (graphduo.parallel passes jax.pmap); ``jit_options`` are
        # jax.jit's own (in_shardings, out_shardings for the sharded strategies).
        self.jitted = (transform or jax.jit)(fn, donate_argnums=donate_argnums, **jit_options)
        self.compiles: list[CompileRecord] = []
        self._executables: dict[tuple, Any] = {}
        self._stages: dict[tuple, Stages] = {}
        self._last = None  # the executable of the latest call
        self._on_recompile = on_recompile or self._warn_recompile

    def __call__(self, *args):
        if jax.config.jax_debug_nans:  # jit's own path re-runs op by op to name the op that made a NaN
            return self.jitted(*args)
        if self._last is not None:
            # The common case, a call like the last: no signature to compute (flattening the whole
            # train state every call is a visible share of a short step). The executable checks
            # its arguments' tree, shapes and dtypes itself before it runs (nothing donated yet)
            # and raises TypeError on a mismatch: then look the signature up. It does not check
            # weak types, so this path is kept for executables whose arguments were all strongly
            # typed arrays (graphduo's steps: a train state and a batch); a Python scalar where
            # the last call had an array is then taken as an array of that dtype.
            try:
                return self._last(*args)
            except TypeError:
                pass
        sig = signature(args)
        executable = self._executables.get(sig)
        if executable is None:
            executable = self.stages(*args).compiled
        self._last = executable if _strong_arrays(args) else None
        return executable(*args)

    def stages(self, *args) -> Stages:
        """Trace, lower and compile for the signature of ``args`` (cached), timing each stage."""
        sig = signature(args)
        if sig in self._stages:
            return self._stages[sig]
        t0 = time.perf_counter()
        try:
            # jax.pmap has no separate trace stage: its lower() traces too, and trace_s is ~0.
            traced = self.jitted.trace(*args) if hasattr(self.jitted, "trace") else None
        except jax.errors.ConcretizationTypeError as err:
            first_line = str(err).strip().splitlines()[0]
            raise TracingError(
                f"{self.name} branches in Python on a traced value, which works in eager mode but not "
                f"under jax.jit: use jax.lax.cond / jax.lax.while_loop / jnp.where instead, or run it "
                f"with --mode eager ({first_line})"
            ) from err
        t1 = time.perf_counter()
        lowered = traced.lower() if traced is not None else self.jitted.lower(*args)
        t2 = time.perf_counter()
        compiled = lowered.compile()
        t3 = time.perf_counter()
        record = CompileRecord(sig, t1 - t0, t2 - t1, t3 - t2)
        stages = Stages(traced, lowered, compiled, record)
        self._stages[sig] = stages
        self._executables[sig] = compiled
        self.compiles.append(record)
        if len(self.compiles) > 1:
            self._on_recompile(record)
        return stages

    @property
    def compile_time_s(self) -> float:
        """Total trace + lower + compile time spent so far."""
        return sum(r.total_s for r in self.compiles)

    def _warn_recompile(self, record: CompileRecord) -> None:
        shapes = [s for s in record.signature[1:]]
        log.warning("%s compiled again (compile #%d, %.2f s) for a new input signature: %s",
                    self.name, len(self.compiles), record.total_s, _describe(shapes))


def _strong_arrays(args) -> bool:
    """Every leaf of ``args`` an array with a strong dtype (no Python scalars, no weak types)."""
    return all(isinstance(x, (jax.Array, np.ndarray)) and not getattr(x, "weak_type", False)
               for x in jax.tree.leaves(args))


def _describe(shapes) -> str:
    return ", ".join(f"{dtype}{list(shape)}" for shape, dtype in shapes if len(shape) > 0)[:300]
