"""Peers: graphduo's training step against PyTorch's, same model, same weights, same optimizer.

What it measures, for the MLP (784-512-512-10) and the CNN (conv32-pool-conv64-pool-dense128) at batch
32 and 256, Adam lr 1e-3 (``torch.optim.Adam`` defaults equal ``optax.adam``'s: b1 0.9, b2 0.999,
eps 1e-8), four variants of one training step (forward, softmax cross-entropy, backward, Adam):

* ``torch-eager``:     a ``torch.nn`` model, ``loss.backward()``, ``torch.optim.Adam`` with torch's defaults
                       (on the CPU its per-parameter loop; ``foreach`` is torch's default on CUDA only).
* ``torch-compile``:   the same, with the model wrapped in ``torch.compile`` (default mode; forward and
                       backward compiled, the optimizer step runs as in eager). Its first step includes
                       the compile and is reported apart.
* ``graphduo-eager``:  ``graphduo.EagerStep(make_train_step(model.apply, tx))``, op by op.
* ``graphduo-traced``: ``graphduo.TracedStep(make_train_step(model.apply, tx), donate_argnums=0)``.

All four start from the same weights: graphduo's ``model.init(jax.random.key(0))`` copied into torch
(Dense kernels (in, out) -> Linear weight (out, in); Conv kernels HWIO -> OIHW; the CNN's flatten is
NHWC order in graphduo, so the torch CNN permutes to NHWC before flattening). A check runs five
steps of every variant on the same five batches and requires the same losses.

How: every step goes through ``graphduo.timing.time_steps`` (first step apart, untimed warm-up, each
step run to completion, median and p10/p90); torch steps are adapted to its ``step(state, batch)``
form (CPU torch is synchronous, so a step has finished when it returns; on CUDA the step ends
with ``torch.cuda.synchronize()``). The machine is noisy, so
the variants are interleaved over several rounds; a variant's figure is the median over rounds of
its per-round median, p10-p90 is over every timed step, and a ratio is the median of per-round
ratios. torch runs with ``torch.set_num_threads(os.cpu_count())``, on the hardware JAX runs on: CUDA when
JAX's backend is a GPU, with both sides' float32 matmuls and convolutions in TF32 (JAX's default
there), else the CPU.

Also: the traced step's achieved FLOP/s (XLA ``cost_analysis()["flops"]`` / median step time) against
``_common.matmul_peak_flops()`` measured right before it in the same round (the median over rounds
of the per-round fraction: the machine's speed drifts between rounds, and a ceiling measured minutes away measures the
drift), PyTorch's rate on the same product measured right after it (``torch_matmul_flops``: how fast each
framework's GEMM library is on this machine), and, at batch 32, where graphduo's eager step spends its time
(``graphduo.graphs.inspect_eager``: ops dispatched per step, time by phase) next to torch eager's
forward / backward / optimizer-step times.

Needs PyTorch: from the repository root, ``pip install -c constraints.txt ".[peers]"`` (the version it
was measured with). Without it the script says so and exits with status 2. When the four variants'
losses disagree, it still writes its results (recording the mismatch) and then exits with status 1.

The process runs with graphduo's CLI defaults (``_common.setup``), recorded in results.json; PyTorch
shares its host memory policy (its CPU tensors come from the same ``malloc``).

Run:
    python experiments/peers.py            # full run
    python experiments/peers.py --quick    # smoke test: MLP, batch 32, 1 round
    python experiments/peers.py --out DIR  # results elsewhere

Writes ``DIR/results.json`` (every per-round time, check, ratio and goal, the environment with torch's
version and thread count), ``DIR/SUMMARY.md`` (table, goals, breakdown) and ``DIR/step_time.png``
(skipped, with a note, when matplotlib is missing).
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
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import _common  # experiments/_common.py
from _common import INPUT_SHAPE, LR, NUM_CLASSES
from graphduo import timing
from graphduo.eager import EagerStep
from graphduo.graphs import inspect_eager
from graphduo.models import build_model
from graphduo.step import TrainState, make_optimizer, make_train_step
from graphduo.traced import TracedStep

DEFAULT_OUT = _common.default_out("peers")
VARIANTS = ("torch-eager", "torch-compile", "graphduo-eager", "graphduo-traced")
PEAK_REPEATS = 5  # matmuls per round for the ceiling (2048-square on a CPU: about half a second on 2 cores)
CHECK_STEPS = 5
# Loss agreement after CHECK_STEPS steps from the same weights on the same batches. torch and XLA sum
# in different orders (and pick different matmul/conv kernels), so float32 results differ by rounding
# (~1e-6 relative) at step 0. Adam then normalises each gradient entry by its own magnitude: an entry
# whose gradient is near zero can get a visibly different update (up to ~lr = 1e-3 per step) from a
# rounding-level difference. Over five steps this moves the loss by ~1e-5..1e-4, far below the
# ~1e-2 per-step change of the loss itself, so 1e-3 relative separates "same computation" from a
# wrong weight layout or optimizer (which give differences of 1e-1 or more from the first step).
LOSS_RTOL = 1e-3
# On an NVIDIA GPU both sides multiply float32 matrices in TF32 (JAX's default there; torch is set to
# match, see ``torch_device``): 10 mantissa bits, a relative error of ~3e-4 per product (measured on
# an H100: 2.9e-4 for a 1024-square product against float64, float32 proper 3e-7), 1000x float32's.
# The step-0 difference grows by the same factor, so the five-step loss differences that are
# ~1e-5..1e-4 in float32 become ~1e-3: 1e-2 still sits well under a layout or optimizer bug's 1e-1.
TF32_LOSS_RTOL = 1e-2


INSTALL_TORCH = 'from the repository root, pip install -c constraints.txt ".[peers]"'


def torch_missing():
    """Exit with status 2 and a one-line message saying how to install PyTorch."""
    print(f"experiments/peers.py needs PyTorch, which is not installed: {INSTALL_TORCH}", file=sys.stderr)
    sys.exit(2)


def need_torch():
    """Import torch, or exit with status 2 and a one-line message saying how to install it."""
    try:
        import torch
    except ImportError:
        torch_missing()
    return torch


# --------------------------------------------------------------------------------------------
# The torch side: the same models, weights copied from graphduo's parameter tree.
# --------------------------------------------------------------------------------------------


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


def torch_model(torch, name: str, params, device: str = "cpu") -> Any:
    """graphduo's MLP or CNN as a ``torch.nn`` module holding a copy of ``params``, on ``device``."""
    nn = torch.nn

    def t(a, perm=None):
        a = np.array(a)  # a writable host copy
        return torch.from_numpy(np.ascontiguousarray(a.transpose(perm) if perm else a)).clone()

    def linear(p):
        layer = nn.Linear(*p["kernel"].shape)
        with torch.no_grad():
            layer.weight.copy_(t(p["kernel"], (1, 0)))  # (in, out) -> (out, in)
            layer.bias.copy_(t(p["bias"]))
        return layer

    def conv(p):
        h, w, i, o = p["kernel"].shape
        layer = nn.Conv2d(i, o, (h, w), padding="same")
        with torch.no_grad():
            layer.weight.copy_(t(p["kernel"], (3, 2, 0, 1)))  # HWIO -> OIHW
            layer.bias.copy_(t(p["bias"]))
        return layer

    class NHWCFlatten(nn.Module):
        """Flatten in graphduo's (NHWC) order, so the first Dense kernel's rows line up."""

        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    if name == "mlp":
        n = len(params)
        layers: list[Any] = [nn.Flatten()]
        for i in range(n):
            layers.append(linear(params[f"Dense_{i}"]))
            if i < n - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).to(device)
    layers = []
    n_conv = sum(k.startswith("Conv_") for k in params)
    for i in range(n_conv):  # graphduo pools before ReLU: the same function (both monotone)
        layers += [conv(params[f"Conv_{i}"]), nn.MaxPool2d(2), nn.ReLU()]
    layers += [NHWCFlatten(), linear(params["Dense_0"]), nn.ReLU(), linear(params["Dense_1"])]
    return nn.Sequential(*layers).to(device)


