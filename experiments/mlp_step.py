"""The MLP step on XLA:CPU: what its time is made of, and what else was tried to make it faster.

The record behind the MLP's speed goals (experiments/RESULTS.md, "The MLP step"), kept reproducible.
It times graphduo's traced Adam training step of the default MLP (784-512-512-10 on 28x28x1 inputs,
10 classes) as shipped against variants that compute the same function, all in one process, from
the same weights on the same batch, interleaved over rounds:

* ``shipped``:         ``TracedStep(make_train_step(mlp_apply, adam))``, as graphduo runs it: its
                       matmuls are ``models.matmul``, whose weight gradient XLA:CPU gives to YNNPACK.
* ``flax``:            the same step around Flax's ``module.apply``.
* ``eigen-dots``:      every dot on Eigen (jaxlib 0.10's XLA gives YNNPACK the dots that contract the
                       left operand's last axis, Eigen the rest; the shipped step has no other kind).
* ``xnnpack-dots``:    every dot on XNNPACK.
* ``onednn-dots``:     every dot on XLA's own oneDNN fusions (``xla_cpu_use_onednn``).
* ``no-param-copies``: XLA's copy insertion with region analysis, which drops the copies it makes of
                       three parameters before it updates them in place.
* ``one-hot-loss``:    the cross-entropy against one-hot labels (no gather forward, no scatter
                       backward; the same values for finite logits).
* ``eigen-weight-gradients``: each weight gradient as ``jax.grad`` writes it, a dot contracting the
                       batch axis, which XLA:CPU runs on Eigen: graphduo's step before
                       ``models.matmul`` (each weight gradient a YNNPACK dot of an explicit copy of
                       the layer's input transposed), and Flax's.
* ``onednn-sgemm``:    every matmul of the dense layers (forward, input and weight gradients) a call
                       of oneDNN's ``dnnl_sgemm`` through graphduo's FFI plumbing
                       (``graphduo.onednn.ffi_handler``), the way the CNN's convolutions reach oneDNN:
                       the GEMM reads and writes XLA's buffers, on oneDNN's OpenMP threads.
and one reference that computes less:
* ``gradient-only``:   the loss and its gradient without the Adam update: what Adam costs.

The XLA options go to this variant's compile alone (``Lowered.compile(compiler_options=...)``), so
every variant runs in the same process. In every round, right before ``shipped``, the matmul
ceiling (``graphduo.timing.matmul_peak_flops``) is measured; a variant's fraction of peak is the
median over rounds of its FLOP rate over that round's ceiling (FLOPs: XLA's cost analysis of the
shipped step, which every full variant computes; of its own step for ``gradient-only``). Each of
the step's eight matmuls is also timed alone, as XLA compiles it (20 calls dispatched back to
back, so each carries a share of JAX's dispatch; a weight gradient both as shipped and as
``jax.grad``'s batch-contracting dot) and as a direct ``dnnl_sgemm`` call (ctypes, the GIL
released): the kernels' own rates beside the step's. And Adam's update alone (the step's
``tx.update`` and ``optax.apply_updates`` on its gradients, 20 calls back to back), which with each
matmul at the fastest of its kernels estimates how fast a step that runs these kernels one after
another can be: its time, and its FLOP rate as a fraction of the ceiling (the rest of the step,
loss, ReLUs, bias adds and metrics, is left out; each part timed alone pays its own dispatch and
cache misses, so not a strict bound).

Same function: every variant trains 3 steps from the same weights on the same 3 batches; its losses
must match shipped's (relative 1e-4: float32 summation order; a wrong formulation is off by far more
from the first step); ``gradient-only``'s first loss, the only one it computes from the same weights.

oneDNN's OpenMP threads: ``OMP_WAIT_POLICY`` is read once, when oneDNN's OpenMP runtime loads, so
the script sets it first thing: ``passive`` (default) lets the threads sleep as soon as a GEMM ends
instead of spinning on the cores XLA's next kernels need; ``active`` keeps them spinning.

Run:
    python experiments/mlp_step.py            # batch 256, 5 rounds, about two minutes
    python experiments/mlp_step.py --quick    # smoke test: batch 32, 1 round, under a minute
    python experiments/mlp_step.py --omp-wait-policy active --out DIR

Writes ``DIR/results.json`` (every per-round time, the losses, the environment), ``DIR/SUMMARY.md`` and,
when matplotlib is installed, ``DIR/step_time.png``.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import pathlib
import statistics
import sys
import time

import _args  # experiments/_args.py

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "mlp_step"
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
LR = 1e-3
CHECK_STEPS = 3
LOSS_RTOL = 1e-4
PEAK_REPEATS = 5
MATMUL_CALLS = 20
ADAM_CALLS = 20
OMP_WAIT_POLICIES = ("passive", "active")
BASELINE = "shipped"
REFERENCE = "gradient-only"  # computes less than a full step: no ratio against the goals
_NO_YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
COMPILER_OPTIONS = {
    "eigen-dots": _NO_YNN_DOTS,
    "xnnpack-dots": {**_NO_YNN_DOTS, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn-dots": {**_NO_YNN_DOTS, "xla_cpu_use_onednn": True,
                    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "no-param-copies": {"xla_cpu_copy_insertion_use_region_analysis": True},
}
VARIANTS = ("shipped", "flax", "eigen-dots", "xnnpack-dots", "onednn-dots", "no-param-copies", "one-hot-loss",
            "eigen-weight-gradients", "onednn-sgemm", REFERENCE)


# ---------------------------------------------------------------------------------------------
# oneDNN's sgemm as an XLA FFI call, with its gradients.

_SGEMM_TARGETS = {"nn": (b"N", b"N"), "tn": (b"T", b"N"), "nt": (b"N", b"T")}  # op(a) @ op(b), row-major
_sgemm_handlers: dict = {}  # kept alive: XLA holds only their addresses


def _register_sgemm() -> None:
    from graphduo import onednn

    if _sgemm_handlers:
        return
    sgemm = onednn.library().dnnl_sgemm
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    sgemm.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    sgemm.restype = ctypes.c_int

    def gemm(trans_a: bytes, trans_b: bytes):
        def run(frame):
            (a, b), (out,) = onednn.frame_buffers(frame)
            if a.rank != 2 or b.rank != 2 or out.rank != 2:
                raise ValueError("sgemm takes two matrices")
            a0, a1, b0, b1 = a.dims[0], a.dims[1], b.dims[0], b.dims[1]
            m, k = (a1, a0) if trans_a == b"T" else (a0, a1)
            k_b, n = (b1, b0) if trans_b == b"T" else (b0, b1)
            if k != k_b or (out.dims[0], out.dims[1]) != (m, n):  # never write outside XLA's buffer
                raise ValueError(f"shapes {(a0, a1)}, {(b0, b1)} -> {(out.dims[0], out.dims[1])} do not fit")
            status = sgemm(trans_a, trans_b, m, n, k, 1.0, a.data, a1, b.data, b1, 0.0, out.data, n)
            if status != 0:
                raise RuntimeError(f"dnnl_sgemm returned status {status}")
        return run

    for name, (ta, tb) in _SGEMM_TARGETS.items():
        handler = onednn.ffi_handler(gemm(ta, tb), f"oneDNN sgemm ({name})")
        onednn.register_handler(f"mlp_step_sgemm_{name}", handler)
        _sgemm_handlers[name] = handler


def _sgemm(kind: str, a, b, shape):
    import jax
    import jax.numpy as jnp

    return jax.ffi.ffi_call(f"mlp_step_sgemm_{kind}", jax.ShapeDtypeStruct(shape, jnp.float32))(a, b)


def sgemm_matmul():
    """``matmul(x, w) = x @ w`` on oneDNN's sgemm, its gradients too (``g @ w.T``, ``x.T @ g``)."""
    import jax

    _register_sgemm()

    @jax.custom_vjp
    def matmul(x, w):
        return _sgemm("nn", x, w, (x.shape[0], w.shape[1]))

    def forward(x, w):
        return matmul(x, w), (x, w)

    def backward(res, g):
        x, w = res
        return _sgemm("nt", g, w, x.shape), _sgemm("tn", x, g, w.shape)

    matmul.defvjp(forward, backward)
    return matmul


