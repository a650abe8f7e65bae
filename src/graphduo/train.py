"""The training loop, shared by both paradigms: ``train_and_evaluate(config)``.

The loop reads top to bottom; each part it calls does one job and is tested on its own:

* ``prepare``: the config checked, the data loaded, the model, optimizer and wrapped steps built
  (``parallel.plan``, the one place a config becomes wrapped steps and placements); writes nothing.
* ``CheckpointPolicy``: restore or start afresh; save every K steps, at the end, and on
  SIGTERM/SIGINT (then stop).
* ``MetricsBuffer``: step metrics pulled from the device in groups, so Python seldom waits on the
  device; a non-finite loss stops the run with its own step number.
* ``Progress``: the progress bar, ``metrics.jsonl``, and samples/s of training alone.
* ``evaluate`` and ``summarize``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from graphduo import parallel, paths, traced
from graphduo.checkpoint import Checkpointer, is_key
from graphduo.config import DEFAULT_EPOCHS, Config, ConfigError
from graphduo.data import Dataset, epoch_batches, epoch_permutation, load_dataset, steps_per_epoch
from graphduo.models import Model, build_model, count_params
from graphduo.step import create_train_state, make_optimizer

METRICS_EVERY = 10
"""The loop reads step metrics (loss, accuracy) back from the device in groups of this many steps.
Reading them every step makes Python wait for each step before dispatching the next, so a fast
device idles between steps. A non-finite loss is still reported with the step that produced it, at
most this many steps later, and always before a checkpoint is saved."""


PARAMS_FILE = "params.npz"
"""The run's final parameters, in its run directory (``save_params``' format)."""
MODEL_STATE_FILE = "model_state.npz"
"""The run's final model state (BatchNorm's statistics...), beside them, for models that keep one."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def wrap_steps(mode: str, model: Model, tx) -> tuple[Any, Any]:
    """The single-device train and eval steps of ``mode``, as ``graphduo.parallel.plan`` wraps them."""
    p = parallel.plan(mode, model, tx)
    return p.train_step, p.eval_step


@dataclasses.dataclass
class Call:
    """``state, metrics = call(state)`` runs ``n`` optimizer steps; ``stacked``: the metrics carry a
    leading axis of ``n`` values (else one step's, as the single-step wrappers return them)."""

    n: int
    run: Callable[[Any], tuple[Any, Any]]
    stacked: bool = True

    def __call__(self, state):
        return self.run(state)


def _host(batch):
    return batch


