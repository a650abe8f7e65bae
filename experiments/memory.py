"""Peak memory of one training step, eager against traced, across batch sizes.

What it measures, for the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128) on
28x28x1 inputs, 10 classes, optax Adam (lr 1e-3), at batch sizes 1, 2, 4, ..., 1024:

* traced (``TracedStep(make_train_step(model.apply, tx), donate_argnums=0)``): XLA's own plan for the
  compiled step, ``TracedStep.stages(state, batch).memory_analysis()``: argument, output, alias
  (output bytes written in place of donated arguments), temporary and generated-code bytes. Peak
  estimate = argument + output + temp - alias: the inputs, the outputs that need fresh buffers and
  XLA's scratch buffer, all live at once at worst. The code bytes are reported apart.
* eager (``EagerStep(make_train_step(...))``): live-buffer accounting. The step is recorded as a
  jaxpr (``jax.make_jaxpr``: exactly the primitives eager mode binds one by one: the forward pass
  under autodiff, the transposed backward pass, the Adam update and the metrics) and replayed
  equation by equation on concrete arrays, as ``graphduo.graphs._replay`` does, with one addition:
  a value is dropped right after its last use, as Python's reference counting drops an eager
  intermediate, while the step's inputs (the state and the batch) stay alive, as the caller holds
  them until the step returns. After each op (its inputs and outputs both still alive) the script
  sums ``x.nbytes`` over ``jax.live_arrays()``; the step's footprint is that sum minus what was
  live before the step that is not the step's input, and the peak is its maximum over the step.
  For comparison: the bytes of all the step's intermediates if none were ever freed (an upper bound),
  and, as a check, the live bytes around one real ``EagerStep`` call (before: inputs; after: inputs +
  new state + metrics, since eager mode cannot donate).

Limits: buffers inside one eager op (XLA's scratch within a primitive's own small executable, or
within a ``jnp`` helper JAX jits internally such as ``log_softmax``) are not live arrays and are not
seen; allocator caching and fragmentation are not modelled in either mode. The two figures are the
bytes of live tensors, the quantity a framework controls.

The convolutions XLA:CPU compiles run on Eigen here whatever graphduo's default (``_common.setup``,
recorded in results.json): the traced figures are XLA's plan for the library that runs each
convolution, and pinning it keeps runs comparable from one graphduo release to the next.

Run:
    python experiments/memory.py            # full run
    python experiments/memory.py --quick    # smoke test: MLP, batch 1 and 64
    python experiments/memory.py --out DIR --models cnn --batch-sizes 1,64,1024

Writes ``DIR/results.json`` (every case, the per-op live-bytes trace of the largest batch, the
environment), ``DIR/SUMMARY.md`` (method, tables, reading) and ``DIR/memory.png`` (bytes vs batch).
"""

from __future__ import annotations

import argparse
import gc
import pathlib
import sys
import time
from typing import Any

import jax
import jax.extend.core as jex_core

import _common  # experiments/_common.py
from _common import INPUT_SHAPE, LR, NUM_CLASSES, make_batch
from graphduo.eager import EagerStep
from graphduo.graphs import run_equation
from graphduo.models import build_model, count_params
from graphduo.step import create_train_state, make_optimizer, make_train_step
from graphduo.traced import TracedStep

DEFAULT_OUT = _common.default_out("memory")
MiB = 2**20


def nbytes(x) -> int:
    try:
        return int(x.nbytes)
    except Exception:  # a typed PRNG key array: count its raw key data
        return int(jax.random.key_data(x).nbytes)


def tree_bytes(tree) -> int:
    seen, total = set(), 0
    for leaf in jax.tree.leaves(tree):
        if id(leaf) not in seen:
            seen.add(id(leaf))
            total += nbytes(leaf)
    return total


def live_bytes() -> int:
    """Bytes of every live (not deleted) JAX array in the process."""
    return sum(nbytes(x) for x in jax.live_arrays() if not x.is_deleted())


# --------------------------------------------------------------------------------------------
# Traced: XLA's memory analysis.
# --------------------------------------------------------------------------------------------


def traced_memory(model, tx, batch) -> dict[str, Any]:
    step = TracedStep(make_train_step(model.apply, tx), donate_argnums=0)
    state = create_train_state(model, tx, jax.random.key(0))
    stages = step.stages(state, batch)
    mem = stages.memory_analysis()
    peak = (mem.get("argument_size_in_bytes", 0) + mem.get("output_size_in_bytes", 0)
            + mem.get("temp_size_in_bytes", 0) - mem.get("alias_size_in_bytes", 0))
    return {**mem, "peak_bytes": peak, "compile_s": stages.record.total_s}


