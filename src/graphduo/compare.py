"""``graphduo compare``: the same steps, from the same parameters and batches, in both paradigms."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphduo import parallel, timing
from graphduo.config import MODES, Config, ConfigError
from graphduo.data import epoch_batches
from graphduo.step import create_train_state
from graphduo.train import prepare

# Both modes run the same float32 arithmetic, but XLA fuses and reorders it, so results differ by
# rounding (~1e-7 relative per op); over hundreds of Adam steps that grows to ~1e-5..1e-4 in the
# loss. A gap above this tolerance means the two modes did not compute the same function.
LOSS_RTOL = 1e-3
# On a GPU, JAX's default precision multiplies float32 matrices (and convolves) in TF32: a relative
# error of ~3e-4 per product (2.9e-4 measured on an H100 for a 1024-square product against float64;
# float32 proper: 3e-7), so the two modes drift apart ~1000x faster: on an H100, the default CNN's
# losses after 100 steps differed by 9.7e-4, the MLP's by 1.1e-4. A step that computes something
# else still fails it (tests/test_cli.py: one mode with twice the learning rate); differences as
# subtle as a 1% learning rate need the float32 check (tests/test_paradigms.py). Measured on an
# NVIDIA GPU only: a TPU's default (bfloat16 passes) is coarser still, and 1e-2 may be tight there.
ACCELERATOR_LOSS_RTOL = 1e-2


def loss_rtol(backend: str) -> float:
    """The relative tolerance between the modes' final losses on ``backend`` (see ``LOSS_RTOL``)."""
    return LOSS_RTOL if backend == "cpu" else ACCELERATOR_LOSS_RTOL


class ModesDisagree(RuntimeError):
    """Eager and traced training ended at different losses."""


def fixed_batches(run, steps: int) -> list[dict[str, jax.Array]]:
    """The first ``steps`` training batches of ``run`` (epoch after epoch), on the device."""
    ds, cfg = run.dataset, run.config
    stream = itertools.chain.from_iterable(
        epoch_batches(ds.x_train, ds.y_train, cfg.batch_size, seed=cfg.seed, epoch=e)
        for e in itertools.count())
    return [jax.device_put(b) for b in itertools.islice(stream, steps)]


def _stack(batches: list[dict[str, jax.Array]]) -> dict[str, jax.Array]:
    return jax.tree.map(lambda *b: jnp.stack(b), *batches)


def max_abs_diff(a, b) -> float:
    """The largest absolute elementwise difference between two pytrees of the same structure."""
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree.leaves(diffs))


