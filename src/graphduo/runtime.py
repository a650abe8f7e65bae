"""XLA settings read once, when JAX starts its CPU backend. Entry points apply them, libraries don't.

One setting lives here: which library runs XLA:CPU's convolutions. jaxlib 0.10 hands them to
YNNPACK by default; XLA's older Eigen path runs the CNN's convolutions 2-3x faster on the CPU
measured, their weight gradients most (experiments/RESULTS.md, "The CNN step": with graphduo's
formulation the default CNN's traced step at batch 256 took 75 ms on Eigen, 135 ms on YNNPACK).
The choice is an ``XLA_FLAGS``
entry, so it covers eager ops and compiled steps alike, and the eager-vs-traced comparison stays
like for like.

This module only computes the setting; entry points apply it, before any JAX computation:
``graphduo train|compare|inspect`` (``--cpu-convolutions``), the experiment scripts and the test
suite's ``conftest.py``. A program using graphduo as a library does the same, first thing: it sets
the environment variable ``XLA_FLAGS`` to ``graphduo.runtime.cpu_convolution_flags("eigen")[0]``
(README, "As a library").
"""

from __future__ import annotations

import functools
import mmap
import os
import pathlib

CPU_CONVOLUTIONS = ("eigen", "xla")
"""``eigen``: XLA's Eigen convolutions (graphduo's default); ``xla``: whatever this jaxlib picks."""

_YNN_TYPES = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_FLAG = f"--{_YNN_TYPES}=-individual_convolution"
"""Removes convolutions from the ops XLA:CPU gives to YNNPACK; they fall back to Eigen."""


@functools.cache
def _jaxlib_knows(flag_name: str) -> bool:
    """Whether this jaxlib's XLA registers ``flag_name``. An unknown name in ``XLA_FLAGS`` aborts
    the process when the backend starts, so a flag is only ever added once its name is found in
    the library that parses it."""
    import jaxlib

    for lib in sorted(pathlib.Path(jaxlib.__file__).parent.glob("*.so"), key=lambda p: -p.stat().st_size):
        if lib.stat().st_size < (1 << 20):
            continue
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(flag_name.encode()) >= 0:
                return True
    return False


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def cpu_convolution_flags(choice: str = "eigen", flags: str | None = None) -> tuple[str, str]:
    """``(XLA_FLAGS value, one-line account)`` that picks the library behind XLA:CPU's convolutions.

    ``flags`` defaults to the current ``XLA_FLAGS``. The value only ever adds to them, and only when
    the addition can take effect: JAX's backend has not started, the user's flags say nothing about
    YNNPACK fusions (theirs win), and this jaxlib knows the flag. ``choice="xla"`` changes nothing.
    Pure: putting the value into the environment is the caller's (an entry point's) job.
    """
    if choice not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution choice {choice!r}: choose one of {', '.join(CPU_CONVOLUTIONS)}")
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    if choice == "xla":
        return flags, "XLA:CPU convolutions: this jaxlib's default"
    if _YNN_TYPES in flags and EIGEN_FLAG not in flags:
        return flags, f"XLA:CPU convolutions: as XLA_FLAGS sets them ({flags.strip()})"
    if EIGEN_FLAG in flags:
        return flags, "XLA:CPU convolutions: Eigen"
    if not _jaxlib_knows(_YNN_TYPES):
        return flags, "XLA:CPU convolutions: this jaxlib's default (it has no YNNPACK choice to change)"
    if _backend_started():
        return flags, ("XLA:CPU convolutions: this jaxlib's default (JAX had already started; set XLA_FLAGS "
                       "before any JAX computation)")
    return f"{flags} {EIGEN_FLAG}".strip(), "XLA:CPU convolutions: Eigen"
