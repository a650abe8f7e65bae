"""Core overhead benchmark: graphduo's steps against the same step written in bare JAX.

What it measures, for the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128)
at batch 32 and 256, optax Adam (lr 1e-3), on the local backend:

1. jit:   graphduo's traced step (``TracedStep(make_train_step(model.apply, tx), donate_argnums=0)``)
          against a bare ``jax.jit`` of a hand-written step (the model's own ``apply``, so both run
          the same arithmetic; ``jax.value_and_grad`` of softmax cross-entropy, ``optax.adam``,
          ``optax.apply_updates``; no TrainState, no metrics, no other graphduo code).
          Goal: graphduo / bare <= 1.05.
2. eager: graphduo's eager step (``EagerStep(make_train_step(...))``) against the same hand-written
          step run op by op (no jit). Goal: graphduo / bare <= 1.10. For information, an eager step
          that calls Flax's ``model.module.apply`` instead of the lean ``model.apply``.
3. train: ``train_and_evaluate`` end to end in traced mode on synthetic data, its steady-state
          samples/s (``summary["samples_per_s"]``) against the bare jit step's B / median step time.
          Goal: graphduo / bare >= 0.90.

For information, the jit section also runs graphduo's own step function under a plain
``jax.jit`` (no ``TracedStep``), which splits graphduo's jit overhead into "what the step computes"
(TrainState, step counter, accuracy metric) and "how TracedStep calls it".

How: every variant starts from the same parameters (``model.init(jax.random.key(0))``) and times
the same device-resident batch through ``graphduo.timing.time_steps`` (first call apart, warm-up,
``block_until_ready`` on every step, median and p10/p90). The machine is noisy, so the variants are
interleaved: several rounds, each running bare and graphduo back to back (order alternating between
rounds). A variant's figure is the median over rounds of its per-round median; a ratio is the median
of the per-round ratios. Step counts are chosen from a short probe so each measurement lasts about
``--budget`` seconds.

Run:
    python experiments/bench_core.py            # full run
    python experiments/bench_core.py --quick    # smoke test: batch 32 only, 2 short rounds
    python experiments/bench_core.py --out DIR  # results elsewhere

The process runs with graphduo's CLI defaults (``_common.setup``), recorded in results.json.

Writes ``DIR/results.json`` (every per-round time, ratio and goal, plus the environment),
``DIR/SUMMARY.md`` (the table, the command, the machine and a reading of each goal) and, when
matplotlib is installed, ``DIR/ratios.png`` (graphduo / bare per section, model and batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common  # experiments/_common.py
from _common import INPUT_SHAPE, LR, NUM_CLASSES
from graphduo import timing
from graphduo.config import Config
from graphduo.eager import EagerStep
from graphduo.models import build_model
from graphduo.step import TrainState, make_optimizer, make_train_step
from graphduo.traced import TracedStep
from graphduo.train import train_and_evaluate

DEFAULT_OUT = _common.default_out("bench_core")

# Goals, as ratio graphduo / bare: ("<=", x) for times, (">=", x) for throughput.
GOALS = {"jit": ("<=", 1.05), "eager": ("<=", 1.10), "train": (">=", 0.90)}


# --------------------------------------------------------------------------------------------
# The bare step: plain JAX + optax, written here by hand around the model's apply function.
# --------------------------------------------------------------------------------------------


def make_bare_step(tx: optax.GradientTransformation, forward):
    """``step(params, opt_state, x, y) -> (params, opt_state, loss)``: one Adam step, nothing else.

    ``forward(params, x) -> logits`` is the model's own ``apply`` (the function graphduo trains), so
    bare and graphduo run the same arithmetic and their ratio is graphduo's wrapping alone.
    """

    def loss_fn(params, x, y):
        logp = jax.nn.log_softmax(forward(params, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    def step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


# --------------------------------------------------------------------------------------------
# Workloads and variants.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
    """One model at one batch size, with the shared initial parameters and device-resident batch."""

    model_name: str
    batch_size: int
    model: Any
    params0: Any
    batch: dict[str, jax.Array]

    @property
    def label(self) -> str:
        return f"{self.model_name} b{self.batch_size}"


@dataclasses.dataclass
class Variant:
    """A step to time: ``step(state, batch) -> (state, metrics)`` and a fresh-state factory."""

    name: str
    kind: str  # "jit" or "eager"
    role: str  # "bare", "goal" (compared against the goal) or "info"
    description: str
    step: Callable[[Any, Any], tuple[Any, Any]]
    fresh_state: Callable[[], Any]


def make_workload(model_name: str, batch_size: int) -> Workload:
    model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
    params0 = jax.block_until_ready(model.init(jax.random.key(0)))
    return Workload(model_name, batch_size, model, params0, _common.make_batch(batch_size))


def bare_as_step(fn):
    """Adapt ``fn(params, opt_state, x, y)`` to the harness's ``step(state, batch)``."""

    def step(state, batch):
        params, opt_state, loss = fn(state[0], state[1], batch["image"], batch["label"])
        return (params, opt_state), loss

    return step


