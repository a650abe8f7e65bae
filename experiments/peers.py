"""Peers: graphduo's training step and loop against PyTorch's and Keras's, each at its best.

What it measures, for the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128) at
batch 32 and 256, 28x28x1, Adam lr 1e-3 (b1 0.9, b2 0.999, eps 1e-8 everywhere), from the same
weights (graphduo's, copied into each framework):

Steps, each on a batch already on the device, every call run to completion:

* PyTorch (``experiments/_torch_steps.py``): ``torch-eager`` (the default Adam: a per-parameter
  loop on the CPU), ``torch-eager-fused`` (``Adam(fused=True)``, one kernel), ``torch-compile``
  (the whole step under ``torch.compile`` with compiled autograd; the graph breaks left are
  reported); on CUDA also ``torch-compile-reduce-overhead`` (CUDA graphs) and
  ``torch-compile-max-autotune``. PyTorch's fastest variant is named per workload, and every
  ratio of the goals is against that one.
* graphduo: ``graphduo-eager`` (op by op), ``graphduo-eager-fused`` (its optimizer update one
  compiled op, ``--eager-update fused``), ``graphduo-traced`` (``TracedStep``, one step per
  call), and K=16 steps per call on a training split held on the device
  (``--steps-per-call 16``): ``graphduo-traced-k16`` as a loop (``lax.scan``) and
  ``graphduo-traced-k16-unrolled`` (``--unroll 16``), timed per call and reported per step.

Loops, each a whole training run on the same synthetic 28x28x1 data, steady state (Keras's and
graphduo's first call, which compiles, left out):

* ``graphduo train`` at ``--steps-per-call`` 1 and 16 (16 as a loop and unrolled);
* Keras 3 on the same JAX, where it is installed (``experiments/_keras_steps.py``): ``Model.fit``
  with ``run_eagerly=True``, ``jit_compile=True``, and ``steps_per_execution=16``.

Same function: every step variant trains 5 steps from the same weights on the same batches and
must reach the same losses (graphduo's K=16 variants: their 16 losses against ``graphduo-traced``
on the same 16 batches); Keras's ``train_on_batch`` is checked the same way.

Also: the traced step's achieved FLOP/s against the matmul ceiling measured at the start of the same
round (``_common.matmul_peak_flops``), PyTorch's rate on the same product measured right after it,
and at the smallest batch where graphduo's eager step spends its time (ops by phase)
beside PyTorch eager's forward, backward and optimizer step.

How: the variants are interleaved over rounds; a figure is the median over rounds of the per-round
medians, p10-p90 over every timed step, a ratio the median of per-round ratios. torch runs with
``torch.set_num_threads(os.cpu_count())`` on the hardware JAX runs on: CUDA when JAX's backend is a
GPU, with both sides' float32 matmuls and convolutions in TF32 (JAX's default there).

Needs PyTorch (``pip install -c constraints.txt ".[peers]"``); without it the script says so and
exits with status 2. Keras is optional: without it the loops section has graphduo's figures only.
When the variants' losses disagree, it still writes its results and then exits with status 1.

Run:
    python experiments/peers.py            # both models, batch 32 and 256, 3 rounds
    python experiments/peers.py --quick    # smoke test: the MLP at batch 32, 1 round
    python experiments/peers.py --out DIR  # results elsewhere

Writes ``DIR/results.json`` (every per-round time, check, ratio and goal, the environment with
torch's and Keras's versions and settings), ``DIR/SUMMARY.md`` and ``DIR/step_time.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import os
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

import _common  # experiments/_common.py
import _keras_steps  # experiments/_keras_steps.py
import _torch_steps  # experiments/_torch_steps.py
from _common import INPUT_SHAPE, LR, NUM_CLASSES
from _torch_steps import INSTALL_TORCH
from graphduo import parallel, timing
from graphduo.config import Config
from graphduo.data import epoch_permutation
from graphduo.graphs import inspect_eager
from graphduo.models import build_model
from graphduo.step import create_train_state, make_optimizer
from graphduo.train import train_and_evaluate

DEFAULT_OUT = _common.default_out("peers")
K = 16  # graphduo's steps per call in the compiled-loop variants, Keras's steps_per_execution
GRAPHDUO_STEPS = ("graphduo-eager", "graphduo-eager-fused", "graphduo-traced", "graphduo-traced-k16",
                  "graphduo-traced-k16-unrolled")
LOOPS = ("graphduo-train-k1", "graphduo-train-k16", "graphduo-train-k16-unrolled", *_keras_steps.VARIANTS)
PEAK_REPEATS = 5  # matmuls per round for the ceiling
CHECK_STEPS = 5
# Loss agreement after CHECK_STEPS steps from the same weights on the same batches. Frameworks sum
# in different orders (and pick different matmul/conv kernels), so float32 results differ by
# rounding (~1e-6 relative) at step 0. Adam then normalises each gradient entry by its own
# magnitude: an entry whose gradient is near zero can get a visibly different update (up to ~lr per
# step) from a rounding-level difference. Over five steps this moves the loss by ~1e-5..1e-4, far
# below the ~1e-2 per-step change of the loss itself, so 1e-3 relative separates "same computation"
# from a wrong weight layout or optimizer (which give differences of 1e-1 or more from the first step).
LOSS_RTOL = 1e-3
# On an NVIDIA GPU both sides multiply float32 matrices in TF32 (JAX's default there; torch is set to
# match, see ``torch_device``): a relative error ~1000x float32's per product, so the five-step loss
# differences grow to ~1e-3: 1e-2 still sits well under a layout or optimizer bug's 1e-1.
TF32_LOSS_RTOL = 1e-2
# graphduo's K=16 variants against graphduo-traced on the same 16 batches: the same ops in a loop or
# unrolled, compiled separately: rounding only (measured 0 on the CPU).
K_LOSS_RTOL = 1e-5


def torch_missing():
    """Exit with status 2 and a one-line message saying how to install PyTorch."""
    print(f"experiments/peers.py needs PyTorch, which is not installed: {INSTALL_TORCH}", file=sys.stderr)
    sys.exit(2)


def torch_device(torch, backend: str) -> tuple[str, str]:
    """Where torch runs, beside JAX's ``backend``, and a line saying how its float32 matmuls run.

    The comparison only means something on the same hardware: torch on CUDA when JAX runs on a GPU,
    else on the CPU. On CUDA, torch is set to TF32 matmuls and convolutions
    (``torch.set_float32_matmul_precision("high")``; cuDNN's convolutions already default to TF32),
    which is what JAX's default precision gives float32 matmuls and convolutions on NVIDIA GPUs since
    Ampere: the same arithmetic on both sides. Raises ``SystemExit(2)`` with one line when JAX runs on
    a GPU and this torch has no CUDA."""
    if backend == "cpu":
        return "cpu", "float32 matmuls in float32 on both sides"
    if backend != "gpu":
        print(f"experiments/peers.py: error: JAX runs on {backend}, where peers has no PyTorch counterpart "
              "(it compares on a CPU or an NVIDIA GPU): run on the CPU with JAX_PLATFORMS=cpu", file=sys.stderr)
        raise SystemExit(2)
    if not torch.cuda.is_available():
        print(f"experiments/peers.py: error: JAX runs on gpu but this PyTorch ({torch.__version__}) has no "
              "CUDA device, and timing one against the other's CPU compares hardware, not frameworks: install a "
              "CUDA build of PyTorch, or run on the CPU with JAX_PLATFORMS=cpu", file=sys.stderr)
        raise SystemExit(2)
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return "cuda", ("float32 matmuls and convolutions in TF32 on both sides (JAX's default on this GPU; "
                    "torch.set_float32_matmul_precision('high'), cudnn.allow_tf32)")


def loss_rtol(device: str) -> float:
    """The loss check's relative tolerance for torch on ``device`` (see ``LOSS_RTOL``)."""
    return LOSS_RTOL if device == "cpu" else TF32_LOSS_RTOL


def torch_matmul_flops(torch, device: str, n: int, repeats: int = PEAK_REPEATS) -> float:
    """PyTorch's own matmul rate on ``matmul_peak_flops``'s product: beside JAX's, how much of a ratio
    between the frameworks is their GEMM libraries on this machine."""
    sync = _torch_steps.sync_fn(torch, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    times = _common.time_call(lambda: (torch.mm(a, a), sync()), repeats=repeats)
    return 2 * n**3 / (times.median_ms / 1e3)


# --------------------------------------------------------------------------------------------
# The step variants.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    step: Callable[[Any, Any], tuple[Any, Any]]  # (state, inputs) -> (state, metrics)
    fresh_state: Callable[[], Any]
    inputs: Any  # what a timed call takes
    steps_per_call: int = 1
    graph_breaks: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Workload:
    model_name: str
    batch_size: int
    params: Any
    host_batches: list[dict[str, np.ndarray]]  # K batches: the checks' and the timed calls'
    split: tuple[Any, Any, Any]  # (images, labels, perm) on the device, whose first K batches those are


def make_workload(model_name: str, batch_size: int) -> Workload:
    """K batches of digit-like synthetic images (exact zeros, pooling ties), as rows of one split
    whose epoch permutation orders them: the host's batch i is the device's step i."""
    model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
    params = create_train_state(model, make_optimizer("adam", LR), jax.random.key(0)).params
    rng = np.random.default_rng(0)
    n = K * batch_size
    u = rng.random((n, *INPUT_SHAPE), dtype=np.float32)
    images, labels = np.where(u < 0.6, 0.0, u).astype(np.float32), rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    perm = epoch_permutation(n, seed=0, epoch=0)
    batches = [{"image": images[perm[i * batch_size:(i + 1) * batch_size]],
                "label": labels[perm[i * batch_size:(i + 1) * batch_size]]} for i in range(K)]
    return Workload(model_name, batch_size, params, batches, jax.device_put((images, labels, perm)))


def graphduo_variants(w: Workload) -> list[Variant]:
    model = build_model(w.model_name, INPUT_SHAPE, NUM_CLASSES)
    tx = make_optimizer("adam", LR)

    def fresh():
        return create_train_state(model, tx, jax.random.key(0))

    batch = jax.device_put(w.host_batches[0])
    out = []
    for name, mode, update in (("graphduo-eager", "eager", "ops"), ("graphduo-eager-fused", "eager", "fused"),
                               ("graphduo-traced", "traced", "ops")):
        step = parallel.plan(mode, model, tx, eager_update=update).train_step
        out.append(Variant(name, step, fresh, batch))
    ticks = jax.device_put(np.zeros(K, np.int32))
    for name, unroll in (("graphduo-traced-k16", 1), ("graphduo-traced-k16-unrolled", K)):
        steps = parallel.plan("traced", model, tx, steps_per_call=K, unroll=unroll,
                              gather=(w.batch_size, K)).train_steps
        out.append(Variant(name, lambda s, a, f=steps: f(s, *a), fresh, (*w.split, ticks), steps_per_call=K))
    return out


def torch_variants(torch, w: Workload, device: str) -> list[Variant]:
    batch = _torch_steps.torch_batch(torch, w.host_batches[0], w.model_name, device)
    out = []
    for variant in _torch_steps.variants(device):
        def fresh(variant=variant):
            return _torch_steps.TorchTrainer(torch, variant, w.model_name, w.params, lr=LR, device=device)

        def step(trainer, xy):
            return trainer, {"loss": trainer.step(*xy)}

        out.append(Variant(f"torch-{variant}", step, fresh, batch))
    return out


def check_losses(torch, w: Workload, variants: list[Variant], device: str, keras) -> dict[str, Any]:
    """Every variant from the same weights on the same batches: its losses against graphduo-traced's,
    and the first call of each (compiles included) timed apart."""
    losses, first_s, breaks = {}, {}, {}
    for v in variants:
        gc.collect()
        state, t0 = v.fresh_state(), time.perf_counter()
        if v.steps_per_call > 1:
            state, metrics = v.step(state, v.inputs)
            jax.block_until_ready(metrics)
            losses[v.name] = [float(x) for x in np.asarray(metrics["loss"])]
        else:
            inputs = [(_torch_steps.torch_batch(torch, b, w.model_name, device) if v.name.startswith("torch")
                       else jax.device_put(b)) for b in w.host_batches[:CHECK_STEPS]]
            values = []
            for x in inputs:
                state, metrics = v.step(state, x)
                values.append(float(metrics["loss"]))
            losses[v.name] = values
        first_s[v.name] = time.perf_counter() - t0
        if v.name.startswith("torch"):
            breaks[v.name] = state.graph_breaks
    if keras is not None:
        for name in _keras_steps.VARIANTS:
            losses[name] = _keras_steps.losses(keras, name, w.model_name, w.params, INPUT_SHAPE, LR,
                                               w.host_batches[:CHECK_STEPS])
    # graphduo-traced's first 16 losses: the reference of the K=16 variants
    ref_state = variants[[v.name for v in variants].index("graphduo-traced")].fresh_state()
    ref_step = next(v.step for v in variants if v.name == "graphduo-traced")
    reference = []
    for b in w.host_batches:
        ref_state, metrics = ref_step(ref_state, jax.device_put(b))
        reference.append(float(metrics["loss"]))
    worst, worst_k = 0.0, 0.0
    for name, values in losses.items():
        diffs = [abs(a - r) / max(1.0, abs(r)) for a, r in zip(values, reference)]
        if name.startswith("graphduo-traced-k16"):
            worst_k = max(worst_k, *diffs)
        else:
            worst = max(worst, *diffs)
    rtol = loss_rtol(device)
    ok = worst <= rtol and worst_k <= K_LOSS_RTOL
    if not ok:
        print(f"WARNING: losses differ across variants (max rel diff {worst:.2e}; K=16 {worst_k:.2e})", file=sys.stderr)
    return {"steps": CHECK_STEPS, "k_steps": K, "losses": losses, "reference": reference, "max_rel_diff": worst,
            "rtol": rtol, "k_max_rel_diff": worst_k, "k_rtol": K_LOSS_RTOL, "ok": ok}, first_s, breaks


def bench_steps(torch, w: Workload, args, keras) -> dict[str, Any]:
    label = f"{w.model_name} b{w.batch_size}"
    variants = torch_variants(torch, w, args.torch_device) + graphduo_variants(w)
    checks, first_s, breaks = check_losses(torch, w, variants, args.torch_device, keras)
    print(f"[{label}] loss check: max rel diff {checks['max_rel_diff']:.1e} (K=16 {checks['k_max_rel_diff']:.1e}): "
          f"{'ok' if checks['ok'] else 'MISMATCH'}", file=sys.stderr)
    states, calls = {}, {}
    for v in variants:  # a probe sizes each measurement; states carry on from here across rounds
        gc.collect()
        multi = v.steps_per_call > 1  # a call of K steps: fewer calls, no warm-up beyond the first
        states[v.name], _, t = timing.time_steps(v.step, v.fresh_state(), [v.inputs] * (2 if multi else 5),
                                                 warmup=0 if multi else 1)
        calls[v.name] = _common.steps_for(t.median_ms / 1e3, args.budget, 1 if multi else args.min_steps,
                                          args.max_steps)
    rounds = {v.name: [] for v in variants}
    peaks, torch_peaks = [], []
    for r in range(args.rounds):
        # the ceiling opens each round, apart from the variants: a large matmul right before a small
        # step leaves the step slower for a while (XLA's threads, the caches)
        peaks.append(_common.matmul_peak_flops(repeats=PEAK_REPEATS))
        torch_peaks.append(torch_matmul_flops(torch, args.torch_device, _common.peak_matmul_size()))
        for v in (variants if r % 2 == 0 else variants[::-1]):
            gc.collect()
            warmup = 0 if v.steps_per_call > 1 else 2
            states[v.name], _, t = timing.time_steps(v.step, states[v.name], [v.inputs] * (1 + warmup + calls[v.name]),
                                                     warmup=warmup)
            per_step = [x * 1e3 / v.steps_per_call for x in t.times_s]
            rounds[v.name].append({"median_ms": statistics.median(per_step), "times_ms": per_step})
        print(f"[{label}] round {r + 1}/{args.rounds} (ms/step): " + "  ".join(
            f"{n} {rs[-1]['median_ms']:.3g}" for n, rs in rounds.items()), file=sys.stderr, flush=True)
    traced = next(v for v in variants if v.name == "graphduo-traced")
    cost = traced.step.stages(traced.fresh_state(), traced.inputs).cost_analysis()  # compiled already
    summary = {n: summarize(rs, w.batch_size) for n, rs in rounds.items()}
    torch_names = [v.name for v in variants if v.name.startswith("torch")]
    fastest = min(torch_names, key=lambda n: summary[n]["median_ms"])
    res = {"model": w.model_name, "batch_size": w.batch_size, "checks": checks, "first_call_s": first_s,
           "graph_breaks": breaks, "calls_per_round": calls, "rounds": rounds, "summary": summary, "cost": cost,
           "torch_fastest": fastest, "matmul_peak_flops_per_round": peaks, "torch_matmul_flops_per_round": torch_peaks}
    res["ratios"] = step_ratios(rounds, torch_names)
    gemm = [t / j for t, j in zip(torch_peaks, peaks)]
    res["torch_vs_jax_matmul"] = {"median": statistics.median(gemm), "min": min(gemm), "max": max(gemm)}
    res["traced_peak_fraction"] = peak_fraction(cost["flops"], rounds["graphduo-traced"], peaks)
    if w.batch_size == min(args.batch_sizes):
        res["eager_breakdown"] = eager_breakdown(torch, args.torch_device, w)
    return res


def summarize(rs: list[dict], batch_size: int) -> dict[str, float]:
    median = statistics.median(r["median_ms"] for r in rs)
    pooled = [t for r in rs for t in r["times_ms"]]
    return {"median_ms": median, "p10_ms": float(np.percentile(pooled, 10)),
            "p90_ms": float(np.percentile(pooled, 90)), "samples_per_s": batch_size / (median / 1e3)}


def per_round(rounds, num: str, den) -> dict[str, Any]:
    """Median over rounds of ``num``'s time / ``den``'s (``den`` a name, or a function of a round
    index giving a time): above 1, ``den`` is faster."""
    den_ms = (lambda i: rounds[den][i]["median_ms"]) if isinstance(den, str) else den
    per = [r["median_ms"] / den_ms(i) for i, r in enumerate(rounds[num])]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


def step_ratios(rounds, torch_names: list[str]) -> dict[str, Any]:
    def torch_best(i):  # PyTorch's fastest variant in round i
        return min(rounds[n][i]["median_ms"] for n in torch_names)

    best_k = {name: per_round(rounds, name, torch_best) for name in
              ("graphduo-traced", "graphduo-traced-k16", "graphduo-traced-k16-unrolled")}
    return {
        # speeds: > 1 means graphduo's traced step is faster than PyTorch's fastest variant of that round
        "traced_speedup_vs_torch_fastest": _inverse(best_k["graphduo-traced"]),
        "best_k_speedup_vs_torch_fastest": max((_inverse(v) for v in best_k.values()), key=lambda r: r["median"]),
        "k16_speedup_vs_traced": _inverse(per_round(rounds, "graphduo-traced-k16", "graphduo-traced")),
        "k16_unrolled_speedup_vs_traced": _inverse(per_round(rounds, "graphduo-traced-k16-unrolled", "graphduo-traced")),
        # eager, variant by variant: > 1 means graphduo eager is slower
        "eager_time_vs_torch_eager": per_round(rounds, "graphduo-eager", "torch-eager"),
        "eager_fused_time_vs_torch_eager_fused": per_round(rounds, "graphduo-eager-fused", "torch-eager-fused"),
        "eager_fused_speedup_vs_eager": _inverse(per_round(rounds, "graphduo-eager-fused", "graphduo-eager")),
    }


def _inverse(r: dict[str, Any]) -> dict[str, Any]:
    per = [1 / x for x in r["per_round"]]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


def peak_fraction(flops: float, traced_rounds: list[dict], peaks: list[float]) -> dict[str, Any]:
    """The traced step's achieved FLOP/s as a fraction of the matmul ceiling measured in the same round
    (median of per-round fractions): the machine's speed drifts from minute to minute, and pairing
    the two by round, as every other ratio here is, cancels the drift."""
    per = [flops / (r["median_ms"] / 1e3) / peak for r, peak in zip(traced_rounds, peaks)]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


def eager_breakdown(torch, device: str, w: Workload, reps: int = 15) -> dict[str, Any]:
    """graphduo eager: ops and time by phase (``inspect_eager``); torch eager (default Adam): its three
    phases timed (on CUDA each phase run to completion, as graphduo's ops are)."""
    model = build_model(w.model_name, INPUT_SHAPE, NUM_CLASSES)
    tx = make_optimizer("adam", LR)
    report = inspect_eager(model, tx, create_train_state(model, tx, jax.random.key(0)), jax.device_put(w.host_batches[0]))
    F = torch.nn.functional
    sync = _torch_steps.sync_fn(torch, device)
    trainer = _torch_steps.TorchTrainer(torch, "eager", w.model_name, w.params, lr=LR, device=device)
    x, y = _torch_steps.torch_batch(torch, w.host_batches[0], w.model_name, device)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "update+metrics": []}
    for i in range(reps + 2):
        trainer.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(trainer.model(x), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        trainer.opt.step()
        sync()
        t3 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[k].append(dt * 1e3)
    return {"graphduo_ops_per_step": report["ops_per_step"],
            "graphduo_total_ms": report["total_us"] / 1e3,
            "graphduo_by_phase": {k: {"ops": int(v["count"]), "ms": v["time_us"] / 1e3}
                                  for k, v in report["by_phase"].items()},
            "torch_by_phase_ms": {k: statistics.median(v) for k, v in phases.items()}}


# --------------------------------------------------------------------------------------------
# The loops: graphduo train against Keras's fit.
# --------------------------------------------------------------------------------------------


def graphduo_loop(model_name: str, batch_size: int, steps: int, k: int, unroll: int) -> float:
    """Seconds per step of ``graphduo train`` (traced, synthetic data on the device, steady state)."""
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="peers_") as run_dir:
        config = Config(model=model_name, mode="traced", dataset="synthetic", synthetic_shape=INPUT_SHAPE,
                        synthetic_size=batch_size * steps, batch_size=batch_size, steps=steps, steps_per_call=k,
                        unroll=unroll, run_dir=run_dir)
        return train_and_evaluate(config, progress=False)["step_time_ms"] / 1e3


def bench_loops(w: Workload, step_ms: float, args, keras) -> dict[str, Any]:
    """Every loop, interleaved over rounds; seconds per step of each, and graphduo's over Keras's."""
    steps = max(2 * K, round(args.budget * 3 / (step_ms / 1e3) / K) * K)  # whole calls of K
    from graphduo.data import load_dataset

    ds = load_dataset("synthetic", synthetic_shape=INPUT_SHAPE, synthetic_size=w.batch_size * steps, seed=0)
    x, y = ds.x_train[:w.batch_size * steps], ds.y_train[:w.batch_size * steps]
    eager_steps = max(2, min(steps, int(args.budget / (step_ms / 1e3 * 10))))  # Keras eager: ~10x the step
    rounds: dict[str, list[float]] = {name: [] for name in LOOPS}
    first: dict[str, float] = {}
    for r in range(args.rounds):
        for name in (LOOPS if r % 2 == 0 else LOOPS[::-1]):
            if name.startswith("graphduo"):
                k = 1 if name.endswith("k1") else K
                rounds[name].append(graphduo_loop(w.model_name, w.batch_size, steps, k, K if "unrolled" in name else 1))
            elif keras is not None:
                n = eager_steps if name == "keras-eager" else steps
                t = _keras_steps.time_fit(keras, name, w.model_name, w.params, INPUT_SHAPE, LR, x[:w.batch_size * n],
                                          y[:w.batch_size * n], w.batch_size, 1)
                rounds[name].append(t["step_s"][0])
                first[name] = t["first_fit_s"]
        print(f"[{w.model_name} b{w.batch_size}] loops round {r + 1}/{args.rounds} (ms/step): " + "  ".join(
            f"{n} {rs[-1] * 1e3:.3g}" for n, rs in rounds.items() if rs), file=sys.stderr, flush=True)
    rounds = {n: rs for n, rs in rounds.items() if rs}
    out = {"steps": steps, "keras_eager_steps": eager_steps, "rounds_s": rounds, "first_fit_s": first,
           "median_ms": {n: statistics.median(rs) * 1e3 for n, rs in rounds.items()}}
    if keras is not None:
        best16 = [min(a, b) for a, b in zip(rounds["graphduo-train-k16"], rounds["graphduo-train-k16-unrolled"])]
        out["vs_keras"] = {
            "k1": _ratio_list(rounds["keras-jit"], rounds["graphduo-train-k1"]),
            "k16": _ratio_list(rounds["keras-jit-spe16"], best16),
        }
    return out


def _ratio_list(num: list[float], den: list[float]) -> dict[str, Any]:
    per = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


# --------------------------------------------------------------------------------------------
# Goals and report.
# --------------------------------------------------------------------------------------------


def goals(results, backend: str) -> list[dict[str, Any]]:
    out = []

    def add(text, value, target, shown):
        met = None if value is None else value >= target
        out.append({"goal": text, "value": value, "target": f">= {target}", "met": met,
                    "reading": shown if value is not None else "not measured in this run"})

    where = "on the CPU" if backend == "cpu" else f"on {backend}"
    for res in results:
        label = f"{res['model']} batch {res['batch_size']}"
        r = res["ratios"]
        v = r["traced_speedup_vs_torch_fastest"]
        add(f"graphduo's traced step (K=1) at least as fast as PyTorch's fastest variant, {label}, {where}",
            v["median"], 1.0, f"{v['median']:.2f}x (rounds {v['min']:.2f}-{v['max']:.2f}; PyTorch's fastest: "
                              f"{res['torch_fastest']})")
        v = r["best_k_speedup_vs_torch_fastest"]
        add(f"graphduo's traced step at its best K at least as fast as PyTorch's fastest variant, {label}, {where}",
            v["median"], 1.0, f"{v['median']:.2f}x (rounds {v['min']:.2f}-{v['max']:.2f})")
        loops = res.get("loops", {}).get("vs_keras")
        for k in ("k1", "k16"):
            v = loops[k] if loops else None
            add(f"graphduo's loop faster than Keras's fit at K={k[1:]}, {label}", v and v["median"], 1.0,
                f"{v['median']:.2f}x (rounds {v['min']:.2f}-{v['max']:.2f})" if v else "")
    return out


def table_rows(results) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        fastest = res["summary"][res["torch_fastest"]]["median_ms"]
        for name, s in res["summary"].items():
            mark = " (PyTorch's fastest)" if name == res["torch_fastest"] else ""
            rows.append((res["model"], str(res["batch_size"]), name + mark, f"{s['median_ms']:.3g}",
                         f"{s['p10_ms']:.3g}-{s['p90_ms']:.3g}", f"{s['samples_per_s']:,.0f}",
                         f"{res['first_call_s'][name]:.2f}", f"{fastest / s['median_ms']:.2f}x"))
    return rows


HEADER = ("model", "batch", "variant", "median ms/step", "p10-p90", "samples/s", "first call s",
          "speed vs PyTorch's fastest")


def markdown_table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def ratio_rows(results) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        r = res["ratios"]
        f = lambda k: f"{r[k]['median']:.2f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]"  # noqa: E731
        frac = res["traced_peak_fraction"]
        g = res["torch_vs_jax_matmul"]
        rows.append((res["model"], str(res["batch_size"]), f("traced_speedup_vs_torch_fastest"),
                     f("best_k_speedup_vs_torch_fastest"), f("k16_speedup_vs_traced"), f("k16_unrolled_speedup_vs_traced"),
                     f("eager_time_vs_torch_eager"), f("eager_fused_time_vs_torch_eager_fused"),
                     f"{100 * frac['median']:.1f}%", f"{g['median']:.2f}"))
    return rows


RATIO_HEADER = ("model", "batch", "traced vs PyTorch's fastest", "best K vs PyTorch's fastest", "K=16 loop vs K=1",
                "K=16 unrolled vs K=1", "graphduo eager / torch eager (time)", "graphduo fused / torch fused (time)",
                "traced, of the matmul ceiling", "torch.mm / jax matmul rate")


def loop_rows(results) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        loops = res.get("loops")
        if not loops:
            continue
        m = loops["median_ms"]
        vs = loops.get("vs_keras", {})
        rows.append((res["model"], str(res["batch_size"]), *(f"{m[n]:.3g}" if n in m else "-" for n in LOOPS),
                     *(f"{vs[k]['median']:.2f}" if k in vs else "-" for k in ("k1", "k16"))))
    return rows


LOOP_HEADER = ("model", "batch", *(f"{n} ms/step" for n in LOOPS), "graphduo / Keras, K=1 (speed)",
               "graphduo / Keras, K=16 (speed)")


def breakdown_lines(results) -> list[str]:
    lines = []
    for res in results:
        b = res.get("eager_breakdown")
        if not b:
            continue
        lines += [f"**{res['model']} batch {res['batch_size']}**: graphduo eager dispatches "
                  f"{b['graphduo_ops_per_step']} ops per step ({b['graphduo_total_ms']:.2f} ms when each op is run to "
                  f"completion, `inspect_eager`); with its update fused, "
                  f"x{res['ratios']['eager_fused_speedup_vs_eager']['median']:.2f} faster.", "",
                  "| phase | graphduo ops | graphduo ms | torch eager ms |", "|---|---|---|---|"]
        for phase in ("forward", "backward", "update+metrics"):
            g = b["graphduo_by_phase"].get(phase, {"ops": 0, "ms": 0.0})
            lines.append(f"| {phase} | {g['ops']} | {g['ms']:.2f} | {b['torch_by_phase_ms'][phase]:.2f} |")
        lines.append("")
    return lines


def write_summary(out, results, goal_list, env, command, wall_s, args, plot_note) -> None:
    verdict = {True: "**MET**", False: "**NOT MET**", None: "not evaluated"}
    breaks = {f"{r['model']} b{r['batch_size']} {n}": v for r in results for n, v in r["graph_breaks"].items() if v}
    text = [
        "# peers: graphduo against PyTorch and Keras, each at its best", "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s; {args.rounds} interleaved round(s) per workload.  ",
        f"Machine: {_common.describe_machine(env)}; torch {env['torch']} on {env['torch_device']} with "
        f"torch.set_num_threads({env['torch_threads']}); {env['keras_note']}.", "",
        "## Steps", "", markdown_table(HEADER, table_rows(results)), "",
        "median: median over rounds of each round's median time per step (K=16 variants: per call / 16); p10-p90 "
        "over every timed step; first call: the check's first call, compiles included; speed vs PyTorch's fastest: "
        "its median time over this variant's.", "",
        markdown_table(RATIO_HEADER, ratio_rows(results)), "",
        "Each ratio: median of the per-round ratios [smallest-largest]; speeds (> 1: graphduo faster) except the "
        "two eager columns, which are time ratios (> 1: graphduo eager slower), variant by variant: PyTorch's "
        "default Adam against graphduo op by op, PyTorch's fused Adam against graphduo's fused update.", "",
        "## Loops", "", markdown_table(LOOP_HEADER, loop_rows(results)) if loop_rows(results) else "(not run)", "",
        "Seconds per step of whole training runs on the same synthetic data, steady state: `graphduo train` at "
        f"`--steps-per-call` 1 and {K} (a loop, and unrolled) against Keras 3's `fit` on the same JAX "
        f"(`run_eagerly`, `jit_compile`, `steps_per_execution={K}`); the ratios take graphduo's faster K={K} form.", "",
        "## Goals", "",
    ]
    for g in goal_list:
        text.append(f"- {g['goal']} (target {g['target']}): {verdict[g['met']]}, {g['reading']}.")
    text += ["", "## Same function", "", "; ".join(
        f"{r['model']} b{r['batch_size']}: max relative loss difference {r['checks']['max_rel_diff']:.1e} over "
        f"{CHECK_STEPS} steps ({'within' if r['checks']['max_rel_diff'] <= r['checks']['rtol'] else 'OUTSIDE'} "
        f"{r['checks']['rtol']:g}), K=16 {r['checks']['k_max_rel_diff']:.1e} over {K} steps" for r in results)
        + f". Arithmetic: {env['torch_precision']}.", ""]
    if breaks:
        text += ["## torch.compile's graph breaks (first call)", ""]
        text += [f"- {k}: " + "; ".join(f"{reason} (x{n})" for reason, n in v.items()) for k, v in breaks.items()]
        text.append("")
    mismatch = loss_mismatch(results)
    if mismatch:
        text += [f"**Loss check failed**: {mismatch}. The run exited with status 1.", ""]
    text += ["## Eager breakdown", "", *breakdown_lines(results)]
    if plot_note:
        text += [plot_note, ""]
    _common.write_summary(out, text)


def plot(results, out: pathlib.Path) -> str:
    plt = _common.pyplot()
    if plt is None:
        return "Plot skipped: matplotlib is not installed."
    names = list(results[0]["summary"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    labels = [f"{r['model']} b{r['batch_size']}" for r in results]
    x = np.arange(len(results))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar(x + i * width, [r["summary"][name]["median_ms"] for r in results], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, labels)
    ax.set_yscale("log")
    ax.set_ylabel("median ms per step (log)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)
    return ""


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time the same MLP/CNN Adam training step in PyTorch (eager, fused Adam, torch.compile), graphduo "
                 "(eager, fused update, traced, 16 steps per call) and, as loops, graphduo train against Keras's "
                 f"fit; check they agree; write results.json and SUMMARY.md. Needs PyTorch: {INSTALL_TORCH}.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: MLP at batch 32 only, 1 round, short measurements")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, metavar="DIR",
                        help=_common.out_help("results.json, SUMMARY.md and step_time.png", DEFAULT_OUT))
    parser.add_argument("--models", type=_common.models, default=None,
                        help=f"comma-separated models, of {', '.join(_common.MODELS)} (default mlp,cnn; --quick: mlp)")
    parser.add_argument("--batch-sizes", type=_common.batch_sizes, default=None,
                        help="comma-separated batch sizes (default 32,256; --quick: 32)")
    parser.add_argument("--rounds", type=_common.positive_int, default=None,
                        help="interleaved rounds per workload (default 3; --quick: 1)")
    parser.add_argument("--budget", type=_common.positive_float, default=None,
                        help="seconds of timed steps per variant per round (default 0.8; --quick: 0.2)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    q = args.quick
    args.models = args.models or (["mlp"] if q else list(_common.MODELS))
    args.batch_sizes = args.batch_sizes or ([32] if q else [32, 256])
    args.rounds = args.rounds or (1 if q else 3)
    args.budget = args.budget or (0.2 if q else 0.8)
    args.min_steps = 3 if q else 5
    args.max_steps = 50 if q else 300
    if importlib.util.find_spec("torch") is None:  # before --out is made: a run without torch writes nothing
        torch_missing()
    args.out = _common.check_out(parser, args.out)
    return args


def loss_mismatch(results) -> str | None:
    """One line naming the workloads whose variants reached different losses, or None."""
    bad = [r for r in results if not r["checks"]["ok"]]
    if not bad:
        return None
    return ("the variants' losses differ beyond the relative tolerance "
            f"{bad[0]['checks']['rtol']:g} after {CHECK_STEPS} steps from the same weights: "
            + ", ".join(f"{r['model']} b{r['batch_size']} (max {r['checks']['max_rel_diff']:.1e})" for r in bad)
            + "; the timings compare different computations")


def report(args, command: str, env: dict, results: list[dict], wall_s: float) -> int:
    """Print the tables and goals, write results.json, SUMMARY.md and the plot into ``args.out``; the exit
    status: 1 (with a one-line error) when the variants' losses disagree, else 0."""
    goal_list = goals(results, env["backend"])
    print(markdown_table(HEADER, table_rows(results)))
    for g in goal_list:
        print(f"goal: {g['goal']}: {g['met']} ({g['reading']})")
    mismatch = loss_mismatch(results)
    plot_note = plot(results, args.out)
    payload = {"command": command, "wall_s": wall_s, "environment": env, "goals": goal_list,
               "losses_agree": mismatch is None, "loss_mismatch": mismatch,
               "settings": _common.settings_record(args), "workloads": results}
    _common.write_results(args.out, payload)
    write_summary(args.out, results, goal_list, env, command, wall_s, args, plot_note)
    print(f"wall time {wall_s:.0f} s; wrote {args.out / 'results.json'} and {args.out / 'SUMMARY.md'}",
          file=sys.stderr)
    if mismatch:
        print(f"peers.py: error: {mismatch}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> None:
    args = parse_args(argv)
    settings = _common.setup()  # the CLI's process settings, before any JAX computation
    keras = _keras_steps.need_keras()  # sets KERAS_BACKEND=jax before Keras is imported
    torch = _torch_steps.need_torch("experiments/peers.py")
    torch.set_num_threads(os.cpu_count() or 1)
    # torch.compile's first call must include a real compile, not a hit in inductor's on-disk cache
    # left by an earlier run; graphduo-traced compiles afresh too.
    torch._inductor.config.force_disable_caches = True
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    args.torch_device, precision = torch_device(torch, env["backend"])
    env.update(_torch_steps.settings(torch), torch_device=args.torch_device, torch_precision=precision,
               matmul_peak_size=_common.peak_matmul_size())
    env.update(_keras_steps.settings(keras) if keras is not None else {"keras": None})
    env["keras_note"] = (f"Keras {env['keras']} on {env['keras_backend']}" if keras is not None else
                         f"Keras not installed ({_keras_steps.INSTALL_KERAS}): its loops not run")
    print(f"peers on {env['cpu']} ({env['cpu_count']} cores), {env['device_kind']}, jax {env['jax']}, torch "
          f"{env['torch']} on {args.torch_device} ({env['torch_threads']} threads); {env['keras_note']}", file=sys.stderr)
    results = []
    for m in args.models:
        for b in args.batch_sizes:
            w = make_workload(m, b)
            res = bench_steps(torch, w, args, keras)
            res["loops"] = bench_loops(w, res["summary"]["graphduo-traced"]["median_ms"], args, keras)
            results.append(res)
    status = report(args, command, env, results, time.perf_counter() - t_start)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
