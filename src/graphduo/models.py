"""The models: an MLP and a CNN, defined as Flax modules, applied as pure functions.

Each model has two faces that compute the same function (``tests/test_models.py``):

* ``module``: a ``flax.linen`` module. It owns the definition: layer order, parameter
  names and shapes, and initializers (``init``).
* ``apply``: a pure ``jnp`` function of that very parameter tree. The training step calls it.

Why not ``module.apply`` in the step? Under ``jax.jit`` the two cost the same, but in eager mode
(op by op) Flax's module machinery runs in Python on every call and roughly doubles the step
time (measured in ``experiments/bench_core.py``). graphduo's eager baseline must pay JAX's dispatch
cost and nothing else, so both paradigms share the lean ``apply``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]


class MLP(nn.Module):
    """Flatten, then ``Dense -> ReLU`` for each width in ``features``, then a linear classifier."""

    features: Sequence[int] = (512, 512)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for width in self.features:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
    """``Conv3x3 -> ReLU -> MaxPool2x2`` per entry of ``channels``, then ``Dense -> ReLU -> Dense``."""

    channels: Sequence[int] = (32, 64)
    dense: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for c in self.channels:
            x = nn.Conv(c, (3, 3), padding="SAME")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def _dense(layer, x):
    return x @ layer["kernel"] + layer["bias"]


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """``MLP.apply`` as plain ``jnp`` on the same parameter tree."""
    n = len(params)
    x = x.reshape((x.shape[0], -1))
    for i in range(n - 1):
        x = jnp.maximum(_dense(params[f"Dense_{i}"], x), 0.0)
    return _dense(params[f"Dense_{n - 1}"], x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2, VALID (odd edges dropped), as a reshape and a max.

    Same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``. The reshape form lowers to a
    plain reduction whose gradient is a cheap select, where ``lax.reduce_window``'s gradient
    is a ``select_and_scatter`` that XLA:CPU runs slowly.
    """
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2, :]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def cnn_apply(params: Params, x: jax.Array) -> jax.Array:
    """``CNN.apply`` as plain ``jnp``/``lax`` on the same parameter tree."""
    n_conv = sum(name.startswith("Conv_") for name in params)
    for i in range(n_conv):
        layer = params[f"Conv_{i}"]
        x = jax.lax.conv_general_dilated(
            x, layer["kernel"], window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        ) + layer["bias"]
        # max-pool then ReLU: both are monotone, so they commute, and ReLU runs on 4x fewer values.
        x = jnp.maximum(max_pool_2x2(x), 0.0)
    x = x.reshape((x.shape[0], -1))
    x = jnp.maximum(_dense(params["Dense_0"], x), 0.0)
    return _dense(params["Dense_1"], x)


class Model(NamedTuple):
    """A model ready to train: its Flax definition, its pure ``apply`` and its input shape."""

    name: str
    module: nn.Module
    apply: ApplyFn
    input_shape: tuple[int, ...]

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters from Flax's initializers for one ``input_shape`` example."""
        dummy = jnp.zeros((1, *self.input_shape), jnp.float32)
        return self.module.init(rng, dummy)["params"]


_REGISTRY: dict[str, tuple[type[nn.Module], ApplyFn]] = {
    "mlp": (MLP, mlp_apply),
    "cnn": (CNN, cnn_apply),
}
MODELS = tuple(_REGISTRY)


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> Model:
    """Build a registered model (``MODELS``) for inputs of ``input_shape`` (H, W, C).

    ``options`` go to the Flax module: ``features=(512, 512)`` for the MLP,
    ``channels=(32, 64), dense=128`` for the CNN.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    module_cls, apply = _REGISTRY[name]
    if any(int(d) < 1 for d in input_shape) or len(input_shape) != 3:
        raise ValueError(f"input shape must be (H, W, C) of positive sizes, got {tuple(input_shape)}")
    if name == "cnn":
        min_side = 2 ** len(options.get("channels", CNN.channels))
        if min(input_shape[:2]) < min_side:
            raise ValueError(f"the CNN pools {len(options.get('channels', CNN.channels))} times and needs images "
                             f"of at least {min_side}x{min_side}, got {input_shape[0]}x{input_shape[1]}: use "
                             f"--model mlp or fewer --cnn-channels")
    module = module_cls(num_classes=num_classes, **options)
    return Model(name, module, apply, tuple(int(d) for d in input_shape))


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