# --------------------------------------------------------------------------------------------
# Eager: op-by-op replay with liveness, sampling jax.live_arrays().
# --------------------------------------------------------------------------------------------


def eager_memory(model, tx, state, batch, keep_trace: bool = False) -> dict[str, Any]:
    fn = make_train_step(model.apply, tx)
    closed = jax.make_jaxpr(fn)(state, batch)
    jaxpr = closed.jaxpr
    inputs = jax.tree.leaves((state, batch))
    n = len(jaxpr.eqns)
    # Last equation that reads each variable; the jaxpr's outputs live to the end.
    last_use: dict[Any, int] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                last_use[v] = i
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            last_use[v] = n
    held = set(jaxpr.invars) | set(jaxpr.constvars)  # the caller's inputs and the constants stay alive

    gc.collect()
    input_bytes = tree_bytes(inputs) + tree_bytes(closed.consts)
    background = live_bytes() - input_bytes
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars, inputs))

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    peak, peak_op, trace, all_intermediate = 0, None, [], 0
    for i, eqn in enumerate(jaxpr.eqns):
        args = [read(v) for v in eqn.invars]
        out = run_equation(eqn, args)
        jax.block_until_ready(out)
        outs = out if eqn.primitive.multiple_results else [out]
        for var, val in zip(eqn.outvars, outs):
            all_intermediate += nbytes(val)
            if not isinstance(var, jex_core.DropVar) and var in last_use:
                env[var] = val
        del args, out, outs
        now = live_bytes() - background  # this op's inputs and outputs are both alive here
        if now > peak:
            peak, peak_op = now, f"#{i} {eqn.primitive.name}"
        if keep_trace:
            trace.append({"op": eqn.primitive.name, "live_bytes": now})
        for var in list(eqn.invars) + list(eqn.outvars):  # free what is dead after this op
            if not isinstance(var, (jex_core.Literal, jex_core.DropVar)) and var not in held \
                    and last_use.get(var, -1) <= i:
                env.pop(var, None)
    outputs = [read(v) for v in jaxpr.outvars]
    output_bytes = tree_bytes(outputs)
    end = live_bytes() - background
    env.clear()  # drop every value the replay held (the closure `read` keeps the dict itself)
    del outputs
    gc.collect()
    row = {"ops": n, "input_bytes": input_bytes, "output_bytes": output_bytes, "peak_bytes": peak,
           "peak_op": peak_op, "end_bytes": end, "intermediate_bytes_no_free": all_intermediate,
           "no_free_peak_bytes": input_bytes + all_intermediate}
    if keep_trace:
        row["trace"] = trace
    return row


def eager_real_step(model, tx, state, batch) -> dict[str, int]:
    """Live bytes around one real EagerStep call: a check on the replay's input and end figures."""
    step = EagerStep(make_train_step(model.apply, tx))
    gc.collect()
    before = live_bytes()
    new_state, metrics = step(state, batch)
    jax.block_until_ready((new_state, metrics))
    gc.collect()
    after = live_bytes()
    del new_state, metrics
    gc.collect()
    return {"real_step_added_bytes": after - before}


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / MiB:.2f}"


