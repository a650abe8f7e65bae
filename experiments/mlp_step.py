"""The MLP step on XLA:CPU: what its time is made of, and what else was tried to make it faster.

The record behind the MLP's speed goals (experiments/RESULTS.md, "The MLP step"), kept reproducible.
It times graphduo's traced Adam training step of the default MLP (784-512-512-10 on 28x28x1 inputs,
10 classes) as shipped against variants that compute the same function, all in one process, from
the same weights on the same batch, interleaved over rounds:

* ``shipped``:         ``TracedStep(make_train_step(mlp_apply, adam))``, as graphduo runs it: plain
                       ``x @ w + b`` layers, so each weight gradient is ``jax.grad``'s own dot, which
                       contracts the batch axis (the first of both operands).
* ``flax``:            the same step around Flax's ``module.apply``.
* ``transposed-weight-gradients``: each weight gradient a dot of an explicit copy of the layer's
                       input transposed (``transposed_matmul``): a dot that contracts its left operand's
                       last axis, which XLA:CPU hands to YNNPACK where it runs the batch-contracting
                       one on Eigen (seen in jaxlib 0.10.2 and 0.12.0.1). graphduo's step used it
                       while its models were tuned to jaxlib 0.10.
* ``eigen-dots``:      every dot on Eigen (no dot left to YNNPACK).
* ``xnnpack-dots``:    every dot on XNNPACK.
* ``onednn-dots``:     every dot on XLA's own oneDNN fusions (``xla_cpu_use_onednn``).
* ``no-param-copies``: XLA's copy insertion with region analysis, which drops the copies it makes of
                       parameters before it updates them in place.
* ``one-hot-loss``:    the cross-entropy against one-hot labels (no gather forward, no scatter
                       backward; the same values for finite logits).
* ``onednn-sgemm``:    every matmul of the dense layers (forward, input and weight gradients) a call
                       of oneDNN's ``dnnl_sgemm`` through the FFI plumbing of ``experiments/_onednn.py``
                       (``_onednn.ffi_handler``), the way ``cnn_step.py``'s convolutions reach oneDNN:
                       the GEMM reads and writes XLA's buffers, on oneDNN's OpenMP threads.
and one reference that computes less:
* ``gradient-only``:   the loss and its gradient without the Adam update: what Adam costs.

The XLA options go to this variant's compile alone (``Lowered.compile(compiler_options=...)``), so
every variant runs in the same process. They are XLA:CPU's own and come and go with jaxlib releases:
a jaxlib that does not know one refuses the compile, and the variant is recorded as not available in
that jaxlib, with one line, while the others are measured. So is ``onednn-sgemm`` where oneDNN cannot
load (it needs the ``onednn`` extra, on Linux x86-64): results.json and SUMMARY.md say why.

In every round, right before ``shipped``, the matmul ceiling (``_common.matmul_peak_flops``) is
measured; a variant's fraction of peak is the median over rounds of its FLOP rate over that round's
ceiling (FLOPs: XLA's cost analysis of the shipped step, which every full variant computes; of its
own step for ``gradient-only``). Each of the step's eight matmuls is also timed alone, as XLA
compiles it (20 calls dispatched back to back, so each carries a share of JAX's dispatch; a weight
gradient both as shipped and as ``transposed-weight-gradients`` computes it) and, where oneDNN
loads, as a direct ``dnnl_sgemm`` call (ctypes, the GIL released): the kernels' own rates beside the
step's. And Adam's update alone (the step's ``tx.update`` and ``optax.apply_updates`` on its
gradients, 20 calls back to back), which with each matmul at the fastest of its kernels estimates
how fast a step that runs these kernels one after another can be: its time, and its FLOP rate as a
fraction of the ceiling (the rest of the step, loss, ReLUs, bias adds and metrics, is left out; each
part timed alone pays its own dispatch and cache misses, so not a strict bound).

Same function: every variant trains 3 steps from the same weights on the same 3 batches; its losses
must match shipped's (relative 1e-4: float32 summation order; a wrong formulation is off by far more
from the first step); ``gradient-only``'s first loss, the only one it computes from the same weights.

oneDNN's OpenMP threads: ``OMP_WAIT_POLICY`` is read once, when oneDNN's OpenMP runtime loads, so
the script sets it first thing: ``passive`` (default) lets the threads sleep as soon as a GEMM ends
instead of spinning on the cores XLA's next kernels need; ``active`` keeps them spinning. The process
runs with graphduo's CLI defaults otherwise (``_common.setup``), recorded in results.json.

Run:
    python experiments/mlp_step.py            # batch 256, 5 rounds
    python experiments/mlp_step.py --quick    # smoke test: batch 32, 1 round
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

import jax
import jax.numpy as jnp
import numpy as np

import _common  # experiments/_common.py
import _onednn  # experiments/_onednn.py: loads oneDNN only when first asked to
from _common import INPUT_SHAPE, LR, NUM_CLASSES

DEFAULT_OUT = _common.default_out("mlp_step")
CHECK_STEPS = 3
LOSS_RTOL = 1e-4
PEAK_REPEATS = 5
MATMUL_CALLS = 20
ADAM_CALLS = 20
OMP_WAIT_POLICIES = ("passive", "active")
BASELINE = "shipped"
REFERENCE = "gradient-only"  # computes less than a full step: no ratio against the goals
TRANSPOSED = "transposed-weight-gradients"
SGEMM = "onednn-sgemm"
_NO_YNN_DOTS = {"xla_cpu_experimental_ynn_fusion_type": ""}
COMPILER_OPTIONS = {
    "eigen-dots": _NO_YNN_DOTS,
    "xnnpack-dots": {**_NO_YNN_DOTS, "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "onednn-dots": {**_NO_YNN_DOTS, "xla_cpu_use_onednn": True,
                    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    "no-param-copies": {"xla_cpu_copy_insertion_use_region_analysis": True},
}
VARIANTS = ("shipped", "flax", TRANSPOSED, "eigen-dots", "xnnpack-dots", "onednn-dots", "no-param-copies",
            "one-hot-loss", SGEMM, REFERENCE)


# ---------------------------------------------------------------------------------------------
# The weight gradient from a transposed copy (transposed-weight-gradients).


@jax.jit
def transposed_weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x.T @ g`` from an explicit copy of ``x.T``: ``lax.optimization_barrier`` keeps XLA from
    folding the transpose back into the dot, which leaves a dot of the canonical form (left operand
    contracted on its last axis) where ``jax.grad``'s contracts the batch axis of both operands; the
    two forms can go to different libraries on XLA:CPU. One ``jax.jit`` function: in eager mode one
    dispatched op, as the dot it replaces."""
    return jax.lax.optimization_barrier(x.T) @ g