def make_variants(w: Workload) -> list[Variant]:
    """The six timed variants of one workload: three under jit, three eager."""
    bare_tx = optax.adam(LR)
    graphduo_tx = make_optimizer("adam", LR)  # what `graphduo train --optimizer adam` builds
    bare_step = make_bare_step(bare_tx, w.model.apply)
    graphduo_step = make_train_step(w.model.apply, graphduo_tx)
    module = w.model.module
    flax_step = make_train_step(lambda p, x: module.apply({"params": p}, x), graphduo_tx)

    def bare_state():
        params = _common.copy_tree(w.params0)
        return params, bare_tx.init(params)

    def graphduo_state():
        params = _common.copy_tree(w.params0)
        return TrainState(jnp.zeros((), jnp.int32), params, graphduo_tx.init(params), jax.random.key(1))

    return [
        Variant("bare-jit", "jit", "bare", "hand-written step, jax.jit(donate params+opt_state)",
                bare_as_step(jax.jit(bare_step, donate_argnums=(0, 1))), bare_state),
        Variant("graphduo-traced", "jit", "goal", "TracedStep(make_train_step(model.apply), donate=0)",
                TracedStep(graphduo_step, donate_argnums=0), graphduo_state),
        Variant("graphduo-step-jit", "jit", "info", "make_train_step(model.apply) under plain jax.jit",
                jax.jit(graphduo_step, donate_argnums=0), graphduo_state),
        Variant("bare-eager", "eager", "bare", "hand-written step, op by op",
                bare_as_step(bare_step), bare_state),
        Variant("graphduo-eager", "eager", "goal", "EagerStep(make_train_step(model.apply))",
                EagerStep(graphduo_step), graphduo_state),
        Variant("flax-module-eager", "eager", "info", "EagerStep(make_train_step(module.apply))",
                EagerStep(flax_step), graphduo_state),
    ]