def compare(config: Config, *, warmup: int = 5, announce: Callable[[str], None] | None = None,
            process_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``config.steps`` steps in eager and in traced mode from identical parameters and batches.

    Returns per-mode timings (time to first step, steady-state median and spread, samples/s),
    the speedup, the break-even step count, both final losses and the largest parameter
    difference. Raises ``ModesDisagree`` when the final losses differ beyond ``loss_rtol(backend)``.
    ``announce`` gets one line saying what is about to run, once the config and data are checked.
    ``process_settings``: what the caller set for the process (``ProcessSettings.record()``), to be
    recorded in the result's environment.
    """
    run = prepare(config)
    k = config.steps_per_call
    steps = run.total_steps - run.total_steps % k  # whole calls only: a shorter one would compile again
    if steps < k * (warmup + 2):
        raise ConfigError(f"--steps {run.total_steps} gives {steps // k} calls of --steps-per-call {k}; timing needs "
                          f"at least {warmup + 2}: use --steps {k * (warmup + 2)} or more")
    if announce is not None:
        rounded = f" (rounded down to a multiple of --steps-per-call {k})" if steps != run.total_steps else ""
        announce(f"training {config.model} for {steps} steps{rounded} in eager, then traced mode...")
    batches = fixed_batches(run, steps)
    results: dict[str, Any] = {}
    finals = {}
    for mode in MODES:
        state = create_train_state(run.model, run.tx, jax.random.key(config.seed))
        if mode == "traced" and k > 1:  # K steps per executable: time the calls, report per step
            step = parallel.plan(mode, run.model, run.tx, steps_per_call=k, unroll=config.unroll).train_steps
            calls = [_stack(batches[i:i + k]) for i in range(0, steps, k)]
            state, metrics, times = timing.time_steps(step, state, calls, warmup=warmup)
            times = timing.StepTimes(times.first_s, tuple(t / k for t in times.times_s))
            final_loss = float(metrics[-1]["loss"][-1])
        else:
            step = parallel.plan(mode, run.model, run.tx, eager_update=config.eager_update).train_step
            state, metrics, times = timing.time_steps(step, state, batches, warmup=warmup)
            final_loss = float(metrics[-1]["loss"])
        finals[mode] = jax.device_get(state.params)
        results[mode] = {**times.summary(config.batch_size), "final_loss": final_loss, "compiles": len(step.compiles)}
    results["eager"]["eager_update"] = config.eager_update
    results["traced"]["steps_per_call"] = k
    e, t = results["eager"], results["traced"]
    out = {
        "model": config.model,
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "batch_size": config.batch_size,
        "steps": steps,
        "modes": results,
        "speedup": e["step_time_ms"] / t["step_time_ms"],
        # a first call of K steps counts as its compile plus one step: first - (K - 1) steps
        "break_even_steps": timing.break_even_steps(
            e["first_step_s"], e["step_time_ms"] / 1e3,
            t["first_step_s"] - (k - 1) * t["step_time_ms"] / 1e3, t["step_time_ms"] / 1e3),
        "max_param_diff": max_abs_diff(finals["eager"], finals["traced"]),
        "loss_diff": abs(e["final_loss"] - t["final_loss"]),
        "loss_rtol": loss_rtol(jax.default_backend()),
        "environment": timing.environment(process_settings),
    }
    out["same_loss"] = bool(out["loss_diff"] <= out["loss_rtol"] * max(1.0, abs(t["final_loss"])))
    return out


def format_table(result: dict[str, Any]) -> str:
    """A side-by-side table of a ``compare`` result, for people."""
    e, t = result["modes"]["eager"], result["modes"]["traced"]
    rows = [
        ("time to first step (first call)", f"{e['first_step_s']:.3f} s", f"{t['first_step_s']:.3f} s"),
        ("step time, median", f"{e['step_time_ms']:.3f} ms", f"{t['step_time_ms']:.3f} ms"),
        ("step time, p10-p90", f"{e['step_time_p10_ms']:.3f}-{e['step_time_p90_ms']:.3f} ms",
         f"{t['step_time_p10_ms']:.3f}-{t['step_time_p90_ms']:.3f} ms"),
        ("samples/s", f"{e['samples_per_s']:,.0f}", f"{t['samples_per_s']:,.0f}"),
        ("compilations of the step", str(e["compiles"]), str(t["compiles"])),
        (f"loss after {result['steps']} steps", f"{e['final_loss']:.6f}", f"{t['final_loss']:.6f}"),
    ]
    width = max(len(r[0]) for r in rows)
    k = t.get("steps_per_call", 1)
    eager_name = "eager, fused update" if e.get("eager_update") == "fused" else "eager"
    traced_name = f"traced, {k} steps/call" if k > 1 else "traced"
    lines = [f"{result['model']} on {result['dataset']}, batch {result['batch_size']}, "
             f"{result['optimizer']}, {result['steps']} steps, {result['environment']['backend']} "
             f"({result['environment']['device_kind']})", "",
             f"{'':<{width}}  {eager_name:>22}  {traced_name:>22}"]
    lines += [f"{a:<{width}}  {b:>22}  {c:>22}" for a, b, c in rows]
    be = result["break_even_steps"]
    lines += [
        "",
        f"speedup (eager / traced step time): {result['speedup']:.2f}x",
        "break-even: " + (f"compiling pays for itself after {be} step{'s' * (be != 1)}" if be is not None
                          else "never: traced steps are not faster here"),
        f"largest parameter difference after {result['steps']} steps: {result['max_param_diff']:.3g}",
        f"same loss (rtol {result['loss_rtol']:g}): {'yes' if result['same_loss'] else 'NO'} "
        f"(difference {result['loss_diff']:.3g})",
    ]
    return "\n".join(lines)