@jax.custom_vjp
def transposed_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a batch ``x`` (N, K) and a weight ``w`` (K, M), the same values and gradients,
    its weight gradient ``transposed_weight_gradient``. The input gradient is ``jax.grad``'s own dot,
    and either gradient is computed only when asked for (``symbolic_zeros``: no input gradient for a
    batch of data, as with plain ``x @ w``)."""
    return x @ w


def _transposed_matmul_fwd(x, w):
    # x and w are CustomVJPPrimal: keep only what the gradients that will be asked for need
    return x.value @ w.value, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _transposed_matmul_bwd(res, g):
    x, w = res
    dx = None if w is None else jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    return dx, None if x is None else transposed_weight_gradient(x, g)


transposed_matmul.defvjp(_transposed_matmul_fwd, _transposed_matmul_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------
# oneDNN's sgemm as an XLA FFI call, with its gradients (onednn-sgemm).

_SGEMM_TARGETS = {"nn": (b"N", b"N"), "tn": (b"T", b"N"), "nt": (b"N", b"T")}  # op(a) @ op(b), row-major
_sgemm_handlers: dict = {}  # kept alive: XLA holds only their addresses


def _dnnl_sgemm():
    """libdnnl's ``dnnl_sgemm`` with its argument types (``_onednn.OneDNNUnavailable`` if it cannot load)."""
    sgemm = _onednn.library().dnnl_sgemm
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    sgemm.argtypes = [ctypes.c_char, ctypes.c_char, i64, i64, i64, f32, ptr, i64, ptr, i64, f32, ptr, i64]
    sgemm.restype = ctypes.c_int
    return sgemm


def _register_sgemm() -> None:
    if _sgemm_handlers:
        return
    sgemm = _dnnl_sgemm()

    def gemm(trans_a: bytes, trans_b: bytes):
        def run(frame):
            (a, b), (out,) = _onednn.frame_buffers(frame)
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
        handler = _onednn.ffi_handler(gemm(ta, tb), f"oneDNN sgemm ({name})")
        _onednn.register_handler(f"mlp_step_sgemm_{name}", handler)
        _sgemm_handlers[name] = handler


