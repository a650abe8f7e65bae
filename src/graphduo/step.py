"""The one training step and the one evaluation step, written once as pure functions.

Nothing here is jitted. Each paradigm wraps these functions in exactly one place:
``eager.py`` calls them as they are, ``traced.py`` compiles them with ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from graphduo.models import ApplyFn, ForwardFn, Model

Batch = dict[str, jax.Array]  # {"image": f32[B, H, W, C], "label": i32[B]}
Metrics = dict[str, jax.Array]

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "warmup-cosine")


class TrainState(NamedTuple):
    """Everything a step reads and writes: a pytree, so it can be jitted, donated and saved.

    ``rng`` is the run's base key; each step draws its randomness (dropout) from
    ``jax.random.fold_in(state.rng, state.step)``, so the stream never depends on how many steps ran
    in one process. ``model_state``: what the model itself updates (BatchNorm's running statistics,
    an NNX module's random streams); ``{}`` for a model that keeps none.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    model_state: Any = {}  # noqa: RUF012  (never mutated: each step returns a new one)


def make_optimizer(
    name: str,
    learning_rate: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
) -> optax.GradientTransformation:
    """An optax optimizer: ``sgd``, ``momentum`` (heavy ball), ``adam`` or ``adamw``.

    ``schedule="warmup-cosine"`` ramps the rate linearly from 0 over ``warmup_steps``, then
    decays it to 0 along a cosine by ``total_steps``. ``weight_decay`` is decoupled for
    ``adamw`` (optax's own) and added to the gradient (L2) for the others.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    lr: float | optax.Schedule = learning_rate
    if schedule == "warmup-cosine":
        if not total_steps:
            raise ValueError("schedule 'warmup-cosine' needs total_steps")
        lr = optax.warmup_cosine_decay_schedule(
            0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
        )
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    base = {
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=momentum),
        "adam": lambda: optax.adam(lr),
    }[name]()
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay), base)
    return base


def create_train_state(model: Model, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """Initial parameters and model state from ``rng``, and the optimizer's initial state."""
    init_rng, state_rng = jax.random.split(rng)
    params, model_state = model.init_variables(init_rng)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), state_rng, model_state)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy against integer labels.

    Written with ``jax.nn.log_softmax`` (one fused helper) rather than optax's version, which
    dispatches more ops per step in eager mode for the same value (count them with ``graphduo inspect``).
    """
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1))


def make_train_step(
    model: Model | ApplyFn,
    tx: optax.GradientTransformation,
    *,
    reduce: Callable[[Any], Any] | None = None,
    compute_dtype: jnp.dtype | None = None,
    wrap_update: Callable[[Callable], Callable] | None = None,
    device_rng: Callable[[jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """``train_step(state, batch) -> (state, {"loss", "accuracy"})``: one pure optimizer step.

    Args:
      model: a ``Model`` (its ``forward``: parameters, model state and randomness), or a stateless
        ``logits = apply_fn(params, images)``.
      tx: the optax optimizer.
      reduce: applied to the gradients, the metrics and the new model state before the update;
        data-parallel wrappers pass a cross-device mean here (``graphduo.parallel``). ``None`` on
        one device.
      compute_dtype: run the forward and backward pass in this dtype (``jnp.bfloat16``) while
        parameters, gradients and optimizer state stay float32 (mixed precision, as PyTorch AMP).
      wrap_update: applied once to the optimizer update, ``(grads, opt_state, params) -> (params,
        opt_state)``; eager mode's fused variant compiles it into one op (``graphduo.eager``).
      device_rng: turns the step's key into this device's (data-parallel wrappers: each device
        draws its own dropout masks).

    The metrics describe the parameters *before* the update (the loss the gradient came from).
    """
    forward = _in_dtype(forward_of(model), compute_dtype)
    update = optimizer_update(tx)
    if wrap_update is not None:
        update = wrap_update(update)

    def loss_fn(params, model_state, batch, rng):
        logits, new_model_state = forward(params, model_state, batch["image"], True, rng)
        return cross_entropy(logits, batch["label"]), (logits, new_model_state)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        if device_rng is not None:
            rng = device_rng(rng)
        (loss, (logits, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.model_state, batch, rng)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        if reduce is not None:
            grads, metrics, model_state = reduce((grads, metrics, model_state))
        params, opt_state = update(grads, state.opt_state, state.params)
        return TrainState(state.step + 1, params, opt_state, state.rng, model_state), metrics

    return train_step


def forward_of(model: Model | ApplyFn) -> ForwardFn:
    """``model``'s ``forward``; a plain ``apply_fn(params, x)`` as a forward with no model state."""
    if isinstance(model, Model):
        return model.forward

    def forward(params, model_state, x, train, rng):
        return model(params, x), model_state

    return forward