# ---------------------------------------------------------------------------------------------
# The variants.

def _mlp_apply_with(matmul):
    from graphduo import models

    def apply(params, x):
        n = len(params)
        x = x.reshape((x.shape[0], -1))
        for i in range(n):
            layer = params[f"Dense_{i}"]
            x = matmul(x, layer["kernel"]) + layer["bias"]
            if i < n - 1:
                x = models.relu(x)
        return x

    return apply


def one_hot_cross_entropy(logits, labels):
    """``graphduo.step.cross_entropy`` as a sum against one-hot labels."""
    import jax
    import jax.numpy as jnp

    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, axis=-1))


def step_function(name: str, model, tx):
    """The pure ``step(state, batch) -> (state, metrics)`` of variant ``name``."""
    import jax
    import jax.numpy as jnp

    from graphduo import step as graphduo_step

    if name == "flax":
        return graphduo_step.make_train_step(lambda p, x: model.module.apply({"params": p}, x), tx)
    if name == "onednn-sgemm":
        return graphduo_step.make_train_step(_mlp_apply_with(sgemm_matmul()), tx)
    if name == "eigen-weight-gradients":
        return graphduo_step.make_train_step(_mlp_apply_with(jnp.matmul), tx)
    if name == REFERENCE:
        def gradient_only(state, batch):
            def loss(params):
                return graphduo_step.cross_entropy(model.apply(params, batch["image"]), batch["label"])
            value, grads = jax.value_and_grad(loss)(state.params)
            return state, {"loss": value, "grads": grads}
        return gradient_only
    shipped = graphduo_step.make_train_step(model.apply, tx)
    if name != "one-hot-loss":
        return shipped

    def one_hot_step(state, batch):  # the loss is looked up when the step is traced
        original = graphduo_step.cross_entropy
        graphduo_step.cross_entropy = one_hot_cross_entropy
        try:
            return shipped(state, batch)
        finally:
            graphduo_step.cross_entropy = original
    return one_hot_step


