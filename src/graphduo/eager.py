"""Eager mode: the dynamic-graph paradigm. The step runs op by op, as PyTorch does.

Each ``jnp``/``lax`` call dispatches one operation as soon as Python reaches it, and ``jax.grad``
records and replays the graph as it goes. Python control flow on concrete values therefore just
works (``if loss > 1.0:`` inside a loss), and every op pays JAX's dispatch cost. This module adds
nothing on top of that cost: it calls the pure step as it is.

One variant, named wherever eager figures appear: ``EAGER_UPDATES``. ``ops`` (the default) runs the
optimizer update op by op like everything else; ``fused`` compiles the update alone into one op
(``fused_update``), as PyTorch's ``Adam(fused=True)`` runs it as one kernel, while the forward and
backward passes stay op by op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

MODE = "eager"
EAGER_UPDATES = ("ops", "fused")


def fused_update(update: Callable[..., Any]) -> Callable[..., Any]:
    """The optimizer update ``(grads, opt_state, params) -> (params, opt_state)`` as one compiled
    op: ``make_train_step(..., wrap_update=fused_update)`` for eager mode's ``fused`` variant. Inside
    a traced step a nested ``jax.jit`` is inlined, so it changes nothing there."""
    return jax.jit(update)


class EagerStep:
    """Run ``fn`` op by op.

    Args:
      fn: a pure step function (``graphduo.step.make_train_step`` or ``make_eval_step``).
      strict: also run the small ``jnp`` helpers that JAX jits internally (``jax.nn.relu``,
        ``log_softmax``...) primitive by primitive, under ``jax.disable_jit()``. Slower; use it
        when every single op must be visible (profiling, debugging).
    """

    mode = MODE

    def __init__(self, fn: Callable[..., Any], *, strict: bool = False):
        self.fn = fn
        self.strict = strict
        self.name = getattr(fn, "__name__", "step")
        self.compiles: list = []  # eager never compiles a whole step

    def __call__(self, *args):
        if self.strict:
            with jax.disable_jit():
                return self.fn(*args)
        return self.fn(*args)
