"""The training loop, shared by both paradigms: ``train_and_evaluate(config)``.

The loop is written so that Python seldom holds the device back: batches are put on the device
ahead of use, and step metrics are pulled to the host in groups of ``METRICS_EVERY`` steps (up to
that many steps in flight), and always before a checkpoint is saved, so a saved state never
follows an unchecked loss.
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
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from graphduo import parallel, paths, traced
from graphduo.checkpoint import Checkpointer
from graphduo.config import DEFAULT_EPOCHS, Config, ConfigError
from graphduo.data import Dataset, epoch_batches, load_dataset, steps_per_epoch
from graphduo.models import Model, build_model, count_params
from graphduo.step import create_train_state, make_optimizer

METRICS_EVERY = 10
"""The loop reads step metrics (loss, accuracy) back from the device in groups of this many steps.
Reading them every step made Python wait for each step before dispatching the one after next, so
a GPU, whose steps take a fraction of a millisecond, idled between steps (experiments/RESULTS.md,
section 7). A NaN loss is still reported with the step that produced it, at most this many steps
later, and always before a checkpoint is saved."""


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
    try:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, **config.model_options())
    except ValueError as err:
        raise ConfigError(str(err)) from None
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


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


# Settings a run directory must share with the command that resumes it: they decide the shapes
# of the state or the arithmetic of every step. The others (how long, where, how often to save,
# how many processes) may change between a run and its resumption.
RESUME_MUST_MATCH = ("model", "dataset", "mlp_features", "cnn_channels", "cnn_dense", "synthetic_shape",
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
    current = config.to_dict()
    for name in RESUME_MUST_MATCH:
        old, new = saved.get(name), current[name]
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
    ds, plan = run.dataset, run.plan
    train_step, eval_step = plan.train_step, plan.eval_step
    lead = jax.process_index() == 0  # only process 0 reports and writes
    run_dir = pathlib.Path(config.run_dir) if config.run_dir else default_run_dir(config)
    check_outputs(config, run_dir)
    resuming = check_resumable(run_dir, config)
    state = create_train_state(run.model, run.tx, jax.random.key(config.seed))
    n_params = count_params(state.params)
    state = plan.put_state(state)
    put = plan.put_batch
    put_eval = plan.put_eval_batch or put

    ckpt_dir = run_dir / "checkpoints"
    checkpointer = None
    if config.checkpoint_every or (resuming and ckpt_dir.is_dir()):
        checkpointer = Checkpointer(ckpt_dir, keep=config.keep)
    start = 0
    if resuming and checkpointer is not None:
        restored = checkpointer.restore_latest(state)
        if restored is not None:
            state, start = restored
    if start >= run.total_steps and (done := finished_summary(run_dir, start)) is not None:
        # Run again after it finished (a requeued job, a repeated command): nothing to train, and
        # its files stay as they are.
        checkpointer.close()
        if config.params_out:
            save_params(plan.host_params(state), config.params_out, write=lead)
        if lead:
            asked = "" if start == run.total_steps else f" (this command asks for {run.total_steps})"
            print(f"graphduo: {run_dir} already finished at step {start}{asked}: nothing to train; its "
                  f"summary follows. Use a new --run-dir to train again, or more --steps/--epochs to go on.",
                  file=sys.stderr)
        return {**done, "process_index": jax.process_index()}
    if lead:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        if start:
            print(f"graphduo: resuming {run_dir} from the checkpoint at step {start}", file=sys.stderr)
    writer = MetricsWriter(run_dir / "metrics.jsonl", keep_until=start) if lead else None

    label = config.mode if plan.mesh is None else f"{config.mode}/{config.strategy}x{plan.num_devices}"
    bar = _progress_bar(run.total_steps, f"{config.model}/{label}", progress and lead, initial=start)
    first_step_s = 0.0
    train_time_s = 0.0  # steady-state steps only: excludes this process's first step and evaluation
    last = {"loss": float("nan"), "accuracy": float("nan")}
    evals: list[dict[str, Any]] = []
    step = start
    window = _Window()
    stop = _StopSignal(agree_every=config.checkpoint_every or 10)

    pending: list[tuple[int, Any]] = []  # (step number, metrics still on the device)

    def consume_pending() -> None:
        # One device_get for the whole group: the device ran these steps while Python dispatched them.
        fetched = jax.device_get([m for _, m in pending])
        for (step_no, _), metrics in zip(pending, fetched):
            consume(step_no, metrics)
        pending.clear()

    def consume(step_no: int, metrics) -> None:
        nonlocal last
        # np.ravel: pmap returns one (identical, averaged) value per device.
        values = {k: float(np.ravel(v)[0]) for k, v in metrics.items()}
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

    saved_at = start

    def save(step_no: int) -> None:
        nonlocal checkpointer, saved_at
        if checkpointer is None:
            checkpointer = Checkpointer(ckpt_dir, keep=config.keep)
        if step_no != saved_at:
            checkpointer.save(step_no, state)
            saved_at = step_no

    profiler = jax.profiler.trace(config.profile, create_perfetto_trace=True) if config.profile else contextlib.nullcontext()
    try:
        with stop, profiler:
            epoch0, skip = divmod(start, run.steps_per_epoch)
            for epoch in range(epoch0, run.epochs):
                t_epoch = time.perf_counter()
                batches = device_batches(ds.x_train, ds.y_train, config.batch_size, seed=config.seed,
                                         epoch=epoch, put=put, skip=skip if epoch == epoch0 else 0)
                for batch in batches:
                    if step >= run.total_steps:
                        break
                    if step == start:
                        t0 = time.perf_counter()
                        state, metrics = train_step(state, batch)
                        jax.block_until_ready(state)
                        first_step_s = time.perf_counter() - t0
                        t_epoch = time.perf_counter()
                        window.restart_clock()
                    else:
                        state, metrics = train_step(state, batch)
                    step += 1
                    pending.append((step, metrics))
                    if len(pending) >= METRICS_EVERY:
                        consume_pending()
                    if config.checkpoint_every and step % config.checkpoint_every == 0:
                        consume_pending()  # a NaN must stop the run before it is saved
                        save(step)
                    if stop.agreed(step):
                        consume_pending()
                        save(step)
                        checkpointer.wait()
                        raise Preempted(f"stopped by {stop.name} at step {step}; checkpoint saved in {ckpt_dir}: "
                                        f"run the same command to resume", stop.signum)
                consume_pending()
                if bar is not None and window.values:
                    window.show(bar, config.batch_size, force=True)  # the epoch's last figures
                jax.block_until_ready(state)
                train_time_s += time.perf_counter() - t_epoch
                result = evaluate(eval_step, plan.eval_params(state.params), ds.x_test, ds.y_test,
                                  put=put_eval, multiple=plan.num_devices)
                record = {"kind": "eval", "epoch": epoch + 1, "step": step,
                          "test_loss": result["loss"], "test_accuracy": result["accuracy"]}
                if writer is not None:
                    writer.write(record)
                evals.append(record)
                if bar is not None:
                    bar.write(f"epoch {epoch + 1}/{run.epochs}  step {step}  test loss {result['loss']:.4f}  "
                              f"test accuracy {result['accuracy']:.2%}", file=sys.stderr)
            if config.checkpoint_every:
                save(step)
    finally:
        if checkpointer is not None:
            checkpointer.close()
        if writer is not None:
            writer.close()
        if bar is not None:
            bar.close()

    if not evals:  # resumed a finished run: nothing left to train, evaluate once
        result = evaluate(eval_step, plan.eval_params(state.params), ds.x_test, ds.y_test,
                          put=put_eval, multiple=plan.num_devices)
        evals.append({"test_loss": result["loss"], "test_accuracy": result["accuracy"]})
    steady_steps = step - start - 1
    step_time_ms = train_time_s / steady_steps * 1e3 if steady_steps > 0 else float("nan")
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
        "resumed_from": start,
        "epochs": run.epochs,
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
    """Save a parameter tree to ``path`` (.npz, keys like ``Dense_0/kernel``), atomically."""
    flat = {"/".join(str(getattr(k, "key", k)) for k in keys): np.asarray(v)
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

    def show(self, bar, batch_size: int, force: bool = False) -> None:
        now = time.perf_counter()
        if self._count == 0 or (now - self._shown < 0.5 and not force):
            return
        rate = self._count * batch_size / max(now - self._t, 1e-9)
        m = self.mean()
        bar.set_postfix_str(f"loss {m['loss']:.4f}  acc {m['accuracy']:.2%}  {rate:,.0f} samples/s",
                            refresh=False)
        self._shown, self._t, self._count = now, now, 0


def _progress_bar(total: int, desc: str, enabled: bool, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
                mininterval=0.2)