class TorchState:
    """A torch model and its Adam optimizer: the torch step's ``state`` (updated in place)."""

    def __init__(self, torch, model, forward):
        self.model = model
        self.forward = forward  # the model itself, or its torch.compile wrapper
        self.opt = torch.optim.Adam(model.parameters(), lr=LR)  # defaults: b1 .9, b2 .999, eps 1e-8


def torch_sync(torch, device: str) -> Callable[[], None]:
    """What waits for torch's queued work on ``device``: ``torch.cuda.synchronize`` on CUDA; nothing
    on the CPU, where an op has finished when it returns."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def torch_matmul_flops(torch, device: str, n: int, repeats: int = PEAK_REPEATS) -> float:
    """PyTorch's own matmul rate: FLOP/s of ``torch.mm`` on an n x n float32 pair (median of
    ``repeats``), ``matmul_peak_flops``'s product on torch's side. Beside JAX's, it says how much of
    a ratio between the two frameworks is their GEMM libraries on this machine (MKL for torch's CPU
    build, YNNPACK/Eigen for XLA:CPU's)."""
    sync = torch_sync(torch, device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device)
    times = _common.time_call(lambda: (torch.mm(a, a), sync()), repeats=repeats)
    return 2 * n**3 / (times.median_ms / 1e3)


def torch_step(torch, device: str = "cpu"):
    """``step(state, batch) -> (state, {"loss"})`` for ``graphduo.timing.time_steps``.

    On CUDA the step ends with ``torch.cuda.synchronize()``: torch launches its kernels
    asynchronously, and ``time_steps`` must time the step run to completion, as it does JAX's
    (``block_until_ready``). CPU torch has finished when the step returns."""
    F = torch.nn.functional
    sync = torch_sync(torch, device)

    def step(state: TorchState, batch):
        state.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(state.forward(batch["image"]), batch["label"])
        loss.backward()
        state.opt.step()
        sync()
        return state, {"loss": loss.detach()}

    return step


def torch_batch(torch, batch, model_name: str, device: str = "cpu"):
    """A graphduo batch (NHWC numpy) as torch tensors on ``device``: NCHW for the CNN, flat for the MLP."""
    x = np.asarray(batch["image"])
    x = x.transpose(0, 3, 1, 2) if model_name == "cnn" else x.reshape(len(x), -1)
    return {"image": torch.from_numpy(np.ascontiguousarray(x)).to(device),
            "label": torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)).to(device)}