def _stack(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


DEVICE_SPLIT_FRACTION = 0.25
"""The training split goes on the device (``--steps-per-call``'s batches gathered there) when it
takes at most this fraction of the device's memory, as the device reports it."""
DEVICE_SPLIT_BYTES = 2 << 30
"""Where the device reports no memory size (a CPU): the largest split put on it."""


def fits_on_device(nbytes: int, device=None) -> bool:
    """Whether a training split of ``nbytes`` goes on ``device`` (default: the first)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return nbytes <= (DEVICE_SPLIT_FRACTION * limit if limit else DEVICE_SPLIT_BYTES)


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
    run_dir: pathlib.Path
    _split: Any = dataclasses.field(default=None, repr=False)
    _tick_arrays: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def initial_state(self):
        """Fresh parameters and optimizer state from the config's seed, placed for the plan."""
        return self.plan.put_state(create_train_state(self.model, self.tx, jax.random.key(self.config.seed)))

    @property
    def steps_per_call(self) -> int:
        return self.config.steps_per_call

    def epoch_calls(self, start: int) -> Iterator[tuple[int, Iterator[Call]]]:
        """``(epoch, its calls)`` from step ``start`` to the end. A call runs ``n`` optimizer steps:
        one on a batch put on the device from the host, or up to ``--steps-per-call`` in one
        executable. Calls never cross an epoch's end (evaluation) nor the run's. A resumed run
        continues mid-epoch where it stopped: batches depend on (seed, epoch, index) only."""
        first, skip = divmod(start, self.steps_per_epoch)
        for epoch in range(first, self.epochs):
            done = epoch * self.steps_per_epoch + (skip if epoch == first else 0)
            yield epoch, self._calls(epoch, done)

    def _chunks(self, epoch: int, done: int) -> Iterator[tuple[int, int]]:
        """``(place in the epoch, steps)`` of each call of ``epoch`` from global step ``done``."""
        end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        while done < end:
            n = min(self.steps_per_call, end - done)
            yield done - epoch * self.steps_per_epoch, n
            done += n

    def _calls(self, epoch: int, done: int) -> Iterator[Call]:
        ds, cfg, plan = self.dataset, self.config, self.plan
        if plan.gather:  # the split lives on the device: each call sends nothing but its step count
            images, labels = self._device_split()
            perm = jax.device_put(epoch_permutation(len(ds.y_train), seed=cfg.seed, epoch=epoch))
            for _, n in self._chunks(epoch, done):
                ticks = self._ticks(n)
                yield Call(n, lambda state, t=ticks: plan.train_steps(state, images, labels, perm, t))
            return
        place = done - epoch * self.steps_per_epoch
        batches = device_batches(ds.x_train, ds.y_train, cfg.batch_size, seed=cfg.seed, epoch=epoch,
                                 put=plan.put_batch if plan.train_steps is None else _host, skip=place)
        for _, n in self._chunks(epoch, done):
            if plan.train_steps is None:
                batch = next(batches)
                yield Call(n, lambda state, b=batch: plan.train_step(state, b), stacked=False)
            else:  # K host batches stacked into one transfer, scanned on the device
                stacked = jax.device_put(_stack([next(batches) for _ in range(n)]))
                yield Call(n, lambda state, b=stacked: plan.train_steps(state, b))

    def compile_seconds(self) -> float:
        """Time the run's training executables spent compiling so far (traced mode; 0 in eager)."""
        return sum(s.compile_time_s for s in (self.plan.train_step, self.plan.train_steps)
                   if isinstance(s, traced.TracedStep))

    def _device_split(self):
        if self._split is None:
            self._split = jax.device_put((self.dataset.x_train, self.dataset.y_train))
        return self._split

    def _ticks(self, n: int):
        if n not in self._tick_arrays:
            self._tick_arrays[n] = jax.device_put(np.zeros(n, np.int32))
        return self._tick_arrays[n]

    def evaluate(self, state) -> dict[str, float]:
        plan = self.plan
        return evaluate(plan.eval_step, plan.eval_weights(state), self.dataset.x_test, self.dataset.y_test,
                        put=plan.put_eval_batch or plan.put_batch, multiple=plan.num_devices)


def prepare(config: Config) -> Run:
    """Validate ``config``, load the data and build model, optimizer and wrapped steps. Writes nothing."""
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
    options = config.model_options()
    if config.model == "resnet" and config.strategy in ("shard_map", "pmap"):
        options["batch_norm_axis"] = parallel.DATA_AXIS  # batch statistics over the global batch (SyncBatchNorm)
    try:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, **options)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    tx = make_optimizer(config.optimizer, config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay_value, schedule=config.schedule,
                        warmup_steps=config.warmup_steps, total_steps=total)
    # Traced on one device, the training split goes on the device when it fits: each call then
    # sends the device nothing, and K steps per call gather their batches there.
    on_device = (config.mode == "traced" and config.strategy == "none" and jax.process_count() == 1
                 and fits_on_device(dataset.x_train.nbytes + dataset.y_train.nbytes))
    try:
        plan = parallel.plan(config.mode, model, tx, strategy=config.strategy, devices=config.devices,
                             precision=config.precision, eager_update=config.eager_update,
                             steps_per_call=config.steps_per_call, unroll=config.unroll,
                             gather=(config.batch_size, per_epoch) if on_device else None)
        parallel.check_batch_size(config.batch_size, plan.num_devices)
    except parallel.ParallelError as err:
        raise ConfigError(str(err)) from None
    run_dir = pathlib.Path(config.run_dir) if config.run_dir else default_run_dir(config)
    return Run(config, dataset, model, tx, total, per_epoch, plan, run_dir)


def device_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
                   put=jax.device_put, prefetch: int = 2, skip: int = 0) -> Iterator[Any]:
    """One epoch of shuffled batches, each placed by ``put`` ``prefetch`` batches ahead of use.

    With several processes each loads only its own slice of every global batch. ``skip`` drops
    the epoch's first batches (a resumed run continues mid-epoch where it stopped).
    """
    queue: deque = deque()
    shard = (jax.process_index(), jax.process_count())
    stream = epoch_batches(x, y, batch_size, seed=seed, epoch=epoch, shard=shard)
    for batch in itertools.islice(stream, skip, None):
        queue.append(put(batch))
        if len(queue) > prefetch:
            yield queue.popleft()
    yield from queue