def build_steps(model, tx, state, batch) -> dict:
    """Every variant compiled once for ``(state, batch)``: ``{name: (callable, XLA's FLOPs per call)}``."""
    import jax

    from graphduo.traced import TracedStep

    steps = {}
    for name in VARIANTS:
        fn = step_function(name, model, tx)
        if name == BASELINE:
            traced = TracedStep(fn, donate_argnums=0)
            steps[name] = (traced, traced.stages(state, batch).cost_analysis()["flops"])
            continue
        compiled = jax.jit(fn, donate_argnums=0).lower(state, batch).compile(COMPILER_OPTIONS.get(name))
        cost = compiled.cost_analysis()
        steps[name] = (compiled, float((cost[0] if isinstance(cost, list) else cost)["flops"]))
    return steps


def check_losses(steps, fresh_state, batches) -> dict:
    """CHECK_STEPS steps of every variant from the same weights: the losses agree with shipped's."""
    losses = {}
    for name, (step, _) in steps.items():
        state, out = fresh_state(), []
        for batch in batches:
            state, metrics = step(state, batch)
            out.append(float(metrics["loss"]))
        losses[name] = out[:1] if name == REFERENCE else out
    ref = losses[BASELINE]
    worst = max(abs(a - r) / abs(r) for ls in losses.values() for a, r in zip(ls, ref))
    return {"losses": losses, "max_rel_diff": worst, "tolerance": LOSS_RTOL, "ok": worst <= LOSS_RTOL}


def matmul_shapes(params, batch_size: int) -> list[dict]:
    """The step's matmuls: each layer's forward ``x @ W`` and weight gradient ``x.T @ g``, and every
    layer's input gradient ``g @ W.T`` but the first's (the input needs none)."""
    shapes = []
    n = len(params)
    for i in range(n):
        k_in, k_out = params[f"Dense_{i}"]["kernel"].shape
        shapes.append({"name": f"forward {i}", "kind": "nn", "a": (batch_size, k_in), "b": (k_in, k_out)})
        shapes.append({"name": f"weight gradient {i}", "kind": "tn", "a": (batch_size, k_in), "b": (batch_size, k_out)})
        if i > 0:
            shapes.append({"name": f"input gradient {i}", "kind": "nt", "a": (batch_size, k_out), "b": (k_in, k_out)})
    for s in shapes:
        a, b = s["a"], s["b"]
        m = a[1] if s["kind"] == "tn" else a[0]
        k = a[0] if s["kind"] == "tn" else a[1]
        n_out = b[0] if s["kind"] == "nt" else b[1]
        s["flops"] = 2 * m * k * n_out
    return shapes