# --------------------------------------------------------------------------------------------
# Workloads and variants.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Variant:
    name: str
    step: Callable[[Any, Any], tuple[Any, Any]]
    fresh_state: Callable[[], Any]
    batch: Any  # this variant's form of the timing batch
    check_batches: list[Any]


def make_variants(torch, model_name: str, batch_size: int, seed: int = 0, device: str = "cpu"):
    model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES)
    params0 = model.init(jax.random.key(0))
    tx = make_optimizer("adam", LR)
    rng = np.random.default_rng(seed)
    np_batches = [_common.host_batch(batch_size, rng=rng) for _ in range(CHECK_STEPS + 1)]
    jax_batches = [jax.device_put(b) for b in np_batches]
    torch_batches = [torch_batch(torch, b, model_name, device) for b in np_batches]
    jax.block_until_ready(jax_batches)

    def gd_state():
        params = _common.copy_tree(params0)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(1))

    def t_state(compiled: bool):
        def fresh():
            m = torch_model(torch, model_name, params0, device)
            if not compiled:
                return TorchState(torch, m, m)
            torch._dynamo.reset()  # no cached graph (or automatic-dynamic shapes) from another workload
            return TorchState(torch, m, torch.compile(m))
        return fresh

    train_step = make_train_step(model.apply, tx)
    tstep = torch_step(torch, device)
    variants = [
        Variant("torch-eager", tstep, t_state(False), torch_batches[-1], torch_batches[:CHECK_STEPS]),
        Variant("torch-compile", tstep, t_state(True), torch_batches[-1], torch_batches[:CHECK_STEPS]),
        Variant("graphduo-eager", EagerStep(train_step), gd_state, jax_batches[-1], jax_batches[:CHECK_STEPS]),
        Variant("graphduo-traced", TracedStep(train_step, donate_argnums=0), gd_state, jax_batches[-1],
                jax_batches[:CHECK_STEPS]),
    ]
    return model, tx, gd_state, jax_batches[-1], variants