def evaluate(eval_step, weights, x: np.ndarray, y: np.ndarray, batch_size: int = 512, *,
             put=jax.device_put, multiple: int = 1) -> dict[str, float]:
    """Loss and accuracy over the whole of ``x, y`` with ``weights`` (a state's ``(params,
    model_state)``); the last batch is padded, not dropped.

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
        sums = eval_step(weights, put({"image": xb[local], "label": yb[local], "mask": mask[local]}))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = jax.device_get(totals)
    return {"loss": float(totals["loss_sum"] / totals["count"]),
            "accuracy": float(totals["correct"] / totals["count"])}


def default_run_dir(config: Config) -> pathlib.Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    where, _, name = config.model.rpartition(":")  # a user's FILE.py:NAME: one folder, named for both
    label = f"{pathlib.Path(where).stem}.{name}" if where else config.model
    return pathlib.Path("runs") / f"{stamp}-{label}-{config.mode}-{config.dataset}"


# Settings a run directory must share with the command that resumes it: they decide the shapes
# of the state or the arithmetic of every step. The others (how long, where, how often to save,
# how many processes) may change between a run and its resumption.
RESUME_MUST_MATCH = ("model", "dataset", "mlp_features", "cnn_channels", "cnn_dense", "resnet_width", "resnet_stages",
                     "rnn_cell", "rnn_hidden", "rnn_loop", "vit_patch", "vit_dim", "vit_depth", "vit_heads",
                     "synthetic_shape",
                     "synthetic_size", "batch_size", "optimizer", "lr", "schedule", "warmup_steps",
                     "momentum", "weight_decay", "seed", "precision")


def check_resumable(run_dir: pathlib.Path, config: Config) -> bool:
    """Whether ``run_dir`` holds an earlier run of ``config``; ``ConfigError`` if it is another run's."""
    saved_path = run_dir / "config.json"
    if not saved_path.exists():
        return False
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{saved_path} is unreadable ({err}): use another --run-dir") from None
    current, defaults = config.to_dict(), Config().to_dict()
    for name in RESUME_MUST_MATCH:
        # a setting newer than the saved run is recorded there as its default
        old, new = saved.get(name, defaults[name]), current[name]
        if isinstance(new, tuple):
            old = tuple(old) if isinstance(old, list) else old
        if old != new:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{run_dir} holds a run with {flag} {_show(old)}, not {_show(new)}: use another "
                              f"--run-dir, or the same {flag} to resume it")
    return True


