"""Eager and traced mode compute the same function; traced mode compiles once per shape, and says so."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tree_allclose
from graphduo import EagerStep, TracedStep, TracingError, build_model, create_train_state, epoch_batches
from graphduo.step import make_optimizer, make_train_step
from graphduo.train import wrap_steps

# Both modes run the same float32 ops; XLA fuses and reorders them, so each step differs by rounding
# (~1e-7 relative). Measured after 20 steps on CPU: max abs parameter difference 3e-8..6e-8 for the
# four cases below. atol 1e-6 leaves a >15x margin for other CPUs; a 1% learning-rate change moves
# the parameters by 1.7e-3..3.8e-3, >1000x beyond it, and the negative controls assert it is caught.
ATOL = 1e-6
RTOL = 1e-5
STEPS = 20

EQUIVALENCE_CASES = [
    pytest.param("mlp", "sgd", 0.05, {"features": (64, 32)}, id="mlp-sgd"),
    pytest.param("mlp", "adam", 1e-3, {"features": (64, 32)}, id="mlp-adam"),
    pytest.param("cnn", "sgd", 0.05, {"channels": (8, 16), "dense": 32}, id="cnn-sgd"),
    pytest.param("cnn", "adam", 1e-3, {"channels": (8, 16), "dense": 32}, id="cnn-adam"),
]


def _train(mode, name, opt, lr, options, digits, *, steps=STEPS, lr_scale=1.0):
    model = build_model(name, digits.input_shape, digits.num_classes, **options)
    tx = make_optimizer(opt, lr * lr_scale)
    step, _ = wrap_steps(mode, model, tx)
    state = create_train_state(model, tx, jax.random.key(0))
    batches = epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0)
    losses = []
    for _, batch in zip(range(steps), batches):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), losses, step


@pytest.mark.parametrize("name,opt,lr,options", EQUIVALENCE_CASES)
def test_eager_and_traced_reach_the_same_parameters(name, opt, lr, options, digits):
    eager_params, eager_losses, eager_step = _train("eager", name, opt, lr, options, digits)
    traced_params, traced_losses, traced_step = _train("traced", name, opt, lr, options, digits)
    # Genuinely different paths: one compiled the step, the other never did.
    assert isinstance(eager_step, EagerStep) and eager_step.compiles == []
    assert isinstance(traced_step, TracedStep) and len(traced_step.compiles) == 1
    assert eager_losses[-1] < eager_losses[0]  # it trained
    np.testing.assert_allclose(eager_losses, traced_losses, rtol=RTOL, atol=ATOL)
    assert tree_allclose(eager_params, traced_params, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,opt,lr,options", [EQUIVALENCE_CASES[1], EQUIVALENCE_CASES[2]])
def test_equivalence_check_catches_a_small_difference(name, opt, lr, options, digits):
    """Negative control: a 1% different learning rate on one side must fail the same check."""
    eager_params, _, _ = _train("eager", name, opt, lr, options, digits)
    traced_params, _, _ = _train("traced", name, opt, lr, options, digits, lr_scale=1.01)
    assert not tree_allclose(eager_params, traced_params, rtol=RTOL, atol=ATOL)


def _compile_events():
    """Count XLA compilations JAX itself reports, independent of TracedStep's own bookkeeping."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, listener


def test_traced_compiles_once_for_a_fixed_shape_and_again_for_a_new_one(digits, caplog):
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(32,))
    tx = make_optimizer("sgd", 0.1)
    step = TracedStep(make_train_step(model.apply, tx), donate_argnums=0)
    state = create_train_state(model, tx, jax.random.key(0))
    batches = list(epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0))
    state, _ = step(state, batches[0])  # compile
    events, listener = _compile_events()
    try:
        for batch in batches[1:41]:
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        assert len(step.compiles) == 1
        assert events == []  # JAX agrees: 40 steps, no compilation
        small = {k: v[:8] for k, v in batches[0].items()}
        with caplog.at_level(logging.WARNING, logger="graphduo.traced"):
            state, _ = step(state, small)
        assert len(step.compiles) == 2
        assert len(events) >= 1
        assert "compiled again (compile #2" in caplog.text and "[8, 8, 8, 1]" in caplog.text
        state, _ = step(state, batches[1])  # the old shape's executable is reused
        assert len(step.compiles) == 2
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_traced_repeat_calls_skip_the_signature_but_not_the_check(digits, monkeypatch):
    # A call like the last goes straight to its executable (no flattening of the state: ~10 us a
    # call); one with another signature is still caught, compiled and counted.
    from graphduo import traced

    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(16,))
    tx = make_optimizer("sgd", 0.1)
    step = TracedStep(make_train_step(model.apply, tx), donate_argnums=0)
    state = create_train_state(model, tx, jax.random.key(0))
    batches = list(epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0))[:6]
    state, _ = step(state, batches[0])
    signatures = []
    real = traced.signature
    monkeypatch.setattr(traced, "signature", lambda args: signatures.append(1) or real(args))
    for batch in batches[1:5]:
        state, _ = step(state, batch)
    assert signatures == [] and len(step.compiles) == 1
    small = {k: v[:8] for k, v in batches[5].items()}
    state, metrics = step(state, small)
    assert len(step.compiles) == 2 and float(metrics["loss"]) > 0
    state, _ = step(state, batches[5])  # back to the first shape: its executable, no compile
    assert len(step.compiles) == 2


