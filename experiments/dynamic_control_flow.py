"""Data-dependent control flow, eager against traced: a loop whose trip count depends on the input.

The model: z = x @ U, then the residual block h <- h + a * (tanh(h @ W + z) - h), starting from h = 0,
applied until the update is small (``max |update| < tol``, over the whole batch) or ``max_iters``
iterations ran, then a linear head ``logits = h @ V + c``. W is an orthogonal matrix scaled to norm
0.9 and a = 0.5, so the block is a contraction and h converges to the fixed point h* = tanh(h* W + z);
how many iterations that takes depends on the data: small inputs keep tanh in its linear range (local
contraction factor ~ 0.5 + 0.5 x 0.9 = 0.95, slow), large inputs saturate it (factor ~ 0.5, fast).

Variants, all on the same parameters and inputs (same batch shape, input scales differ):

- eager:          ``graphduo.EagerStep`` on a plain Python ``while`` loop over concrete values (the
                  stopping rule is an ordinary ``if`` on a device value, read back every iteration).
- while_loop:     ``graphduo.TracedStep`` on ``jax.lax.while_loop``: the loop runs inside XLA; one compile
                  serves every input.
- fori_cond:      ``TracedStep`` on a fixed ``lax.fori_loop`` of ``max_iters`` whose body is a
                  ``lax.cond`` that skips the update once converged: one compile, but every call pays
                  ``max_iters`` trips (cheap skipped ones).
- unrolled:       ``TracedStep`` on a Python ``for`` loop of n iterations, n computed on the host from the
                  data (here: the count the eager run found; in practice a sequence length, say). n
                  reaches the traced function through the SHAPE of an empty marker argument
                  (``f32[n, 0]``), so a single ``TracedStep`` sees each distinct n as a new input signature
                  and counts (and announces) each recompile itself, as it would for a new batch shape.
                  The alternative, a closure per n each in its own TracedStep, compiles just as often
                  but spreads the count over many objects. Its time per call does NOT include finding n.

Also: the eager variant's function handed to ``TracedStep`` fails with graphduo's ``TracingError``
(the Python ``while`` branches on a traced value); the message is recorded.

Checks: every variant gives the same iteration count and outputs as eager on every input (tolerances
justified in ``tolerances``; matmuls in full float32 on every backend, a GPU's TF32 default off).
Times: ``_common.time_call`` (first call apart, every call blocked on), variants interleaved over
several rounds, median over rounds. The process runs with graphduo's CLI defaults
(``_common.setup``), recorded in results.json.

Run:
    python experiments/dynamic_control_flow.py            # full run
    python experiments/dynamic_control_flow.py --quick    # smoke test: 3 inputs, 1 round
    python experiments/dynamic_control_flow.py --out DIR  # results elsewhere

Writes ``DIR/results.json`` (all figures plus the environment, ``_common.environment``), ``DIR/SUMMARY.md``
and, when matplotlib is installed, ``DIR/time_per_call.png``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import _common  # experiments/_common.py
from graphduo.eager import EagerStep
from graphduo.traced import TracedStep, TracingError

DEFAULT_OUT = _common.default_out("dynamic_control_flow")
IN_DIM, HIDDEN, NUM_CLASSES, BATCH = 32, 64, 10, 16
DAMPING = 0.5  # a in h <- h + a * (tanh(h W + z) - h)
TOL = 1e-4
MAX_ITERS = 200
SCALES = (0.01, 0.1, 0.5, 2.0, 10.0)
QUICK_SCALES = (0.1, 2.0, 10.0)
VARIANTS = ("eager", "while_loop", "fori_cond", "unrolled")


# --------------------------------------------------------------------------------------------
# The model and its four implementations.
# --------------------------------------------------------------------------------------------


def init_params(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(HIDDEN, HIDDEN)))
    return {"U": jnp.asarray(rng.normal(size=(IN_DIM, HIDDEN)) / np.sqrt(IN_DIM), jnp.float32),
            "W": jnp.asarray(0.9 * q, jnp.float32),  # spectral norm 0.9: the block is a contraction
            "V": jnp.asarray(rng.normal(size=(HIDDEN, NUM_CLASSES)) / np.sqrt(HIDDEN), jnp.float32),
            "c": jnp.zeros((NUM_CLASSES,), jnp.float32)}


def make_inputs(scales, seed: int = 1) -> list[jax.Array]:
    rng = np.random.default_rng(seed)
    return [jnp.asarray(s * rng.normal(size=(BATCH, IN_DIM)), jnp.float32) for s in scales]


def _update(params, h, z):
    return DAMPING * (jnp.tanh(h @ params["W"] + z) - h)


def _head(params, h):
    return h @ params["V"] + params["c"]


def eager_forward(params, x):
    """Plain Python: loop until the update is small. Works op by op; fails under tracing."""
    z = x @ params["U"]
    h = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
    n = 0
    while n < MAX_ITERS:
        u = _update(params, h, z)
        h = h + u
        n += 1
        if jnp.max(jnp.abs(u)) < TOL:  # a device value turned into a Python bool: concrete values only
            break
    return _head(params, h), h, n


def while_forward(params, x):
    """The same loop as ``lax.while_loop``: the stopping rule is part of the compiled program."""
    z = x @ params["U"]
    h0 = jnp.zeros((x.shape[0], HIDDEN), x.dtype)

    def cond(carry):
        _, n, last = carry
        return (n < MAX_ITERS) & (last >= TOL)

    def body(carry):
        h, n, _ = carry
        u = _update(params, h, z)
        return h + u, n + 1, jnp.max(jnp.abs(u))

    h, n, _ = jax.lax.while_loop(cond, body, (h0, jnp.int32(0), jnp.float32(jnp.inf)))
    return _head(params, h), h, n


def fori_cond_forward(params, x):
    """A fixed ``fori_loop`` of MAX_ITERS trips; ``lax.cond`` skips the update once converged."""
    z = x @ params["U"]
    h0 = jnp.zeros((x.shape[0], HIDDEN), x.dtype)

    def step(carry):
        h, n, _ = carry
        u = _update(params, h, z)
        return h + u, n + 1, jnp.max(jnp.abs(u)) < TOL

    def body(_, carry):
        return jax.lax.cond(carry[2], lambda c: c, step, carry)

    h, n, _ = jax.lax.fori_loop(0, MAX_ITERS, body, (h0, jnp.int32(0), jnp.bool_(False)))
    return _head(params, h), h, n


def unrolled_forward(params, x, marker):
    """A Python loop of ``marker.shape[0]`` iterations, unrolled into the graph at trace time."""
    z = x @ params["U"]
    h = jnp.zeros((x.shape[0], HIDDEN), x.dtype)
    for _ in range(marker.shape[0]):
        h = h + _update(params, h, z)
    return _head(params, h), h, marker.shape[0]


def count_marker(n: int) -> jax.Array:
    """An empty array whose shape carries the iteration count into the traced function's signature."""
    return jnp.zeros((n, 0), jnp.float32)


