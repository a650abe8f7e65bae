"""The static graph as an artefact: a trained run's model, or its training step, exported with
``jax.export`` so that it outlives the program that traced it.

* ``export_inference``: ``logits = f(images)``, the run's parameters baked in, with a symbolic batch
  dimension (one artefact serves every batch size). Images as graphduo's data sets give them:
  float32 NHWC, scaled to [0, 1] and standardized with the training split's per-channel statistics.
* ``export_train_step``: the training step itself, optimizer included, as a function of plain
  arrays: ``(*state, images, labels) -> (*new_state, loss, accuracy)``. The state's layout (one
  array per leaf of ``TrainState``, in ``jax.tree.leaves`` order, the RNG key as its raw ``uint32``
  data) is ``state_layout``'s, and ``save_train_step`` writes it beside the artefact with the
  state's values, so training can go on in a process that has neither graphduo nor the model's code.

An artefact is the bytes of ``Exported.serialize()``; loading it needs JAX alone::

    import jax, numpy as np
    f = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = f.call(images)

Serialization needs the ``flatbuffers`` package (a graphduo dependency; JAX does not install it).
Only custom calls on JAX's stable list can be exported: graphduo's models have none, and the
export's safety checks stay on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from graphduo.checkpoint import is_key
from graphduo.config import Config
from graphduo.models import Model, build_model
from graphduo.step import TrainState, create_train_state, make_optimizer, make_train_step

WHAT = ("inference", "train-step")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


class ExportError(ValueError):
    """A run directory or an artefact cannot be used. ``str(err)`` is one line naming the fix."""


@dataclasses.dataclass
class TrainedRun:
    """What a finished (or checkpointed) run left: its config, model, optimizer and state."""

    run_dir: pathlib.Path
    config: Config
    model: Model
    tx: Any
    state: TrainState | None  # from a checkpoint (``step``), else None
    params: Any  # the parameters to export: the checkpoint's, or the run's final ones
    model_state: Any  # and the model state that goes with them ({} for a model that keeps none)
    step: int


def _read_json(path: pathlib.Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {what}") from None
    except (OSError, ValueError) as err:
        raise ExportError(f"{path} is unreadable ({err}): give a run directory written by graphduo train") from None
    if not isinstance(value, dict):
        raise ExportError(f"{path} is not a graphduo file: give a run directory written by graphduo train")
    return value


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> TrainedRun:
    """The model and parameters of ``run_dir`` (a ``graphduo train`` run directory): its final
    parameters, or with ``step`` those of its checkpoint of that step (with the whole train state).
    Loads no data: the input shape and class count come from the run's summary."""
    from graphduo.train import MODEL_STATE_FILE, PARAMS_FILE, load_params

    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"run directory {run_dir} does not exist: give the --run-dir of a graphduo train run")
    fields = _read_json(run_dir / "config.json", "give the --run-dir of a graphduo train run")
    summary = _read_json(run_dir / "summary.json", "the run has not finished: let it finish, or export one of "
                                                   "its checkpoints with --step")
    if "input_shape" not in summary or "num_classes" not in summary:
        raise ExportError(f"{run_dir / 'summary.json'} names no input shape: the run was trained by an older "
                          f"graphduo; train it again")
    known = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items() if k in known})
    try:
        model = build_model(config.model, summary["input_shape"], summary["num_classes"], **config.model_options())
    except ValueError as err:
        raise ExportError(f"{run_dir}: {err}") from None
    tx = make_optimizer(config.optimizer, config.lr, momentum=config.momentum,
                        weight_decay=config.weight_decay_value, schedule=config.schedule,
                        warmup_steps=config.warmup_steps, total_steps=summary.get("total_steps", summary["steps"]))
    template = create_train_state(model, tx, jax.random.key(config.seed))
    if step is None:
        path = run_dir / PARAMS_FILE
        if not path.is_file():
            raise ExportError(f"{path} is missing: the run predates graphduo export, or its files were moved; "
                              f"export a checkpoint with --step, or train again")
        try:
            flat = load_params(path)
        except (OSError, ValueError) as err:
            raise ExportError(f"{path} is unreadable ({err}): train again, or export a checkpoint with --step") from None
        params = _unflatten(flat, template.params, path)
        model_state = template.model_state
        if jax.tree.leaves(model_state):
            state_path = run_dir / MODEL_STATE_FILE
            try:
                model_state = _unflatten(load_params(state_path), model_state, state_path)
            except (OSError, ValueError) as err:
                raise ExportError(f"{state_path} is missing or unreadable ({err}): train again, or export a "
                                  f"checkpoint with --step") from None
        return TrainedRun(run_dir, config, model, tx, None, params, model_state, int(summary["steps"]))
    from graphduo.checkpoint import CheckpointError, Checkpointer

    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        raise ExportError(f"{run_dir} has no checkpoints: train with --checkpoint-every, or export its final "
                          f"parameters without --step")
    checkpointer = Checkpointer(folder, keep=None)
    try:
        state = checkpointer.restore(step, template)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    finally:
        checkpointer.close()
    return TrainedRun(run_dir, config, model, tx, state, state.params, state.model_state, step)