def adam_update(tx):
    """The shipped step's optimizer update alone, ``update(state, grads) -> state``: ``tx.update`` and
    ``optax.apply_updates`` as ``graphduo.step.make_train_step`` runs them, state donated."""
    import jax
    import optax

    from graphduo.step import TrainState

    def update(state, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.rng)

    return jax.jit(update, donate_argnums=0)


def time_adam(update, state, grads, calls: int = ADAM_CALLS):
    """``(state, ms per call)``: ``calls`` updates dispatched back to back, then one wait (the way the
    matmuls alone are timed: each call carries a share of JAX's dispatch)."""
    import jax

    state = jax.block_until_ready(update(state, grads))
    t0 = time.perf_counter()
    for _ in range(calls):
        state = update(state, grads)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - t0) / calls * 1e3


def time_matmuls(shapes, calls: int = MATMUL_CALLS) -> list[dict]:
    """Each matmul alone: XLA (``calls`` jitted calls back to back, then one wait) and a direct
    ``dnnl_sgemm`` call (timed ``calls`` times in a row); ms per call."""
    import jax
    import numpy as np

    from graphduo import models, onednn

    _register_sgemm()
    sgemm = onednn.library().dnnl_sgemm
    rng = np.random.default_rng(0)
    out = []
    for s in shapes:
        a = rng.standard_normal(s["a"], dtype=np.float32)
        b = rng.standard_normal(s["b"], dtype=np.float32)
        kind = s["kind"]
        xa, xb = jax.device_put(a), jax.device_put(b)
        plain = _plain_dot(kind)
        # the shipped step's weight gradient: YNNPACK's dot of an explicit copy of x.T
        xla_ms = _time_xla(models._weight_gradient if kind == "tn" else plain, xa, xb, calls)
        row = {"name": s["name"], "xla_ms": xla_ms}
        if kind == "tn":  # and jax.grad's own dot, contracting the batch axis: Eigen's
            row["xla_batch_contracting_ms"] = _time_xla(plain, xa, xb, calls)
        ta, tb = _SGEMM_TARGETS[kind]
        m = a.shape[1] if kind == "tn" else a.shape[0]
        k = a.shape[0] if kind == "tn" else a.shape[1]
        n = b.shape[0] if kind == "nt" else b.shape[1]
        c = np.empty((m, n), np.float32)
        args = (ta, tb, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, n)
        sgemm(*args)
        t0 = time.perf_counter()
        for _ in range(calls):
            sgemm(*args)
        onednn_ms = (time.perf_counter() - t0) / calls * 1e3
        out.append({**row, "onednn_sgemm_ms": onednn_ms})
    return out


@functools.cache
def _plain_dot(kind: str):
    """``op(a) @ op(b)`` for a ``_SGEMM_TARGETS`` kind, jitted once per kind (not once per round)."""
    import jax

    return jax.jit(lambda x, y: (x.T if kind == "tn" else x) @ (y.T if kind == "nt" else y))


def _time_xla(fn, a, b, calls: int) -> float:
    """ms per call of a jitted ``fn(a, b)``: ``calls`` calls back to back, then one wait."""
    import jax

    jax.block_until_ready(fn(a, b))
    t0 = time.perf_counter()
    jax.block_until_ready([fn(a, b) for _ in range(calls)])
    return (time.perf_counter() - t0) / calls * 1e3


# ---------------------------------------------------------------------------------------------
# Measure, analyse, report.

