"""The compiled loop: ``graphduo train`` with K optimizer steps per executable, against the bare step.

What it measures, for the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128) on
28x28x1 synthetic inputs at batch 32 and 256, Adam (lr 1e-3), traced:

* ``bare``: the one-step executable alone, ``jax.jit(make_train_step(model.apply, tx))`` on one
  batch already on the device, every call run to completion: the step with no loop around it;
* ``K=1, 2, 4, ..., 64``: ``train_and_evaluate`` with ``--steps-per-call K`` (``lax.scan`` over K
  steps, the training split on the device, each step gathering its batch there), its steady-state
  samples/s (evaluation and compiles left out) and the compile time of its executables.

The ratio of each loop to the bare step, per round, says what the loop costs (K=1) and what
compiling several steps into one executable buys. Every run trains one epoch of synthetic data of
a whole number of calls for every K (a multiple of the largest K), so each run compiles exactly one
executable, and all of them visit the same batches.

How: rounds interleave every variant of a workload (in an order that flips each round); a figure
is the median over rounds, a ratio the median of the per-round ratios. Step counts are chosen from
a probe of the bare step so each run lasts about ``--budget`` seconds.

Run:
    python experiments/steps_per_call.py            # both models, batch 32 and 256, 3 rounds
    python experiments/steps_per_call.py --quick    # smoke test: MLP, batch 32, K in 1, 4, 16
    python experiments/steps_per_call.py --models mlp --batch-sizes 32 --ks 1,16 --rounds 5
    python experiments/steps_per_call.py --models cnn --unroll full   # each call unrolled: no loop

Writes ``DIR/results.json`` (every run's summary per round, the environment), ``DIR/SUMMARY.md`` and
``DIR/samples_per_s.png``.
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import statistics
import sys
import tempfile
import time

import _common  # experiments/_common.py
from _common import INPUT_SHAPE, LR

DEFAULT_OUT = _common.default_out("steps_per_call")
KS = (1, 2, 4, 8, 16, 32, 64)


def bare_step_s(model_name: str, batch_size: int, steps: int) -> tuple[float, float]:
    """``(median s per step, compile s)`` of the one-step executable on a fixed device batch."""
    import jax

    from graphduo import create_train_state, make_optimizer, make_train_step
    from graphduo.models import build_model
    from graphduo.timing import time_steps

    model = build_model(model_name, INPUT_SHAPE, _common.NUM_CLASSES)
    tx = make_optimizer("adam", LR)
    step = jax.jit(make_train_step(model.apply, tx), donate_argnums=0)
    batch = _common.make_batch(batch_size)
    state = create_train_state(model, tx, jax.random.key(0))
    _, _, times = time_steps(step, state, [batch] * (steps + 3), warmup=2)
    return times.median_ms / 1e3, times.first_s


def loop(model_name: str, batch_size: int, steps: int, k: int, unroll: str) -> dict:
    """``graphduo train`` traced, ``--steps-per-call k``, one epoch of ``steps`` steps; its summary.
    ``unroll``: ``scan`` keeps the loop (``--unroll 1``), ``full`` unrolls each call (``--unroll k``)."""
    from graphduo import Config, train_and_evaluate

    gc.collect()
    with tempfile.TemporaryDirectory(prefix="steps_per_call_") as run_dir:
        config = Config(model=model_name, mode="traced", dataset="synthetic", synthetic_shape=INPUT_SHAPE,
                        synthetic_size=batch_size * steps, batch_size=batch_size, steps=steps, steps_per_call=k,
                        unroll=k if unroll == "full" else 1, run_dir=run_dir)
        summary = train_and_evaluate(config, progress=False)
    keep = ("samples_per_s", "step_time_ms", "compile_time_s", "compiles", "first_step_s", "final_loss",
            "device_split")
    return {key: summary[key] for key in keep}


def run_workload(model_name: str, batch_size: int, args) -> dict:
    probe_s, _ = bare_step_s(model_name, batch_size, 5)
    largest = max(args.ks)
    # one epoch of whole calls for every K; enough steps to fill the budget
    steps = max(largest * 2, round(args.budget / probe_s / largest) * largest)
    rounds = []
    for r in range(args.rounds):
        order = list(args.ks) if r % 2 == 0 else list(args.ks)[::-1]
        result = {"round": r}
        step_s, compile_s = bare_step_s(model_name, batch_size, steps)
        result["bare"] = {"samples_per_s": batch_size / step_s, "step_time_ms": step_s * 1e3, "compile_time_s": compile_s}
        for k in order:
            result[f"K={k}"] = loop(model_name, batch_size, steps, k, args.unroll)
        rounds.append(result)
        line = "  ".join(f"{name} {result[name]['samples_per_s']:,.0f}" for name in ["bare", *(f"K={k}" for k in args.ks)])
        print(f"[steps_per_call] {model_name} b{batch_size} round {r + 1}/{args.rounds} (samples/s): {line}",
              file=sys.stderr, flush=True)
    names = [f"K={k}" for k in args.ks]
    summary = {}
    for name in ["bare", *names]:
        summary[name] = {"samples_per_s": statistics.median(r[name]["samples_per_s"] for r in rounds),
                         "compile_time_s": statistics.median(r[name]["compile_time_s"] for r in rounds)}
        if name != "bare":
            summary[name]["vs_bare"] = statistics.median(r[name]["samples_per_s"] / r["bare"]["samples_per_s"]
                                                         for r in rounds)
            summary[name]["vs_k1"] = statistics.median(r[name]["samples_per_s"] / r["K=1"]["samples_per_s"]
                                                       for r in rounds) if "K=1" in names else None
    losses = [r[name]["final_loss"] for r in rounds for name in names]
    return {"model": model_name, "batch_size": batch_size, "steps": steps, "rounds": rounds, "summary": summary,
            "same_loss": max(losses) - min(losses) <= 1e-4 * max(1.0, abs(losses[0]))}


def summary_lines(payload: dict) -> list[str]:
    ks = payload["settings"]["ks"]
    lines = ["# steps_per_call: K optimizer steps per executable, the training loop against the bare step", "",
             f"Command: `{payload['command']}`  ", f"Wall time: {payload['wall_s']:.0f} s; {payload['settings']['rounds']} "
             f"round(s); each call {'a loop over its steps' if payload['settings']['unroll'] == 'scan' else 'unrolled'} "
             f"(`--unroll {'1' if payload['settings']['unroll'] == 'scan' else 'K'}`).  ",
             f"Machine: {_common.describe_machine(payload['environment'])}.", "",
             "samples/s of `graphduo train` (traced, synthetic 28x28x1 data on the device, steady state: compiles and "
             "evaluation left out) with `--steps-per-call K`, and of the bare one-step executable on a fixed device "
             "batch; ratios are medians of per-round ratios; compile: the executables' trace + lower + compile.", "",
             "| workload | bare | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---:|" + "---:|" * len(ks)]
    for w in payload["workloads"]:
        s = w["summary"]
        lines.append(f"| {w['model']} b{w['batch_size']} ({w['steps']} steps) | {s['bare']['samples_per_s']:,.0f} | "
                     + " | ".join(f"{s[f'K={k}']['samples_per_s']:,.0f}" for k in ks) + " |")
    lines += ["", "| workload | " + " | ".join(f"K={k} / bare" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for w in payload["workloads"]:
        s = w["summary"]
        lines.append(f"| {w['model']} b{w['batch_size']} | " + " | ".join(f"{s[f'K={k}']['vs_bare']:.2f}" for k in ks) + " |")
    if 1 in ks:
        lines += ["", "| workload | " + " | ".join(f"K={k} / K=1" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
        for w in payload["workloads"]:
            s = w["summary"]
            lines.append(f"| {w['model']} b{w['batch_size']} | " + " | ".join(f"{s[f'K={k}']['vs_k1']:.2f}" for k in ks) + " |")
    lines += ["", "| workload | compile s, bare | " + " | ".join(f"K={k}" for k in ks) + " |", "|---|---:|" + "---:|" * len(ks)]
    for w in payload["workloads"]:
        s = w["summary"]
        lines.append(f"| {w['model']} b{w['batch_size']} | {s['bare']['compile_time_s']:.2f} | "
                     + " | ".join(f"{s[f'K={k}']['compile_time_s']:.2f}" for k in ks) + " |")
    lines += ["", "Same function: every run of a workload ends at the same loss (relative 1e-4): "
              + ", ".join(f"{w['model']} b{w['batch_size']} {'yes' if w['same_loss'] else 'NO'}" for w in payload["workloads"]),
              ""]
    return lines


def write_plot(out: pathlib.Path, payload: dict) -> list[str]:
    plt = _common.pyplot()
    if plt is None:
        return []
    ks = payload["settings"]["ks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for w in payload["workloads"]:
        s = w["summary"]
        ax.plot(ks, [s[f"K={k}"]["vs_bare"] for k in ks], marker="o", label=f"{w['model']} b{w['batch_size']}")
    ax.axhline(1.0, color="grey", linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("optimizer steps per executable (K)")
    ax.set_ylabel("graphduo train samples/s / bare step's")
    ax.set_title("The compiled loop against the bare one-step executable")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "samples_per_s.png", dpi=120)
    plt.close(fig)
    return ["samples_per_s.png"]


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(__doc__, "Time graphduo's training loop with K optimizer steps per executable "
                                          "(a lax.scan, the data on the device) against the bare one-step "
                                          "executable, for K from 1 to 64.")
    parser.add_argument("--quick", action="store_true", help="smoke test: MLP at batch 32, K in 1, 4, 16, one round")
    parser.add_argument("--models", type=_common.models, default=None, help="comma-separated models (default mlp,cnn)")
    parser.add_argument("--batch-sizes", type=_common.batch_sizes, default=None, help="batch sizes (default 32,256)")
    parser.add_argument("--ks", type=_common.batch_sizes, default=None,
                        help="steps per call to time (default 1,2,4,8,16,32,64)")
    parser.add_argument("--unroll", choices=("scan", "full"), default="scan",
                        help="scan: each call a loop over its steps (--unroll 1); full: each call unrolled (--unroll K: "
                             "no loop, a compile that grows with K) (default scan)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None, help="rounds (default 3)")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
                        help="seconds of training per run, roughly (default 2; --quick: 0.3)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and samples_per_s.png", DEFAULT_OUT))
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = args.models or (["mlp"] if args.quick else list(_common.MODELS))
    args.batch_sizes = args.batch_sizes or ([32] if args.quick else [32, 256])
    args.ks = sorted(args.ks or ([1, 4, 16] if args.quick else list(KS)))
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.budget = args.budget or (0.3 if args.quick else 2.0)
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()
    command = _common.command_line(argv)
    t0 = time.perf_counter()
    workloads = [run_workload(m, b, args) for m in args.models for b in args.batch_sizes]
    payload = {"command": command, "environment": _common.environment(settings),
               "settings": _common.settings_record(args), "workloads": workloads, "wall_s": time.perf_counter() - t0}
    _common.write_results(args.out, payload)
    lines = summary_lines(payload)
    _common.write_summary(args.out, lines)
    plots = write_plot(args.out, payload)
    print("\n".join(lines))
    print(f"wrote {args.out}/results.json, SUMMARY.md" + "".join(f", {p}" for p in plots), file=sys.stderr)


if __name__ == "__main__":
    main()