def test_traced_keeps_weak_types_apart_by_signature(monkeypatch):
    # The executable's own check ignores weak types, so a step called with a Python scalar is looked
    # up by signature on every call: 2.0 stays weak (bfloat16 result), float32(2.0) is compiled apart.
    from graphduo import traced

    step = TracedStep(lambda x, s: x * s)
    x = jnp.ones(3, jnp.bfloat16)
    assert step(x, 2.0).dtype == jnp.bfloat16
    signatures = []
    real = traced.signature
    monkeypatch.setattr(traced, "signature", lambda args: signatures.append(1) or real(args))
    assert step(x, 3.0).dtype == jnp.bfloat16 and len(signatures) == 1
    assert step(x, jnp.float32(2.0)).dtype == jnp.float32 and len(step.compiles) == 2
    # Documented limit of the fast path (TracedStep.__call__): right after a call with strong arrays,
    # a Python scalar is taken as an array of the last call's dtype, as jnp.float32(2.0) would be.
    assert step(x, 2.0).dtype == jnp.float32 and len(step.compiles) == 2


def test_traced_donates_the_state_buffers(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(16,))
    tx = make_optimizer("adam", 1e-3)
    step = TracedStep(make_train_step(model.apply, tx), donate_argnums=0)
    state = create_train_state(model, tx, jax.random.key(0))
    batch = next(epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0))
    new_state, _ = step(state, batch)
    assert state.params["Dense_0"]["kernel"].is_deleted()  # updated in place, as PyTorch does
    assert not new_state.params["Dense_0"]["kernel"].is_deleted()


def test_traced_exposes_the_compiled_stages(digits):
    batch_size, width = 32, 64
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(width,))
    tx = make_optimizer("sgd", 0.1)
    step = TracedStep(make_train_step(model.apply, tx))
    state = create_train_state(model, tx, jax.random.key(0))
    batch = next(epoch_batches(digits.x_train, digits.y_train, batch_size, seed=0, epoch=0))
    stages = step.stages(state, batch)
    primitives = {eqn.primitive.name for eqn in stages.jaxpr.eqns}
    assert "dot_general" in primitives
    record = stages.record
    assert record.trace_s > 0 and record.lower_s > 0 and record.compile_s > 0
    # Independent reference: a dense layer costs 2*B*in*out FLOPs forward and twice that backward
    # (the input layer needs no input gradient: 2 backward matmuls elsewhere, 1 there).
    matmul_flops = 2 * batch_size * (64 * width + width * 10)
    analytic = matmul_flops * 3 - 2 * batch_size * 64 * width
    flops = stages.cost_analysis()["flops"]
    assert 0.9 * analytic <= flops <= 1.5 * analytic, (flops, analytic)
    memory = stages.memory_analysis()
    param_bytes = 4 * (64 * width + width + width * 10 + 10)
    assert memory["argument_size_in_bytes"] >= param_bytes
    assert step.stages(state, batch) is stages  # cached: no second compile
    assert len(step.compiles) == 1


def _loss_with_python_control_flow(apply_fn):
    """A loss that branches in Python on a value computed from the data: define-by-run style."""

    def apply(params, x):
        logits = apply_fn(params, x)
        if jnp.abs(logits).max() > 10.0:  # a concrete bool in eager mode, a tracer under jit
            logits = logits / 2.0
        return logits

    return apply


def test_python_control_flow_works_eagerly_and_fails_clearly_when_traced(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(16,))
    apply = _loss_with_python_control_flow(model.apply)
    tx = make_optimizer("sgd", 0.1)
    state = create_train_state(model, tx, jax.random.key(0))
    batch = next(epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0))

    eager_step = EagerStep(make_train_step(apply, tx))
    _, metrics = eager_step(state, batch)
    assert np.isfinite(metrics["loss"])
    strict = EagerStep(make_train_step(apply, tx), strict=True)
    _, strict_metrics = strict(state, batch)
    np.testing.assert_allclose(strict_metrics["loss"], metrics["loss"], rtol=1e-6)

    traced_step = TracedStep(make_train_step(apply, tx))
    with pytest.raises(TracingError, match=r"branches in Python on a traced value.*jax\.lax\.cond"):
        traced_step(state, batch)