def measure(args) -> dict:
    import jax
    import numpy as np

    from graphduo import timing
    from graphduo.models import build_model
    from graphduo.step import create_train_state, make_optimizer

    model = build_model("mlp", INPUT_SHAPE, NUM_CLASSES)
    tx = make_optimizer("adam", LR)
    rng = np.random.default_rng(0)
    batches = [jax.device_put({"image": rng.random((args.batch_size, *INPUT_SHAPE), dtype=np.float32),
                               "label": rng.integers(0, NUM_CLASSES, args.batch_size).astype(np.int32)})
               for _ in range(CHECK_STEPS)]

    def fresh_state():
        return create_train_state(model, tx, jax.random.key(0))

    steps = build_steps(model, tx, fresh_state(), batches[0])
    checks = check_losses(steps, fresh_state, batches)
    print(f"[mlp_step] loss check over {CHECK_STEPS} steps: max rel diff {checks['max_rel_diff']:.1e} "
          f"({'ok' if checks['ok'] else 'MISMATCH'})", file=sys.stderr)
    states = {name: fresh_state() for name in VARIANTS}
    counts = {}
    for name, (step, _) in steps.items():  # probe: a rough step time to size the measurements
        states[name], _, t = timing.time_steps(step, states[name], [batches[0]] * 5, warmup=1)
        counts[name] = int(min(300, max(5, round(args.budget / (t.median_ms / 1e3)))))
    shapes = matmul_shapes(states[BASELINE].params, args.batch_size)
    update = adam_update(tx)
    adam_state = fresh_state()
    grads = steps[REFERENCE][0](fresh_state(), batches[0])[1]["grads"]
    rounds = []
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        rnd = {"steps": {}}
        for name in order:
            if name == BASELINE:
                rnd["matmul_peak_flops"] = timing.matmul_peak_flops(repeats=PEAK_REPEATS)
            step = steps[name][0]
            states[name], _, t = timing.time_steps(step, states[name], [batches[0]] * (3 + counts[name]), warmup=2)
            rnd["steps"][name] = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}
        rnd["matmuls"] = time_matmuls(shapes)
        adam_state, rnd["adam_update_ms"] = time_adam(update, adam_state, grads)
        rounds.append(rnd)
        print(f"[mlp_step] round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n} {rnd['steps'][n]['median_ms']:.2f}" for n in VARIANTS) + f" ms; Adam alone "
            f"{rnd['adam_update_ms']:.2f} ms; matmul {rnd['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", file=sys.stderr)
    return {"batch_size": args.batch_size, "flops": {n: f for n, (_, f) in steps.items()}, "checks": checks,
            "timed_steps_per_round": counts, "matmul_shapes": shapes, "rounds": rounds,
            "compiler_options": {n: COMPILER_OPTIONS.get(n, {}) for n in VARIANTS}}


def analyse(result: dict) -> dict:
    rounds = result["rounds"]
    full_flops = result["flops"][BASELINE]
    variants = {}
    for name in VARIANTS:
        ms = [r["steps"][name]["median_ms"] for r in rounds]
        speedups = [r["steps"][BASELINE]["median_ms"] / r["steps"][name]["median_ms"] for r in rounds]
        flops = result["flops"][name] if name == REFERENCE else full_flops
        fractions = [flops / (r["steps"][name]["median_ms"] / 1e3) / r["matmul_peak_flops"] for r in rounds]
        variants[name] = {"median_ms": statistics.median(ms), "rounds_ms": ms,
                          "speedup_vs_shipped": statistics.median(speedups),
                          "speedup_range": [min(speedups), max(speedups)],
                          "gflops": flops / (statistics.median(ms) / 1e3) / 1e9,
                          "peak_fraction": statistics.median(fractions),
                          "peak_fraction_range": [min(fractions), max(fractions)]}
    matmuls = []
    for i, s in enumerate(result["matmul_shapes"]):
        xla = statistics.median(r["matmuls"][i]["xla_ms"] for r in rounds)
        dnnl = statistics.median(r["matmuls"][i]["onednn_sgemm_ms"] for r in rounds)
        matmuls.append({"name": s["name"], "flops": s["flops"], "xla_ms": xla, "onednn_sgemm_ms": dnnl})
        if "xla_batch_contracting_ms" in rounds[0]["matmuls"][i]:
            matmuls[-1]["xla_batch_contracting_ms"] = statistics.median(
                r["matmuls"][i]["xla_batch_contracting_ms"] for r in rounds)
    peaks = [r["matmul_peak_flops"] for r in rounds]
    return {"variants": variants, "matmuls": matmuls, "matmul_peak_flops": [min(peaks), max(peaks)],
            "matmuls_alone_ms": {"xla": sum(m["xla_ms"] for m in matmuls),
                                 "onednn_sgemm": sum(m["onednn_sgemm_ms"] for m in matmuls)},
            "adam_update_ms": statistics.median(r["adam_update_ms"] for r in rounds),
            "parts_estimate": parts_estimate(rounds, full_flops)}