def make_scan_steps(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]], *, unroll: int = 1):
    """``steps(state, batches) -> (state, metrics)``: one ``train_step`` per batch of ``batches``
    (each array with a leading axis of K steps), as a ``lax.scan``: K optimizer steps in one
    traced program. ``metrics`` has the same leading axis: one value per step. ``unroll``: steps
    per iteration of the loop XLA compiles (``lax.scan``'s own; K: no loop left, a longer compile)."""

    def steps(state: TrainState, batches: Batch) -> tuple[TrainState, Metrics]:
        return jax.lax.scan(train_step, state, batches, unroll=unroll)

    return steps


def make_gather_steps(train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]], *,
                      batch_size: int, steps_per_epoch: int, unroll: int = 1):
    """``steps(state, images, labels, perm, ticks) -> (state, metrics)``: ``len(ticks)`` optimizer
    steps on a training split already on the device, as a ``lax.scan`` (one step without one).

    Each step gathers its own batch on the device: rows ``perm[p * batch_size:(p + 1) * batch_size]``
    of ``images`` and ``labels``, where ``p = state.step % steps_per_epoch`` is the step's place in
    its epoch and ``perm`` the epoch's permutation (``graphduo.data.epoch_permutation``): the batch
    ``graphduo.data.epoch_batches`` yields for that step on the host. ``ticks`` only says how many
    steps (its values are unused); ``metrics`` has one value per step along a leading axis.
    ``unroll`` as in ``make_scan_steps``.
    """

    def steps(state: TrainState, images, labels, perm, ticks) -> tuple[TrainState, Metrics]:
        def one(state: TrainState, _=None) -> tuple[TrainState, Metrics]:
            start = (state.step % steps_per_epoch) * batch_size
            rows = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
            return train_step(state, {"image": images[rows], "label": labels[rows]})

        if ticks.shape[0] == 1:  # no loop for one step: the program of a plain step
            state, metrics = one(state)
            return state, jax.tree.map(lambda m: m[None], metrics)
        return jax.lax.scan(one, state, ticks, unroll=unroll)

    return steps


def optimizer_update(tx: optax.GradientTransformation) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """``(grads, opt_state, params) -> (params, opt_state)``: one update of ``tx``, applied."""

    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update


def _in_dtype(forward: ForwardFn, dtype) -> ForwardFn:
    """``forward`` computing in ``dtype`` on float32 parameters, returning float32 logits and a model
    state in the dtypes it came in."""
    if dtype is None or jnp.dtype(dtype) == jnp.float32:
        return forward

    def low_forward(params, model_state, x, train, rng):
        low = jax.tree.map(lambda p: p.astype(dtype), params)
        logits, new_state = forward(low, model_state, x.astype(dtype), train, rng)
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, model_state)
        return logits.astype(jnp.float32), new_state

    return low_forward


def make_eval_step(model: Model | ApplyFn, *, compute_dtype: jnp.dtype | None = None) -> Callable[[Any, Batch], Metrics]:
    """``eval_step(weights, batch) -> {"loss_sum", "correct", "count"}``: sums, so batches add up.
    ``weights`` is ``(params, model_state)`` (``TrainState``'s); the model runs in evaluation mode.

    ``batch["mask"]`` (1 for real examples, 0 for padding) lets the last batch be padded to the
    same shape as the others, so a traced evaluation compiles once.
    """

    forward = _in_dtype(forward_of(model), compute_dtype)

    def eval_step(weights, batch: Batch) -> Metrics:
        params, model_state = weights
        logits, _ = forward(params, model_state, batch["image"], False, None)
        mask = batch["mask"]
        losses = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=-1)[:, 0]
        hits = jnp.argmax(logits, -1) == batch["label"]
        return {"loss_sum": jnp.sum(losses * mask), "correct": jnp.sum(hits * mask), "count": jnp.sum(mask)}

    return eval_step
