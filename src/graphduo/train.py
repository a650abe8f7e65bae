"""The training loop, shared by both paradigms: ``train_and_evaluate(config)``.

The loop is written so that Python never holds the device back: batches are put on the device
ahead of use, and step N-1's metrics are pulled to the host only after step N has been
dispatched (at most two steps in flight, no per-step stall).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from graphduo import parallel, traced
from graphduo.config import DEFAULT_EPOCHS, Config, ConfigError
from graphduo.data import Dataset, epoch_batches, load_dataset, steps_per_epoch
from graphduo.models import Model, build_model, count_params
from graphduo.step import create_train_state, make_optimizer


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def wrap_steps(mode: str, model: Model, tx) -> tuple[Any, Any]:
    """The single-device train and eval steps of ``mode``, as ``graphduo.parallel.plan`` wraps them."""
    p = parallel.plan(mode, model, tx)
    return p.train_step, p.eval_step


@dataclasses.dataclass
class Run:
    """A run assembled from a config and checked, before anything is written to disk."""

    config: Config
    dataset: Dataset
    model: Model
    tx: Any
    total_steps: int
    steps_per_epoch: int
    plan: parallel.Plan

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


def prepare(config: Config) -> Run:
    """Validate ``config``, load the data and build model and optimizer. Writes nothing."""
    config.validate()
    dataset = load_dataset(config.dataset, data_dir=config.data_dir, download=config.download,
                           synthetic_shape=tuple(config.synthetic_shape),
                           synthetic_size=config.synthetic_size, seed=config.seed)
    n_train = len(dataset.y_train)
    if config.batch_size > n_train:
        raise ConfigError(f"--batch-size {config.batch_size} is larger than the {n_train} training "
                          f"examples of {config.dataset}: use --batch-size {n_train} or less")
    per_epoch = steps_per_epoch(n_train, config.batch_size)
    total = config.steps if config.steps is not None else per_epoch * (config.epochs or DEFAULT_EPOCHS)
    model = build_model(config.model, dataset.input_shape, dataset.num_classes, **config.model_options())
    tx = make_optimizer(config.optimizer, config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay_value, schedule=config.schedule,
                        warmup_steps=config.warmup_steps, total_steps=total)
    try:
        plan = parallel.plan(config.mode, model, tx, strategy=config.strategy, devices=config.devices,
                             precision=config.precision)
        parallel.check_batch_size(config.batch_size, plan.num_devices)
    except parallel.ParallelError as err:
        raise ConfigError(str(err)) from None
    return Run(config, dataset, model, tx, total, per_epoch, plan)


def device_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                   put=jax.device_put, prefetch: int = 2) -> Iterator[Any]:
    """One epoch of shuffled batches, each placed by ``put`` ``prefetch`` batches ahead of use.

    With several processes each loads only its own slice of every global batch.
    """
    queue: deque = deque()
    shard = (jax.process_index(), jax.process_count())
    for batch in epoch_batches(x, y, batch_size, seed=seed, epoch=epoch, shard=shard):
        queue.append(put(batch))
        if len(queue) > prefetch:
            yield queue.popleft()
    yield from queue


def evaluate(eval_step, params, x: np.ndarray, y: np.ndarray, batch_size: int = 512, *,
             put=jax.device_put, multiple: int = 1) -> dict[str, float]:
    """Loss and accuracy over the whole of ``x, y``; the last batch is padded, not dropped.

    ``batch_size`` is rounded up to a ``multiple`` of the device count; with several processes,
    each contributes only its slice of every evaluation batch.
    """
    n = len(y)
    batch_size = -(-min(batch_size, n) // multiple) * multiple
    index, count = jax.process_index(), jax.process_count()
    rows = batch_size // count
    totals = None
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        mask = np.ones(batch_size, np.float32)
        if len(yb) < batch_size:
            pad = batch_size - len(yb)
            mask[len(yb):] = 0.0
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
        local = slice(index * rows, (index + 1) * rows)
        sums = eval_step(params, put({"image": xb[local], "label": yb[local], "mask": mask[local]}))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"])}


def default_run_dir(config: Config) -> pathlib.Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return pathlib.Path("runs") / f"{stamp}-{config.model}-{config.mode}-{config.dataset}"


class MetricsWriter:
    """Metrics as JSON lines, one object per line, flushed as written."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def train_and_evaluate(config: Config, *, progress: bool = True, log_every: int = 50) -> dict[str, Any]:
    """Train ``config`` end to end, evaluate on the test split every epoch, return a summary.

    Metrics go to ``<run_dir>/metrics.jsonl``: a ``train`` record every ``log_every`` steps and
    an ``eval`` record every epoch; the summary also goes to ``<run_dir>/summary.json``.
    Raises ``ConfigError``/``DataError`` before writing anything, ``TrainingDiverged`` on a
    non-finite loss.
    """
    run = prepare(config)
    ds, plan = run.dataset, run.plan
    train_step, eval_step = plan.train_step, plan.eval_step
    state = create_train_state(run.model, run.tx, jax.random.key(config.seed))
    n_params = count_params(state.params)
    state = plan.put_state(state)
    put = plan.put_batch
    lead = jax.process_index() == 0  # only process 0 reports and writes

    run_dir = pathlib.Path(config.run_dir) if config.run_dir else default_run_dir(config)
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    writer = MetricsWriter(run_dir / "metrics.jsonl") if lead else None

    label = config.mode if plan.mesh is None else f"{config.mode}/{config.strategy}x{plan.num_devices}"
    bar = _progress_bar(run.total_steps, f"{config.model}/{label}", progress and lead)
    first_step_s = 0.0
    train_time_s = 0.0  # steady-state steps only: excludes step 1 and evaluation
    last = {"loss": float("nan"), "accuracy": float("nan")}
    evals: list[dict[str, Any]] = []
    step = 0
    window = _Window()

    def consume(step_no: int, metrics) -> None:
        nonlocal last
        # np.ravel: pmap returns one (identical, averaged) value per device.
        values = {k: float(np.ravel(v)[0]) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(values["loss"]):
            raise TrainingDiverged(
                f"loss became {values['loss']} at step {step_no}: lower --lr (now {config.lr:g}), "
                f"add --schedule warmup-cosine --warmup-steps 100, or check the inputs for NaN/Inf")
        last = values
        window.add(values)
        if writer is not None and (step_no % log_every == 0 or step_no == run.total_steps):
            writer.write({"kind": "train", "step": step_no, **window.mean(), "time_s": time.time()})
        if bar is not None:
            bar.update(1)
            window.show(bar, config.batch_size)

    try:
        for epoch in range(run.epochs):
            pending = None
            t_epoch = time.perf_counter()
            for batch in device_batches(ds.x_train, ds.y_train, config.batch_size,
                                        seed=config.seed, epoch=epoch, put=put):
                if step >= run.total_steps:
                    break
                if step == 0:
                    t0 = time.perf_counter()
                    state, metrics = train_step(state, batch)
                    jax.block_until_ready(state)
                    first_step_s = time.perf_counter() - t0
                    t_epoch = time.perf_counter()
                    window.restart_clock()
                else:
                    state, metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
            if pending is not None:
                consume(*pending)
            jax.block_until_ready(state)
            train_time_s += time.perf_counter() - t_epoch
            result = evaluate(eval_step, plan.eval_params(state.params), ds.x_test, ds.y_test,
                              put=put, multiple=plan.num_devices)
            record = {"kind": "eval", "epoch": epoch + 1, "step": step,
                      "test_loss": result["loss"], "test_accuracy": result["accuracy"]}
            if writer is not None:
                writer.write(record)
            evals.append(record)
            if bar is not None:
                bar.write(f"epoch {epoch + 1}/{run.epochs}  step {step}  test loss {result['loss']:.4f}  "
                          f"test accuracy {result['accuracy']:.2%}", file=sys.stderr)
    finally:
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()

    steady_steps = max(step - 1, 1)
    step_time_ms = train_time_s / steady_steps * 1e3
    summary = {
        "model": config.model,
        "mode": config.mode,
        "dataset": config.dataset,
        "optimizer": config.optimizer,
        "strategy": config.strategy,
        "devices": plan.num_devices,
        "processes": jax.process_count(),
        "process_index": jax.process_index(),
        "precision": config.precision,
        "batch_size": config.batch_size,
        "steps": step,
        "epochs": len(evals),
        "params": n_params,
        "final_loss": last["loss"],
        "final_accuracy": last["accuracy"],
        "test_loss": evals[-1]["test_loss"],
        "test_accuracy": evals[-1]["test_accuracy"],
        "first_step_s": first_step_s,
        "step_time_ms": step_time_ms,
        "samples_per_s": config.batch_size / (step_time_ms / 1e3),
        "compile_time_s": sum(s.compile_time_s for s in (train_step, eval_step)
                              if isinstance(s, traced.TracedStep)),
        "compiles": len(train_step.compiles),
        "eval_compiles": len(eval_step.compiles),
        "run_dir": str(run_dir),
    }
    if config.params_out:
        save_params(plan.host_params(state), config.params_out, write=lead)
    if lead:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def save_params(params, path: str | os.PathLike, *, write: bool = True) -> None:
    """Save a parameter tree to ``path`` (.npz, keys like ``Dense_0/kernel``), atomically."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v)
            for keys, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if not write:
        return
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat ``{"Dense_0/kernel": array, ...}`` mapping written by ``save_params``."""
    with np.load(path) as data:
        return dict(data)


class _Window:
    """Running means of recent step metrics, for the progress bar and the train records."""

    def __init__(self, size: int = 50):
        self.values: deque = deque(maxlen=size)
        self._shown = 0.0
        self._t = time.perf_counter()
        self._count = 0

    def restart_clock(self) -> None:
        self._t, self._count = time.perf_counter(), 0

    def add(self, values: dict[str, float]) -> None:
        self.values.append(values)
        self._count += 1

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean([v[k] for v in self.values])) for k in self.values[0]}

    def show(self, bar, batch_size: int) -> None:
        now = time.perf_counter()
        if now - self._shown < 0.5:
            return
        rate = self._count * batch_size / max(now - self._t, 1e-9)
        m = self.mean()
        bar.set_postfix_str(f"loss {m['loss']:.4f}  acc {m['accuracy']:.2%}  {rate:,.0f} samples/s",
                            refresh=False)
        self._shown, self._t, self._count = now, now, 0


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True, mininterval=0.2)