def parts_estimate(rounds: list[dict], flops: float) -> dict:
    """What the measured parts add up to: each matmul at the fastest of its kernels alone, plus Adam's
    update alone, per round, and that time's FLOP rate over the round's ceiling. The rest of the step
    (loss, ReLUs, bias adds, metrics) is left out, but each part timed alone pays its own share of
    dispatch and its own cache misses: an estimate of the fastest such step, not a strict bound.
    Median over rounds [smallest-largest]."""
    ms, fractions = [], []
    for r in rounds:
        t = sum(min(v for k, v in m.items() if k.endswith("_ms")) for m in r["matmuls"]) + r["adam_update_ms"]
        ms.append(t)
        fractions.append(flops / (t / 1e3) / r["matmul_peak_flops"])
    return {"ms": statistics.median(ms), "ms_range": [min(ms), max(ms)], "peak_fraction": statistics.median(fractions),
            "peak_fraction_range": [min(fractions), max(fractions)]}


def variant_rows(analysis: dict) -> list[str]:
    rows = ["| variant | median ms/step | per round | vs shipped [range] | GFLOP/s | of the round's matmul peak [range] |",
            "|---|---|---|---|---|---|"]
    for name, v in analysis["variants"].items():
        lo, hi = v["speedup_range"]
        flo, fhi = v["peak_fraction_range"]
        label = f"{name} (reference: no Adam)" if name == REFERENCE else name
        rows.append(f"| {label} | {v['median_ms']:.2f} | {', '.join(f'{t:.2f}' for t in v['rounds_ms'])} | "
                    f"{v['speedup_vs_shipped']:.2f}x [{lo:.2f}-{hi:.2f}] | {v['gflops']:.0f} | "
                    f"{100 * v['peak_fraction']:.1f}% [{100 * flo:.1f}-{100 * fhi:.1f}] |")
    return rows


def matmul_rows(analysis: dict) -> list[str]:
    rows = ["| matmul | MFLOP | XLA ms (GFLOP/s), as shipped | XLA, jax.grad's batch-contracting dot (Eigen) | "
            "oneDNN sgemm ms (GFLOP/s) | oneDNN / XLA speed |", "|---|---|---|---|---|---|"]
    for m in analysis["matmuls"]:
        rate = lambda ms: m["flops"] / (ms / 1e3) / 1e9  # noqa: E731
        eigen = m.get("xla_batch_contracting_ms")
        rows.append(f"| {m['name']} | {m['flops'] / 1e6:.1f} | {m['xla_ms']:.3f} ({rate(m['xla_ms']):.0f}) | "
                    + (f"{eigen:.3f} ({rate(eigen):.0f}) | " if eigen else "| ")
                    + f"{m['onednn_sgemm_ms']:.3f} ({rate(m['onednn_sgemm_ms']):.0f}) | "
                    f"{m['xla_ms'] / m['onednn_sgemm_ms']:.2f}x |")
    alone = analysis["matmuls_alone_ms"]
    rows.append(f"| all {len(analysis['matmuls'])} | {sum(m['flops'] for m in analysis['matmuls']) / 1e6:.1f} | "
                f"{alone['xla']:.2f} | | {alone['onednn_sgemm']:.2f} | {alone['xla'] / alone['onednn_sgemm']:.2f}x |")
    return rows


