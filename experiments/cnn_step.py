"""The CNN step on XLA:CPU: which formulation, convolution library and host memory policy make it fast.

The finding behind graphduo's CNN defaults (experiments/RESULTS.md, "The CNN step"), kept
reproducible. It times the default CNN's traced Adam training step (conv32-pool-conv64-pool-dense128
on 28x28x1, 10 classes) in a 3 x 5 design (three formulations; XLA's two convolution libraries by
two host memory policies, and oneDNN's convolutions with memory reused), all cells from the same
initial weights on the same batch:

formulations (all compute the same function, see tests/test_models.py):
* ``flax``:           ``model.module.apply``: Flax's ``nn.Conv`` -> ``nn.relu`` -> ``nn.max_pool``.
* ``graphduo-lax``:   graphduo's block, ``relu(max_pool_2x2(conv) + bias)`` with the first-maximum
                      pooling gradient, but every convolution a plain ``lax.conv_general_dilated``.
* ``graphduo``:       ``graphduo.models.cnn_apply`` as shipped: the above, plus the one-input-channel
                      first convolution as shifted multiply-adds, and its convolutions on oneDNN in
                      the ``onednn`` setting (the other two formulations keep XLA's there).

convolution libraries (``graphduo.runtime.cpu_convolution_flags``; XLA reads its flags once per
process, so each setting runs in its own child process):
* ``xla``:    this jaxlib's default (jax 0.10: YNNPACK);
* ``eigen``:  XLA's Eigen convolutions;
* ``onednn``: graphduo's default (``graphduo.runtime.use_cpu_convolutions``): the models'
              convolutions on oneDNN through JAX's FFI (``graphduo.onednn``), XLA's on Eigen.

host memory (``graphduo.runtime.reuse_host_memory``, process-wide, so also one per child):
* ``system``: glibc's default: the step's scratch memory is mapped afresh every step;
* ``reuse``:  freed memory kept for the next step (graphduo's default).

How: the five children of a round run in an order that flips each round; in a child every
formulation is compiled once and timed with ``graphduo.timing.time_steps`` (first step apart,
warm-up, each step run to completion), in an order that flips each round too. A cell's figure is
the median over rounds of its per-round median; a ratio is the median of per-round ratios against
``flax`` with ``xla`` convolutions and ``system`` memory (jaxlib's defaults throughout) measured in
the same round. Each child also trains every formulation 3 steps from the same weights; the losses
of all fifteen cells must agree (relative 1e-4, float32 summation order).
Each cell also counts the process's minor page faults per step (``getrusage``) over 3 more steps
after its timed ones (steady state, once the heap has grown): memory the kernel maps and zeroes
afresh, which is what ``reuse`` is meant to remove.

Run:
    python experiments/cnn_step.py            # batch 256, 3 rounds, about 4 minutes
    python experiments/cnn_step.py --quick    # smoke test: batch 32, 1 round, under a minute
    python experiments/cnn_step.py --batch-size 64 --rounds 5 --out DIR

Writes ``DIR/results.json`` (every per-round time, losses, the environment of each child),
``DIR/SUMMARY.md`` and, when matplotlib is installed, ``DIR/step_time.png`` (median ms per step, by
formulation and setting).
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

import _args  # experiments/_args.py

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "cnn_step"
FORMULATIONS = ("flax", "graphduo-lax", "graphduo")
CONVOLUTIONS = ("xla", "eigen")
HOST_MEMORY = ("system", "reuse")
# The 2 x 2 design of XLA's libraries and host memory, and oneDNN (graphduo's default) with reuse.
SETTINGS = (*(f"{conv}+{mem}" for conv in CONVOLUTIONS for mem in HOST_MEMORY), "onednn+reuse")
BASELINE = ("flax", "xla+system")
CHECK_STEPS = 3
FAULT_STEPS = 3
LOSS_RTOL = 1e-4
MARKER = "CNN_STEP_RESULT "


# ---------------------------------------------------------------------------------------------
# Child: one convolution library and host memory policy, every formulation, one round.

def _apply_fns(model):
    from graphduo import models

    def lax_convs(params, x):
        for i in range(sum(name.startswith("Conv_") for name in params)):
            layer = params[f"Conv_{i}"]
            x = models.relu(models.max_pool_2x2(models._conv_same(x, layer["kernel"])) + layer["bias"])
        x = models.relu(models._dense(params["Dense_0"], x.reshape((x.shape[0], -1))))
        return models._dense(params["Dense_1"], x)

    return {"flax": lambda params, x: model.module.apply({"params": params}, x),
            "graphduo-lax": lax_convs,
            "graphduo": models.cnn_apply}


def child(setting: str, batch_size: int, steps: int, reverse: bool) -> dict:
    from graphduo import runtime

    convolutions, host_memory = setting.split("+")
    os.environ["XLA_FLAGS"], note = runtime.cpu_convolution_flags(convolutions)
    convolution_note = runtime.use_cpu_convolutions(convolutions)
    memory_note = runtime.reuse_host_memory(host_memory)
    import jax
    import numpy as np

    from graphduo import timing
    from graphduo.models import build_model
    from graphduo.step import create_train_state, make_optimizer, make_train_step
    from graphduo.traced import TracedStep

    model = build_model("cnn", (28, 28, 1), 10)
    tx = make_optimizer("adam", 1e-3)
    rng = np.random.default_rng(0)
    u = rng.random((batch_size, 28, 28, 1), dtype=np.float32)
    batch = jax.device_put({"image": np.where(u < 0.6, 0.0, u).astype(np.float32),  # digit-like zeros
                            "label": rng.integers(0, 10, batch_size).astype(np.int32)})
    out = {"setting": setting, "note": note, "convolution_note": convolution_note, "memory_note": memory_note, "environment": timing.environment(),
           "cells": {}}
    names = FORMULATIONS[::-1] if reverse else FORMULATIONS
    for name in names:
        step = TracedStep(make_train_step(_apply_fns(model)[name], tx), donate_argnums=0)
        state = create_train_state(model, tx, jax.random.key(0))
        losses = []
        for _ in range(CHECK_STEPS):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
        state, _, times = timing.time_steps(step, state, [batch] * (steps + 3), warmup=2)
        faults = timing.minor_page_faults()  # steady state: after the timed steps, over FAULT_STEPS more
        for _ in range(FAULT_STEPS):
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
        out["cells"][name] = {"losses": losses, "median_ms": times.median_ms, "p10_ms": times.p10_ms,
                              "p90_ms": times.p90_ms, "compile_s": step.compile_time_s,
                              "page_faults_per_step": (timing.minor_page_faults() - faults) / FAULT_STEPS}
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
        for name in FORMULATIONS:
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
    return {"cells": cells, "loss_check": {"max_rel_diff": worst, "tolerance": LOSS_RTOL, "ok": worst <= LOSS_RTOL}}


def format_table(cells: dict) -> list[str]:
    rows = ["| formulation | convolutions | host memory | median ms/step | per round | page faults/step | "
            "speedup vs flax+xla+system [range] |", "|---|---|---|---|---|---|---|"]
    for c in cells.values():
        lo, hi = c["speedup_range"]
        rows.append(f"| {c['formulation']} | {c['convolutions']} | {c['host_memory']} | {c['median_ms']:.1f} | "
                    f"{', '.join(f'{t:.1f}' for t in c['rounds_ms'])} | {c['page_faults_per_step']:,.0f} | "
                    f"{c['speedup_vs_defaults']:.2f}x "
                    f"[{lo:.2f}-{hi:.2f}] |")
    return rows


def write_plot(out: pathlib.Path, result: dict) -> str | None:
    """``out/step_time.png``: median ms per step of every formulation under every runtime setting, from
    the results dict (as written to results.json); its file name, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return None
    cells = result["analysis"]["cells"]
    settings = [s for s in SETTINGS if f"{FORMULATIONS[0]}|{s}" in cells]  # results of older runs have fewer
    fig, ax = plt.subplots(figsize=(1.9 * len(settings) + 1, 4))
    width = 0.8 / len(FORMULATIONS)
    for i, name in enumerate(FORMULATIONS):
        xs = [j + (i - (len(FORMULATIONS) - 1) / 2) * width for j in range(len(settings))]
        ms = [cells[f"{name}|{setting}"]["median_ms"] for setting in settings]
        bars = ax.bar(xs, ms, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(settings)),
                  [f"{s.split('+')[0]} convolutions\n{s.split('+')[1]} memory" for s in settings])
    ax.set_ylabel("median ms per step")
    ax.set_title(f"CNN traced Adam step, batch {result['batch_size']}: {len(result['rounds'])} round(s)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(title="formulation")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)
    return "step_time.png"


def write_summary(path: pathlib.Path, result: dict, args, command: str, wall_s: float,
                  plot: str | None = None) -> None:
    from graphduo.timing import describe_machine

    env = result["rounds"][0]["eigen+reuse"]["environment"]
    check = result["analysis"]["loss_check"]
    cells = result["analysis"]["cells"]
    best = min(cells.values(), key=lambda c: c["median_ms"])
    lines = [
        "# cnn_step: the CNN's traced training step, by formulation, convolution library and host memory", "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s; batch {args.batch_size}; {args.rounds} round(s) of {len(SETTINGS)} child "
        f"processes, {args.steps} timed steps per cell per round.  ",
        f"Machine: {describe_machine(env)} (the eigen+reuse children; onednn children with oneDNN's "
        f"convolutions for graphduo's formulation, xla children without XLA_FLAGS, "
        f"system children with glibc's default malloc policy).", "",
        *format_table(cells), "",
        f"Fastest: {best['formulation']} with {best['convolutions']} convolutions and {best['host_memory']} host "
        f"memory, {best['median_ms']:.1f} ms, {best['speedup_vs_defaults']:.2f}x the plain Flax step on this "
        f"jaxlib's defaults.", "",
        f"Same function: losses of the first {CHECK_STEPS} steps from the same weights, all {len(cells)} cells: max "
        f"relative difference {check['max_rel_diff']:.1e} (tolerance {check['tolerance']:g}): "
        f"{'ok' if check['ok'] else 'MISMATCH'}.", "",
        "flax: `nn.Conv -> nn.relu -> nn.max_pool`; graphduo-lax: `relu(max_pool_2x2(conv) + bias)` with "
        "the first-maximum pooling gradient and `lax` convolutions; graphduo: `graphduo.models.cnn_apply` "
        "(also the one-channel first convolution as multiply-adds). xla: jaxlib's default convolutions "
        "(YNNPACK in jax 0.10); eigen: `graphduo.runtime.cpu_convolution_flags(\"eigen\")` in XLA_FLAGS; "
        "onednn: also `graphduo.runtime.use_cpu_convolutions(\"onednn\")` (graphduo's formulation runs its "
        "convolutions on oneDNN through JAX's FFI; the other two keep XLA's Eigen ones). "
        "system: glibc's malloc as it comes (the step's scratch memory mapped afresh every step); reuse: "
        "`graphduo.runtime.reuse_host_memory(\"reuse\")` (freed memory kept for the next step). Page "
        f"faults/step: the child's minor page faults per step over {FAULT_STEPS} steps after the timed ones "
        "(steady state); each is a 4 KiB page the kernel mapped and zeroed on first touch. Children run "
        "without the user's MALLOC_*, GLIBC_TUNABLES and LD_PRELOAD.",
    ]
    if plot:
        lines += ["", f"![median ms per step by formulation and runtime setting]({plot})"]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _args.make_parser(
        __doc__, "Time the default CNN's traced training step for three formulations of the same model "
                 "under XLA:CPU's default and Eigen convolutions, with glibc's default host memory policy "
                 "and with freed memory reused; check all reach the same losses.")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32, 1 round, 5 timed steps")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_args.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_args.positive_int, default=None,
                        help="batch size (default 256; --quick: 32)")
    parser.add_argument("--rounds", type=_args.positive_int, default=None,
                        help="rounds of the four settings (default 3; --quick: 1)")
    parser.add_argument("--steps", type=_args.positive_int, default=None,
                        help="timed steps per cell per round (default 15; --quick: 5)")
    parser.add_argument("--timeout", type=_args.positive_float, default=600.0,
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
        args.out = _args.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(MARKER + json.dumps(child(args.child, args.batch_size, args.steps, args.reverse)), flush=True)
        return
    from graphduo.timing import command_line

    command, t0 = command_line(argv), time.perf_counter()
    rounds = []
    for r in range(args.rounds):
        order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
        rounds.append({s: run_child(s, args, reverse=r % 2 == 1) for s in order})
        print(f"[cnn_step] round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n}|{s} {rounds[-1][s]['cells'][n]['median_ms']:.1f}" for s in SETTINGS for n in FORMULATIONS)
            + " ms", file=sys.stderr)
    result = {"command": command, "batch_size": args.batch_size, "steps": args.steps, "rounds": rounds,
              "analysis": analyse(rounds)}
    wall_s = time.perf_counter() - t0
    result["wall_s"] = wall_s
    print("\n".join(format_table(result["analysis"]["cells"])))
    check = result["analysis"]["loss_check"]
    print(f"loss check: max relative difference {check['max_rel_diff']:.1e} ({'ok' if check['ok'] else 'MISMATCH'})")
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = write_plot(args.out, result)
    write_summary(args.out / "SUMMARY.md", result, args, command, wall_s, plot)
    print(f"wall time {wall_s:.0f} s; wrote {args.out / 'results.json'}, SUMMARY.md"
          + (f" and {plot}" if plot else ""), file=sys.stderr)
    if not check["ok"]:
        print(f"cnn_step.py: error: the cells' losses differ by up to {check['max_rel_diff']:.1e} relative "
              f"(tolerance {check['tolerance']:g}): the formulations do not compute the same function",
              file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
