"""The CNN step on XLA:CPU: which formulation, convolution library and host memory policy make it fast.

The finding behind graphduo's CNN and its process defaults (experiments/RESULTS.md, "The CNN step"),
kept reproducible. It times the default CNN's traced Adam training step (conv32-pool-conv64-pool-
dense128 on 28x28x1, 10 classes) in a 4 x 4 design, four formulations of the same model under two
convolution libraries by two host memory policies, all cells from the same initial weights on the
same batch:

formulations (all compute the same function, checked by the losses below):
* ``flax``:           ``model.module.apply``: Flax's ``nn.Conv`` -> ``nn.relu`` -> ``nn.max_pool``.
* ``lax-convolutions``: graphduo's block, ``relu(max_pool_2x2(conv) + bias)`` with the first-maximum
                      pooling gradient, every convolution a plain ``lax.conv_general_dilated``
                      (``graphduo.models.lax_conv_same``).
* ``graphduo``:       ``graphduo.models.cnn_apply`` as shipped: the same, but a convolution of a
                      one-input-channel image (the first) as kh*kw shifted multiply-adds in one fused
                      loop (``graphduo.models.conv_same``): such a convolution is memory traffic with
                      almost no reuse. Its gradient is the plain one.
* ``onednn``:         the shipped block, but every convolution of at least ``ONEDNN_MIN_FLOPS``
                      forward FLOPs on oneDNN through JAX's FFI (``experiments/_onednn.py``), its
                      gradients too: each oneDNN call has a fixed cost, so small convolutions stay
                      XLA's. Where oneDNN cannot load (the ``onednn`` extra, Linux x86-64 only) this
                      formulation is recorded as unavailable, with the reason, and the others run.

process settings (``graphduo.cli.apply_process_settings`` through ``_common.setup``; XLA reads
its flags once per process and the host memory policy lasts for the process, so each setting runs in
its own child process, which records what it applied):
* convolutions ``xla``: this jaxlib's choice of library for the convolutions XLA compiles;
  ``eigen``: XLA's Eigen convolutions (where this jaxlib is one the flag was checked in; elsewhere the
  child's notes say it was skipped).
* host memory ``system``: glibc's default (the step's scratch memory mapped afresh every step);
  ``reuse``: freed memory kept for the next step.

How: the four children of a round run in an order that flips each round; in a child every
formulation is compiled once and timed with ``graphduo.timing.time_steps`` (first step apart,
warm-up, each step run to completion), in an order that flips each round too. A cell's figure is
the median over rounds of its per-round median; a ratio is the median of per-round ratios against
``flax`` with ``xla`` convolutions and ``system`` memory (jaxlib's and glibc's defaults throughout)
measured in the same round. Each child also trains every formulation 3 steps from the same weights;
the losses of all cells must agree (relative 1e-4, float32 summation order). Each cell also counts
the process's minor page faults per step (``getrusage``) over 3 more steps after its timed ones
(steady state, once the heap has grown): memory the kernel maps and zeroes afresh, which is what
``reuse`` is meant to remove.

Run:
    python experiments/cnn_step.py            # batch 256, 3 rounds
    python experiments/cnn_step.py --quick    # smoke test: batch 32, 1 round
    python experiments/cnn_step.py --batch-size 64 --rounds 5 --out DIR

Writes ``DIR/results.json`` (every per-round time, losses, each child's process settings and
environment), ``DIR/SUMMARY.md`` and, when matplotlib is installed, ``DIR/step_time.png`` (median ms
per step, by formulation and setting).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

import _common  # experiments/_common.py
import _onednn  # experiments/_onednn.py: loads oneDNN only when first asked to
from graphduo import models

DEFAULT_OUT = _common.default_out("cnn_step")
FORMULATIONS = ("flax", "lax-convolutions", "graphduo", "onednn")
CONVOLUTIONS = ("xla", "eigen")
HOST_MEMORY = ("system", "reuse")
SETTINGS = tuple(f"{conv}+{mem}" for conv in CONVOLUTIONS for mem in HOST_MEMORY)
BASELINE = ("flax", "xla+system")
CHECK_STEPS = 3
FAULT_STEPS = 3
LOSS_RTOL = 1e-4
MARKER = "CNN_STEP_RESULT "
ONEDNN_MIN_FLOPS = 100e6
"""Smallest convolution (forward FLOPs) the ``onednn`` formulation gives to oneDNN. Each oneDNN call
costs more than an XLA kernel, and its OpenMP threads keep spinning for a while after it on cores
XLA's next kernels want: below some size that outweighs oneDNN's faster arithmetic. The value is the
one measured for graphduo's models when they shipped this path (experiments/RESULTS.md)."""


