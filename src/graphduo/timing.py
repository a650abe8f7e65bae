"""The timing harness: one way to time a step, used by ``graphduo compare`` and the experiments.

Rules it enforces: the first call (trace + compile in traced mode, first dispatches in eager mode)
is timed apart from steady state; every timed call ends with ``block_until_ready`` so asynchronous
dispatch never flatters a figure; results are a median with a spread, never a single sample.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from graphduo import paths, runtime


@dataclasses.dataclass(frozen=True)
class StepTimes:
    """Wall times of a sequence of steps: the first apart, the rest as steady state."""

    first_s: float
    times_s: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_s) * 1e3

    @property
    def p10_ms(self) -> float:
        return float(np.percentile(self.times_s, 10)) * 1e3

    @property
    def p90_ms(self) -> float:
        return float(np.percentile(self.times_s, 90)) * 1e3

    def samples_per_s(self, batch_size: int) -> float:
        return batch_size / (self.median_ms / 1e3)

    def summary(self, batch_size: int) -> dict[str, float]:
        return {
            "first_step_s": self.first_s,
            "step_time_ms": self.median_ms,
            "step_time_p10_ms": self.p10_ms,
            "step_time_p90_ms": self.p90_ms,
            "samples_per_s": self.samples_per_s(batch_size),
            "timed_steps": len(self.times_s),
        }


def time_steps(step: Callable[[Any, Any], tuple[Any, Any]], state: Any, batches: Sequence[Any],
               *, warmup: int = 0) -> tuple[Any, list[Any], StepTimes]:
    """Run ``state, metrics = step(state, batch)`` over ``batches``, timing each call to completion.

    The first call is reported as ``first_s``; the next ``warmup`` calls run untimed; the rest
    are the steady state. Returns the final state, every step's metrics, and the times.
    """
    if len(batches) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} batches to time steady state, got {len(batches)}")
    all_metrics = []
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t0
        all_metrics.append(metrics)
        if i == 0:
            first = elapsed
        elif i > warmup:
            times.append(elapsed)
    return state, all_metrics, StepTimes(first, tuple(times))


def time_call(fn: Callable[[], Any], *, repeats: int = 20, warmup: int = 2) -> StepTimes:
    """Time a no-argument call ``repeats`` times after ``warmup`` untimed calls (first call apart)."""
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


def break_even_steps(first_eager_s: float, step_eager_s: float,
                     first_traced_s: float, step_traced_s: float) -> int | None:
    """The smallest step count n at which traced mode's total time is no more than eager's.

    Total time of n steps: ``first + (n - 1) * step``. ``None`` when traced steps are not faster.
    """
    if first_traced_s <= first_eager_s:
        return 1
    saving = step_eager_s - step_traced_s
    if saving <= 0:
        return None
    return 1 + int(np.ceil((first_traced_s - first_eager_s) / saving))


def peak_matmul_size(backend: str | None = None) -> int:
    """The matmul size ``matmul_peak_flops`` uses by default: one that fills the device. 2048 on a
    CPU (larger ones run no faster there); 8192 on a GPU or TPU, where a 2048 product takes tens of
    microseconds and its launch weighs as much as its arithmetic (on an H100: 70 TFLOP/s at 2048,
    362 at 8192, experiments/RESULTS.md section 7)."""
    return 2048 if (backend or jax.default_backend()) == "cpu" else 8192


def matmul_peak_flops(n: int | None = None, *, repeats: int = 10) -> float:
    """This machine's practical compute ceiling: FLOP/s of a jitted n x n float32 matmul (median),
    at JAX's default precision (so on a GPU in the precision the models' float32 matmuls use:
    TF32 on NVIDIA's since Ampere). ``n``: ``peak_matmul_size()`` unless given."""
    import jax.numpy as jnp

    n = n or peak_matmul_size()

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    times = time_call(lambda: matmul(a, a), repeats=repeats)
    return 2 * n**3 / (times.median_ms / 1e3)


def minor_page_faults() -> int:
    """This process's minor page faults so far (``getrusage``): pages the kernel mapped and zeroed
    on first touch. Around a step, what the host memory policy (``graphduo.runtime``) should keep
    near zero. POSIX only."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a result, quoted so it can be pasted back into a shell."""
    import shlex
    import sys

    return "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


def writable_folder(path: str | os.PathLike, what: str = "--out") -> pathlib.Path:
    """``path`` as a folder that exists and can be written to, made if missing (with its parents).

    For commands that write their results at the end of a long run: call it first, so a bad path
    fails in a second with one line, not after the measurement. Raises ``ValueError`` whose message
    names ``what``, the path, the problem and the fix.
    """
    return paths.output_folder(path, what, create=True)


def describe_machine(env: dict[str, Any]) -> str:
    """One line naming what ``environment()`` recorded, for the summaries results come with."""
    device = f"; {env['device_kind']}" if env.get("backend", "cpu") != "cpu" else ""
    return (f"{env['cpu']}, {env['cpu_count']} cores{device}; jax {env['jax']} ({env['backend']}), "
            f"python {env['python']}, XLA_FLAGS={env['xla_flags'] or '(none)'}; "
            f"{env.get('convolutions', 'convolutions: not recorded')}; "
            f"{env.get('host_memory', 'host memory: not recorded')}")


def environment() -> dict[str, Any]:
    """What a figure was measured on: versions, backend, device and CPU, XLA flags, host memory policy."""
    import jaxlib

    device = jax.devices()[0]
    backend = jax.default_backend()
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": backend,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_memory": runtime.host_memory_note(),
        "convolutions": (runtime.convolution_note() if backend == "cpu" else
                         f"convolutions: {device.platform}'s own (the CPU settings do not apply)"),
        "recorded_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