def check_losses(variants: list[Variant], rtol: float = LOSS_RTOL):
    """CHECK_STEPS steps of each variant from the same weights on the same batches: the losses agree.

    Also returns each variant's state after those steps (timing goes on from there) and the time of
    its cold first step (compilation included for torch.compile and graphduo-traced), taken through
    ``timing.time_steps`` like every other figure.
    """
    losses, states, first_s = {}, {}, {}
    for v in variants:
        gc.collect()
        states[v.name], metrics, t = timing.time_steps(v.step, v.fresh_state(), v.check_batches)
        losses[v.name] = [float(m["loss"]) for m in metrics]
        first_s[v.name] = t.first_s
    ref = losses["graphduo-traced"]
    max_rel = max(abs(a - r) / max(1.0, abs(r)) for name, ls in losses.items() for a, r in zip(ls, ref))
    ok = max_rel <= rtol
    if not ok:
        print(f"WARNING: losses differ across variants (max rel diff {max_rel:.2e}): {losses}", file=sys.stderr)
    return {"steps": CHECK_STEPS, "losses": losses, "max_rel_diff": max_rel, "rtol": rtol, "ok": ok}, \
        states, first_s


# --------------------------------------------------------------------------------------------
# Timing.
# --------------------------------------------------------------------------------------------


def bench_workload(torch, model_name: str, batch_size: int, args) -> dict[str, Any]:
    label = f"{model_name} b{batch_size}"
    model, tx, gd_state, gd_batch, variants = make_variants(torch, model_name, batch_size, device=args.torch_device)
    checks, states, first_s = check_losses(variants, loss_rtol(args.torch_device))
    print(f"[{label}] loss check over {CHECK_STEPS} steps: max rel diff {checks['max_rel_diff']:.1e} "
          f"({'ok' if checks['ok'] else 'MISMATCH'})", file=sys.stderr)

    # One state per variant, kept across rounds, continuing from the check.
    steps, rounds = {}, {v.name: [] for v in variants}
    for v in variants:  # probe: a rough steady-state time to size the measurements
        gc.collect()
        states[v.name], _, t = timing.time_steps(v.step, states[v.name], [v.batch] * 5, warmup=1)
        steps[v.name] = _common.steps_for(t.median_ms / 1e3, args.budget, args.min_steps, args.max_steps)
    peaks = []  # the matmul ceiling, measured in every round right before the traced step it is compared with
    torch_peaks = []  # and torch's rate on the same product, right after it
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            if v.name == "graphduo-traced":
                peaks.append(_common.matmul_peak_flops(repeats=PEAK_REPEATS))
                torch_peaks.append(torch_matmul_flops(torch, args.torch_device, _common.peak_matmul_size()))
            gc.collect()
            faults = _common.minor_page_faults()
            states[v.name], _, t = timing.time_steps(v.step, states[v.name], [v.batch] * (3 + steps[v.name]),
                                                     warmup=2)
            rounds[v.name].append({"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms,
                                   "times_ms": [x * 1e3 for x in t.times_s],
                                   "page_faults_per_step": (_common.minor_page_faults() - faults) / (3 + steps[v.name])})
        print(f"[{label}] round {r + 1}/{args.rounds}: " + "  ".join(
            f"{n} {rs[-1]['median_ms']:.3g}" for n, rs in rounds.items()) + f" ms; matmul {peaks[-1] / 1e9:.0f} GFLOP/s (torch.mm {torch_peaks[-1] / 1e9:.0f})",
            file=sys.stderr)

    traced = next(v for v in variants if v.name == "graphduo-traced")
    cost = traced.step.stages(gd_state(), gd_batch).cost_analysis()  # compiled already: no new compile
    res = {"model": model_name, "batch_size": batch_size, "checks": checks, "first_step_s": first_s,
           "timed_steps_per_round": steps, "rounds": rounds, "cost": cost,
           "graphduo_traced_compile_s": traced.step.compile_time_s}
    res["summary"] = {n: summarize(rs, batch_size) for n, rs in rounds.items()}
    res["ratios"] = ratios(rounds)
    res["matmul_peak_flops_per_round"] = peaks
    res["torch_matmul_flops_per_round"] = torch_peaks
    gemm = [t / j for t, j in zip(torch_peaks, peaks)]
    res["torch_vs_jax_matmul"] = {"median": statistics.median(gemm), "min": min(gemm), "max": max(gemm)}
    res["traced_peak_fraction"] = peak_fraction(cost["flops"], rounds["graphduo-traced"], peaks)
    if batch_size == min(args.batch_sizes):
        res["eager_breakdown"] = eager_breakdown(torch, args.torch_device, model, tx, gd_state(), gd_batch,
                                                 next(v for v in variants if v.name == "torch-eager"))
    return res


