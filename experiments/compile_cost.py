"""Compile cost of traced mode: what tracing, lowering and compiling the train step costs, when it pays off.

What it measures, for the Adam train step (``make_train_step(model.apply, make_optimizer("adam", 1e-3))``)
wrapped in a fresh ``TracedStep(..., donate_argnums=0)`` per configuration, on the local backend:

1. stages:     trace, lower and compile seconds (``TracedStep.compiles[0]``, i.e. ``stages(...).record``)
               against MLP depth (1..8 hidden layers of width 256, 28x28x1 inputs), MLP width (64..2048,
               2 hidden layers) and CNN depth (1..3 conv layers of 32 channels, 32x32x3 inputs).
2. break-even: per configuration, the step count n at which traced mode's total time (first step =
               trace + lower + compile + run, then steady steps) is no more than eager mode's
               (``graphduo.EagerStep``, first step apart), from ``graphduo.timing.break_even_steps``.
3. shapes:     recompilation when batch sizes vary: 50 batches with sizes drawn uniformly from 1..128 fed
               to one TracedStep (MLP 2x256; --quick: 5 batches, MLP 1x32), counting compiles (``len(step.compiles)``) and compile
               seconds, against three fixes:
               - bucket-down: round each batch size DOWN to a power of two and drop the remainder
                 (gradients stay exact means over real examples, but examples are thrown away);
               - pad-pow2: pad UP to the next power of two with zero images, label 0;
               - pad-fixed: pad every batch to 128 with zero images, label 0.
               The train step has no mask, so padded rows enter the mean loss: the gradient is that of
               a different objective (real examples weighted by B_real/B_padded plus a pull of the padded
               rows towards class 0). A correct padded step needs a per-example mask in the loss (as
               ``make_eval_step`` has); we report the padding fraction instead of hiding it.
4. cache:      JAX's persistent compilation cache: a child Python process (fresh interpreter) compiles
               the CNN conv32-conv32 train step (--quick: MLP 784-32-10), twice in a row, both times with ``JAX_COMPILATION_CACHE_DIR=<tmp>``
               and ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`` set in the CHILD's environment only
               (never in library code), reporting each stage cold (empty cache) and warm.

How: all timing goes through ``graphduo.timing`` (``time_steps``: first call apart, every call blocked
on, median with p10/p90). Every process (this one and the cache children) runs with graphduo's CLI
defaults (``_common.setup``), recorded in results.json. Eager and traced steps of a configuration run on identical states and one
device-resident batch. The eager first step in a process also compiles each primitive JAX dispatches
(op-by-op executables are cached by shape), so it is largest for the first configuration of a shape
family; that is what a user pays, and it is recorded as is.

Run:
    python experiments/compile_cost.py            # full run
    python experiments/compile_cost.py --quick    # smoke test: 2 configurations per sweep, small models
    python experiments/compile_cost.py --out DIR  # results elsewhere

Writes ``DIR/results.json`` (every figure plus the environment, ``_common.environment``), ``DIR/SUMMARY.md``
(the tables, the command, the machine, a reading) and, when matplotlib is installed,
``DIR/compile_stages.png`` and ``DIR/recompiles.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import _common  # experiments/_common.py
from _common import LR, NUM_CLASSES
from graphduo import timing
from graphduo.eager import EagerStep
from graphduo.models import build_model, count_params
from graphduo.step import create_train_state, make_optimizer, make_train_step
from graphduo.traced import TracedStep

MLP_INPUT = _common.INPUT_SHAPE
CNN_INPUT = (32, 32, 3)
DEFAULT_OUT = _common.default_out("compile_cost")


# --------------------------------------------------------------------------------------------
# Configurations and batches.
# --------------------------------------------------------------------------------------------


def config_list(quick: bool, cnn_input=CNN_INPUT) -> list[dict[str, Any]]:
    """The sweep: (family, x value, model name, input shape, module options)."""
    depths = (1, 4) if quick else (1, 2, 3, 4, 6, 8)
    widths = (64, 256) if quick else (64, 128, 256, 512, 1024, 2048)
    convs = (1, 2) if quick else (1, 2, 3)
    configs = [{"family": "mlp-depth", "x": d, "model": "mlp", "input_shape": MLP_INPUT,
                "options": {"features": (256,) * d}} for d in depths]
    configs += [{"family": "mlp-width", "x": w, "model": "mlp", "input_shape": MLP_INPUT,
                 "options": {"features": (w, w)}} for w in widths]
    configs += [{"family": "cnn-depth", "x": k, "model": "cnn", "input_shape": cnn_input,
                 "options": {"channels": (32,) * k}} for k in convs]
    return configs


def setup(model_name: str, input_shape, options: dict):
    model = build_model(model_name, input_shape, NUM_CLASSES, **options)
    tx = make_optimizer("adam", LR)
    step_fn = make_train_step(model.apply, tx)
    return model, tx, step_fn


def fresh_state(model, tx, template=None):
    """The initial state (key 0) in fresh buffers (the traced step donates them).

    With ``template`` (a state made earlier) it copies the buffers instead of running Flax's
    initialisation again, which takes seconds op by op.
    """
    if template is not None:
        return jax.tree.map(jnp.copy, template)
    return create_train_state(model, tx, jax.random.key(0))


# --------------------------------------------------------------------------------------------
# 1 + 2. Stage times and break-even.
# --------------------------------------------------------------------------------------------


def measure_config(cfg: dict, args) -> dict[str, Any]:
    model, tx, step_fn = setup(cfg["model"], cfg["input_shape"], cfg["options"])
    batch = _common.make_batch(args.batch_size, input_shape=cfg["input_shape"])
    state0 = fresh_state(model, tx)
    jax.block_until_ready(state0)

    # Traced: a fresh TracedStep, so its first call traces, lowers and compiles (recorded per stage).
    traced = TracedStep(step_fn, donate_argnums=0)
    _, _, t_times = timing.time_steps(traced, fresh_state(model, tx, state0), [batch] * args.traced_steps,
                                      warmup=2)
    record = traced.compiles[0]
    # Eager: op by op on the same initial state and batch.
    _, _, e_times = timing.time_steps(EagerStep(step_fn), fresh_state(model, tx, state0),
                                      [batch] * args.eager_steps, warmup=1)
    n_even = timing.break_even_steps(e_times.first_s, e_times.median_ms / 1e3,
                                     t_times.first_s, t_times.median_ms / 1e3)
    row = {
        "family": cfg["family"], "x": cfg["x"], "model": cfg["model"],
        "options": {k: list(v) for k, v in cfg["options"].items()},
        "params": count_params(state0.params),
        "trace_s": record.trace_s, "lower_s": record.lower_s, "compile_s": record.compile_s,
        "compile_total_s": record.total_s,
        "traced_first_step_s": t_times.first_s, "traced": t_times.summary(args.batch_size),
        "eager_first_step_s": e_times.first_s, "eager": e_times.summary(args.batch_size),
        "break_even_steps": n_even,
        # The eager first step also compiles every primitive at shapes this process has not yet met, so
        # it depends on what ran before. With those executables cached, the eager first step is a step:
        "break_even_steps_warm_eager": timing.break_even_steps(e_times.median_ms / 1e3, e_times.median_ms / 1e3,
                                                               t_times.first_s, t_times.median_ms / 1e3),
    }
    print(f"{cfg['family']:10s} x={cfg['x']:<5} trace {record.trace_s:.3f}s lower {record.lower_s:.3f}s "
          f"compile {record.compile_s:.3f}s | traced first {t_times.first_s:.2f}s step {t_times.median_ms:.2f}ms "
          f"| eager first {e_times.first_s:.2f}s step {e_times.median_ms:.2f}ms | break-even {n_even}",
          file=sys.stderr)
    return row


def warm_up(args) -> None:
    """Pay the process's one-off costs (XLA client start-up, first MLP primitives) outside the sweep.

    Without this the first configuration's compile (and eager first step) carries them and looks
    dearer than the next one. New primitives/shapes the sweep meets later (the first conv) are still paid
    by the configuration that meets them, as a user would.
    """
    model, tx, step_fn = setup("mlp", MLP_INPUT, {"features": (32,)})
    batch = _common.make_batch(args.batch_size, input_shape=MLP_INPUT)
    timing.time_steps(TracedStep(step_fn, donate_argnums=0), fresh_state(model, tx), [batch] * 2)
    timing.time_steps(EagerStep(step_fn), fresh_state(model, tx), [batch] * 2)


# --------------------------------------------------------------------------------------------
# 3. Varying batch shapes.
# --------------------------------------------------------------------------------------------


def pow2_floor(n: int) -> int:
    return 1 << (int(n).bit_length() - 1)


def pow2_ceil(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def shape_policies(max_batch: int):
    """policy name -> (kept real examples, padded size) for a drawn batch size b."""
    return {
        "as-is": lambda b: (b, b),
        "bucket-down-pow2": lambda b: (pow2_floor(b), pow2_floor(b)),
        "pad-pow2": lambda b: (b, pow2_ceil(b)),
        "pad-fixed": lambda b: (b, max_batch),
    }


def apply_policy(images: np.ndarray, labels: np.ndarray, kept: int, size: int) -> dict[str, jax.Array]:
    """Keep the first ``kept`` examples and pad with zero images (label 0) up to ``size`` rows."""
    pad = size - kept
    img = np.concatenate([images[:kept], np.zeros((pad, *images.shape[1:]), images.dtype)])
    lab = np.concatenate([labels[:kept], np.zeros((pad,), labels.dtype)])
    return {"image": jnp.asarray(img), "label": jnp.asarray(lab)}


def measure_shapes(args) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, args.max_batch + 1, size=args.shape_batches).tolist()
    images = rng.normal(size=(args.max_batch, *MLP_INPUT)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=args.max_batch).astype(np.int32)
    rows = []
    template = None
    for name, policy in shape_policies(args.max_batch).items():
        # A fresh step function per policy: jax.jit caches traces, lowerings and executables in-process by
        # function identity, so reusing one would let a policy reuse another's compiles for free.
        model, tx, step_fn = setup("mlp", MLP_INPUT, {"features": args.shape_features})
        plan = [policy(b) for b in sizes]
        batches = [apply_policy(images, labels, kept, size) for kept, size in plan]
        step = TracedStep(step_fn, donate_argnums=0, on_recompile=lambda record: None)  # counted, not logged
        template = template if template is not None else fresh_state(model, tx)
        state = fresh_state(model, tx, template)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        # time_steps blocks on every step; its total wall time is what a training loop would see.
        _, _, times = timing.time_steps(step, state, batches)
        wall = time.perf_counter() - t0
        real = sum(sizes)
        kept = sum(k for k, _ in plan)
        rows_run = sum(s for _, s in plan)
        rows.append({
            "policy": name, "compiles": len(step.compiles), "compile_s": step.compile_time_s,
            "wall_s": wall, "distinct_sizes": len({s for _, s in plan}),
            "examples_drawn": real, "examples_used": kept, "dropped_frac": 1 - kept / real,
            "rows_computed": rows_run, "padding_frac": 1 - kept / rows_run,
            "run_s": wall - step.compile_time_s,
        })
        print(f"shapes {name:17s} compiles {len(step.compiles):3d} compile {step.compile_time_s:6.2f}s "
              f"wall {wall:6.2f}s dropped {rows[-1]['dropped_frac']:.0%} padding {rows[-1]['padding_frac']:.0%}",
              file=sys.stderr)
    model_desc = "mlp 784-" + "-".join(map(str, args.shape_features)) + "-10"
    return {"batch_sizes": sizes, "model": model_desc, "policies": rows}


# --------------------------------------------------------------------------------------------
# 4. Persistent compilation cache (child processes).
# --------------------------------------------------------------------------------------------


CACHE_MODELS = {"cnn": ("cnn", CNN_INPUT, {"channels": (32, 32)}, "cnn conv32-conv32, batch 32, 32x32x3"),
                "mlp": ("mlp", MLP_INPUT, {"features": (32,)}, "mlp 784-32-10, batch 32")}


def cache_child(which: str) -> None:
    """Run in a fresh interpreter: compile one train step once and print the stage times as JSON."""
    t0 = time.perf_counter()
    name, shape, options, _ = CACHE_MODELS[which]
    model, tx, step_fn = setup(name, shape, options)
    step = TracedStep(step_fn, donate_argnums=0)
    record = step.stages(fresh_state(model, tx), _common.make_batch(32, input_shape=shape)).record
    print(json.dumps({"trace_s": record.trace_s, "lower_s": record.lower_s, "compile_s": record.compile_s,
                      "total_s": record.total_s, "child_wall_s": time.perf_counter() - t0}))


def measure_cache(which: str) -> dict[str, Any]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="graphduo-jax-cache-") as cache_dir:
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": cache_dir,
               "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        for label in ("cold", "warm"):
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--cache-child", which],
                                  capture_output=True, text=True, env=env, timeout=300)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"cache child failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            files = [p for p in pathlib.Path(cache_dir).rglob("*") if p.is_file()]
            result.update(run=label, process_wall_s=wall, cache_files_after=len(files),
                          cache_bytes_after=sum(p.stat().st_size for p in files))
            runs.append(result)
            print(f"cache {label}: trace {result['trace_s']:.3f}s lower {result['lower_s']:.3f}s "
                  f"compile {result['compile_s']:.3f}s; process {wall:.2f}s; {len(files)} cache files",
                  file=sys.stderr)
    return {"model": CACHE_MODELS[which][3], "runs": runs,
            "compile_speedup": runs[0]["compile_s"] / max(runs[1]["compile_s"], 1e-9)}


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def stage_table(rows) -> str:
    lines = ["| sweep | x | params | trace s | lower s | compile s | traced 1st step s | traced step ms "
             "| eager 1st step s | eager step ms | break-even steps | break-even, warm eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['x']} | {r['params']:,} | {r['trace_s']:.3f} | {r['lower_s']:.3f} "
                     f"| {r['compile_s']:.3f} | {r['traced_first_step_s']:.3f} | {r['traced']['step_time_ms']:.2f} "
                     f"| {r['eager_first_step_s']:.3f} | {r['eager']['step_time_ms']:.2f} "
                     f"| {r['break_even_steps'] if r['break_even_steps'] is not None else 'never'} "
                     f"| {r['break_even_steps_warm_eager'] if r['break_even_steps_warm_eager'] is not None else 'never'} |")
    return "\n".join(lines)


def shapes_table(shapes) -> str:
    lines = ["| policy | compiles | compile s | total wall s | distinct shapes | examples dropped "
             "| padded rows | wall s minus compile s |", "|---|---|---|---|---|---|---|---|"]
    for r in shapes["policies"]:
        lines.append(f"| {r['policy']} | {r['compiles']} | {r['compile_s']:.2f} | {r['wall_s']:.2f} "
                     f"| {r['distinct_sizes']} | {r['dropped_frac']:.0%} | {r['padding_frac']:.0%} "
                     f"| {r['run_s']:.2f} |")
    return "\n".join(lines)


def cache_table(cache) -> str:
    lines = ["| run | trace s | lower s | compile s | child process wall s | cache files after |",
             "|---|---|---|---|---|---|"]
    for r in cache["runs"]:
        lines.append(f"| {r['run']} | {r['trace_s']:.3f} | {r['lower_s']:.3f} | {r['compile_s']:.3f} "
                     f"| {r['process_wall_s']:.2f} | {r['cache_files_after']} |")
    return "\n".join(lines)


def write_summary(out: pathlib.Path, payload: dict) -> None:
    env, args = payload["environment"], payload["settings"]
    rows, shapes, cache = payload["configs"], payload["shapes"], payload["cache"]
    trace_share = np.median([r["trace_s"] / r["compile_total_s"] for r in rows])
    compile_share = np.median([r["compile_s"] / r["compile_total_s"] for r in rows])
    be = [r["break_even_steps"] for r in rows if r["break_even_steps"] is not None]
    never = [f"{r['family']} x={r['x']}" for r in rows if r["break_even_steps"] is None]
    be_warm = [r["break_even_steps_warm_eager"] for r in rows if r.get("break_even_steps_warm_eager") is not None]
    by = {r["policy"]: r for r in shapes["policies"]}
    text = f"""# compile_cost: what tracing and compiling the train step costs