def build_variants():
    """variant name -> (step object (for .compiles), call(params, x, n_host) -> (logits, h, n))."""
    eager = EagerStep(eager_forward)
    wl = TracedStep(while_forward)
    fc = TracedStep(fori_cond_forward)
    un = TracedStep(unrolled_forward, on_recompile=lambda record: None)  # counted in .compiles, not logged
    return {
        "eager": (eager, lambda p, x, n: eager(p, x)),
        "while_loop": (wl, lambda p, x, n: wl(p, x)),
        "fori_cond": (fc, lambda p, x, n: fc(p, x)),
        "unrolled": (un, lambda p, x, n: un(p, x, count_marker(n))),
    }


def tracing_error_message(params, x) -> str | None:
    """What graphduo says when the eager Python ``while`` is handed to TracedStep."""
    try:
        TracedStep(eager_forward)(params, x)
    except TracingError as err:
        return str(err)
    return None


# --------------------------------------------------------------------------------------------
# Agreement.
# --------------------------------------------------------------------------------------------


def tolerances(params) -> dict[str, float]:
    """Tolerances for comparing a variant with eager, and why.

    Each variant runs the same float32 ops in the same order, but XLA fuses the traced loop body
    (e.g. the matmul's add with tanh's argument), so results can differ in the last bits per iteration.
    The block is a contraction (factor <= 0.95), so per-iteration rounding (~1e-7 relative on O(1)
    values) accumulates to at most ~1e-7 / (1 - 0.95) = 2e-6: rtol 1e-5 covers it. Near the stopping
    threshold such a difference could flip ``max|u| < tol`` and make one variant run one more iteration;
    that extra update moves every entry of h by less than ``tol``, hence ``atol = tol`` for h, and for
    the logits the same bound through the head: ``tol * max_j sum_i |V_ij|`` (a row of h times V).
    """
    v = np.asarray(params["V"])
    return {"rtol": 1e-5, "atol_h": TOL, "atol_logits": float(TOL * np.abs(v).sum(axis=0).max())}