def summarize(rs: list[dict], batch_size: int) -> dict[str, float]:
    median = statistics.median(r["median_ms"] for r in rs)
    pooled = [t for r in rs for t in r["times_ms"]]
    return {"median_ms": median, "p10_ms": float(np.percentile(pooled, 10)),
            "p90_ms": float(np.percentile(pooled, 90)), "samples_per_s": batch_size / (median / 1e3),
            "page_faults_per_step": statistics.median(r["page_faults_per_step"] for r in rs),
            "page_faults_per_step_max": max(r["page_faults_per_step"] for r in rs)}


def ratio(rounds, num: str, den: str) -> dict[str, Any]:
    """Median over rounds of ``num``'s median time / ``den``'s (a speedup of ``den`` over ``num``)."""
    per = [a["median_ms"] / b["median_ms"] for a, b in zip(rounds[num], rounds[den])]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


def peak_fraction(flops: float, traced_rounds: list[dict], peaks: list[float]) -> dict[str, Any]:
    """The traced step's achieved FLOP/s as a fraction of the matmul ceiling measured in the same round
    (median of per-round fractions). The machine's speed drifts from minute to minute, so
    a ceiling measured minutes away from the step (or the larger of two such) says more about the
    drift than about the step; pairing them by round, as every other ratio here is, cancels it."""
    per = [flops / (r["median_ms"] / 1e3) / peak for r, peak in zip(traced_rounds, peaks)]
    return {"median": statistics.median(per), "min": min(per), "max": max(per), "per_round": per}


def ratios(rounds) -> dict[str, Any]:
    return {
        # speedups of graphduo traced: > 1 means graphduo traced is faster
        "traced_speedup_vs_torch_compile": ratio(rounds, "torch-compile", "graphduo-traced"),
        "traced_speedup_vs_torch_eager": ratio(rounds, "torch-eager", "graphduo-traced"),
        # time ratio: > 1 means graphduo eager is slower
        "eager_time_vs_torch_eager": ratio(rounds, "graphduo-eager", "torch-eager"),
    }


def eager_breakdown(torch, device: str, model, tx, state, batch, torch_variant: Variant,
                    reps: int = 15) -> dict[str, Any]:
    """graphduo eager: ops and time by phase (``inspect_eager``); torch eager: its three phases timed
    (on CUDA each phase run to completion, as graphduo's ops are)."""
    report = inspect_eager(model, tx, state, batch)
    F = torch.nn.functional
    sync = torch_sync(torch, device)
    ts = torch_variant.fresh_state()
    b = torch_variant.batch
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "update+metrics": []}
    for i in range(reps + 2):
        ts.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(ts.forward(b["image"]), b["label"])
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        ts.opt.step()
        sync()
        t3 = time.perf_counter()
        if i >= 2:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
                phases[k].append(dt * 1e3)
    return {"graphduo_ops_per_step": report["ops_per_step"],
            "graphduo_total_ms": report["total_us"] / 1e3,
            "graphduo_by_phase": {k: {"ops": int(v["count"]), "ms": v["time_us"] / 1e3}
                                  for k, v in report["by_phase"].items()},
            "graphduo_top_primitives": {k: {"ops": int(v["count"]), "ms": v["time_us"] / 1e3}
                                        for k, v in list(report["by_primitive"].items())[:6]},
            "torch_by_phase_ms": {k: statistics.median(v) for k, v in phases.items()}}


# --------------------------------------------------------------------------------------------
# Goals and report.
# --------------------------------------------------------------------------------------------