def parts_lines(result: dict) -> list[str]:
    analysis = result["analysis"]
    f, adam, shipped = analysis["parts_estimate"], analysis["adam_update_ms"], analysis["variants"][BASELINE]
    return [f"Adam's update alone (`tx.update` and `optax.apply_updates` on the step's gradients, {ADAM_CALLS} "
            f"calls back to back): {adam:.2f} ms per call, median over rounds. Each matmul at the fastest of its "
            f"kernels alone, plus Adam's update: {f['ms']:.2f} ms a step [{f['ms_range'][0]:.2f}-"
            f"{f['ms_range'][1]:.2f}], {100 * f['peak_fraction']:.1f}% of the round's ceiling "
            f"[{100 * f['peak_fraction_range'][0]:.1f}-{100 * f['peak_fraction_range'][1]:.1f}] "
            f"({result['flops'][BASELINE] / 1e6:.1f} MFLOP a step): an estimate of how fast a step that runs "
            "these kernels one after another, as XLA:CPU runs this one's, can be. The loss, ReLUs, bias adds and "
            "metrics are left out, but each part timed alone also carries a share of JAX's dispatch (about "
            "10-20 us a call) and its own cache misses, so it is not a strict bound (shipped: "
            f"{shipped['median_ms']:.2f} ms, {100 * shipped['peak_fraction']:.1f}%"
            + ("; faster than its parts alone)." if shipped["median_ms"] < f["ms"] else ").")]