def _sgemm(kind: str, a, b, shape):
    return jax.ffi.ffi_call(f"mlp_step_sgemm_{kind}", jax.ShapeDtypeStruct(shape, jnp.float32))(a, b)


def sgemm_matmul():
    """``matmul(x, w) = x @ w`` on oneDNN's sgemm, its gradients too (``g @ w.T``, ``x.T @ g``)."""
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
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * one_hot, axis=-1))


def step_function(name: str, model, tx):
    """The pure ``step(state, batch) -> (state, metrics)`` of variant ``name``."""
    from graphduo import step as graphduo_step

    if name == "flax":
        return graphduo_step.make_train_step(lambda p, x: model.module.apply({"params": p}, x), tx)
    if name == SGEMM:
        return graphduo_step.make_train_step(_mlp_apply_with(sgemm_matmul()), tx)
    if name == TRANSPOSED:
        return graphduo_step.make_train_step(_mlp_apply_with(transposed_matmul), tx)
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


def _unknown_option(err: Exception, options: dict) -> bool:
    """Whether a compile failed because this jaxlib does not know one of ``options``: it then
    refuses the compile (``No such compile option``) rather than ignore the option."""
    text = str(err)
    return "compile option" in text.lower() or any(name in text for name in options)


def build_steps(model, tx, state, batch, variants=VARIANTS) -> tuple[dict, dict[str, str]]:
    """Every variant compiled once for ``(state, batch)``: ``{name: (callable, XLA's FLOPs per call)}``,
    and ``{name: one line}`` for the variants this process cannot run (a compiler option this jaxlib
    does not know, oneDNN that does not load)."""
    from graphduo.runtime import jaxlib_version
    from graphduo.traced import TracedStep

    steps, unavailable = {}, {}
    for name in variants:
        if name == SGEMM and (reason := _onednn.available()) is not None:
            unavailable[name] = f"oneDNN unavailable: {reason}"
            continue
        fn = step_function(name, model, tx)
        if name == BASELINE:
            traced = TracedStep(fn, donate_argnums=0)
            steps[name] = (traced, traced.stages(state, batch).cost_analysis()["flops"])
            continue
        options = COMPILER_OPTIONS.get(name)
        try:
            compiled = jax.jit(fn, donate_argnums=0).lower(state, batch).compile(options)
        except jax.errors.JaxRuntimeError as err:
            if not options or not _unknown_option(err, options):
                raise
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            unavailable[name] = f"not available in jaxlib {jaxlib_version()}: {first}"
            continue
        cost = compiled.cost_analysis()
        steps[name] = (compiled, float((cost[0] if isinstance(cost, list) else cost)["flops"]))
    return steps, unavailable


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
    import optax

    from graphduo.step import TrainState

    def update(state, grads):
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, state.rng)

    return jax.jit(update, donate_argnums=0)


def time_adam(update, state, grads, calls: int = ADAM_CALLS):
    """``(state, ms per call)``: ``calls`` updates dispatched back to back, then one wait (the way the
    matmuls alone are timed: each call carries a share of JAX's dispatch)."""
    state = jax.block_until_ready(update(state, grads))
    t0 = time.perf_counter()
    for _ in range(calls):
        state = update(state, grads)
    jax.block_until_ready(state)
    return state, (time.perf_counter() - t0) / calls * 1e3


def time_matmuls(shapes, calls: int = MATMUL_CALLS, *, sgemm: bool = True) -> list[dict]:
    """Each matmul alone: XLA (``calls`` jitted calls back to back, then one wait) and, with
    ``sgemm``, a direct ``dnnl_sgemm`` call (timed ``calls`` times in a row); ms per call."""
    dnnl_sgemm = _dnnl_sgemm() if sgemm else None
    rng = np.random.default_rng(0)
    out = []
    for s in shapes:
        a = rng.standard_normal(s["a"], dtype=np.float32)
        b = rng.standard_normal(s["b"], dtype=np.float32)
        kind = s["kind"]
        xa, xb = jax.device_put(a), jax.device_put(b)
        row = {"name": s["name"], "xla_ms": _time_xla(_plain_dot(kind), xa, xb, calls)}  # as shipped
        if kind == "tn":  # and as transposed-weight-gradients computes it
            row["xla_transposed_ms"] = _time_xla(transposed_weight_gradient, xa, xb, calls)
        if dnnl_sgemm is not None:
            ta, tb = _SGEMM_TARGETS[kind]
            m = a.shape[1] if kind == "tn" else a.shape[0]
            k = a.shape[0] if kind == "tn" else a.shape[1]
            n = b.shape[0] if kind == "nt" else b.shape[1]
            c = np.empty((m, n), np.float32)
            args = (ta, tb, m, n, k, 1.0, a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, n)
            dnnl_sgemm(*args)
            t0 = time.perf_counter()
            for _ in range(calls):
                dnnl_sgemm(*args)
            row["onednn_sgemm_ms"] = (time.perf_counter() - t0) / calls * 1e3
        out.append(row)
    return out


