"""Data parallelism: the same pure step, wrapped once per strategy, over one axis of devices.

Strategies (``STRATEGIES``):

* ``shard_map``: ``jax.shard_map`` over the mesh; each device runs the step on its slice of the
  batch and the gradients are averaged with an explicit ``lax.pmean`` written here.
* ``pmap``: ``jax.pmap`` (in maintenance mode upstream, kept for comparison), the same explicit
  ``pmean``; one process only.
* ``auto``: ``jax.jit`` with ``NamedSharding``: parameters replicated, the batch split along
  ``DATA_AXIS``; XLA's partitioner inserts the all-reduce itself.

Why ``check_vma=False`` with an explicit ``pmean`` for shard_map: with ``check_vma=True``, the
gradient of a replicated parameter is *already* summed over the axis, and the classic
``pmean(grad)`` then gives N times the true gradient. Tests compare every strategy with the
single-device gradient on the whole global batch.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from graphduo import eager, traced
from graphduo.models import Model
from graphduo.step import make_eval_step, make_gather_steps, make_scan_steps, make_train_step

DATA_AXIS = "data"
STRATEGIES = ("none", "shard_map", "pmap", "auto")
PRECISIONS = {"fp32": None, "bf16": jnp.bfloat16}


class ParallelError(ValueError):
    """A data-parallel setting cannot work here. ``str(err)`` is one line with the fix."""


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis mesh (``DATA_AXIS``) over ``num_devices`` devices (default: all of them).

    With several processes the mesh spans every process's devices, in process order.
    """
    devices = jax.devices()
    if jax.process_count() > 1:
        local = jax.local_device_count()
        if num_devices not in (None, local):
            raise ParallelError(f"--devices {num_devices}: this process has {local} device(s); with several "
                                f"processes, --devices is the count per process")
        return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)
    n = len(devices) if num_devices is None else num_devices
    if n < 1 or n > len(devices):
        raise ParallelError(f"--devices {n}: only {len(devices)} {jax.default_backend()} device(s) exist; "
                            f"use --devices {len(devices)} or fewer")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def mean_over_devices(tree: Any) -> Any:
    """The collective of the explicit strategies: an all-reduce mean over ``DATA_AXIS`` of every
    floating-point leaf (gradients, metrics, a model's running statistics); integer leaves and keys
    (an NNX module's random-stream counters) are the same on every device and stay as they are."""
    return jax.tree.map(lambda x: jax.lax.pmean(x, DATA_AXIS) if jnp.issubdtype(x.dtype, jnp.inexact) else x, tree)


def key_per_device(rng: jax.Array) -> jax.Array:
    """Each device's own key for the step (its dropout masks differ from the others')."""
    return jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))


@dataclasses.dataclass
class Plan:
    """How one run places its state and batches and which wrapped steps it calls.

    ``train_step(state, batch)`` takes what ``put_state`` and ``put_batch`` return,
    ``eval_step(weights, batch)`` what ``eval_weights`` (the state's ``(params, model_state)``) and
    ``put_eval_batch`` (``put_batch`` when None) return; ``host_params`` brings parameters back as one
    NumPy tree. Under ``pmap`` the
    state and the step's metrics carry a leading device axis (the metrics are already averaged:
    every entry is the same), and evaluation takes the batch split over the devices as it comes.

    ``train_steps``, when set, runs several optimizer steps per call (``--steps-per-call``): with
    ``gather`` it takes ``(state, images, labels, perm, ticks)``, the training split on the device
    (``graphduo.step.make_gather_steps``), else ``(state, batches)`` with K batches stacked
    (``graphduo.step.make_scan_steps``); its metrics carry one value per step.
    """

    strategy: str
    mesh: Mesh | None
    train_step: Any
    eval_step: Any
    put_state: Callable[[Any], Any]
    put_batch: Callable[[dict[str, np.ndarray]], Any]
    eval_weights: Callable[[Any], Any]
    put_eval_batch: Callable[[dict[str, np.ndarray]], Any] | None = None
    train_steps: Any = None
    gather: bool = False

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def host_params(self, state) -> Any:
        """Parameters as NumPy arrays on the host (one replica)."""
        return jax.tree.map(np.asarray, jax.device_get(self.eval_weights(state)[0]))

    def host_model_state(self, state) -> Any:
        """The model state on the host (one replica); typed keys stay keys."""
        return jax.device_get(self.eval_weights(state)[1])