def check_same_function(w: Workload, variants: list[Variant]) -> dict[str, float]:
    """One eager step of bare and graphduo from the same state: the losses and new params agree."""
    by_name = {v.name: v for v in variants}
    (bare_params, _), bare_loss_value = by_name["bare-eager"].step(by_name["bare-eager"].fresh_state(), w.batch)
    gd_state, gd_metrics = by_name["graphduo-eager"].step(by_name["graphduo-eager"].fresh_state(), w.batch)
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), bare_params, gd_state.params)
    result = {"bare_loss": float(bare_loss_value), "graphduo_loss": float(gd_metrics["loss"]),
              "max_param_diff_after_one_step": max(jax.tree.leaves(diffs))}
    if abs(result["bare_loss"] - result["graphduo_loss"]) > 1e-4 * max(1.0, abs(result["bare_loss"])):
        print(f"WARNING {w.label}: bare and graphduo losses differ: {result}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def matmul_gflops() -> float:
    """How fast this machine is right now (``_common.matmul_peak_flops``), in GFLOP/s.

    On a shared machine this drifts with the neighbours' load; it is measured at the start and the
    end of a run so absolute times can be read against it (ratios are interleaved and need not be).
    """
    return _common.matmul_peak_flops() / 1e9


def probe_step_s(v: Variant, w: Workload, calls: int = 3) -> float:
    """A rough steady-state step time (after the first call, which may compile)."""
    _, _, times = timing.time_steps(v.step, v.fresh_state(), [w.batch] * (calls + 2), warmup=1)
    return times.median_ms / 1e3


def time_variant(v: Variant, w: Workload, steps: int, warmup: int) -> dict[str, Any]:
    """One measurement: a fresh state, ``warmup`` untimed steps, then ``steps`` timed ones."""
    gc.collect()
    _, _, times = timing.time_steps(v.step, v.fresh_state(), [w.batch] * (1 + warmup + steps),
                                    warmup=warmup)
    return {"median_ms": times.median_ms, "p10_ms": times.p10_ms, "p90_ms": times.p90_ms,
            "first_s": times.first_s, "times_ms": [t * 1e3 for t in times.times_s]}


def run_train(w: Workload, steps: int) -> dict[str, Any]:
    """``graphduo train`` (traced, synthetic data) for ``steps`` steps of one epoch; its summary."""
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="bench_core_") as run_dir:
        config = Config(model=w.model_name, mode="traced", dataset="synthetic",
                        synthetic_shape=INPUT_SHAPE, synthetic_size=w.batch_size * steps,
                        batch_size=w.batch_size, steps=steps, run_dir=run_dir)
        summary = train_and_evaluate(config, progress=False)
    keep = ("steps", "first_step_s", "step_time_ms", "samples_per_s", "compile_time_s", "compiles")
    return {k: summary[k] for k in keep}


def bench_workload(w: Workload, args) -> dict[str, Any]:
    """All rounds of one workload: jit variants, eager variants and a training run per round."""
    variants = make_variants(w)
    checks = check_same_function(w, variants)
    # Step counts from a probe of each bare variant, shared by the variants of that kind.
    probes = {v.kind: probe_step_s(v, w) for v in variants if v.role == "bare"}
    steps = {"jit": _common.steps_for(probes["jit"], args.budget, 10, args.max_steps),
             "eager": _common.steps_for(probes["eager"], args.budget, args.min_eager_steps, args.max_steps)}
    train_steps = _common.steps_for(probes["jit"], args.train_budget, 20, args.max_train_steps)
    print(f"[{w.label}] probe: jit {probes['jit'] * 1e3:.2f} ms, eager {probes['eager'] * 1e3:.1f} ms; "
          f"steps jit {steps['jit']}, eager {steps['eager']}, train {train_steps}", file=sys.stderr)

    rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    rounds["graphduo-train"] = []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for kind in ("jit", "eager"):
            group = [v for v in variants if v.kind == kind]
            for v in group if r % 2 == 0 else reversed(group):  # alternate who goes first
                warmup = 2 if kind == "jit" else 1
                rounds[v.name].append(time_variant(v, w, steps[kind], warmup))
        rounds["graphduo-train"].append(run_train(w, train_steps))
        line = "  ".join(f"{name} {rs[-1].get('median_ms', rs[-1].get('step_time_ms')):.3g}"
                         for name, rs in rounds.items())
        print(f"[{w.label}] round {r + 1}/{args.rounds} ({time.perf_counter() - t0:.1f} s): {line} ms",
              file=sys.stderr)

    return {"model": w.model_name, "batch_size": w.batch_size, "checks": checks,
            "probe_step_ms": {k: s * 1e3 for k, s in probes.items()},
            "steps": {**steps, "train": train_steps},
            "variants": {v.name: {"kind": v.kind, "role": v.role, "description": v.description}
                         for v in variants},
            "rounds": rounds,
            "comparisons": compare(w.batch_size, variants, rounds)}


# --------------------------------------------------------------------------------------------
# Ratios and goals.
# --------------------------------------------------------------------------------------------


def meets(goal: tuple[str, float], ratio: float) -> bool:
    op, target = goal
    return ratio <= target if op == "<=" else ratio >= target