@functools.cache
def _plain_dot(kind: str):
    """``op(a) @ op(b)`` for a ``_SGEMM_TARGETS`` kind, jitted once per kind (not once per round)."""
    return jax.jit(lambda x, y: (x.T if kind == "tn" else x) @ (y.T if kind == "nt" else y))


def _time_xla(fn, a, b, calls: int) -> float:
    """ms per call of a jitted ``fn(a, b)``: ``calls`` calls back to back, then one wait."""
    jax.block_until_ready(fn(a, b))
    t0 = time.perf_counter()
    jax.block_until_ready([fn(a, b) for _ in range(calls)])
    return (time.perf_counter() - t0) / calls * 1e3


# ---------------------------------------------------------------------------------------------
# Measure, analyse, report.

def measure(args) -> dict:
    from graphduo import timing
    from graphduo.models import build_model
    from graphduo.step import create_train_state, make_optimizer

    model = build_model("mlp", INPUT_SHAPE, NUM_CLASSES)
    tx = make_optimizer("adam", LR)
    rng = np.random.default_rng(0)
    batches = [jax.device_put(_common.host_batch(args.batch_size, rng=rng)) for _ in range(CHECK_STEPS)]

    def fresh_state():
        return create_train_state(model, tx, jax.random.key(0))

    steps, unavailable = build_steps(model, tx, fresh_state(), batches[0])
    for name, reason in unavailable.items():
        print(f"[mlp_step] {name}: {reason}", file=sys.stderr)
    checks = check_losses(steps, fresh_state, batches)
    print(f"[mlp_step] loss check over {CHECK_STEPS} steps: max rel diff {checks['max_rel_diff']:.1e} "
          f"({'ok' if checks['ok'] else 'MISMATCH'})", file=sys.stderr)
    names = [name for name in VARIANTS if name in steps]
    states = {name: fresh_state() for name in names}
    counts = {}
    for name, (step, _) in steps.items():  # probe: a rough step time to size the measurements
        states[name], _, t = timing.time_steps(step, states[name], [batches[0]] * 5, warmup=1)
        counts[name] = _common.steps_for(t.median_ms / 1e3, args.budget, 5, 300)
    shapes = matmul_shapes(states[BASELINE].params, args.batch_size)
    update = adam_update(tx)
    adam_state = fresh_state()
    grads = steps[REFERENCE][0](fresh_state(), batches[0])[1]["grads"]
    rounds = []
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        rnd = {"steps": {}}
        for name in order:
            if name == BASELINE:
                rnd["matmul_peak_flops"] = _common.matmul_peak_flops(repeats=PEAK_REPEATS)
            step = steps[name][0]
            states[name], _, t = timing.time_steps(step, states[name], [batches[0]] * (3 + counts[name]), warmup=2)
            rnd["steps"][name] = {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms}
        rnd["matmuls"] = time_matmuls(shapes, sgemm=SGEMM in steps)
        adam_state, rnd["adam_update_ms"] = time_adam(update, adam_state, grads)
        rounds.append(rnd)
        print(f"[mlp_step] round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n} {rnd['steps'][n]['median_ms']:.2f}" for n in names) + f" ms; Adam alone "
            f"{rnd['adam_update_ms']:.2f} ms; matmul {rnd['matmul_peak_flops'] / 1e9:.0f} GFLOP/s", file=sys.stderr)
    return {"batch_size": args.batch_size, "flops": {n: f for n, (_, f) in steps.items()}, "checks": checks,
            "unavailable": unavailable, "timed_steps_per_round": counts, "matmul_shapes": shapes, "rounds": rounds,
            "compiler_options": {n: COMPILER_OPTIONS.get(n, {}) for n in VARIANTS}}