def check_agreement(params, reference, other) -> dict[str, Any]:
    """Compare one variant's (logits, h, n) with eager's; raises AssertionError if they differ."""
    tol = tolerances(params)
    (l0, h0, n0), (l1, h1, n1) = reference, other
    np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), rtol=tol["rtol"], atol=tol["atol_h"])
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=tol["rtol"], atol=tol["atol_logits"])
    assert abs(int(n1) - int(n0)) <= 1, f"iteration counts {int(n1)} and {int(n0)} differ by more than one"
    return {"iterations": int(n1), "iterations_equal": int(n1) == int(n0),
            "max_abs_diff_h": float(np.max(np.abs(np.asarray(h1) - np.asarray(h0)))),
            "max_abs_diff_logits": float(np.max(np.abs(np.asarray(l1) - np.asarray(l0))))}


# --------------------------------------------------------------------------------------------
# The experiment.
# --------------------------------------------------------------------------------------------


def run(args) -> dict[str, Any]:
    params = init_params()
    inputs = make_inputs(args.scales)
    variants = build_variants()
    eager_step, eager_call = variants["eager"]
    # Eager first: its iteration count is the host-side count the unrolled variant is given.
    reference = [eager_call(params, x, None) for x in inputs]
    counts = [int(r[2]) for r in reference]
    print(f"iterations per input (scales {list(args.scales)}): {counts}", file=sys.stderr)

    # The machine is shared and noisy, so the variants are interleaved: each round times every variant
    # on every input (``time_call``, first call apart); a figure is the median over rounds of the
    # per-round medians. The first round's first calls compile; compile times come from TracedStep.
    agreement: dict[str, list] = {name: [] for name in variants}
    rounds: dict[str, list] = {name: [[] for _ in inputs] for name in variants}
    first_call: dict[str, list] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, (step, call) in variants.items():
            for i, (x, ref, n) in enumerate(zip(inputs, reference, counts)):
                times = _common.time_call(lambda: call(params, x, n), repeats=args.repeats, warmup=1)
                rounds[name][i].append(times.median_ms)
                if r == 0:
                    first_call[name].append(times.first_s)
                    agreement[name].append(check_agreement(params, ref, call(params, x, n)))
    per_call: dict[str, list] = {}
    for name, (step, _) in variants.items():
        per_call[name] = [{"iterations": n, "first_call_s": first_call[name][i],
                           "median_ms": float(np.median(rounds[name][i])),
                           "round_medians_ms": rounds[name][i]} for i, n in enumerate(counts)]
        print(f"{name:10s} compiles {len(step.compiles):2d} ({sum(r.total_s for r in step.compiles):.2f} s) "
              f"ms/call {[round(p['median_ms'], 2) for p in per_call[name]]}", file=sys.stderr)

    summary = []
    for name, (step, _) in variants.items():
        summary.append({
            "variant": name, "compiles": len(step.compiles),
            "compile_s": sum(r.total_s for r in step.compiles),
            "compile_s_each": [r.total_s for r in step.compiles],
            "per_input": per_call[name], "agreement": agreement[name],
        })
    return {"scales": list(args.scales), "iterations": counts, "tolerances": tolerances(params),
            "variants": summary, "all_agree": True,
            "tracing_error": tracing_error_message(params, inputs[0])}


