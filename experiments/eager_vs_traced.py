"""Eager against traced: one training step's time across batch sizes, and where dispatch stops mattering.

What it measures, for graphduo's five built-in models (the MLP 784-512-512-10, the CNN
conv32-pool-conv64-pool-dense128, a small ResNet with BatchNorm, a GRU reading the image row by row,
a small ViT with dropout; ``graphduo.models``) on 28x28x1 inputs, 10 classes, optax Adam (lr 1e-3,
``graphduo.step.make_optimizer("adam", 1e-3)``), at batch sizes 1, 2, 4, ..., 1024, in both modes:

* eager:  ``EagerStep(make_train_step(model, tx))``: op by op, one dispatch per op;
* traced: ``TracedStep(make_train_step(model, tx), donate_argnums=0)``: one XLA executable.

and the RNN across sequence lengths (images of 7 to 112 rows): eager's Python loop over the rows
against the traced loop, unrolled or a ``lax.scan``: compile time and step time.

Per model, batch and mode: median step time with p10-p90 and samples/s (``graphduo.timing.time_steps``:
first step apart, every step blocked on, median and percentiles); the first step (eager: per-primitive
compiles; traced: trace + lower + compile); the speedup eager/traced; the achieved FLOP/s of each mode
= XLA's ``cost_analysis()["flops"]`` of the traced step / the mode's median step time (both modes run
the same arithmetic, XLA's count is the one count we have), as a fraction of this machine's peak
measured by ``_common.matmul_peak_flops()`` (a jitted float32 matmul), at the start and end.

Dispatch-bound rule (stated in SUMMARY.md): the eager step is dispatch-bound while its time stays
within 2x of its batch-1 time (at batch 1 almost all of an eager step is per-op Python and dispatch
cost, which does not grow with the batch); the crossover is the smallest batch from which on every
eager p10 step time is more than 2x the batch-1 eager p10 (p10, not the median, and "from which on",
so one disturbed measurement on this noisy machine cannot move it). A second reading: the smallest
batch from which the traced per-sample p10 time stops falling (each further doubling of the batch
improves it by less than 10%).

How: per case, a short probe run (first step + one steady step) picks the number of timed steps so
each measurement lasts about ``--budget`` seconds (at least ``--min-steps``, at most ``--max-steps``;
slow eager CNN steps at large batch therefore get only a few), then a second ``time_steps`` run on
the warm step gives the steady-state figures. The machine is shared and noisy: read p10 as the least
disturbed estimate. The process runs with graphduo's CLI defaults (``_common.setup``), recorded in
results.json.

Run:
    python experiments/eager_vs_traced.py            # full run
    python experiments/eager_vs_traced.py --quick    # smoke test: MLP, batch 1, 8, 64
    python experiments/eager_vs_traced.py --out DIR --models mlp --batch-sizes 1,32,1024

Writes ``DIR/results.json`` (every case, the environment, the peak), ``DIR/SUMMARY.md`` (tables, rule,
reading) and ``DIR/step_time.png`` (step time vs batch, log-log, per model) and ``DIR/speedup.png``.
"""

from __future__ import annotations

import argparse
import gc
import json
import pathlib
import sys
import time
from typing import Any

import jax
import numpy as np

import _common  # experiments/_common.py
from _common import INPUT_SHAPE, LR, NUM_CLASSES
from graphduo import timing
from graphduo.eager import EagerStep
from graphduo.models import build_model
from graphduo.step import create_train_state, make_optimizer, make_train_step
from graphduo.traced import TracedStep

MODES = ("eager", "traced")
DEFAULT_OUT = _common.default_out("eager_vs_traced")
DISPATCH_FACTOR = 2.0  # eager time > this x batch-1 eager time: no longer dispatch-bound
PER_SAMPLE_GAIN = 0.9  # traced per-sample time "still falling" while t(2b)/2b < this x t(b)/b


def make_step(mode: str, model, tx):
    fn = make_train_step(model, tx)
    return EagerStep(fn) if mode == "eager" else TracedStep(fn, donate_argnums=0)