def check_outputs(config: Config, run_dir: pathlib.Path) -> None:
    """``ConfigError`` unless every path the run will write can be written: the run directory, the
    profiler's folder and the parameters file. Checked before any work, so a typo costs a second,
    not a training run, and leaves nothing on disk."""
    try:
        paths.output_folder(run_dir, "--run-dir", create=False)
        if config.profile:
            paths.output_folder(config.profile, "--profile", create=False)
        if config.params_out:
            paths.output_file(config.params_out, "--params-out", "params.npz")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def finished_summary(run_dir: pathlib.Path, step: int) -> dict[str, Any] | None:
    """The summary a finished run wrote, if ``run_dir/summary.json`` is that of a run that ended at
    ``step`` (the step of its newest checkpoint); else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == step else None


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


# --------------------------------------------------------------------------------------------
# The loop.


def train_and_evaluate(config: Config, *, progress: bool = True, log_every: int = 50) -> dict[str, Any]:
    """Train ``config`` end to end, evaluate on the test split every epoch, return a summary.

    Metrics go to ``<run_dir>/metrics.jsonl``: a ``train`` record every ``log_every`` steps and
    an ``eval`` record every epoch; the summary also goes to ``<run_dir>/summary.json``. With
    ``checkpoint_every``, checkpoints go to ``<run_dir>/checkpoints``, and a run directory that
    has them is resumed from the newest complete one. SIGTERM/SIGINT save a checkpoint at the next
    step boundary and raise ``Preempted``. Raises ``ConfigError``/``DataError`` before writing
    anything, ``TrainingDiverged`` on a non-finite loss.
    """
    run = prepare(config)
    if config.mode == "traced" and config.eager_update != "ops":
        raise ConfigError(f"--eager-update {config.eager_update} changes eager mode only: add --mode eager, or drop it")
    check_outputs(config, run.run_dir)
    lead = jax.process_index() == 0  # only process 0 reports and writes
    checkpoints = CheckpointPolicy(run.run_dir / "checkpoints", every=config.checkpoint_every, keep=config.keep)
    state, start = checkpoints.restore_or(run.initial_state(), resume=check_resumable(run.run_dir, config))
    if start >= run.total_steps and (done := finished_summary(run.run_dir, start)) is not None:
        checkpoints.close()
        return _already_finished(run, state, start, done, lead)
    if lead:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if start:
            print(f"graphduo: resuming {run.run_dir} from the checkpoint at step {start}", file=sys.stderr)
        for line in call_notes(run):
            print(f"graphduo: {line}", file=sys.stderr)

    report = Progress(run, start=start, enabled=progress and lead, write=lead, log_every=log_every)
    clock = TrainClock()  # steady-state training time: after the first call, evaluation left out
    pending = MetricsBuffer(report.train, on_bad_loss=lambda step, loss: TrainingDiverged(
        f"loss became {loss} at step {step}: lower --lr (now {config.lr:g}), add --schedule warmup-cosine "
        f"--warmup-steps 100, or check the inputs for NaN/Inf"))
    first_call_s, first_call_steps, step, evals = 0.0, 0, start, []
    profiler = jax.profiler.trace(config.profile, create_perfetto_trace=True) if config.profile else contextlib.nullcontext()
    with checkpoints, report, profiler:
        for epoch, calls in run.epoch_calls(start):
            if step > start:
                clock.start()  # again after the previous epoch's evaluation
            for call in calls:
                t0, compiled_s = time.perf_counter(), run.compile_seconds()
                state, metrics = call(state)
                step += call.n
                if not first_call_steps:  # the first call (it compiles in traced mode) is timed apart
                    jax.block_until_ready(state)
                    first_call_s, first_call_steps = time.perf_counter() - t0, call.n
                    clock.start()
                else:  # a later compile (an epoch's shorter last call) is not training time either
                    clock.discount(run.compile_seconds() - compiled_s)
                pending.add(step, metrics, call.n, stacked=call.stacked)
                checkpoints.after_call(step - call.n, step, state, before_saving=pending.flush)
            pending.flush()
            jax.block_until_ready(state)
            clock.stop()
            evals.append(report.evaluation(epoch, step, run.evaluate(state)))
        checkpoints.finish(step, state)
    if not evals:  # nothing was left to train: evaluate once
        evals.append(report.evaluation(None, step, run.evaluate(state)))
    summary = summarize(run, start=start, steps=step, last=pending.last, evaluation=evals[-1],
                        first_call_s=first_call_s, first_call_steps=first_call_steps, train_time_s=clock.seconds())
    params = run.plan.host_params(state)
    save_params(params, run.run_dir / PARAMS_FILE, write=lead)  # what `graphduo export` exports
    if jax.tree.leaves(state.model_state):
        save_params(run.plan.host_model_state(state), run.run_dir / MODEL_STATE_FILE, write=lead)
    if config.params_out:
        save_params(params, config.params_out, write=lead)
    if lead:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def call_notes(run: Run) -> list[str]:
    """One line each for what ``--steps-per-call`` changes in this run that the user should know."""
    k, cfg, notes = run.steps_per_call, run.config, []
    if cfg.mode == "traced" and cfg.strategy == "none" and not run.plan.gather:
        size = (run.dataset.x_train.nbytes + run.dataset.y_train.nbytes) / 2**20
        notes.append(f"the training split ({size:,.0f} MiB) is too large to keep on the device: batches stream from "
                     f"the host" + (f", {k} stacked per call" if k > 1 else ""))
    if k > 1 and run.steps_per_epoch % k:
        notes.append(f"an epoch is {run.steps_per_epoch} steps, not a multiple of --steps-per-call {k}: each epoch "
                     f"ends with a call of {run.steps_per_epoch % k} steps (compiled once more)")
    if k > 1 and cfg.checkpoint_every and (cfg.checkpoint_every % k or run.steps_per_epoch % k):
        notes.append(f"checkpoints are saved between calls of up to {k} steps: each at the end of the call that "
                     f"reaches or passes a multiple of --checkpoint-every {cfg.checkpoint_every}")
    return notes


def _already_finished(run: Run, state, step: int, summary: dict[str, Any], lead: bool) -> dict[str, Any]:
    """A run started again after it finished (a requeued job, a repeated command): nothing to
    train, and its files stay as they are."""
    if run.config.params_out:
        save_params(run.plan.host_params(state), run.config.params_out, write=lead)
    if lead:
        asked = "" if step == run.total_steps else f" (this command asks for {run.total_steps})"
        print(f"graphduo: {run.run_dir} already finished at step {step}{asked}: nothing to train; its "
              f"summary follows. Use a new --run-dir to train again, or more --steps/--epochs to go on.",
              file=sys.stderr)
    return {**summary, "process_index": jax.process_index()}


def summarize(run: Run, *, start: int, steps: int, last: dict[str, float], evaluation: dict[str, Any],
              first_call_s: float, first_call_steps: int, train_time_s: float) -> dict[str, Any]:
    """The run's summary: what ran, how it ended, and how fast (steady state: every step after
    this process's first call, evaluation excluded)."""
    config, plan = run.config, run.plan
    steady_steps = steps - start - first_call_steps
    step_time_ms = train_time_s / steady_steps * 1e3 if steady_steps > 0 else float("nan")
    return {
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
        "input_shape": list(run.model.input_shape),
        "num_classes": run.dataset.num_classes,
        "steps": steps,
        "total_steps": run.total_steps,
        "resumed_from": start,
        "epochs": run.epochs,
        "params": count_params(jax.eval_shape(run.model.init, jax.random.key(0))),
        "final_loss": last.get("loss", float("nan")),
        "final_accuracy": last.get("accuracy", float("nan")),
        "test_loss": evaluation["test_loss"],
        "test_accuracy": evaluation["test_accuracy"],
        "first_step_s": first_call_s,  # the first call: its compile and its steps
        "first_call_steps": first_call_steps,
        "steps_per_call": run.steps_per_call,
        "unroll": config.unroll,
        "device_split": run.plan.gather,
        "eager_update": config.eager_update if config.mode == "eager" else None,
        "step_time_ms": step_time_ms,
        "samples_per_s": config.batch_size / (step_time_ms / 1e3),
        "compile_time_s": sum(s.compile_time_s for s in (plan.train_step, plan.train_steps, plan.eval_step)
                              if isinstance(s, traced.TracedStep)),
        "compiles": len(plan.train_step.compiles) + (len(plan.train_steps.compiles) if plan.train_steps else 0),
        "eval_compiles": len(plan.eval_step.compiles),
        "run_dir": str(run.run_dir),
    }


