"""Data-parallel scaling: step time, throughput and all-reduce bytes per strategy and device count.

What it measures: the traced training step of the MLP (784-512-512-10, optax Adam lr 1e-3) on
synthetic 28x28x1 data at a fixed GLOBAL batch (default 256), for every data-parallel strategy of
``graphduo.parallel`` (``shard_map``, ``pmap``, ``auto``) on N = 1, 2, 4, 8 devices, plus the
single-device baseline (strategy ``none``). Per row:

* median step time with p10/p90 (``graphduo.timing.time_steps``: first step apart, warm-up, every
  step blocked on, so the CPU collective deadlock of async back-to-back steps cannot happen);
* samples/s, and scaling against the same strategy on 1 device: ``speedup = throughput_N /
  throughput_1`` (ideal: N at a fixed global batch) and ``efficiency = speedup / N`` (ideal: 1);
* bytes all-reduced per step, MEASURED from the compiled executable: the output bytes of every
  ``all-reduce`` (or ``all-reduce-start``; its ``-done`` half is not counted again) in
  ``plan.train_step.stages(state, batch).compiled.as_text()``;
* next to it, the ring all-reduce model ``2 (N-1)/N x bytes / bandwidth`` for each bandwidth of
  ``--bandwidth-gbps`` (GB/s, gigabytes per second; default 25 = PCIe 4.0 x16, 450 = NVLink 4 on
  an H100, per direction), in ms and as a fraction of the measured step time.

How: the device count is fixed when JAX starts, so each N runs in a subprocess of this script
(``--worker N``, with ``JAX_PLATFORMS=cpu`` and ``JAX_NUM_CPU_DEVICES=N`` set in the child's
environment only) that prints one JSON line; the parent collects the rows, prints a table and writes
the outputs. On a CPU machine these are virtual devices sharing the same cores. Parent and workers run
with graphduo's CLI defaults (``_common.setup``; a worker's are recorded in results.json).

Run:
    python experiments/data_parallel.py                  # full run
    python experiments/data_parallel.py --quick          # smoke test: N = 1 and 2, a smaller MLP
    python experiments/data_parallel.py --out DIR --batch-size 512 --bandwidth-gbps 25 450 900

Writes ``DIR/results.json`` (rows, settings, a worker's environment, ``_common.environment``),
``DIR/SUMMARY.md`` (table, command, machine, reading) and ``DIR/samples_per_s.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import _common  # experiments/_common.py

DEFAULT_OUT = _common.default_out("data_parallel")
PARALLEL_STRATEGIES = ("shard_map", "pmap", "auto")
BANDWIDTH_NAMES = {25.0: "PCIe 4.0 x16", 450.0: "NVLink 4, H100, per direction"}
JSON_MARKER = "DP_RESULT "

FULL = {"devices": (1, 2, 4, 8), "features": (512, 512), "steps": 25, "warmup": 3, "timeout_s": 300}
QUICK = {"devices": (1, 2), "features": (256, 256), "steps": 8, "warmup": 2, "timeout_s": 120}

# ---------------------------------------------------------------------------------------------
# Measuring the compiled executable.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_ALL_REDUCE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+all-reduce(?:-start)?\(")


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (``f32[512,512]``, tuples of them)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        size = 1
        for d in filter(None, dims.split(",")):
            size *= int(d)
        total += size * _DTYPE_BYTES[dtype]
    return total


def all_reduce_bytes(hlo_text: str) -> tuple[int, int]:
    """(bytes, count) of the all-reduces in optimized HLO text: the output shape of each
    ``all-reduce`` / ``all-reduce-start`` instruction (``all-reduce-done`` is the same transfer)."""
    total = count = 0
    for line in hlo_text.splitlines():
        match = _ALL_REDUCE.match(line)
        if match:
            total += shape_bytes(match.group(1))
            count += 1
    return total, count


# ---------------------------------------------------------------------------------------------
# The worker: one process, one device count, every strategy.


def run_worker(num_devices: int, batch_size: int, features: tuple[int, ...], steps: int,
               warmup: int, process_settings) -> dict:
    import jax
    import numpy as np

    from graphduo import parallel, timing
    from graphduo.data import epoch_batches, load_dataset
    from graphduo.models import build_model, count_params
    from graphduo.step import create_train_state, make_optimizer

    if jax.device_count() != num_devices:
        raise RuntimeError(f"asked for {num_devices} devices, JAX sees {jax.device_count()}")
    model = build_model("mlp", _common.INPUT_SHAPE, _common.NUM_CLASSES, features=tuple(features))
    tx = make_optimizer("adam", _common.LR)
    data = load_dataset("synthetic", synthetic_size=max(2048, 4 * batch_size), seed=0)
    host_batches = list(epoch_batches(data.x_train, data.y_train, batch_size, seed=0, epoch=0))
    n_calls = 1 + warmup + steps

    strategies = ("none",) if num_devices == 1 else ()
    strategies += PARALLEL_STRATEGIES
    rows = []
    for strategy in strategies:
        parallel.check_batch_size(batch_size, num_devices)
        plan = parallel.plan("traced", model, tx, strategy=strategy,
                             devices=None if strategy == "none" else num_devices)
        state = plan.put_state(create_train_state(model, tx, jax.random.key(0)))
        device_batches = [plan.put_batch(b) for b in host_batches]
        batches = [device_batches[i % len(device_batches)] for i in range(n_calls)]
        stages = plan.train_step.stages(state, batches[0])  # compiles once; the step reuses it
        ar_bytes, ar_count = all_reduce_bytes(stages.compiled.as_text())
        state, metrics, times = timing.time_steps(plan.train_step, state, batches, warmup=warmup)
        loss = float(np.mean(np.asarray(jax.device_get(metrics[-1]["loss"]))))
        rows.append({
            "strategy": strategy,
            "devices": num_devices,
            "global_batch": batch_size,
            "per_device_batch": batch_size // num_devices,
            "compile_s": stages.record.total_s,
            **times.summary(batch_size),
            "all_reduce_bytes": ar_bytes,
            "all_reduce_ops": ar_count,
            "final_loss": loss,
            "params": count_params(plan.host_params(state)),
        })
        del state, device_batches, batches
    return {"rows": rows, "environment": _common.environment(process_settings)}


# ---------------------------------------------------------------------------------------------
# The parent: one subprocess per device count, then tables and files.


def launch_worker(num_devices: int, args, settings: dict) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(num_devices))
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", str(num_devices),
           "--batch-size", str(args.batch_size), "--steps", str(settings["steps"]),
           "--warmup", str(settings["warmup"]),
           "--features", ",".join(str(f) for f in settings["features"])]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=settings["timeout_s"])
    except subprocess.TimeoutExpired:
        return {"error": f"N={num_devices}: worker timed out after {settings['timeout_s']} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_MARKER):
            result = json.loads(line[len(JSON_MARKER):])
            result["worker_wall_s"] = time.perf_counter() - t0
            return result
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"error": f"N={num_devices}: worker exited {proc.returncode}: " + " | ".join(tail)}


def add_derived(rows: list[dict], bandwidths: list[float]) -> None:
    """Scaling against the same strategy on 1 device, and the ring all-reduce model."""
    one = {r["strategy"]: r["samples_per_s"] for r in rows if r["devices"] == 1}
    for r in rows:
        n = r["devices"]
        base = one.get(r["strategy"])
        r["scaling_efficiency"] = r["samples_per_s"] / base if base else None  # throughput_N / throughput_1
        r["parallel_efficiency"] = r["scaling_efficiency"] / n if base else None
        r["ring_model"] = []
        for bw in bandwidths:
            t_ms = 2 * (n - 1) / n * r["all_reduce_bytes"] / (bw * 1e9) * 1e3
            r["ring_model"].append({"bandwidth_GBps": bw, "time_ms": t_ms,
                                    "fraction_of_step": t_ms / r["step_time_ms"]})


def markdown_table(rows: list[dict], bandwidths: list[float]) -> str:
    head = ["strategy", "N", "step ms (p10-p90)", "samples/s", "speedup vs N=1", "eff.",
            "all-reduce bytes (ops)"]
    head += [f"ring @{bw:g} GB/s: ms (of step)" for bw in bandwidths]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = "-" if r["scaling_efficiency"] is None else f"{r['scaling_efficiency']:.2f}"
        eff = "-" if r["parallel_efficiency"] is None else f"{r['parallel_efficiency']:.2f}"
        cells = [r["strategy"], str(r["devices"]),
                 f"{r['step_time_ms']:.2f} ({r['step_time_p10_ms']:.2f}-{r['step_time_p90_ms']:.2f})",
                 f"{r['samples_per_s']:,.0f}", speed, eff,
                 f"{r['all_reduce_bytes']:,} ({r['all_reduce_ops']})"]
        cells += [f"{m['time_ms']:.4f} ({100 * m['fraction_of_step']:.2f}%)" for m in r["ring_model"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ring_reading(rows: list[dict], bandwidths: list[float]) -> str:
    biggest = max(rows, key=lambda r: (r["devices"], r["all_reduce_bytes"]))
    n, nbytes = biggest["devices"], biggest["all_reduce_bytes"]
    if n == 1 or nbytes == 0:
        return "With one device there is no all-reduce, so the ring model predicts nothing here."
    parts = []
    for m in biggest["ring_model"]:
        name = BANDWIDTH_NAMES.get(m["bandwidth_GBps"], "")
        parts.append(f"{m['time_ms'] * 1e3:.0f} us at {m['bandwidth_GBps']:g} GB/s"
                     + (f" ({name})" if name else ""))
    fractions = ", ".join(f"{100 * m['fraction_of_step']:.2f}%" for m in biggest["ring_model"])
    return (f"The gradient all-reduce moves {nbytes / 1e6:.2f} MB per step (all parameters in float32, "
            f"plus the two metric scalars). On N={n} devices a ring all-reduce of that size takes about "
            + " and ".join(parts) +
            " on a real interconnect (bandwidth term only; per-hop latency of a few microseconds per "
            "step of the ring comes on top). Against the step times measured here that is "
            f"{fractions} of a step; "
            "on real accelerators the compute part of the step shrinks by orders of magnitude while "
            "these communication figures do not, so the all-reduce share would be far larger there, "
            "and on PCIe it could well become what limits the scaling of a model this small.")


def write_summary(out: pathlib.Path, rows, bandwidths, env, settings, command, wall_s, errors) -> None:
    bw_text = ", ".join(f"{bw:g} GB/s" + (f" ({BANDWIDTH_NAMES[bw]})" if bw in BANDWIDTH_NAMES else "")
                        for bw in bandwidths)
    text = f"""# Data-parallel scaling (graphduo.parallel, traced mode)