# --------------------------------------------------------------------------------------------
# Output.
# --------------------------------------------------------------------------------------------


def markdown_table(res) -> str:
    head = "| variant | compiles | compile s | " + " | ".join(
        f"ms/call, scale {s:g} ({n} it)" for s, n in zip(res["scales"], res["iterations"])) + " | max abs diff vs eager |"
    lines = [head, "|" + "---|" * (4 + len(res["scales"]))]
    for v in res["variants"]:
        cells = " | ".join(f"{p['median_ms']:.2f}" for p in v["per_input"])
        diff = max(a["max_abs_diff_logits"] for a in v["agreement"])
        lines.append(f"| {v['variant']} | {v['compiles']} | {v['compile_s']:.2f} | {cells} | {diff:.1e} |")
    return "\n".join(lines)


def write_summary(out: pathlib.Path, payload: dict) -> None:
    env, res = payload["environment"], payload["results"]
    by = {v["variant"]: v for v in res["variants"]}
    counts_seen = list(dict.fromkeys(res["iterations"]))  # TracedStep compiles in first-seen order
    unrolled_each = ", ".join(f"{n}: {t:.2f} s" for n, t in zip(counts_seen, by["unrolled"]["compile_s_each"]))
    us_per_it = {name: np.median([p["median_ms"] * 1e3 / p["iterations"] for p in v["per_input"]])
                 for name, v in by.items()}
    # Which way it went is the machine's: slower on the 2-core CPU, faster on an H100 (RESULTS.md).
    unrolled_reading = (
        "straight-line code saves the loop condition, but n copies of the block make a larger program (on "
        "XLA:CPU, many more small kernels to launch) than one loop body run n times."
        if us_per_it["unrolled"] >= us_per_it["while_loop"] else
        "straight-line code, with no loop condition to evaluate between iterations, beat the loop body run n "
        "times on this machine, at the price of a larger program per count.")
    text = f"""# dynamic_control_flow: a data-dependent loop, eager against traced

Command: `{payload['command']}`  
Wall time: {payload['wall_s']:.0f} s.  
Machine: {_common.describe_machine(env)}. Shared and noisy.

Model: z = x U; h <- h + {DAMPING} (tanh(h W + z) - h) from h = 0 until max|update| < {TOL:g} or {MAX_ITERS}
iterations; logits = h V + c. Batch {BATCH} x {IN_DIM}, hidden {HIDDEN}, |W| = 0.9. Inputs differ only in scale,
which sets the iteration count. ms/call: median over {payload['settings']['rounds']} interleaved rounds of the median
of {payload['settings']['repeats']} calls (`_common.time_call`, first call apart, so compile time is not in it).

{markdown_table(res)}

Every variant matched eager on every input: same iteration counts
({'all equal' if all(a['iterations_equal'] for v in res['variants'] for a in v['agreement']) else 'some off by one near the threshold'}),
outputs within rtol {res['tolerances']['rtol']:g}, atol {res['tolerances']['atol_h']:g} on h and
{res['tolerances']['atol_logits']:.2g} on the logits (see `tolerances()` for why).

Median cost per loop iteration (ms/call / iterations): eager {us_per_it['eager']:.0f} us, while_loop
{us_per_it['while_loop']:.1f} us, fori_cond {us_per_it['fori_cond']:.1f} us (plus {MAX_ITERS} trips in all, the
skipped ones cheap), unrolled {us_per_it['unrolled']:.1f} us.

## Reading

- eager: Python `while` just works, and every iteration pays op-by-op dispatch plus a device-to-host
  read of `max|u|` for the `if`: time grows with the iteration count at the eager per-iteration rate.
- while_loop: {by['while_loop']['compiles']} compile for every input; the stopping rule runs inside XLA, so cost
  scales with the actual iteration count at the compiled per-iteration rate.
- fori_cond: {by['fori_cond']['compiles']} compile too, but it always makes {MAX_ITERS} trips; a skipped trip (the
  `cond` taking the identity branch) is cheap but not free, so it trails while_loop by a roughly constant amount.
- unrolled: {by['unrolled']['compiles']} compiles for {len(set(res['iterations']))} distinct counts (one per count,
  {by['unrolled']['compile_s']:.1f} s in all; per count n: {unrolled_each}). Each compile is a new program
  holding n copies of the block; at these sizes XLA's fixed cost per compile dominates, not n.
  Per iteration it ran {us_per_it['unrolled'] / us_per_it['while_loop']:.1f}x the while_loop's time here:
  {unrolled_reading} And it needs n on the host before the
  call, which for a convergence rule means running the loop anyway.

## The eager loop under tracing

`TracedStep(eager_forward)` raises `graphduo.TracingError`:

```
{res['tracing_error']}
```
"""
    _common.write_summary(out, text)