class TrainClock:
    """Wall time spent training: started and stopped around the stretches that count."""

    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now
        self._total = 0.0
        self._since: float | None = None

    def start(self) -> None:
        if self._since is None:
            self._since = self._now()

    def stop(self) -> None:
        if self._since is not None:
            self._total += self._now() - self._since
            self._since = None

    def seconds(self) -> float:
        return self._total + (self._now() - self._since if self._since is not None else 0.0)

    def discount(self, seconds: float) -> None:
        """Leave out ``seconds`` spent inside a counted stretch (a compile in the middle of training)."""
        self._total -= seconds


class MetricsBuffer:
    """Step metrics held on the device and read back in groups of ``every`` steps.

    ``flush()`` reads what is pending with one ``device_get``, checks each loss in step order and
    hands the group to ``on_group([(step, values), ...])``; a non-finite loss raises
    ``on_bad_loss(step, loss)`` (an exception) instead, naming the first bad step.
    """

    def __init__(self, on_group: Callable[[list[tuple[int, dict[str, float]]]], None], *,
                 on_bad_loss: Callable[[int, float], Exception], every: int = METRICS_EVERY):
        self._on_group = on_group
        self._on_bad_loss = on_bad_loss
        self.every = every
        self._pending: list[tuple[int, Any, int, bool]] = []
        self._steps = 0
        self.last: dict[str, float] = {}

    def add(self, step: int, metrics, count: int = 1, *, stacked: bool = False) -> None:
        """The metrics of the ``count`` steps that end at ``step``: with ``stacked``, one value per
        step along a leading axis (a multi-step call), else one step's."""
        self._pending.append((step, metrics, count, stacked))
        self._steps += count
        if self._steps >= self.every:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        fetched = jax.device_get([m for _, m, _, _ in self._pending])
        entries = [(s, n, stacked) for s, _, n, stacked in self._pending]
        self._pending.clear()
        self._steps = 0
        group = []
        for (last, n, stacked), metrics in zip(entries, fetched):
            # np.ravel: pmap returns one (identical, averaged) value per device; a stacked call one per step.
            flat = {k: np.ravel(v) for k, v in metrics.items()}
            for i in range(n):
                values = {k: float(v[i if stacked else 0]) for k, v in flat.items()}
                step = last - n + 1 + i
                if not math.isfinite(values["loss"]):
                    raise self._on_bad_loss(step, values["loss"])
                group.append((step, values))
        self.last = group[-1][1]
        self._on_group(group)