MLP 784-{'-'.join(str(f) for f in settings['features'])}-10, optax Adam (lr 1e-3), synthetic 28x28x1
data, fixed global batch {settings['batch_size']}; {settings['steps']} timed steps per row after the
first step and {settings['warmup']} warm-up steps, every step blocked on. "speedup vs N=1" is
throughput_N / throughput_1 of the same strategy (ideal: N at a fixed global batch); "eff." is
speedup / N (ideal: 1). All-reduce bytes are read from the compiled HLO (output bytes of each
all-reduce). At N=1 a nonzero count is an all-reduce over a single device that XLA kept in the
program (it moves nothing; the ring model gives 0 there). Ring model: 2(N-1)/N x bytes / bandwidth
at {bw_text}.

{markdown_table(rows, bandwidths)}

Command: `{command}` (wall time {wall_s:.0f} s)

Machine (a worker's): {_common.describe_machine(env)}.

## Reading

These are virtual CPU devices (`JAX_NUM_CPU_DEVICES=N`) sharing the same {env.get('cpu_count', '?')}
cores, so here "scaling" measures the overhead of splitting the batch and all-reducing the gradients
between devices that compete for the same cores and memory, not a speedup: more devices cannot add
compute here, and a speedup below 1 is the expected result, not a defect of a strategy.
{ring_reading(rows, bandwidths)}
"""
    if errors:
        text += "\n## Errors\n\n" + "\n".join(f"- {e}" for e in errors) + "\n"
    _common.write_summary(out, text)


def write_plot(out: pathlib.Path, rows: list[dict]) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in ("none",) + PARALLEL_STRATEGIES:
        pts = sorted((r["devices"], r["samples_per_s"]) for r in rows if r["strategy"] == strategy)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if strategy != "none" else "*", markersize=10 if strategy == "none" else 6,
                    linestyle="-" if len(pts) > 1 else "none", label=strategy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["devices"] for r in rows}), [str(n) for n in sorted({r["devices"] for r in rows})])
    ax.set_xlabel("devices N (virtual CPU devices)")
    ax.set_ylabel("samples/s (median step)")
    ax.set_title("MLP train step at a fixed global batch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "samples_per_s.png", dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time graphduo's data-parallel strategies (shard_map, pmap, auto; traced) on 1-8 "
                 "virtual CPU devices and compare the measured all-reduce bytes with a ring model.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: N in (1, 2), MLP 784-256-256-10, 8 timed steps")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and samples_per_s.png", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_common.positive_int, default=256,
                        help="GLOBAL batch size, split over the devices: a multiple of every N (default 256)")
    parser.add_argument("--bandwidth-gbps", type=_common.positive_float, nargs="+", default=[25.0, 450.0],
                        help="interconnect bandwidths for the ring model, in GB/s (gigabytes per second): "
                             "25 = PCIe 4.0 x16, 450 = NVLink 4 on an H100 per direction (default 25 450)")
    parser.add_argument("--steps", type=_common.positive_int, default=None,
                        help=f"timed steps per row (default {FULL['steps']}; --quick: {QUICK['steps']})")
    parser.add_argument("--worker", type=_common.positive_int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=_common.nonnegative_int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--features", type=_common.positive_ints, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is None:  # the parent: it checks, launches the workers and writes the results
        devices = (QUICK if args.quick else FULL)["devices"]
        bad = [n for n in devices if args.batch_size % n]
        if bad:
            parser.error(f"argument --batch-size: {args.batch_size} is not divisible by N={bad}: use a "
                         f"multiple of {max(devices)}")
        args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The CLI's process settings, before any JAX computation; the workers inherit XLA_FLAGS and apply
    # their own (host memory is per process), recording them with their rows.
    process_settings = _common.setup()
    settings = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        settings["steps"] = args.steps
    if args.warmup is not None:
        settings["warmup"] = args.warmup
    if args.features:
        settings["features"] = tuple(args.features)
    settings["batch_size"] = args.batch_size

    if args.worker is not None:
        result = run_worker(args.worker, args.batch_size, settings["features"], settings["steps"],
                            settings["warmup"], process_settings)
        print(JSON_MARKER + json.dumps(result), flush=True)
        return 0

    command = _common.command_line(argv)  # the parent process never starts a JAX backend
    t0 = time.perf_counter()
    rows, errors, env = [], [], {}
    for n in settings["devices"]:
        print(f"N={n}: running ...", flush=True)
        result = launch_worker(n, args, settings)
        if "error" in result:
            print("  " + result["error"], flush=True)
            errors.append(result["error"])
            continue
        print(f"  done in {result['worker_wall_s']:.1f} s", flush=True)
        rows.extend(result["rows"])
        env = env or result["environment"]
    wall_s = time.perf_counter() - t0
    if not rows:
        sys.exit("no worker produced a result: " + "; ".join(errors))
    rows.sort(key=lambda r: (r["strategy"] != "none", PARALLEL_STRATEGIES.index(r["strategy"])
                             if r["strategy"] in PARALLEL_STRATEGIES else -1, r["devices"]))
    add_derived(rows, args.bandwidth_gbps)

    out = args.out
    settings_json = {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
    _common.write_results(out, {
        "command": command, "wall_s": wall_s, "settings": settings_json,
        "bandwidths_GBps": args.bandwidth_gbps, "rows": rows, "errors": errors,
        "environment": env})
    write_summary(out, rows, args.bandwidth_gbps, env, settings, command, wall_s, errors)
    write_plot(out, rows)
    print(markdown_table(rows, args.bandwidth_gbps))
    print(f"\nwall time {wall_s:.1f} s; wrote {out}/results.json, SUMMARY.md, samples_per_s.png")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