Command: `{payload['command']}`  
Wall time: {payload['wall_s']:.0f} s.  
Machine: {_common.describe_machine(env)}. Shared and noisy: single figures can move by tens of percent.

Adam (lr 1e-3) train step, batch {args['batch_size']}, each configuration in a fresh `TracedStep`
(donated state). MLP inputs 28x28x1, CNN inputs {'x'.join(map(str, args['cnn_input']))} (conv 3x3, 32 channels per layer, then dense 128).
Traced step ms / eager step ms: median of {args['traced_steps'] - 3} / {args['eager_steps'] - 2} steady steps
(`graphduo.timing.time_steps`). "traced 1st step" = trace + lower + compile + the first run.
Break-even: smallest n with traced total <= eager total, totals = first + (n - 1) x step. The eager first step
also compiles each primitive at shapes this process has not met yet (op-by-op executables are cached by
shape), so it is large for the first configuration of a family (break-even 1: traced wins from the first
step) and small for later ones that reuse those shapes; "warm eager" takes the eager first step equal to an
eager steady step (primitives already cached), the least favourable case for traced mode.

## 1-2. Stage times and break-even

{stage_table(rows)}

Median share of the first-call cost: trace {trace_share:.0%}, XLA compile {compile_share:.0%}, lowering the rest.
Break-even ranges from {min(be) if be else '-'} to {max(be) if be else '-'} steps{'; never for ' + ', '.join(never) if never else ''};
with warm eager caches, from {min(be_warm) if be_warm else '-'} to {max(be_warm) if be_warm else '-'} steps.