class Progress:
    """What a run reports as it goes: the progress bar (loss, accuracy, samples/s), ``metrics.jsonl``
    (a ``train`` record every ``log_every`` steps, an ``eval`` record per evaluation) and the
    evaluation lines. samples/s counts training time only: the steps of each group read back
    against the training time between reads, evaluation left out. A context manager: it closes
    the file and the bar."""

    def __init__(self, run: Run, *, start: int, enabled: bool, write: bool, log_every: int,
                 now: Callable[[], float] = time.perf_counter):
        config = run.config
        self.total, self.batch_size, self.log_every, self.epochs = run.total_steps, config.batch_size, log_every, run.epochs
        self.writer = MetricsWriter(run.run_dir / "metrics.jsonl", keep_until=start) if write else None
        label = config.mode if run.plan.mesh is None else f"{config.mode}/{config.strategy}x{run.plan.num_devices}"
        self.bar = _progress_bar(self.total, f"{config.model}/{label}", enabled, initial=start)
        self.window: deque = deque(maxlen=50)
        self._now = now
        self._mark: float | None = None  # when the last group was read (None: the clock is paused)
        self._steps = 0  # steps read since the rate was last shown
        self._seconds = 0.0  # training time they took
        self._shown = -math.inf
        self._rate_text = ""

    def train(self, group: list[tuple[int, dict[str, float]]]) -> None:
        """One group of step metrics, just read back: every step in it has finished."""
        now = self._now()
        if self._mark is not None:
            self._steps += len(group)
            self._seconds += now - self._mark
        self._mark = now
        for step, values in group:
            self.window.append(values)
            if self.writer is not None and (step % self.log_every == 0 or step == self.total):
                self.writer.write({"kind": "train", "step": step, **self.mean(), "time_s": time.time()})
        if self.bar is not None:
            self.bar.update(len(group))
            self._show(force=False)

    def mean(self) -> dict[str, float]:
        return {k: float(np.mean([v[k] for v in self.window])) for k in self.window[0]}

    def rate(self) -> float | None:
        """Samples/s over the groups read since the rate was last shown (None before two reads)."""
        return self._steps * self.batch_size / self._seconds if self._steps and self._seconds > 0 else None

    def _show(self, force: bool) -> None:
        now = self._now()
        if not self.window or (now - self._shown < 0.5 and not force):
            return
        rate = self.rate()
        if rate is not None:  # else the last rate shown stays (no two reads since, e.g. after an evaluation)
            self._rate_text = f"  {rate:,.0f} samples/s"
            self._steps, self._seconds = 0, 0.0
        m = self.mean()
        self.bar.set_postfix_str(f"loss {m['loss']:.4f}  acc {m['accuracy']:.2%}{self._rate_text}", refresh=False)
        self._shown = now

    def evaluation(self, epoch: int | None, step: int, result: dict[str, float]) -> dict[str, Any]:
        """Report one evaluation; the training clock is paused from the last read until the next."""
        self._mark = None
        record = {"kind": "eval", "epoch": None if epoch is None else epoch + 1, "step": step,
                  "test_loss": result["loss"], "test_accuracy": result["accuracy"]}
        if epoch is None:
            return record
        if self.writer is not None:
            self.writer.write(record)
        if self.bar is not None:
            self._show(force=True)
            self.bar.write(f"epoch {epoch + 1}/{self.epochs}  step {step}  test loss {result['loss']:.4f}  "
                           f"test accuracy {result['accuracy']:.2%}", file=sys.stderr)
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
        return False