def plan(mode: str, model: Model, tx, *, strategy: str = "none", devices: int | None = None,
         precision: str = "fp32", eager_update: str = "ops", steps_per_call: int = 1, unroll: int = 1,
         gather: tuple[int, int] | None = None) -> Plan:
    """Wrap the shared pure steps for ``mode`` (eager/traced) and ``strategy`` in exactly one place.

    ``eager_update="fused"``: eager mode's optimizer update as one compiled op (``graphduo.eager``).
    ``steps_per_call`` > 1 (traced, one device): ``train_steps`` runs that many steps per call, in
    a loop of ``unroll`` steps an iteration.
    ``gather=(batch_size, steps_per_epoch)``: ``train_steps`` gathers each step's batch from a
    training split held on the device (any ``steps_per_call``, one included).
    """
    if strategy not in STRATEGIES:
        raise ParallelError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    if precision not in PRECISIONS:
        raise ParallelError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if mode not in (eager.MODE, traced.MODE):
        raise ParallelError(f"unknown mode {mode!r}: choose one of eager, traced")
    if eager_update not in eager.EAGER_UPDATES:
        raise ParallelError(f"unknown eager update {eager_update!r}: choose one of {', '.join(eager.EAGER_UPDATES)}")
    if steps_per_call > 1 or gather is not None:
        if mode != traced.MODE:
            raise ParallelError(f"--steps-per-call {steps_per_call} needs --mode traced: eager mode runs op by op, "
                                f"one step per call")
        if strategy != "none":
            raise ParallelError(f"--steps-per-call {steps_per_call} runs on one device: use --strategy none, or "
                                f"--steps-per-call 1 with --strategy {strategy}")
    dtype = PRECISIONS[precision]
    wrap = traced.TracedStep if mode == traced.MODE else eager.EagerStep
    eval_fn = make_eval_step(model, compute_dtype=dtype)
    fused = eager.fused_update if mode == eager.MODE and eager_update == "fused" else None

    if strategy == "none":
        if devices not in (None, 1) or jax.process_count() > 1:
            raise ParallelError("several devices or processes need a data-parallel strategy: add "
                                "--strategy shard_map (or pmap, auto)")
        train_fn = make_train_step(model, tx, compute_dtype=dtype, wrap_update=fused)
        if mode == traced.MODE:
            steps = None
            if gather is not None:
                batch_size, per_epoch = gather
                steps = wrap(make_gather_steps(train_fn, batch_size=batch_size, steps_per_epoch=per_epoch,
                                               unroll=unroll), donate_argnums=0)
            elif steps_per_call > 1:
                steps = wrap(make_scan_steps(train_fn, unroll=unroll), donate_argnums=0)
            return Plan(strategy, None, wrap(train_fn, donate_argnums=0), wrap(eval_fn),
                        _identity, jax.device_put, _weights, train_steps=steps, gather=gather is not None)
        return Plan(strategy, None, wrap(train_fn), wrap(eval_fn), _identity, jax.device_put, _weights)

    if mode == eager.MODE and strategy != "shard_map":
        raise ParallelError(f"eager mode runs data-parallel only with --strategy shard_map, not {strategy}")
    mesh = data_mesh(devices)
    replicated = NamedSharding(mesh, P())
    split = NamedSharding(mesh, P(DATA_AXIS))
    put_replicated = functools.partial(_put_global, sharding=replicated)
    put_split = functools.partial(_put_batch, sharding=split)
    if mode == traced.MODE:
        eval_step = traced.TracedStep(eval_fn, in_shardings=(replicated, split), out_shardings=replicated)
    else:
        eval_step = eager.EagerStep(eval_fn)

    if strategy == "shard_map":
        train_fn = make_train_step(model, tx, reduce=mean_over_devices, compute_dtype=dtype, wrap_update=fused,
                                   device_rng=key_per_device)
        sharded = jax.shard_map(train_fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                                out_specs=(P(), P()), check_vma=False)
        train_step = wrap(sharded, donate_argnums=0) if mode == traced.MODE else wrap(sharded)
        return Plan(strategy, mesh, train_step, eval_step, put_replicated, put_split, _weights)

    if strategy == "auto":
        train_fn = make_train_step(model, tx, compute_dtype=dtype)
        train_step = traced.TracedStep(train_fn, donate_argnums=0, in_shardings=(replicated, split),
                                       out_shardings=(replicated, replicated))
        return Plan(strategy, mesh, train_step, eval_step, put_replicated, put_split, _weights)

    # pmap: one replica of the state per device along a new leading axis.
    if jax.process_count() > 1:
        raise ParallelError("--strategy pmap runs within one process here: use shard_map or auto "
                            "across processes")
    n = mesh.size
    train_fn = make_train_step(model, tx, reduce=mean_over_devices, compute_dtype=dtype, device_rng=key_per_device)
    pmap = functools.partial(jax.pmap, axis_name=DATA_AXIS, devices=list(mesh.devices.flat))
    train_step = traced.TracedStep(train_fn, donate_argnums=0, transform=pmap)

    def put_stacked(state):
        return jax.tree.map(lambda x: jax.device_put(jnp.broadcast_to(x, (n, *x.shape)), split), state)

    def put_per_device(batch):
        check_batch_size(len(batch["label"]), n, what="a batch of")
        return {k: jax.device_put(v.reshape(n, v.shape[0] // n, *v.shape[1:]), split) for k, v in batch.items()}

    return Plan(strategy, mesh, train_step, eval_step, put_stacked, put_per_device,
                lambda state: jax.tree.map(lambda x: x[0], _weights(state)), put_eval_batch=put_split)


def check_batch_size(batch_size: int, num_devices: int, what: str = "--batch-size") -> None:
    if batch_size % num_devices:
        up = -(-batch_size // num_devices) * num_devices
        raise ParallelError(f"{what} {batch_size} is not divisible by {num_devices} devices: "
                            f"use a multiple of {num_devices}, such as {up}")


def _identity(x):
    return x


def _weights(state):
    """What evaluation takes of a train state: its parameters and model state."""
    return state.params, state.model_state


def _put_global(tree, *, sharding: NamedSharding):
    """Place a tree that every process holds whole (the state) as global arrays."""
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # typed keys: move their raw bits
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, tree)


def _put_batch(batch: dict[str, np.ndarray], *, sharding: NamedSharding):
    """Place a batch split along its first axis. With several processes, ``batch`` holds only this
    process's rows (``epoch_batches(..., shard=...)``) and the global array is assembled from them."""
    check_batch_size(len(batch["label"]), sharding.mesh.size // jax.process_count(), what="a batch of")
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    n = jax.process_count()
    return {key: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * n, *v.shape[1:]))
            for key, v in batch.items()}