def find(results, model: str, batch: int):
    return next((r for r in results if r["model"] == model and r["batch_size"] == batch), None)


def goals(results) -> list[dict[str, Any]]:
    out = []
    mlp, cnn = find(results, "mlp", 256), find(results, "cnn", 256)

    def add(text, value, target, op, shown):
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": text, "value": value, "target": f"{op} {target}", "met": met,
                    "reading": shown if value is not None else "not measured in this run (needs batch 256)"})

    v = mlp["ratios"]["traced_speedup_vs_torch_compile"]["median"] if mlp else None
    add("graphduo traced MLP step at batch 256 at least 1.5x faster than torch.compile", v, 1.5, ">=",
        f"{v:.2f}x" if v else "")
    frac = mlp["traced_peak_fraction"] if mlp else None
    add("graphduo traced MLP step at batch 256 at >= 85% of the matmul peak", frac and frac["median"], 0.85, ">=",
        f"{100 * frac['median']:.1f}% of the matmul peak measured in the same round (rounds "
        f"{100 * frac['min']:.1f}-{100 * frac['max']:.1f}%; peak {min(mlp['matmul_peak_flops_per_round']) / 1e9:.0f}-"
        f"{max(mlp['matmul_peak_flops_per_round']) / 1e9:.0f} GFLOP/s)" if frac else "")
    v = cnn["ratios"]["traced_speedup_vs_torch_eager"]["median"] if cnn else None
    add("graphduo traced CNN step at batch 256 faster than PyTorch eager", v, 1.0, ">=",
        f"{v:.2f}x" if v else "")
    return out


HEADER = ("model", "batch", "variant", "median ms", "p10-p90 ms", "samples/s", "first step s", "page faults/step",
          "vs torch-eager")


def table_rows(results) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        te = res["summary"]["torch-eager"]["median_ms"]
        for name in VARIANTS:
            s = res["summary"][name]
            rows.append((res["model"], str(res["batch_size"]), name, f"{s['median_ms']:.3g}",
                         f"{s['p10_ms']:.3g}-{s['p90_ms']:.3g}", f"{s['samples_per_s']:,.0f}",
                         f"{res['first_step_s'][name]:.2f}", f"{s['page_faults_per_step']:,.0f} [{s['page_faults_per_step_max']:,.0f}]",
                         f"{te / s['median_ms']:.2f}x"))
    return rows


def format_table(rows) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in [HEADER, tuple("-" * w for w in widths), *rows])


def markdown_table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                      *("| " + " | ".join(r) + " |" for r in rows)])


def ratio_rows(results) -> list[tuple[str, ...]]:
    rows = []
    for res in results:
        r = res["ratios"]
        f = lambda k: f"{r[k]['median']:.2f} [{r[k]['min']:.2f}-{r[k]['max']:.2f}]"  # noqa: E731
        achieved = res["cost"]["flops"] / (res["summary"]["graphduo-traced"]["median_ms"] / 1e3)
        frac = res["traced_peak_fraction"]
        rows.append((res["model"], str(res["batch_size"]), f("traced_speedup_vs_torch_compile"),
                     f("traced_speedup_vs_torch_eager"), f("eager_time_vs_torch_eager"),
                     f"{res['cost']['flops'] / 1e6:.1f}",
                     f"{achieved / 1e9:.1f} ({100 * frac['median']:.1f}% [{100 * frac['min']:.1f}-{100 * frac['max']:.1f}])",
                     f"{g['median']:.2f} [{g['min']:.2f}-{g['max']:.2f}]" if (g := res.get("torch_vs_jax_matmul")) else ""))
    return rows


RATIO_HEADER = ("model", "batch", "traced speedup vs torch.compile", "traced speedup vs torch eager",
                "graphduo eager time / torch eager time", "traced MFLOP/step", "traced GFLOP/s (of the round's peak)",
                "torch.mm / jax matmul rate")