def time_case(model, tx, mode: str, batch_size: int, args, input_shape=INPUT_SHAPE) -> dict[str, Any]:
    """Time one (model, mode, batch) case: a probe run for the step count, then the measurement."""
    batch = _common.make_batch(batch_size, input_shape=input_shape)
    step = make_step(mode, model, tx)
    state = create_train_state(model, tx, jax.random.key(0))
    # Probe: the first step (compiles) and one steady step.
    state, _, probe = timing.time_steps(step, state, [batch, batch])
    steps = int(np.clip(round(args.budget / max(probe.times_s[0], 1e-6)), args.min_steps, args.max_steps))
    # Measurement on the warm step: its first call is a steady call, reported apart by the harness anyway.
    state, metrics, times = timing.time_steps(step, state, [batch] * (steps + 1))
    row = {"model": model.name, "mode": mode, "batch_size": batch_size, **times.summary(batch_size),
           "first_step_s": probe.first_s, "probe_step_ms": probe.times_s[0] * 1e3,
           "loss": float(metrics[-1]["loss"])}
    if mode == "traced":
        stages = step.stages(state, batch)  # cached: same signature, no new compile
        row["cost"] = stages.cost_analysis()
        rec = stages.record
        row["compile_s"] = {"trace": rec.trace_s, "lower": rec.lower_s, "compile": rec.compile_s}
    del state, metrics, step
    gc.collect()
    return row


def analyse(rows: list[dict], peak_flops: float) -> dict[str, Any]:
    """Speedups, achieved FLOP/s and the dispatch-bound crossover, per model."""
    out: dict[str, Any] = {}
    for model_name in sorted({r["model"] for r in rows}, key=lambda m: [r["model"] for r in rows].index(m)):
        by = {(r["mode"], r["batch_size"]): r for r in rows if r["model"] == model_name}
        batches = sorted({b for _, b in by})
        per_batch = []
        for b in batches:
            e, t = by.get(("eager", b)), by.get(("traced", b))
            if e is None or t is None:
                continue
            flops = t.get("cost", {}).get("flops", float("nan"))
            entry = {"batch_size": b, "speedup": e["step_time_ms"] / t["step_time_ms"],
                     "speedup_p10": e["step_time_p10_ms"] / t["step_time_p10_ms"], "flops_per_step": flops}
            for mode, r in (("eager", e), ("traced", t)):
                achieved = flops / (r["step_time_ms"] / 1e3)
                entry[f"{mode}_flops_per_s"] = achieved
                entry[f"{mode}_peak_fraction"] = achieved / peak_flops
                r["achieved_flops_per_s"], r["peak_fraction"] = achieved, achieved / peak_flops
            per_batch.append(entry)
        # p10 (the least disturbed steps) rather than the median: the machine is shared and noisy.
        eager = {b: by[("eager", b)]["step_time_p10_ms"] for b in batches if ("eager", b) in by}
        traced = {b: by[("traced", b)]["step_time_p10_ms"] for b in batches if ("traced", b) in by}
        crossover = None
        eb = [b for b in batches if b in eager]
        if eb and eb[0] == batches[0]:
            base = eager[eb[0]]
            # the smallest batch from which every larger batch's eager step is above the threshold
            for i, b in enumerate(eb):
                if all(eager[c] > DISPATCH_FACTOR * base for c in eb[i:]):
                    crossover = b
                    break
        plateau = None
        tb = [b for b in batches if b in traced]
        for i, b in enumerate(tb[:-1]):
            if all(traced[nb] / nb > PER_SAMPLE_GAIN * traced[pb] / pb for pb, nb in zip(tb[i:], tb[i + 1:])):
                plateau = b
                break
        out[model_name] = {"per_batch": per_batch, "base_batch": batches[0] if batches else None,
                           "dispatch_bound_until": crossover, "traced_per_sample_plateau": plateau}
    return out


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def bound_of(analysis_of_model: dict, batch_size: int) -> str:
    """``dispatch-bound`` below the model's crossover batch (the eager step within ``DISPATCH_FACTOR``
    of its batch-1 time), ``compute-bound`` from it on."""
    cross = analysis_of_model["dispatch_bound_until"]
    return "dispatch-bound" if cross is None or batch_size < cross else "compute-bound"