def write_plot(out: pathlib.Path, res: dict) -> None:
    plt = _common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in res["variants"]:
        pts = sorted((p["iterations"], p["median_ms"]) for p in v["per_input"])
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=f"{v['variant']} ({v['compiles']} compiles)")
    ax.set_xlabel("loop iterations the input needs")
    ax.set_ylabel("ms per call (median)")
    ax.set_yscale("log")
    ax.set_title("Data-dependent loop: time per call")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "time_per_call.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Run a model with a data-dependent loop (iterate a residual block until converged) "
                 "eagerly with a Python while, and traced with lax.while_loop, fori_loop + cond and a "
                 "host-unrolled loop; count compiles, time calls and check all variants agree.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: input scales "
                             f"{','.join(map(str, QUICK_SCALES))}, 1 round of 3 calls")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and time_per_call.png", DEFAULT_OUT))
    parser.add_argument("--scales", type=_common.positive_floats, default=None,
                        help="comma-separated input scales, one input each "
                             f"(default {','.join(map(str, SCALES))}; --quick: {','.join(map(str, QUICK_SCALES))})")
    parser.add_argument("--repeats", type=_common.positive_int, default=None,
                        help="timed calls per variant, input and round (default 5; --quick: 3)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help="interleaved rounds over all variants and inputs (default 7; --quick: 1)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.scales = tuple(args.scales) if args.scales else (QUICK_SCALES if args.quick else SCALES)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 7)
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    # Float32 matmuls in float32 on every backend: the agreement tolerances are derived for float32
    # rounding, and a GPU's default (TF32, ~3e-4 relative per product) made the variants differ by
    # 1.4e-4 on an H100. What is measured here is control flow, not matmul precision.
    jax.config.update("jax_default_matmul_precision", "highest")
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    res = run(args)
    wall_s = time.perf_counter() - t_start
    payload = {"command": command, "wall_s": wall_s, "environment": env,
               "settings": _common.settings_record(args),
               "model": {"in_dim": IN_DIM, "hidden": HIDDEN, "classes": NUM_CLASSES, "batch": BATCH,
                         "damping": DAMPING, "tol": TOL, "max_iters": MAX_ITERS,
                         "matmul_precision": "highest"},
               "results": res}
    _common.write_results(args.out, payload)
    write_summary(args.out, payload)
    write_plot(args.out, res)
    print(markdown_table(res))
    print(f"\nTracingError: {res['tracing_error']}")
    print(f"\nwall time {wall_s:.0f} s; wrote {args.out}/results.json, SUMMARY.md, time_per_call.png", file=sys.stderr)


if __name__ == "__main__":
    main()
