"""The timing harness: one way to time a step, used by ``graphduo compare`` and the experiments
(whose own helpers, such as the matmul ceiling, live in ``experiments/_common.py``).

Rules it enforces: the first call (trace + compile in traced mode, first dispatches in eager mode)
is timed apart from steady state; every timed call ends with ``block_until_ready`` so asynchronous
dispatch never flatters a figure; results are a median with a spread, never a single sample.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np



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


def environment(process_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a figure was measured on: versions, backend, device and CPU, the XLA flags in effect,
    and the process settings the entry point applied (``graphduo.runtime.ProcessSettings.record``;
    ``None`` when the caller did not say: then only ``XLA_FLAGS`` is known)."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "process_settings": process_settings if process_settings is not None else "not recorded by the caller",
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