def breakdown_text(results) -> list[str]:
    lines = []
    for res in results:
        b = res.get("eager_breakdown")
        if not b:
            continue
        te = res["summary"]["torch-eager"]["median_ms"]
        ge = res["summary"]["graphduo-eager"]["median_ms"]
        lines += [f"**{res['model']} batch {res['batch_size']}**: graphduo eager {ge:.2f} ms against torch eager "
                  f"{te:.2f} ms per step (x{res['ratios']['eager_time_vs_torch_eager']['median']:.2f}). "
                  f"graphduo dispatches {b['graphduo_ops_per_step']} ops per step "
                  f"({b['graphduo_total_ms']:.2f} ms when each op is run to completion, `inspect_eager`):", "",
                  "| phase | graphduo ops | graphduo ms | torch ms |", "|---|---|---|---|"]
        for phase in ("forward", "backward", "update+metrics"):
            g = b["graphduo_by_phase"].get(phase, {"ops": 0, "ms": 0.0})
            lines.append(f"| {phase} | {g['ops']} | {g['ms']:.2f} | {b['torch_by_phase_ms'][phase]:.2f} |")
        top = ", ".join(f"{k} {v['ops']} ops {v['ms']:.2f} ms" for k, v in b["graphduo_top_primitives"].items())
        lines += ["", f"graphduo's costliest primitives: {top}. torch's update phase is `opt.step()` only "
                      "(its loss is already computed); graphduo's also computes the accuracy metric.", ""]
    return lines


def write_summary(out, results, goal_list, env, command, wall_s, args, plot_note) -> None:
    all_peaks = [p for r in results for p in r["matmul_peak_flops_per_round"]]
    verdict = {True: "**MET**", False: "**NOT MET**", None: "not evaluated"}
    text = [
        "# peers: graphduo against PyTorch (eager and torch.compile)", "",
        f"Command: `{command}`  ",
        f"Wall time: {wall_s:.0f} s; {args.rounds} interleaved round(s) per workload.  ",
        f"Machine: {_common.describe_machine(env)}; torch {env['torch']} on {env.get('torch_device', 'cpu')} with "
        f"torch.set_num_threads({env['torch_threads']}) (the machine's core count). The host memory policy is "
        f"the process's: PyTorch's tensors come from the same malloc as XLA's buffers.  ",
        f"Matmul peak (`_common.matmul_peak_flops`, {env['matmul_peak_size']}x{env['matmul_peak_size']} float32 "
        f"under `jax.jit`): measured in every round right before the traced step, {min(all_peaks) / 1e9:.1f}-"
        f"{max(all_peaks) / 1e9:.1f} GFLOP/s over the run ({env['matmul_peak_flops_start'] / 1e9:.1f} at the start, "
        f"{env['matmul_peak_flops_end'] / 1e9:.1f} at the end); a step's fraction of peak is the median over rounds "
        f"of its FLOP rate over that round's peak.",
        "", "## Step times", "", markdown_table(HEADER, table_rows(results)), "",
        "median: median over rounds of each round's median step time; p10-p90 over every timed step; first "
        "step: the cold first call (torch.compile and graphduo-traced: includes compilation), timed apart; page "
        "faults/step: the process's minor page faults over a round's timed steps, per step, median over rounds "
        "[largest round: the first round also pays for growing the heap]. "
        "torch.compile wraps the model (forward and backward compiled); Adam's step runs as in eager; "
        "inductor's on-disk caches are disabled, so its first step is a full compile.", "",
        "## Ratios", "", markdown_table(RATIO_HEADER, ratio_rows(results)), "",
        "Each ratio: median of the per-round ratios [smallest-largest]. Achieved FLOP/s: XLA's "
        "`cost_analysis()[\"flops\"]` for one traced step / its median time; its fraction of peak: median "
        "[smallest-largest] over rounds of the round's FLOP rate over the matmul peak measured in that round. "
        "torch.mm / jax matmul rate: `torch.mm` on the same square float32 product, timed right after the peak "
        "in each round, over JAX's rate: below 1, PyTorch's GEMM library runs slower than XLA's on this machine, "
        "and part of any speedup over PyTorch at large batch is the libraries', not the compiler's.", "",
        "## Goals", "",
    ]
    for g in goal_list:
        text.append(f"- {g['goal']} (target {g['target']}): {verdict[g['met']]}, {g['reading']}.")
    text += ["- graphduo eager against PyTorch eager at batch 32 (information, no target): " + "; ".join(
        f"{r['model']} x{r['ratios']['eager_time_vs_torch_eager']['median']:.2f} the time"
        for r in results if r["batch_size"] == 32) + ". Breakdown below.", ""]
    text += ["## Same function", "", "Losses after each of the first "
             f"{CHECK_STEPS} steps from the same weights on the same batches, all four variants: " + "; ".join(
                 f"{r['model']} b{r['batch_size']} max relative difference {r['checks']['max_rel_diff']:.1e} "
                 f"({'within' if r['checks']['ok'] else 'OUTSIDE'} {r['checks']['rtol']:g})" for r in results)
             + f". Arithmetic: {env.get('torch_precision', 'float32 on both sides')}.", ""]
    mismatch = loss_mismatch(results)
    if mismatch:
        text += [f"**Loss check failed**: {mismatch}. The run exited with status 1.", ""]
    text += ["## Eager breakdown (batch 32)", "", *breakdown_text(results)]
    if plot_note:
        text += [plot_note, ""]
    _common.write_summary(out, text)