def analyse(result: dict) -> dict:
    rounds = result["rounds"]
    full_flops = result["flops"][BASELINE]
    variants = {}
    for name in (n for n in VARIANTS if n in rounds[0]["steps"]):
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
        # every kernel this round timed for this matmul: XLA's as shipped, the transposed copy's, oneDNN's
        kernels = [k for k in rounds[0]["matmuls"][i] if k.endswith("_ms")]
        matmuls.append({"name": s["name"], "flops": s["flops"],
                        **{k: statistics.median(r["matmuls"][i][k] for r in rounds) for k in kernels}})
    peaks = [r["matmul_peak_flops"] for r in rounds]
    sgemm = all("onednn_sgemm_ms" in m for m in matmuls)
    return {"variants": variants, "matmuls": matmuls, "matmul_peak_flops": [min(peaks), max(peaks)],
            "matmuls_alone_ms": {"xla": sum(m["xla_ms"] for m in matmuls),
                                 "onednn_sgemm": sum(m["onednn_sgemm_ms"] for m in matmuls) if sgemm else None},
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
    rows = ["| matmul | MFLOP | XLA ms (GFLOP/s), as shipped | XLA, the transposed copy's dot | "
            "oneDNN sgemm ms (GFLOP/s) | oneDNN / XLA speed |", "|---|---|---|---|---|---|"]

    def cell(m, key):
        ms = m.get(key)
        return "n/a" if ms is None else f"{ms:.3f} ({m['flops'] / (ms / 1e3) / 1e9:.0f})"

    for m in analysis["matmuls"]:
        speed = f"{m['xla_ms'] / m['onednn_sgemm_ms']:.2f}x" if "onednn_sgemm_ms" in m else "n/a"
        transposed = cell(m, "xla_transposed_ms") if "xla_transposed_ms" in m else ""
        rows.append(f"| {m['name']} | {m['flops'] / 1e6:.1f} | {cell(m, 'xla_ms')} | {transposed} | "
                    f"{cell(m, 'onednn_sgemm_ms')} | {speed} |")
    alone = analysis["matmuls_alone_ms"]
    dnnl = alone["onednn_sgemm"]
    rows.append(f"| all {len(analysis['matmuls'])} | {sum(m['flops'] for m in analysis['matmuls']) / 1e6:.1f} | "
                f"{alone['xla']:.2f} | | " + (f"{dnnl:.2f} | {alone['xla'] / dnnl:.2f}x |" if dnnl else "n/a | n/a |"))
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
            "metrics are left out, but each part timed alone also carries a share of JAX's dispatch and its "
            "own cache misses, so it is not a strict bound (shipped: "
            f"{shipped['median_ms']:.2f} ms, {100 * shipped['peak_fraction']:.1f}%"
            + ("; faster than its parts alone)." if shipped["median_ms"] < f["ms"] else ").")]


def write_plot(out: pathlib.Path, result: dict) -> str | None:
    """``out/step_time.png``: each variant's median ms per step with its per-round range, from the
    results dict (as written to results.json); its file name, or None without matplotlib."""
    plt = _common.pyplot()
    if plt is None:
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