def _unflatten(flat: dict[str, np.ndarray], template, path: pathlib.Path):
    """``template``'s tree with the arrays ``save_params`` wrote (typed keys rebuilt from their data)."""
    leaves = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(template)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)
        value = flat.get(name)
        want = jax.random.key_data(leaf).shape if is_key(leaf) else leaf.shape
        if value is None or value.shape != want:
            raise ExportError(f"{path} does not hold the parameters of this run's model ({name}): train again")
        leaves.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf)) if is_key(leaf)
                      else jnp.asarray(value, leaf.dtype))
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def _platforms(platforms: Sequence[str] | None) -> tuple[str, ...] | None:
    if not platforms:
        return None
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad:
        raise ExportError(f"unknown platform {bad[0]!r}: choose from {', '.join(PLATFORMS)}")
    return tuple(dict.fromkeys(platforms))


def export_inference(model: Model, params, model_state=None, *,
                     platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """``logits = f(images)`` for images of shape ``(b, *model.input_shape)``, any ``b``, with
    ``params`` and ``model_state`` (BatchNorm's running statistics) baked in as constants; the model
    in evaluation mode."""
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, *model.input_shape), jnp.float32)
    params = jax.tree.map(jnp.asarray, params)
    model_state = {} if model_state is None else model_state

    def logits(images):
        return model.apply(params, images, model_state)

    return jax.export.export(jax.jit(logits), platforms=_platforms(platforms))(spec)


def state_layout(state: TrainState) -> list[dict[str, Any]]:
    """One entry per array of the exported train step's state: its path in ``TrainState``, shape
    and dtype, in the order the step takes and returns them."""
    flat = flatten_state(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return [{"path": p, "shape": list(a.shape), "dtype": str(a.dtype)} for p, a in zip(paths, flat)]


def flatten_state(state: TrainState) -> list[jax.Array]:
    """The state as the exported step takes it: ``jax.tree.leaves``, typed PRNG keys as raw data."""
    return [jax.random.key_data(x) if is_key(x) else x for x in jax.tree.leaves(state)]


def export_train_step(model: Model, tx, state: TrainState, *, batch_size: int | None = None,
                      platforms: Sequence[str] | None = None) -> jax.export.Exported:
    """The pure training step over plain arrays, ``(*state, images, labels) -> (*new_state, loss,
    accuracy)`` (see ``state_layout``), for batches of any size (or exactly ``batch_size``)."""
    step = make_train_step(model, tx)
    leaves, treedef = jax.tree.flatten(state)
    impls = [jax.random.key_impl(x) if is_key(x) else None for x in leaves]
    n = len(leaves)

    def flat_step(*args):
        s = jax.tree.unflatten(treedef, [a if impl is None else jax.random.wrap_key_data(a, impl=impl)
                                         for a, impl in zip(args[:n], impls)])
        new, metrics = step(s, {"image": args[n], "label": args[n + 1]})
        return (*flatten_state(new), metrics["loss"], metrics["accuracy"])

    b = batch_size if batch_size is not None else jax.export.symbolic_shape("b")[0]
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in flatten_state(state)]
    specs += [jax.ShapeDtypeStruct((b, *model.input_shape), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)]
    return jax.export.export(jax.jit(flat_step), platforms=_platforms(platforms))(*specs)


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def state_file(path: str | os.PathLike) -> pathlib.Path:
    """Where ``save_train_step`` puts the state beside an artefact ``path``."""
    path = pathlib.Path(path)
    return path.with_name(path.name + ".state.npz")