def markdown_tables(rows: list[dict]) -> list[str]:
    lines = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model_name]
        lines += [f"### {model_name} ({rs[0]['params']:,} parameters, state {mib(rs[0]['eager']['input_bytes'] - rs[0]['batch_bytes'])} MiB)", "",
                  "| batch | traced args | traced out | traced alias | traced temp | traced code | **traced peak** "
                  "| eager inputs | eager outputs | **eager peak** | peak at op | eager, nothing freed | eager / traced |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
        for r in rs:
            t, e = r["traced"], r["eager"]
            lines.append(
                f"| {r['batch_size']} | {mib(t['argument_size_in_bytes'])} | {mib(t['output_size_in_bytes'])} | "
                f"{mib(t['alias_size_in_bytes'])} | {mib(t['temp_size_in_bytes'])} | "
                f"{mib(t['generated_code_size_in_bytes'])} | **{mib(t['peak_bytes'])}** | {mib(e['input_bytes'])} | "
                f"{mib(e['output_bytes'])} | **{mib(e['peak_bytes'])}** | {e['peak_op']} | "
                f"{mib(e['no_free_peak_bytes'])} | {e['peak_bytes'] / t['peak_bytes']:.2f}x |")
        lines.append("")
    return lines


def per_sample(rows: list[dict], model_name: str, key) -> float | None:
    """Marginal bytes per sample between the two largest batches."""
    rs = sorted((r for r in rows if r["model"] == model_name), key=lambda r: r["batch_size"])
    if len(rs) < 2:
        return None
    a, b = rs[-2], rs[-1]
    return (key(b) - key(a)) / (b["batch_size"] - a["batch_size"])


def reading(rows: list[dict]) -> list[str]:
    paras = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        rs = sorted((r for r in rows if r["model"] == model_name), key=lambda r: r["batch_size"])
        small, big = rs[0], rs[-1]
        ps_t = per_sample(rows, model_name, lambda r: r["traced"]["peak_bytes"])
        ps_e = per_sample(rows, model_name, lambda r: r["eager"]["peak_bytes"])
        text = (f"**{model_name}.** At batch {small['batch_size']} eager needs "
                f"{small['eager']['peak_bytes'] / small['traced']['peak_bytes']:.2f}x the traced peak "
                f"({mib(small['eager']['peak_bytes'])} against {mib(small['traced']['peak_bytes'])} MiB): "
                f"the state dominates, and eager mode holds the old and the new state at once (no donation), "
                f"where the traced step writes the new state over the donated old one "
                f"(alias {mib(small['traced']['alias_size_in_bytes'])} MiB). At batch {big['batch_size']}: "
                f"{mib(big['eager']['peak_bytes'])} MiB eager against {mib(big['traced']['peak_bytes'])} MiB traced "
                f"({big['eager']['peak_bytes'] / big['traced']['peak_bytes']:.2f}x).")
        if ps_t is not None and ps_e is not None:
            text += (f" Marginal cost per extra sample between the two largest batches: "
                     f"{ps_e / 1024:.1f} KiB eager, {ps_t / 1024:.1f} KiB traced (activations and residuals kept for the "
                     f"backward pass; traced counts XLA's whole scratch buffer, eager only live arrays, so scratch "
                     f"inside one eager op, e.g. a convolution's, is missing from the eager figure).")
        text += (f" Keeping every eager intermediate (no freeing) would cost {mib(big['eager']['no_free_peak_bytes'])} "
                 f"MiB at batch {big['batch_size']}: reference counting, not the graph, is what keeps eager memory down.")
        paras.append(text)
    return paras


def write_summary(out: pathlib.Path, rows, env, command: str, wall_s: float) -> None:
    text = [
        "# memory: peak bytes of one training step, eager against traced",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s.  ",
        f"Machine: {_common.describe_machine(env)}.",
        "",
        "Models: MLP 784-512-512-10 and CNN conv32-pool-conv64-pool-dense128, Adam lr 1e-3, 28x28x1 float32 "
        "inputs. All figures in MiB.",
        "",
        "## Method",
        "",
        "**traced** (`TracedStep(..., donate_argnums=0)`): XLA's buffer assignment for the compiled step, from "
        "`TracedStep.stages(state, batch).memory_analysis()`: arguments (state + batch), outputs (new state + "
        "metrics), alias (output bytes written into donated argument buffers), temp (XLA's scratch for every "
        "intermediate, after buffer reuse) and generated code. **traced peak = args + out + temp - alias**: "
        "inputs, the outputs that need fresh buffers and the scratch, all live at once at worst. Code bytes are "
        "not included in the peak.",
        "",
        "**eager** (`EagerStep(make_train_step(...))`): live-buffer accounting. The step is recorded with "
        "`jax.make_jaxpr` (the very primitives eager mode binds one by one: forward under autodiff, the "
        "transposed backward pass, the Adam update, the metrics) and replayed equation by equation on concrete "
        "arrays, blocking after each. Each value is dropped right after its last use (as Python's reference "
        "counting drops an eager intermediate); the step's inputs stay alive, as the caller holds the old state "
        "until the step returns. After each op, with its inputs and outputs both alive, the script sums "
        "`x.nbytes` over `jax.live_arrays()` and subtracts what was live before the step that is not the step's "
        "input. **eager peak** = the maximum of that sum over the step (inputs included, so it compares with "
        "the traced peak); *peak at op* names the equation where it happened. *eager, nothing freed* = inputs + "
        "every intermediate the step creates: what a tape that never frees would need. Not seen: scratch inside "
        "one primitive's own executable or inside a `jnp` helper JAX jits internally (`log_softmax`), and "
        "allocator caching in either mode.",
        "",
        "Check: around one real `EagerStep` call the live bytes grow by exactly the step's outputs (new state + "
        "metrics); results.json records `real_step_added_bytes` next to the replay's `output_bytes`.",
        "",
        *markdown_tables(rows),
        "## Reading",
        "",
        *(p + "\n" for p in reading(rows)),
    ]
    _common.write_summary(out, text)


def write_plot(out: pathlib.Path, rows: list[dict]) -> list[str]:
    plt = _common.pyplot()
    if plt is None:
        return []
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        rs = sorted((r for r in rows if r["model"] == model_name), key=lambda r: r["batch_size"])
        b = [r["batch_size"] for r in rs]
        ax.plot(b, [r["eager"]["peak_bytes"] / MiB for r in rs], marker="o", label="eager peak (live arrays)")
        ax.plot(b, [r["traced"]["peak_bytes"] / MiB for r in rs], marker="s", label="traced peak (XLA: args+out+temp-alias)")
        ax.plot(b, [r["traced"]["temp_size_in_bytes"] / MiB for r in rs], linestyle="--", label="traced temp")
        ax.plot(b, [r["eager"]["no_free_peak_bytes"] / MiB for r in rs], linestyle=":", label="eager, nothing freed")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("MiB")
        ax.set_title(f"{model_name}: memory of one Adam training step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=120)
    plt.close(fig)
    return ["memory.png"]


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Peak memory of one Adam training step of the MLP and the CNN over batch sizes 1..1024: "
                 "traced from XLA's memory analysis, eager from live-array accounting during an op-by-op "
                 "replay of the step.")
    parser.add_argument("--quick", action="store_true", help="smoke test: MLP only, batch 1 and 64")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and memory.png", DEFAULT_OUT))
    parser.add_argument("--models", type=_common.models, default=None,
                        help=f"comma-separated models, of {', '.join(_common.MODELS)} (default mlp,cnn; --quick: mlp)")
    parser.add_argument("--batch-sizes", type=_common.batch_sizes, default=None,
                        help="comma-separated batch sizes (default 1,2,4,...,1024; --quick: 1,64)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.models = args.models or (["mlp"] if args.quick else list(_common.MODELS))
    args.batch_sizes = args.batch_sizes or ([1, 64] if args.quick else [2**i for i in range(11)])
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Eigen convolutions, named rather than left to the CLI's default: the traced figures are XLA's
    # buffer plan, which differs with the library that runs each convolution, and a default may change.
    settings = _common.setup(cpu_convolutions="eigen")  # before any JAX computation
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    tx = make_optimizer("adam", LR)
    rows = []
    for model_name in args.models:
        model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
        for batch_size in args.batch_sizes:
            batch = make_batch(batch_size)
            state = create_train_state(model, tx, jax.random.key(0))
            traced = traced_memory(model, tx, batch)
            eager = eager_memory(model, tx, state, batch, keep_trace=batch_size == max(args.batch_sizes))
            eager.update(eager_real_step(model, tx, state, batch))
            rows.append({"model": model_name, "batch_size": batch_size, "params": count_params(state.params),
                         "batch_bytes": tree_bytes(batch), "traced": traced, "eager": eager})
            print(f"{model_name:>4} b{batch_size:<5} traced peak {mib(traced['peak_bytes']):>8} MiB "
                  f"(temp {mib(traced['temp_size_in_bytes'])}), eager peak {mib(eager['peak_bytes']):>8} MiB "
                  f"(at {eager['peak_op']}; real step added {mib(eager['real_step_added_bytes'])}, replay outputs "
                  f"{mib(eager['output_bytes'])})", file=sys.stderr, flush=True)
            del state, batch
            gc.collect()
    wall_s = time.perf_counter() - t_start

    payload = {"command": command, "wall_s": wall_s, "environment": env,
               "settings": _common.settings_record(args), "rows": rows}
    _common.write_results(args.out, payload)
    write_summary(args.out, rows, env, command, wall_s)
    plots = write_plot(args.out, rows)
    print("\n".join(markdown_tables(rows)))
    print(f"wall time {wall_s:.0f} s; wrote {args.out}/results.json, SUMMARY.md" + "".join(f", {p}" for p in plots),
          file=sys.stderr)


if __name__ == "__main__":
    main()