def write_summary(out, result: dict, plot: str | None = None) -> None:
    analysis, checks = result["analysis"], result["checks"]
    best = min((v for n, v in analysis["variants"].items() if n != REFERENCE), key=lambda v: v["median_ms"])
    best_name = next(n for n, v in analysis["variants"].items() if v is best)
    lo, hi = analysis["matmul_peak_flops"]
    lines = [
        "# mlp_step: the MLP's traced training step, as shipped and as it might have been", "",
        f"Command: `{result['command']}`  ",
        f"Wall time: {result['wall_s']:.0f} s; batch {result['batch_size']}; {len(result['rounds'])} interleaved "
        f"round(s); OMP_WAIT_POLICY={result['omp_wait_policy']} for oneDNN's threads.  ",
        f"Machine: {_common.describe_machine(result['environment'])}.  ",
        f"Matmul peak (`_common.matmul_peak_flops`, measured in every round right before `shipped`): "
        f"{lo / 1e9:.0f}-{hi / 1e9:.0f} GFLOP/s.", "",
        "## The step", "", *variant_rows(analysis), "",
        f"Fastest full step: {best_name}, {best['median_ms']:.2f} ms ({best['speedup_vs_shipped']:.2f}x shipped). "
        f"FLOPs: {result['flops'][BASELINE] / 1e6:.1f} M per step (XLA's cost analysis of the shipped step; "
        f"gradient-only: {result['flops'][REFERENCE] / 1e6:.1f} M). Ratios: median of per-round ratios "
        "[smallest-largest]; fraction of peak: median over rounds of the step's FLOP rate over that round's "
        "ceiling.", "",
        "## Its matmuls alone", "", *matmul_rows(analysis), "",
        f"Median over rounds of ms per call. XLA: one jitted function per matmul, {MATMUL_CALLS} calls dispatched "
        "back to back (each carries a share of JAX's dispatch): a dot as the shipped step has it (a weight "
        "gradient `jax.grad`'s, contracting the batch axis), and for a weight gradient also "
        "`transposed_weight_gradient` (the copy of the input transposed and its dot); oneDNN: `dnnl_sgemm` "
        "called directly, with oneDNN's own threads (n/a: oneDNN unavailable).", "",
        "## What these parts allow", "", *parts_lines(result), "",
        "## Same function", "",
        f"Losses of the first {CHECK_STEPS} steps from the same weights on the same batches ({REFERENCE}: its "
        f"first): max relative difference from shipped {checks['max_rel_diff']:.1e} (tolerance "
        f"{checks['tolerance']:g}): {'ok' if checks['ok'] else 'MISMATCH'}.", "",
        "## Variants", "",
        "shipped: `TracedStep(make_train_step(models.mlp_apply, adam))`, plain `x @ w + b` layers (each "
        "weight gradient `jax.grad`'s dot, contracting the batch axis); flax: `module.apply`; "
        f"{TRANSPOSED}: each weight gradient a dot of an explicit copy of the layer's input transposed "
        "(`transposed_matmul`); eigen-, xnnpack-, onednn-dots and no-param-copies: the shipped step compiled "
        "with " + "; ".join(f"{n}: `{json.dumps(o)}`" for n, o in COMPILER_OPTIONS.items())
        + "; one-hot-loss: the cross-entropy against `jax.nn.one_hot` labels; onednn-sgemm: every dense "
        "layer's matmul (and both its gradients) an FFI call of oneDNN's `dnnl_sgemm` on XLA's buffers "
        f"(`_onednn.ffi_handler`); {REFERENCE}: `value_and_grad` of the loss, no update.",
    ]
    unavailable = result.get("unavailable", {})
    if unavailable:
        lines += ["", "Not measured here: " + "; ".join(f"{n}, {why}" for n, why in unavailable.items()) + "."]
    if plot:
        lines += ["", f"![median ms per step by variant]({plot})"]
    _common.write_summary(out, lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time the default MLP's traced Adam training step as graphduo ships it against variants "
                 "that compute the same function (XLA's dot libraries and options, another loss "
                 "formulation, oneDNN's GEMM through JAX's FFI), each of its matmuls alone, and the "
                 "matmul ceiling, interleaved in one process; check all reach the same losses.")
    parser.add_argument("--quick", action="store_true", help="smoke test: batch 32, 1 round, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    parser.add_argument("--batch-size", type=_common.positive_int, default=None,
                        help="batch size (default 256; --quick: 32)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help="interleaved rounds (default 5; --quick: 1)")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
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
    args.out = _common.check_out(parser, args.out)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read once, when oneDNN's OpenMP runtime loads
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    command, t0 = _common.command_line(argv), time.perf_counter()
    result = {"command": command, "omp_wait_policy": args.omp_wait_policy,
              "environment": _common.environment(settings), **measure(args)}
    result["analysis"] = analyse(result)
    result["wall_s"] = time.perf_counter() - t0
    print("\n".join(variant_rows(result["analysis"])))
    print("\n".join(matmul_rows(result["analysis"])))
    print("\n".join(parts_lines(result)))
    checks = result["checks"]
    print(f"loss check: max relative difference {checks['max_rel_diff']:.1e} ({'ok' if checks['ok'] else 'MISMATCH'})")
    _common.write_results(args.out, result)
    plot = write_plot(args.out, result)
    write_summary(args.out, result, plot)
    print(f"wall time {result['wall_s']:.0f} s; wrote {args.out / 'results.json'}, SUMMARY.md"
          + (f" and {plot}" if plot else ""), file=sys.stderr)
    if not checks["ok"]:
        print(f"mlp_step.py: error: the variants' losses differ by up to {checks['max_rel_diff']:.1e} relative "
              f"(tolerance {checks['tolerance']:g}): they do not compute the same function", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