def save(exported: jax.export.Exported, path: str | os.PathLike) -> int:
    """Write ``exported.serialize()`` to ``path`` atomically; returns its size in bytes."""
    data = bytes(exported.serialize())
    _write_atomically(pathlib.Path(path), data)
    return len(data)


def save_train_step(exported: jax.export.Exported, state: TrainState, path: str | os.PathLike) -> int:
    """The train-step artefact at ``path``, and beside it (``state_file``) the state's arrays
    (``state_000``, ...) with their layout (``layout``, JSON), written before the artefact so a
    reader never finds an artefact without its state."""
    arrays = {f"state_{i:03d}": np.asarray(a) for i, a in enumerate(flatten_state(state))}
    layout = np.frombuffer(json.dumps(state_layout(state)).encode(), np.uint8)
    target = state_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, layout=layout, **arrays)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return save(exported, path)


def load(path: str | os.PathLike) -> jax.export.Exported:
    """An artefact read back as graphduo's ``predict`` and any JAX program read it; ``ExportError``
    (one line) for a missing, truncated or foreign file."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ExportError(f"{path} does not exist: give a file written by graphduo export") from None
    except OSError as err:
        raise ExportError(f"{path} cannot be read ({err.strerror or err}): give a readable file") from None
    if not data:
        raise ExportError(f"{path} is empty: export it again")
    try:
        return jax.export.deserialize(bytearray(data))
    except Exception as err:  # flatbuffers and JAX raise many types for bytes that are not an Exported
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ExportError(f"{path} is not a jax.export artefact, or it is truncated ({type(err).__name__}: "
                          f"{reason}): export it again with graphduo export") from None


def check_images(exported: jax.export.Exported, images: np.ndarray, where: str) -> np.ndarray:
    """``images`` as the artefact takes them, or ``ExportError`` naming the shape or dtype it wants."""
    (aval,) = exported.in_avals
    want = tuple(d if isinstance(d, int) else None for d in aval.shape)
    shown = "(N, " + ", ".join(str(d) for d in want[1:]) + ")"
    if not isinstance(images, np.ndarray) or images.dtype.kind != "f":
        dtype = getattr(images, "dtype", type(images).__name__)
        raise ExportError(f"{where}: images of dtype {dtype}, but the model takes {aval.dtype} images of shape "
                          f"{shown}: convert them (np.float32)")
    if images.ndim != len(want) or any(w is not None and w != d for w, d in zip(want, images.shape)):
        raise ExportError(f"{where}: images of shape {images.shape}, but the model takes {shown}: "
                          f"give images of that shape")
    if len(images) == 0:
        raise ExportError(f"{where}: no images")
    return images.astype(aval.dtype, copy=False)


def predict_logits(exported: jax.export.Exported, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits for ``images``, through ``exported.call`` in batches of ``batch_size`` (the last one
    smaller: the batch dimension is symbolic)."""
    out = [np.asarray(exported.call(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def evaluate(exported: jax.export.Exported, images: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> dict[str, float]:
    """Test loss, accuracy and samples/s of an artefact on ``images, labels``. The first call
    (where XLA compiles the artefact for this machine) is timed apart: samples/s is the rest."""
    import time

    t0 = time.perf_counter()
    first = np.asarray(exported.call(images[:batch_size]))
    first_call_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = np.concatenate([first, predict_logits(exported, images[batch_size:], batch_size)]) \
        if len(images) > batch_size else first
    rest = len(images) - min(batch_size, len(images))
    elapsed = time.perf_counter() - t0
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return {"test_loss": float(-log_probs[np.arange(len(labels)), labels].mean()),
            "test_accuracy": float((logits.argmax(axis=1) == labels).mean()),
            "samples_per_s": (rest / elapsed) if rest else float(len(images) / max(first_call_s, 1e-9)),
            "first_call_s": first_call_s, "count": len(labels)}