class MetricsWriter:
    """Metrics as JSON lines, one object per line, flushed as written.

    ``keep_until``: a resumed run first drops the records of steps after its checkpoint (they
    will be written again) and any torn last line left by a crash, then appends.
    """

    def __init__(self, path: pathlib.Path, *, keep_until: int = 0):
        self.path = path
        if keep_until and path.exists():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("step", 0) <= keep_until:
                    kept.append(line + "\n")
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept), encoding="utf-8")
            os.replace(tmp, path)
        elif path.exists() and not keep_until:
            path.unlink()  # a fresh start in an old run directory: its metrics are not ours
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class CheckpointPolicy:
    """When the loop saves the train state: every ``every`` steps (``None``: never on a
    schedule), once more at the end when ``every`` is set, and at the next step boundary after
    SIGTERM/SIGINT, after which it raises ``Preempted``. A context manager: within it the two
    signals are caught (a second one exits at once); on leaving, saves in flight are finished.
    """

    def __init__(self, directory: pathlib.Path, *, every: int | None, keep: int):
        self.directory = directory
        self.every = every
        self.keep = keep
        self.checkpointer: Checkpointer | None = None
        self.saved_at = 0
        self.stop = _StopSignal(agree_every=every or 10)

    def restore_or(self, fresh, *, resume: bool) -> tuple[Any, int]:
        """``(state, step)`` from the newest complete checkpoint when ``resume`` and there is one,
        else ``(fresh, 0)``; ``fresh`` is also the template the checkpoint is restored into."""
        if self.every or (resume and self.directory.is_dir()):
            self.checkpointer = Checkpointer(self.directory, keep=self.keep)
        if resume and self.checkpointer is not None:
            restored = self.checkpointer.restore_latest(fresh)
            if restored is not None:
                self.saved_at = restored[1]
                return restored
        return fresh, 0

    def save(self, step: int, state) -> None:
        if self.checkpointer is None:
            self.checkpointer = Checkpointer(self.directory, keep=self.keep)
        if step != self.saved_at:
            self.checkpointer.save(step, state)
            self.saved_at = step

    def after_call(self, before: int, step: int, state, *, before_saving: Callable[[], None]) -> None:
        """After a call that took the run from step ``before`` to ``step``: save if it reached or
        passed a multiple of ``every``, or stop if a signal came; ``before_saving`` runs first (the
        metrics check: a state whose loss is already NaN must never be saved)."""
        if self.every and step // self.every > before // self.every:
            before_saving()
            self.save(step, state)
        if self.stop.agreed(step):
            before_saving()
            self.save(step, state)
            self.checkpointer.wait()
            raise Preempted(f"stopped by {self.stop.name} at step {step}; checkpoint saved in {self.directory}: "
                            f"run the same command to resume", self.stop.signum)

    def finish(self, step: int, state) -> None:
        if self.every:
            self.save(step, state)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

    def __enter__(self):
        self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self.close()
        finally:
            self.stop.__exit__(*exc)
        return False


class _StopSignal:
    """SIGTERM/SIGINT handling for the training loop (a context manager).

    The first signal asks the loop to stop at the next step boundary; a second one exits at once.
    With several processes, they agree every ``agree_every`` steps (a tiny all-gather) so that
    all stop after the same step: one stopping early would leave the others in a collective.
    """

    def __init__(self, agree_every: int):
        self.agree_every = agree_every
        self.signum = 0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum, frame):
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\ngraphduo: got {signal.Signals(signum).name}: saving a checkpoint at the next step boundary "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)

    def agreed(self, step: int) -> bool:
        if jax.process_count() == 1:
            return bool(self.signum)
        if step % self.agree_every:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.signum], np.int32))
        if not self.signum and flags.max() > 0:
            self.signum = int(flags.max())
        return bool(flags.max())


def save_params(params, path: str | os.PathLike, *, write: bool = True) -> None:
    """Save a parameter tree to ``path`` (.npz, keys like ``Dense_0/kernel``), atomically; typed PRNG
    keys (in a model state) as their raw data."""
    flat = {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys):
            np.asarray(jax.random.key_data(v) if is_key(v) else v)
            for keys, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if not write:
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **flat)
    os.replace(tmp, path)


def load_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The flat ``{"Dense_0/kernel": array, ...}`` mapping written by ``save_params``."""
    with np.load(path) as data:
        return dict(data)


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2)