def compare(batch_size: int, variants: list[Variant], rounds) -> dict[str, dict[str, Any]]:
    """Per-round ratios of every non-bare variant to the bare variant of its kind."""
    out = {}
    for v in variants:
        if v.role == "bare":
            continue
        bare = rounds[f"bare-{v.kind}"]
        ratios = [a["median_ms"] / b["median_ms"] for a, b in zip(rounds[v.name], bare)]
        out[v.name] = summarize_ratios(ratios, GOALS[v.kind] if v.role == "goal" else None,
                                       "median time / bare median time")
        # The fastest steps are the least disturbed by neighbours: a second, noise-robust estimate.
        out[v.name]["p10_ratio"] = statistics.median(a["p10_ms"] / b["p10_ms"]
                                                     for a, b in zip(rounds[v.name], bare))
    # Training throughput against the bare jit step's throughput, round by round.
    ratios = [t["samples_per_s"] / (batch_size / (b["median_ms"] / 1e3))
              for t, b in zip(rounds["graphduo-train"], rounds["bare-jit"])]
    out["graphduo-train"] = summarize_ratios(ratios, GOALS["train"], "samples/s / bare-jit samples/s")
    # train_and_evaluate's figure is a mean over steps; against the bare step's mean time too.
    out["graphduo-train"]["vs_bare_mean_ratio"] = statistics.median(
        t["samples_per_s"] / (batch_size / (statistics.fmean(b["times_ms"]) / 1e3))
        for t, b in zip(rounds["graphduo-train"], rounds["bare-jit"]))
    return out


def summarize_ratios(ratios: list[float], goal, meaning: str) -> dict[str, Any]:
    median = statistics.median(ratios)
    return {"meaning": meaning, "per_round": ratios, "median": median, "min": min(ratios),
            "max": max(ratios), "goal": list(goal) if goal else None,
            "met": meets(goal, median) if goal else None}


# --------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------

HEADER = ("model", "batch", "variant", "median ms", "p10-p90 ms", "samples/s", "ratio vs bare [min-max]",
          "goal", "result")


def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        b = res["batch_size"]
        for name, rs in res["rounds"].items():
            if name == "graphduo-train":
                median = statistics.median(r["step_time_ms"] for r in rs)
                spread = "-"  # train_and_evaluate reports a mean step time, not a distribution
                sps = statistics.median(r["samples_per_s"] for r in rs)
            else:
                median = statistics.median(r["median_ms"] for r in rs)
                pooled = [t for r in rs for t in r["times_ms"]]
                spread = f"{np.percentile(pooled, 10):.3g}-{np.percentile(pooled, 90):.3g}"
                sps = b / (median / 1e3)
            cmp = res["comparisons"].get(name)
            if cmp is None:
                ratio, goal, verdict = "1 (ref)", "", ""
            else:
                ratio = f"{cmp['median']:.3f} [{cmp['min']:.2f}-{cmp['max']:.2f}]"
                if cmp["goal"]:
                    goal = f"{cmp['goal'][0]} {cmp['goal'][1]:.2f}"
                    verdict = "PASS" if cmp["met"] else "MISS"
                else:
                    goal, verdict = "info", ""
            rows.append((res["model"], str(b), name, f"{median:.3g}", spread, f"{sps:,.0f}", ratio, goal,
                         verdict))
    return rows


def format_table(rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    line = lambda cells: "  ".join(c.ljust(wd) for c, wd in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(HEADER), line(["-" * wd for wd in widths]), *(line(r) for r in rows)])


def markdown_table(rows) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


GOAL_TEXT = {
    "graphduo-traced": ("jit", "graphduo's traced step within 5% of a bare jax.jit step (time ratio <= 1.05)"),
    "graphduo-eager": ("eager", "graphduo's eager step within 10% of bare op-by-op JAX (time ratio <= 1.10)"),
    "graphduo-train": ("train", "`graphduo train` (traced) at >= 90% of the bare jit step's samples/s"),
}