def plot(results, out: pathlib.Path) -> str:
    plt = _common.pyplot()
    if plt is None:
        return "Plot skipped: matplotlib is not installed."
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['model']} b{r['batch_size']}" for r in results]
    x = np.arange(len(results))
    for i, name in enumerate(VARIANTS):
        ax.bar(x + (i - 1.5) * 0.2, [r["summary"][name]["median_ms"] for r in results], 0.2, label=name)
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("median step time (ms, log)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=100)
    plt.close(fig)
    return ""


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _common.make_parser(
        __doc__, "Time the same MLP/CNN Adam training step in PyTorch eager, torch.compile, graphduo eager "
                 "and graphduo traced, from the same weights; check they agree; write results.json and "
                 f"SUMMARY.md. Needs PyTorch: {INSTALL_TORCH}.")
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
    """One line naming the workloads whose four variants reached different losses, or None."""
    bad = [r for r in results if not r["checks"]["ok"]]
    if not bad:
        return None
    return ("the variants' losses differ beyond the relative tolerance "
            f"{bad[0]['checks']['rtol']:g} after {CHECK_STEPS} steps from the same weights: "
            + ", ".join(f"{r['model']} b{r['batch_size']} (max {r['checks']['max_rel_diff']:.1e})" for r in bad)
            + "; the timings compare different computations")


def report(args, command: str, env: dict, results: list[dict], wall_s: float) -> int:
    """Print the table and goals, write results.json, SUMMARY.md and the plot into ``args.out``; the exit
    status: 1 (with a one-line error) when the variants' losses disagree, else 0."""
    goal_list = goals(results)
    print(format_table(table_rows(results)))
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
    torch = need_torch()
    torch.set_num_threads(os.cpu_count() or 1)
    # torch.compile's first step must include a real compile, not a hit in inductor's on-disk cache
    # left by an earlier run (which makes it look ~10x cheaper); graphduo-traced compiles afresh too.
    torch._inductor.config.force_disable_caches = True
    command = _common.command_line(argv)
    t_start = time.perf_counter()
    env = _common.environment(settings)
    args.torch_device, precision = torch_device(torch, env["backend"])
    env.update(torch=torch.__version__, torch_threads=torch.get_num_threads(), torch_device=args.torch_device,
               torch_precision=precision)
    env["matmul_peak_flops_start"] = _common.matmul_peak_flops()
    print(f"peers on {env['cpu']} ({env['cpu_count']} cores), {env['device_kind']}, jax {env['jax']}, torch "
          f"{env['torch']} on {args.torch_device} ({env['torch_threads']} threads), matmul {env['matmul_peak_flops_start'] / 1e9:.0f} GFLOP/s",
          file=sys.stderr)
    results = [bench_workload(torch, m, b, args) for m in args.models for b in args.batch_sizes]
    env["matmul_peak_flops_end"] = _common.matmul_peak_flops()
    env["matmul_peak_flops"] = max(env["matmul_peak_flops_start"], env["matmul_peak_flops_end"])
    env["matmul_peak_size"] = _common.peak_matmul_size()
    status = report(args, command, env, results, time.perf_counter() - t_start)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