def rnn_lengths(tx, args) -> list[dict[str, Any]]:
    """The RNN over images of ``L`` rows (sequence length ``L``, 28 pixels a row) at batch 32: eager
    (a Python loop over the rows, op by op) and traced, its loop unrolled or a ``lax.scan``: the
    first traced step (trace, lower, compile) and the steady-state step."""
    out = []
    for length in args.rnn_lengths:
        shape = (length, INPUT_SHAPE[1], INPUT_SHAPE[2])
        for loop in ("unrolled", "scan"):
            model = build_model("rnn", shape, NUM_CLASSES, loop=loop)
            modes = ("eager", "traced") if loop == "unrolled" else ("traced",)
            for mode in modes:
                row = time_case(model, tx, mode, args.rnn_batch, args, input_shape=shape)
                row.update(length=length, loop=loop)
                out.append(row)
                print(f" rnn L={length:<4} {loop:<8} {mode:<6} {row['step_time_ms']:9.2f} ms, first step "
                      f"{row['first_step_s']:.2f} s", file=sys.stderr, flush=True)
    return out


def rnn_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lengths = sorted({r["length"] for r in rows})
    get = {(r["length"], r["loop"], r["mode"]): r for r in rows}
    lines = ["## The RNN across sequence lengths: unrolled against scan", "",
             f"The RNN (GRU, 128 units) over images of L rows (the sequence) of 28 pixels, batch {rows[0]['batch_size']}: "
             "eager runs the cell in a Python loop, one op at a time per row; traced compiles the same loop either "
             "unrolled (one copy of the cell per row) or as a `lax.scan` (the cell compiled once). First step: "
             "trace + lower + compile + the step (traced), the first dispatches (eager).", "",
             "| L | eager ms | unrolled: first step s | unrolled ms | scan: first step s | scan ms | eager / scan |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for length in lengths:
        e, u, c = get[(length, "unrolled", "eager")], get[(length, "unrolled", "traced")], get[(length, "scan", "traced")]
        lines.append(f"| {length} | {e['step_time_ms']:.2f} | {u['first_step_s']:.2f} | {u['step_time_ms']:.2f} | "
                     f"{c['first_step_s']:.2f} | {c['step_time_ms']:.2f} | {e['step_time_ms'] / c['step_time_ms']:.1f}x |")
    return lines + [""]


def fmt_rate(x: float) -> str:
    return f"{x / 1e9:.2f}G" if x >= 1e8 else f"{x / 1e6:.1f}M"


def markdown_tables(rows: list[dict], analysis: dict) -> list[str]:
    lines = []
    for model_name, a in analysis.items():
        lines += [f"### {model_name}", "",
                  "| batch | mode | median ms | p10-p90 ms | samples/s | first step s | GFLOP/step | achieved FLOP/s | of peak "
                  "| eager step is |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted((r for r in rows if r["model"] == model_name), key=lambda r: (r["batch_size"], r["mode"])):
            flops = next((p["flops_per_step"] for p in a["per_batch"] if p["batch_size"] == r["batch_size"]), float("nan"))
            bound = "" if r["mode"] != "eager" else bound_of(a, r["batch_size"])
            lines.append(
                f"| {r['batch_size']} | {r['mode']} | {r['step_time_ms']:.2f} | "
                f"{r['step_time_p10_ms']:.2f}-{r['step_time_p90_ms']:.2f} | {r['samples_per_s']:,.0f} | "
                f"{r['first_step_s']:.2f} | {flops / 1e9:.4f} | {fmt_rate(r.get('achieved_flops_per_s', float('nan')))} | "
                f"{100 * r.get('peak_fraction', float('nan')):.2f}% | {bound} |")
        lines += ["", "| batch | speedup eager/traced (median) | (p10) | timed steps eager / traced |", "|---:|---:|---:|---|"]
        for p in a["per_batch"]:
            steps = "/".join(str(r["timed_steps"]) for m in MODES for r in rows
                             if r["model"] == model_name and r["batch_size"] == p["batch_size"] and r["mode"] == m)
            lines.append(f"| {p['batch_size']} | {p['speedup']:.2f}x | {p['speedup_p10']:.2f}x | {steps} |")
        lines.append("")
    return lines


def reading(analysis: dict) -> list[str]:
    paras = []
    for model_name, a in analysis.items():
        pb = a["per_batch"]
        if not pb:
            continue
        best = max(pb, key=lambda p: p["speedup"])
        worst = min(pb, key=lambda p: p["speedup"])
        cross = a["dispatch_bound_until"]
        plateau = a["traced_per_sample_plateau"]
        top_t = max(pb, key=lambda p: p["traced_peak_fraction"])
        top_e = max(pb, key=lambda p: p["eager_peak_fraction"])
        paras.append(
            f"**{model_name}.** Traced is {best['speedup']:.1f}x faster than eager at batch {best['batch_size']} "
            f"(the largest gap) and {worst['speedup']:.2f}x at batch {worst['batch_size']} (the smallest). "
            + (f"The eager step is dispatch-bound up to batch {max((p['batch_size'] for p in pb if p['batch_size'] < cross), default=cross)}: batch {cross} is the "
               f"first from which on the eager step (p10) exceeds {DISPATCH_FACTOR:g}x the batch-{a['base_batch']} eager step. "
               if cross else f"The eager step never exceeds {DISPATCH_FACTOR:g}x its batch-{a['base_batch']} time "
               f"in this range: it stays dispatch-bound throughout. ")
            + (f"The traced per-sample time stops falling (less than {100 * (1 - PER_SAMPLE_GAIN):.0f}% gain per "
               f"doubling) from batch {plateau}. " if plateau else
               "The traced per-sample time keeps falling over the whole range. ")
            + f"Best achieved compute: traced {100 * top_t['traced_peak_fraction']:.1f}% of the matmul peak "
            f"(batch {top_t['batch_size']}), eager {100 * top_e['eager_peak_fraction']:.1f}% (batch {top_e['batch_size']}).")
    return paras


def write_summary(out: pathlib.Path, rows, analysis, env, command: str, wall_s: float, args, rnn_rows=None) -> None:
    text = [
        "# eager_vs_traced: one training step, op by op against compiled, across batch sizes",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s.  ",
        f"Machine: {_common.describe_machine(env)}.  ",
        f"Peak (jitted {args.matmul_n}x{args.matmul_n} float32 matmul, `_common.matmul_peak_flops`): "
        f"{env['matmul_peak_flops_start'] / 1e9:.1f} GFLOP/s at the start, {env['matmul_peak_flops_end'] / 1e9:.1f} at the "
        f"end; fractions below are against the larger, {env['matmul_peak_flops'] / 1e9:.1f} GFLOP/s.",
        "",
        "Models: graphduo's built-ins (`graphduo.models`, their default options), Adam lr 1e-3, 28x28x1 inputs. "
        "eager = `EagerStep(make_train_step(model, tx))`, traced = `TracedStep(..., donate_argnums=0)`. The last "
        "column says whether the eager step is still dispatch-bound at that batch (the rule below).",
        "",
        "median ms, p10-p90: over the timed steady-state steps (`graphduo.timing.time_steps`, every step blocked "
        "on); first step s: the first call (eager: one compile per primitive and shape; traced: trace + lower + "
        "compile), timed apart. GFLOP/step: XLA's `cost_analysis()[\"flops\"]` of the compiled traced step; "
        "achieved FLOP/s = that count / the mode's median step time (eager runs the same arithmetic op by op, "
        "so the same count is used for it); of peak = achieved / the matmul peak.",
        "",
        "**Dispatch-bound rule.** At batch 1 almost all of an eager step is per-op overhead (Python, "
        "dispatch, one small kernel per op), which does not grow with the batch. We call the eager step "
        f"dispatch-bound while its step time stays within {DISPATCH_FACTOR:g}x of its batch-1 time; the "
        f"crossover is the smallest batch from which on every eager step time exceeds {DISPATCH_FACTOR:g}x the "
        "batch-1 eager step time. Step time here is the p10 (the least disturbed steps), and \"from which on\" "
        "means one disturbed measurement on this shared machine cannot move the crossover. Second reading, "
        "for the traced step: the smallest batch b from which every further doubling of the batch improves the "
        f"per-sample p10 time by less than {100 * (1 - PER_SAMPLE_GAIN):.0f}% (t(2b)/2b > {PER_SAMPLE_GAIN} t(b)/b).",
        "",
        *markdown_tables(rows, analysis),
        *rnn_table(rnn_rows or []),
        "## Reading",
        "",
        *(p + "\n" for p in reading(analysis)),
        "Timings on a shared machine are noisy; steps at large batch, especially eager CNN, are timed "
        f"only {args.min_steps}+ times, so their medians carry more noise than the small-batch ones.",
        "",
    ]
    _common.write_summary(out, text)


def write_plots(out: pathlib.Path, rows: list[dict], analysis: dict) -> list[str]:
    plt = _common.pyplot()
    if plt is None:
        return []
    models = list(analysis)
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        for mode, marker in (("eager", "o"), ("traced", "s")):
            pts = sorted((r["batch_size"], r["step_time_ms"], r["step_time_p10_ms"], r["step_time_p90_ms"])
                         for r in rows if r["model"] == model_name and r["mode"] == mode)
            if not pts:
                continue
            b, med, p10, p90 = map(np.array, zip(*pts))
            ax.errorbar(b, med, yerr=[med - p10, p90 - med], marker=marker, capsize=2, label=mode)
        cross = analysis[model_name]["dispatch_bound_until"]
        if cross:
            ax.axvline(cross, color="grey", linestyle=":", label=f"eager > {DISPATCH_FACTOR:g}x batch-1")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("step time, ms (median, p10-p90)")
        ax.set_title(f"{model_name}: one Adam training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for model_name in models:
        pb = analysis[model_name]["per_batch"]
        ax.plot([p["batch_size"] for p in pb], [p["speedup"] for p in pb], marker="o", label=model_name)
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup = eager / traced step time")
    ax.set_title("Traced speedup over eager")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)
    return ["step_time.png", "speedup.png"]


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time one Adam training step of the MLP and the CNN in eager and traced mode over batch "
                 "sizes 1..1024; report speedup, achieved FLOP/s against the matmul peak, and the batch "
                 "where the eager step stops being dispatch-bound.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: MLP only, batch 1, 8, 64, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and the plots", DEFAULT_OUT))
    parser.add_argument("--models", type=_common.any_models, default=None,
                        help=f"comma-separated models, of {', '.join(_common.ALL_MODELS)} (default all; --quick: mlp)")
    parser.add_argument("--rnn-lengths", type=_common.batch_sizes, default=None,
                        help="sequence lengths of the RNN study, rows of 28 pixels (default 7,14,28,56,112; --quick: 7)")
    parser.add_argument("--rnn-batch", type=_common.positive_int, default=32,
                        help="batch size of the RNN study (default 32)")
    parser.add_argument("--batch-sizes", type=_common.batch_sizes, default=None,
                        help="comma-separated batch sizes (default 1,2,4,...,1024; --quick: 1,8,64)")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: re-read OUT/results.json and rewrite SUMMARY.md and the plots")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
                        help="target seconds of timed steps per case (default 0.6; --quick: 0.15)")
    parser.add_argument("--min-steps", type=_common.positive_int, default=None,
                        help="fewest timed steps per case (default 3)")
    parser.add_argument("--max-steps", type=_common.positive_int, default=None,
                        help="most timed steps per case (default 40; --quick: 10)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    args.models = args.models or (["mlp"] if quick else list(_common.ALL_MODELS))
    args.rnn_lengths = args.rnn_lengths or ([7] if quick else [7, 14, 28, 56, 112])
    args.batch_sizes = args.batch_sizes or ([1, 8, 64] if quick else [2**i for i in range(11)])
    args.budget = args.budget or (0.15 if quick else 0.6)
    args.min_steps = args.min_steps or 3
    args.max_steps = args.max_steps or (10 if quick else 40)
    if args.min_steps > args.max_steps:
        parser.error(f"--min-steps {args.min_steps} is more than --max-steps {args.max_steps}")
    if args.replot and not (args.out / "results.json").is_file():
        parser.error(f"--replot: {args.out / 'results.json'} not found; run without --replot first")
    args.out = _common.check_out(parser, args.out)
    return args


def replot(out: pathlib.Path) -> None:
    payload = json.loads((out / "results.json").read_text())
    rows, env = payload["rows"], payload["environment"]
    analysis = analyse(rows, env["matmul_peak_flops"])
    payload["analysis"] = analysis
    _common.write_results(out, payload)
    write_summary(out, rows, analysis, env, payload["command"], payload["wall_s"], argparse.Namespace(**payload["settings"]),
                  payload.get("rnn_lengths"))
    write_plots(out, rows, analysis)
    print("\n".join(markdown_tables(rows, analysis)))


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    if args.replot:
        replot(args.out)
        return
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    args.matmul_n = _common.peak_matmul_size() // (2 if args.quick else 1)
    env["matmul_peak_flops_start"] = _common.matmul_peak_flops(args.matmul_n, repeats=5 if args.quick else 10)
    print(f"eager_vs_traced on {env['cpu']} ({env['cpu_count']} cores), jax {env['jax']} {env['backend']}, "
          f"peak {env['matmul_peak_flops_start'] / 1e9:.1f} GFLOP/s", file=sys.stderr)
    tx = make_optimizer("adam", LR)
    rows = []
    for model_name in args.models:
        model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
        for batch_size in args.batch_sizes:
            for mode in MODES:
                row = time_case(model, tx, mode, batch_size, args)
                rows.append(row)
                print(f"{model_name:>4} b{batch_size:<5} {mode:<6} {row['step_time_ms']:9.2f} ms "
                      f"(p10 {row['step_time_p10_ms']:.2f}, p90 {row['step_time_p90_ms']:.2f}, "
                      f"{row['timed_steps']} steps; first {row['first_step_s']:.2f} s)", file=sys.stderr, flush=True)
    rnn_rows = rnn_lengths(tx, args)
    env["matmul_peak_flops_end"] = _common.matmul_peak_flops(args.matmul_n, repeats=5 if args.quick else 10)
    env["matmul_peak_flops"] = max(env["matmul_peak_flops_start"], env["matmul_peak_flops_end"])
    analysis = analyse(rows, env["matmul_peak_flops"])
    wall_s = time.perf_counter() - t_start

    payload = {"command": command, "wall_s": wall_s, "environment": env,
               "rules": {"dispatch_factor": DISPATCH_FACTOR, "per_sample_gain": PER_SAMPLE_GAIN},
               "settings": _common.settings_record(args), "rows": rows, "analysis": analysis, "rnn_lengths": rnn_rows}
    _common.write_results(args.out, payload)
    write_summary(args.out, rows, analysis, env, command, wall_s, args, rnn_rows)
    plots = write_plots(args.out, rows, analysis)
    print("\n".join(markdown_tables(rows, analysis)))
    print(f"wall time {wall_s:.0f} s; wrote {args.out}/results.json, SUMMARY.md" + "".join(f", {p}" for p in plots),
          file=sys.stderr)


if __name__ == "__main__":
    main()