def reading(results: list[dict[str, Any]]) -> list[str]:
    """One paragraph per goal: met or missed, by how much, per workload."""
    paragraphs = []
    for name, (_, text) in GOAL_TEXT.items():
        parts, n_met = [], 0
        for res in results:
            c = res["comparisons"][name]
            op, target = c["goal"]
            n_met += c["met"]
            if op == "<=":
                how = f"{(c['median'] - 1) * 100:+.1f}% vs bare"
                margin = (target - c["median"]) * 100
            else:
                how = f"{c['median'] * 100:.1f}% of bare"
                margin = (c["median"] - target) * 100
            verdict = f"met with {margin:.1f} points to spare" if c["met"] else f"missed by {-margin:.1f} points"
            extra = (f"; p10-step ratio {c['p10_ratio']:.3f}" if "p10_ratio" in c
                     else f"; {c['vs_bare_mean_ratio'] * 100:.1f}% of bare's mean-step samples/s")
            parts.append(f"{res['model']} b{res['batch_size']} {how} ({verdict}; rounds "
                         f"{c['min']:.3f}-{c['max']:.3f}{extra})")
        overall = "met for every workload" if n_met == len(results) else f"met for {n_met} of {len(results)} workloads"
        paragraphs.append(f"**Goal: {text}.** {overall.capitalize()}: " + "; ".join(parts) + ".")
    flax = [f"{r['model']} b{r['batch_size']} x{r['comparisons']['flax-module-eager']['median']:.2f}"
            for r in results]
    stepjit = [f"{r['model']} b{r['batch_size']} x{r['comparisons']['graphduo-step-jit']['median']:.3f}"
               for r in results]
    paragraphs.append("**For information.** An eager step through Flax's `module.apply` instead of the lean "
                      "`model.apply` costs, relative to bare op-by-op JAX: " + ", ".join(flax) + ". "
                      "graphduo's step function under a plain `jax.jit` (no `TracedStep`), relative to the "
                      "bare jit step: " + ", ".join(stepjit) + "; the gap between this row and "
                      "`graphduo-traced` is what `TracedStep.__call__` adds per call.")
    return paragraphs


PLOT_SECTIONS = (("graphduo-traced", "jit: traced step / bare jax.jit step", "time ratio"),
                 ("graphduo-eager", "eager: eager step / bare op-by-op step", "time ratio"),
                 ("graphduo-train", "train: graphduo train / bare jit step", "samples/s ratio"))


def write_plot(out: pathlib.Path, payload: dict) -> str | None:
    """``out/ratios.png``: graphduo against bare JAX per section (jit, eager, train), model and batch,
    with each goal, from the payload written to results.json; its file name, or None without matplotlib."""
    plt = _common.pyplot()
    if plt is None:
        return None
    results = payload["workloads"]
    labels = [f"{r['model']}\nb{r['batch_size']}" for r in results]
    fig, axes = plt.subplots(1, len(PLOT_SECTIONS), figsize=(4.2 * len(PLOT_SECTIONS), 3.8), squeeze=False)
    for ax, (name, title, ylabel) in zip(axes[0], PLOT_SECTIONS):
        cmps = [r["comparisons"][name] for r in results]
        med = np.array([c["median"] for c in cmps])
        err = [med - np.array([c["min"] for c in cmps]), np.array([c["max"] for c in cmps]) - med]
        for i, c in enumerate(cmps):
            ax.errorbar([i], [med[i]], yerr=[[err[0][i]], [err[1][i]]], fmt="o", capsize=4, markersize=7,
                        color="tab:green" if c["met"] else "tab:red")
            ax.annotate(f"{med[i]:.3f}", (i, med[i]), xytext=(7, 0), textcoords="offset points",
                        va="center", fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlim(-0.5, len(labels) - 0.5)
        op, target = cmps[0]["goal"]
        ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"goal {op} {target:g}")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        lo = min(min(c["min"] for c in cmps), target, 1.0)
        hi = max(max(c["max"] for c in cmps), target, 1.0)
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.02, hi + 0.15 * (hi - lo) + 0.02)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"graphduo / bare, {ylabel}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("graphduo against bare JAX: median of the per-round ratios, whiskers from the smallest to "
                 "the largest round (green: goal met, red: missed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "ratios.png", dpi=110)
    plt.close(fig)
    return "ratios.png"