def write_plot(out: pathlib.Path, result: dict) -> str | None:
    """``out/step_time.png``: each variant's median ms per step with its per-round range, from the
    results dict (as written to results.json); its file name, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot", file=sys.stderr)
        return None
    variants = result["analysis"]["variants"]
    names = list(variants)
    ms = [variants[n]["median_ms"] for n in names]
    lo = [m - min(variants[n]["rounds_ms"]) for m, n in zip(ms, names)]
    hi = [max(variants[n]["rounds_ms"]) - m for m, n in zip(ms, names)]
    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["tab:green" if n == BASELINE else "tab:gray" if n == REFERENCE else "tab:blue" for n in names]
    bars = ax.bar(range(len(names)), ms, yerr=[lo, hi], color=colors, capsize=3)
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel("median ms per step (bars: rounds' range)")
    ax.set_title(f"MLP traced Adam step, batch {result['batch_size']}: {len(result['rounds'])} round(s)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=110)
    plt.close(fig)
    return "step_time.png"


def write_summary(path: pathlib.Path, result: dict, plot: str | None = None) -> None:
    from graphduo.timing import describe_machine

    analysis, checks = result["analysis"], result["checks"]
    best = min((v for n, v in analysis["variants"].items() if n != REFERENCE), key=lambda v: v["median_ms"])
    best_name = next(n for n, v in analysis["variants"].items() if v is best)
    lo, hi = analysis["matmul_peak_flops"]
    lines = [
        "# mlp_step: the MLP's traced training step, as shipped and as it might have been", "",
        f"Command: `{result['command']}`  ",
        f"Wall time: {result['wall_s']:.0f} s; batch {result['batch_size']}; {len(result['rounds'])} interleaved "
        f"round(s); OMP_WAIT_POLICY={result['omp_wait_policy']} for oneDNN's threads.  ",
        f"Machine: {describe_machine(result['environment'])}.  ",
        f"Matmul peak (`graphduo.timing.matmul_peak_flops`, measured in every round right before `shipped`): "
        f"{lo / 1e9:.0f}-{hi / 1e9:.0f} GFLOP/s.", "",
        "## The step", "", *variant_rows(analysis), "",
        f"Fastest full step: {best_name}, {best['median_ms']:.2f} ms ({best['speedup_vs_shipped']:.2f}x shipped). "
        f"FLOPs: {result['flops'][BASELINE] / 1e6:.1f} M per step (XLA's cost analysis of the shipped step; "
        f"gradient-only: {result['flops'][REFERENCE] / 1e6:.1f} M). Ratios: median of per-round ratios "
        "[smallest-largest]; fraction of peak: median over rounds of the step's FLOP rate over that round's "
        "ceiling.", "",
        "## Its matmuls alone", "", *matmul_rows(analysis), "",
        f"Median over rounds of ms per call. XLA: one jitted function per matmul, {MATMUL_CALLS} calls dispatched "
        "back to back (each carries a share of JAX's dispatch, about 10-20 us): a dot, or for a weight "
        "gradient as shipped `models._weight_gradient` (the copy of the input transposed and YNNPACK's dot); "
        "oneDNN: `dnnl_sgemm` called directly, with oneDNN's own threads.", "",
        "## What these parts allow", "", *parts_lines(result), "",
        "## Same function", "",
        f"Losses of the first {CHECK_STEPS} steps from the same weights on the same batches ({REFERENCE}: its "
        f"first): max relative difference from shipped {checks['max_rel_diff']:.1e} (tolerance "
        f"{checks['tolerance']:g}): {'ok' if checks['ok'] else 'MISMATCH'}.", "",
        "## Variants", "",
        "shipped: `TracedStep(make_train_step(models.mlp_apply, adam))`, its matmuls `models.matmul` (each "
        "weight gradient a YNNPACK dot of an explicit copy of the layer's input transposed); flax: `module.apply`; eigen-, "
        "xnnpack-, onednn-dots and no-param-copies: the shipped step compiled with "
        + "; ".join(f"{n}: `{json.dumps(o)}`" for n, o in COMPILER_OPTIONS.items())
        + "; one-hot-loss: the cross-entropy against `jax.nn.one_hot` labels; eigen-weight-gradients: plain "
        "`x @ w`, each weight gradient `jax.grad`'s dot contracting the batch axis, which XLA:CPU runs on Eigen "
        "(graphduo's step before `models.matmul`); onednn-sgemm: every dense "
        "layer's matmul (and both its gradients) an FFI call of oneDNN's `dnnl_sgemm` on XLA's buffers "
        f"(`graphduo.onednn.ffi_handler`); {REFERENCE}: `value_and_grad` of the loss, no update.",
    ]
    if plot:
        lines += ["", f"![median ms per step by variant]({plot})"]
    path.write_text("\n".join(lines) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _args.make_parser(
        __doc__, "Time the default MLP's traced Adam training step as graphduo ships it against variants "
                 "that compute the same function (XLA's dot libraries and options, another loss "
                 "formulation, oneDNN's GEMM through JAX's FFI), each of its matmuls alone, and the "
                 "matmul ceiling, interleaved in one process; check all reach the same losses.")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32, 1 round, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_args.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_args.positive_int, default=None,
                        help="batch size (default 256; --quick: 32)")
    parser.add_argument("--rounds", type=_args.positive_int, default=None,
                        help="interleaved rounds (default 5; --quick: 1)")
    parser.add_argument("--budget", type=_args.positive_float, default=None,
                        help="seconds of timed steps per variant per round (default 0.8; --quick: 0.1)")
    parser.add_argument("--omp-wait-policy", choices=OMP_WAIT_POLICIES, default="passive",
                        help="what oneDNN's OpenMP threads do between GEMMs (OMP_WAIT_POLICY, set before "
                             "oneDNN loads): passive (default) sleeps, active spins")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, quick, full in (("batch_size", 32, 256), ("rounds", 1, 5), ("budget", 0.1, 0.8)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.out = _args.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read once, when oneDNN's OpenMP runtime loads
    from graphduo import onednn, runtime

    os.environ["XLA_FLAGS"], _ = runtime.apply_cpu_settings()  # as the CLI, before any JAX computation
    reason = onednn.available()
    if reason is not None:
        print(f"mlp_step.py: error: oneDNN is needed for the onednn-sgemm variant and the matmuls alone: {reason}",
              file=sys.stderr)
        raise SystemExit(2)
    from graphduo import timing

    command, t0 = timing.command_line(argv), time.perf_counter()
    result = {"command": command, "omp_wait_policy": args.omp_wait_policy, "environment": timing.environment(),
              **measure(args)}
    result["analysis"] = analyse(result)
    result["wall_s"] = time.perf_counter() - t0
    print("\n".join(variant_rows(result["analysis"])))
    print("\n".join(matmul_rows(result["analysis"])))
    print("\n".join(parts_lines(result)))
    checks = result["checks"]
    print(f"loss check: max relative difference {checks['max_rel_diff']:.1e} ({'ok' if checks['ok'] else 'MISMATCH'})")
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot = write_plot(args.out, result)
    write_summary(args.out / "SUMMARY.md", result, plot)
    print(f"wall time {result['wall_s']:.0f} s; wrote {args.out / 'results.json'}, SUMMARY.md"
          + (f" and {plot}" if plot else ""), file=sys.stderr)
    if not checks["ok"]:
        print(f"mlp_step.py: error: the variants' losses differ by up to {checks['max_rel_diff']:.1e} relative "
              f"(tolerance {checks['tolerance']:g}): they do not compute the same function", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