## 3. Varying batch sizes ({len(shapes['batch_sizes'])} batches, sizes uniform in 1..{args['max_batch']}, {shapes['model']})

{shapes_table(shapes)}

- as-is: one compile per distinct batch size ({by['as-is']['compiles']} here), every one announced by
  `TracedStep` (silenced here via `on_recompile`) and paid in full.
- bucket-down-pow2: at most log2({args['max_batch']})+1 shapes and exact gradients over the examples kept,
  but it throws away {by['bucket-down-pow2']['dropped_frac']:.0%} of the examples (up to half of each batch).
- pad-pow2 / pad-fixed: keeps every example and compiles {by['pad-pow2']['compiles']} / {by['pad-fixed']['compiles']}
  time(s), but {by['pad-pow2']['padding_frac']:.0%} / {by['pad-fixed']['padding_frac']:.0%} of the computed rows are padding, and
  because the train step has no mask the padded rows (zero images, label 0) enter the mean loss: the gradient
  is NOT that of the real batch. Padding is only correct with a per-example mask in the loss
  (as `make_eval_step` has); the compile counts above are what such a masked step would also get.

## 4. Persistent compilation cache (two fresh child interpreters, same cache directory; {cache.get('model', '-')})

{cache_table(cache)}

XLA compile cold / warm: {cache['compile_speedup']:.1f}x. The cache removes the XLA compile stage only:
tracing and lowering run again in every new process (the cache key is computed from the lowered
program). Enabled only in the child's environment (`JAX_COMPILATION_CACHE_DIR`,
`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`), never by graphduo itself.
"""
    _common.write_summary(out, text)


def write_plots(out: pathlib.Path, payload: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    rows = payload["configs"]
    families = [f for f in ("mlp-depth", "mlp-width", "cnn-depth") if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False)
    labels = {"mlp-depth": "hidden layers (width 256)", "mlp-width": "width (2 hidden layers)",
              "cnn-depth": "conv layers (32 ch)"}
    for ax, fam in zip(axes[0], families):
        rs = [r for r in rows if r["family"] == fam]
        xs = [str(r["x"]) for r in rs]
        bottom = np.zeros(len(rs))
        for stage in ("trace_s", "lower_s", "compile_s"):
            vals = np.array([r[stage] for r in rs])
            ax.bar(xs, vals, bottom=bottom, label=stage[:-2])
            bottom += vals
        ax.set_xlabel(labels[fam])
        ax.set_ylabel("seconds")
        ax.set_title(fam)
        ax.grid(alpha=0.3, axis="y")
    axes[0][0].legend()
    fig.suptitle("Adam train step: trace / lower / compile time")
    fig.tight_layout()
    fig.savefig(out / "compile_stages.png", dpi=110)
    plt.close(fig)

    pol = payload["shapes"]["policies"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    names = [p["policy"] for p in pol]
    ax.bar(names, [p["compile_s"] for p in pol], label="compile s")
    ax.bar(names, [p["wall_s"] - p["compile_s"] for p in pol], bottom=[p["compile_s"] for p in pol],
           label="running s")
    for i, p in enumerate(pol):
        ax.text(i, p["wall_s"], f"{p['compiles']} compiles", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("seconds for all batches")
    ax.set_title(f"{len(payload['shapes']['batch_sizes'])} batches of random size 1..{payload['settings']['max_batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "recompiles.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Measure trace/lower/compile time of graphduo's traced Adam train step against model "
                 "size, the break-even step count against eager mode, recompilation under varying batch "
                 "sizes (and bucketing/padding fixes), and JAX's persistent compilation cache.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 configurations per sweep, 16x16x3 CNN "
                             "inputs, 5 shape batches (MLP 784-32-10), MLP 784-32-10 in the cache test")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and the PNG plots", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_common.positive_int, default=32,
                        help="batch size of the stage/break-even sweeps (default 32)")
    parser.add_argument("--shape-batches", type=_common.positive_int, default=None,
                        help="batches of random size in the recompilation test (default 50; --quick: 5)")
    parser.add_argument("--max-batch", type=_common.positive_int, default=128,
                        help="largest random batch size, a power of two (default 128)")
    parser.add_argument("--no-cache", action="store_true", help="skip the persistent-cache child processes")
    parser.add_argument("--cache-model", choices=tuple(CACHE_MODELS), default=None,
                        help="model compiled by the cache child processes (default cnn; --quick: mlp)")
    parser.add_argument("--cache-child", choices=tuple(CACHE_MODELS), default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batch & (args.max_batch - 1):
        parser.error(f"argument --max-batch: expected a power of two, got {args.max_batch}")
    args.shape_batches = args.shape_batches or (5 if args.quick else 50)
    args.shape_features = (32,) if args.quick else (256, 256)
    args.cnn_input = (16, 16, 3) if args.quick else CNN_INPUT
    args.cache_model = args.cache_model or ("mlp" if args.quick else "cnn")
    args.traced_steps = 4 if args.quick else 30
    args.eager_steps = 3 if args.quick else 10
    if not args.cache_child:  # a cache child only prints its stage times
        args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    if args.cache_child:
        cache_child(args.cache_child)
        return
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    print(f"compile_cost on {env['cpu']} ({env['cpu_count']} cores), jax {env['jax']} {env['backend']}",
          file=sys.stderr)
    warm_up(args)
    configs = [measure_config(cfg, args) for cfg in config_list(args.quick, args.cnn_input)]
    shapes = measure_shapes(args)
    cache = {"runs": [], "skipped": True} if args.no_cache else measure_cache(args.cache_model)
    wall_s = time.perf_counter() - t_start

    payload = {"command": command, "wall_s": wall_s, "environment": env, "settings": _common.settings_record(args),
               "configs": configs, "shapes": shapes, "cache": cache}
    _common.write_results(args.out, payload)
    if args.no_cache:
        cache.update(runs=[], compile_speedup=float("nan"))
    write_summary(args.out, payload)
    write_plots(args.out, payload)
    print(stage_table(configs))
    print()
    print(shapes_table(shapes))
    if cache["runs"]:
        print()
        print(cache_table(cache))
    print(f"\nwall time {wall_s:.0f} s; wrote {args.out}/results.json, SUMMARY.md and plots", file=sys.stderr)


if __name__ == "__main__":
    main()