def write_summary(out: pathlib.Path, rows, results, env, command: str, wall_s: float, args,
                  plot: str | None = None) -> None:
    text = [
        "# bench_core: graphduo against bare JAX",
        "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s, {args.rounds} interleaved rounds per workload.  ",
        f"Machine: {_common.describe_machine(env)}.  ",
        f"Machine speed (jitted {env.get('matmul_n', 2048)}x{env.get('matmul_n', 2048)} float32 matmul): {env['matmul_gflops_start']:.0f} GFLOP/s at the "
        f"start, {env['matmul_gflops_end']:.0f} GFLOP/s at the end.",
        "",
        markdown_table(rows),
        "",
        "median ms: median over rounds of each round's median step time (`graphduo-train`: the mean "
        "steady-state step time `train_and_evaluate` reports, median over rounds). p10-p90: over every "
        "timed step of every round. ratio: median of the per-round ratios to the bare variant of the same "
        "kind (time ratio for jit/eager rows, samples/s ratio against `bare-jit` for `graphduo-train`), "
        "with the smallest and largest per-round ratio. The readings below also give the ratio of the "
        "p10 step times (the least disturbed steps; a noise-robust second estimate) and, for training, "
        "the ratio against the bare step's mean time (`train_and_evaluate` reports a mean).",
        "",
        *(p + "\n" for p in reading(results)),
    ]
    if plot:
        text += [f"![graphduo against bare JAX, per section, model and batch]({plot})", ""]
    _common.write_summary(out, text)


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time graphduo's traced step, eager step and end-to-end training against the same "
                 "step written in bare JAX (MLP and CNN, Adam), interleaved over several rounds.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: batch 32 only, 2 rounds, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and ratios.png", DEFAULT_OUT))
    parser.add_argument("--models", type=_common.models, default=list(_common.MODELS),
                        help=f"comma-separated models, of {', '.join(_common.MODELS)} (default mlp,cnn)")
    parser.add_argument("--batch-sizes", type=_common.batch_sizes, default=None,
                        help="comma-separated batch sizes (default 32,256; --quick: 32)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help="interleaved rounds per workload (default 7; --quick: 2)")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
                        help="seconds of timed steps per variant per round (default 1.0; --quick: 0.15)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch_sizes = args.batch_sizes or ([32] if quick else [32, 256])
    args.rounds = args.rounds or (2 if quick else 7)
    args.budget = args.budget or (0.15 if quick else 1.0)
    args.train_budget = 2 * args.budget  # steady-state seconds of each `graphduo train` run
    args.min_eager_steps = 3 if quick else 6
    args.max_steps = 100 if quick else 400
    args.max_train_steps = 100 if quick else 500
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    env["matmul_n"] = _common.peak_matmul_size()
    env["matmul_gflops_start"] = matmul_gflops()
    print(f"bench_core on {env['cpu']} ({env['cpu_count']} cores), jax {env['jax']} {env['backend']}, "
          f"matmul {env['matmul_gflops_start']:.0f} GFLOP/s", file=sys.stderr)

    results = []
    for model_name in args.models:
        for batch_size in args.batch_sizes:
            results.append(bench_workload(make_workload(model_name, batch_size), args))
    env["matmul_gflops_end"] = matmul_gflops()
    wall_s = time.perf_counter() - t_start

    rows = table_rows(results)
    print(format_table(rows))
    print(f"\nwall time {wall_s:.0f} s", file=sys.stderr)

    payload = {"command": command, "wall_s": wall_s, "environment": env, "goals": GOALS,
               "settings": _common.settings_record(args), "workloads": results}
    _common.write_results(args.out, payload)
    plot = write_plot(args.out, payload)
    write_summary(args.out, rows, results, env, command, wall_s, args, plot)
    print(f"wrote {args.out / 'results.json'}, SUMMARY.md" + (f" and {plot}" if plot else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