# ---------------------------------------------------------------------------------------------
# The formulations' convolutions.


def conv_flops(x_shape, kernel_shape) -> int:
    """Forward FLOPs of a SAME, stride-1 convolution of an NHWC input with an HWIO kernel."""
    n, h, w, _ = x_shape
    kh, kw, ci, co = kernel_shape
    return 2 * n * h * w * ci * co * kh * kw


def onednn_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The ``onednn`` formulation's convolution: oneDNN's (``_onednn.conv_same``) where it applies
    (float32 on the CPU backend) and pays (``ONEDNN_MIN_FLOPS``), else the shipped one."""
    if (x.dtype == kernel.dtype == jnp.float32 and jax.default_backend() == "cpu"
            and conv_flops(x.shape, kernel.shape) >= ONEDNN_MIN_FLOPS):
        return _onednn.conv_same(x, kernel)
    return models.conv_same(x, kernel)


def cnn_apply_with(conv):
    """``graphduo.models.cnn_apply`` with ``conv(x, kernel)`` for its convolutions."""

    def apply(params, x):
        for i in range(sum(name.startswith("Conv_") for name in params)):
            layer = params[f"Conv_{i}"]
            x = models.relu(models.max_pool_2x2(conv(x, layer["kernel"])) + layer["bias"])
        x = models.relu(models.dense(params["Dense_0"], x.reshape((x.shape[0], -1))))
        return models.dense(params["Dense_1"], x)

    return apply


def formulations(model) -> tuple[dict, dict[str, str]]:
    """``({name: apply(params, x)}, {name: why it cannot run here})`` for ``FORMULATIONS``."""
    fns = {"flax": lambda params, x: model.module.apply({"params": params}, x),
           "lax-convolutions": cnn_apply_with(models.lax_conv_same),
           "graphduo": models.cnn_apply}
    reason = _onednn.available()
    if reason is not None:
        return fns, {"onednn": f"oneDNN unavailable: {reason}"}
    return {**fns, "onednn": cnn_apply_with(onednn_conv)}, {}


# ---------------------------------------------------------------------------------------------
# Child: one convolution library and host memory policy, every formulation, one round.

def child(setting: str, batch_size: int, steps: int, reverse: bool) -> dict:
    convolutions, host_memory = setting.split("+")
    settings = _common.setup(convolutions, host_memory)  # before any JAX computation
    import numpy as np

    from graphduo import timing
    from graphduo.step import create_train_state, make_optimizer, make_train_step
    from graphduo.traced import TracedStep

    model = models.build_model("cnn", _common.INPUT_SHAPE, _common.NUM_CLASSES)
    tx = make_optimizer("adam", _common.LR)
    batch = _common.host_batch(batch_size)
    u = batch["image"]
    batch["image"] = np.where(u < 0.6, 0.0, u).astype(np.float32)  # digit-like zeros: ties in the pooling
    batch = jax.device_put(batch)
    fns, unavailable = formulations(model)
    out = {"setting": setting, "process_settings": settings.record(), "environment": _common.environment(settings),
           "unavailable": unavailable, "cells": {}}
    names = [n for n in FORMULATIONS if n in fns]
    for name in names[::-1] if reverse else names:
        step = TracedStep(make_train_step(fns[name], tx), donate_argnums=0)
        state = create_train_state(model, tx, jax.random.key(0))
        losses = []
        for _ in range(CHECK_STEPS):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        state, _, times = timing.time_steps(step, state, [batch] * (steps + 3), warmup=2)
        faults = _common.minor_page_faults()  # steady state: after the timed steps, over FAULT_STEPS more
        for _ in range(FAULT_STEPS):
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        out["cells"][name] = {"losses": losses, "median_ms": times.median_ms, "p10_ms": times.p10_ms,
                              "p90_ms": times.p90_ms, "compile_s": step.compile_time_s,
                              "page_faults_per_step": (_common.minor_page_faults() - faults) / FAULT_STEPS}
    return out


# ---------------------------------------------------------------------------------------------
# Parent: alternate children, collect, compare, write.

def run_child(setting: str, args, reverse: bool) -> dict:
    # Each child chooses its XLA flags and malloc policy itself; the user's own would override both.
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    cmd = [sys.executable, __file__, "--child", setting, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps)] + (["--reverse"] if reverse else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"cnn_step: child ({setting}) failed with status {proc.returncode}: "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER))
    return json.loads(line[len(MARKER):])


def analyse(rounds: list[dict[str, dict]]) -> dict:
    cells = {}
    base_name, base_setting = BASELINE
    for setting in SETTINGS:
        conv, mem = setting.split("+")
        for name in (n for n in FORMULATIONS if all(n in r[setting]["cells"] for r in rounds)):
            per_round = [r[setting]["cells"][name]["median_ms"] for r in rounds]
            speedups = [r[base_setting]["cells"][base_name]["median_ms"] / r[setting]["cells"][name]["median_ms"]
                        for r in rounds]
            faults = [r[setting]["cells"][name]["page_faults_per_step"] for r in rounds]
            cells[f"{name}|{setting}"] = {"formulation": name, "convolutions": conv, "host_memory": mem,
                                          "median_ms": statistics.median(per_round), "rounds_ms": per_round,
                                          "page_faults_per_step": statistics.median(faults),
                                          "speedup_vs_defaults": statistics.median(speedups),
                                          "speedup_range": [min(speedups), max(speedups)]}
    losses = [c["losses"] for r in rounds for setting in SETTINGS for c in r[setting]["cells"].values()]
    ref = losses[0]
    worst = max(abs(a - b) / abs(b) for ls in losses for a, b in zip(ls, ref))
    unavailable = {n: why for r in rounds for s in SETTINGS for n, why in r[s].get("unavailable", {}).items()}
    return {"cells": cells, "unavailable": unavailable,
            "loss_check": {"max_rel_diff": worst, "tolerance": LOSS_RTOL, "ok": worst <= LOSS_RTOL}}


def format_table(cells: dict) -> list[str]:
    rows = ["| formulation | convolutions | host memory | median ms/step | per round | page faults/step | "
            "speedup vs flax+xla+system [range] |", "|---|---|---|---|---|---|---|"]
    for c in cells.values():
        lo, hi = c["speedup_range"]
        rows.append(f"| {c['formulation']} | {c['convolutions']} | {c['host_memory']} | {c['median_ms']:.1f} | "
                    f"{', '.join(f'{t:.1f}' for t in c['rounds_ms'])} | {c['page_faults_per_step']:,.0f} | "
                    f"{c['speedup_vs_defaults']:.2f}x [{lo:.2f}-{hi:.2f}] |")
    return rows


def write_plot(out: pathlib.Path, result: dict) -> str | None:
    """``out/step_time.png``: median ms per step of every formulation under every process setting,
    from the results dict (as written to results.json, whatever formulations and settings its run
    had); its file name, or None without matplotlib."""
    plt = _common.pyplot()
    if plt is None:
        return None
    cells = result["analysis"]["cells"].values()
    names = list(dict.fromkeys(c["formulation"] for c in cells))
    settings = list(dict.fromkeys((c["convolutions"], c["host_memory"]) for c in cells))
    ms = {(c["formulation"], c["convolutions"], c["host_memory"]): c["median_ms"] for c in cells}
    fig, ax = plt.subplots(figsize=(1.9 * len(settings) + 1, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j, s in enumerate(settings) if (name, *s) in ms]
        bars = ax.bar(xs, [ms[(name, *s)] for s in settings if (name, *s) in ms], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(settings)), [f"{conv} convolutions\n{mem} memory" for conv, mem in settings])
    ax.set_ylabel("median ms per step")
    ax.set_title(f"CNN traced Adam step, batch {result['batch_size']}: {len(result['rounds'])} round(s)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="formulation")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)
    return "step_time.png"


def write_summary(out: pathlib.Path, result: dict, args, command: str, wall_s: float,
                  plot: str | None = None) -> None:
    first = result["rounds"][0]
    check = result["analysis"]["loss_check"]
    cells = result["analysis"]["cells"]
    best = min(cells.values(), key=lambda c: c["median_ms"])
    lines = [
        "# cnn_step: the CNN's traced training step, by formulation, convolution library and host memory", "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s; batch {args.batch_size}; {args.rounds} round(s) of {len(SETTINGS)} child "
        f"processes, {args.steps} timed steps per cell per round.  ",
        f"Machine: {_common.describe_machine(first[BASELINE[1]]['environment'])} (the {BASELINE[1]} children; "
        "each child's own settings below).", "",
        "Process settings, as each child applied them: "
        + "; ".join(f"{s}: {', '.join(first[s]['process_settings']['notes'])}" for s in SETTINGS) + ".", "",
        *format_table(cells), "",
        f"Fastest: {best['formulation']} with {best['convolutions']} convolutions and {best['host_memory']} host "
        f"memory, {best['median_ms']:.1f} ms, {best['speedup_vs_defaults']:.2f}x the plain Flax step on this "
        f"jaxlib's defaults.", "",
        f"Same function: losses of the first {CHECK_STEPS} steps from the same weights, all {len(cells)} cells: max "
        f"relative difference {check['max_rel_diff']:.1e} (tolerance {check['tolerance']:g}): "
        f"{'ok' if check['ok'] else 'MISMATCH'}.", "",
        "flax: `nn.Conv -> nn.relu -> nn.max_pool`; lax-convolutions: `relu(max_pool_2x2(conv) + bias)` with the "
        "first-maximum pooling gradient and `lax` convolutions; graphduo: `graphduo.models.cnn_apply` as shipped, "
        "the same with the one-input-channel first convolution as shifted multiply-adds; onednn: "
        f"the same, convolutions of at least {ONEDNN_MIN_FLOPS / 1e6:.0f} MFLOP on oneDNN through JAX's FFI "
        "(`experiments/_onednn.py`). xla: this jaxlib's choice of convolution library; eigen: "
        "`--cpu-convolutions eigen` (`graphduo.runtime.cpu_convolution_flags`). system: glibc's malloc as it "
        "comes (the step's scratch memory mapped afresh every step); reuse: freed memory kept for the next "
        f"step (`graphduo.runtime.reuse_host_memory`). Page faults/step: the child's minor page faults per step "
        f"over {FAULT_STEPS} steps after the timed ones (steady state); each is a 4 KiB page the kernel mapped "
        "and zeroed on first touch. Children run without the user's MALLOC_*, GLIBC_TUNABLES and LD_PRELOAD.",
    ]
    unavailable = result["analysis"]["unavailable"]
    if unavailable:
        lines += ["", "Not measured here: " + "; ".join(f"{n}, {why}" for n, why in unavailable.items()) + "."]
    if plot:
        lines += ["", f"![median ms per step by formulation and process setting]({plot})"]
    _common.write_summary(out, lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time the default CNN's traced training step for four formulations of the same model "
                 "under XLA:CPU's default and Eigen convolutions, with glibc's default host memory policy "
                 "and with freed memory reused; check all reach the same losses.")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32, 1 round, 5 timed steps")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_common.positive_int, default=None,
                        help="batch size (default 256; --quick: 32)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help=f"rounds of the {len(SETTINGS)} settings (default 3; --quick: 1)")
    parser.add_argument("--steps", type=_common.positive_int, default=None,
                        help="timed steps per cell per round (default 15; --quick: 5)")
    parser.add_argument("--timeout", type=_common.positive_float, default=600.0,
                        help="seconds a child process may take (default 600)")
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--reverse", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, quick, full in (("batch_size", 32, 256), ("rounds", 1, 3), ("steps", 5, 15)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not args.child:  # the parent writes the results; a child only prints them
        args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:  # the child applies its own process settings first thing (child())
        print(MARKER + json.dumps(child(args.child, args.batch_size, args.steps, args.reverse)), flush=True)
        return
    # The parent computes nothing with JAX: it needs no process settings of its own.
    command, t0 = _common.command_line(argv), time.perf_counter()
    rounds = []
    for r in range(args.rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        rounds.append({s: run_child(s, args, reverse=r % 2 == 1) for s in order})
        print(f"[cnn_step] round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n}|{s} {c['median_ms']:.1f}" for s in SETTINGS for n, c in rounds[-1][s]["cells"].items())
            + " ms", file=sys.stderr)
    result = {"command": command, "batch_size": args.batch_size, "steps": args.steps, "rounds": rounds,
              "analysis": analyse(rounds)}
    wall_s = time.perf_counter() - t0
    result["wall_s"] = wall_s
    print("\n".join(format_table(result["analysis"]["cells"])))
    for name, why in result["analysis"]["unavailable"].items():
        print(f"{name}: not measured ({why})")
    check = result["analysis"]["loss_check"]
    print(f"loss check: max relative difference {check['max_rel_diff']:.1e} ({'ok' if check['ok'] else 'MISMATCH'})")
    _common.write_results(args.out, result)
    plot = write_plot(args.out, result)
    write_summary(args.out, result, args, command, wall_s, plot)
    print(f"wall time {wall_s:.0f} s; wrote {args.out / 'results.json'}, SUMMARY.md"
          + (f" and {plot}" if plot else ""), file=sys.stderr)
    if not check["ok"]:
        print(f"cnn_step.py: error: the cells' losses differ by up to {check['max_rel_diff']:.1e} relative "
              f"(tolerance {check['tolerance']:g}): the formulations do not compute the same function",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
