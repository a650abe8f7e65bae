"""The models: an MLP and a CNN, defined as Flax modules, applied as pure functions.

Each model has two faces that compute the same function (``tests/test_models.py``):

* ``module``: a ``flax.linen`` module. It owns the definition: layer order, parameter
  names and shapes, and initializers (``init``).
* ``apply``: a pure ``jnp``/``lax`` function of that very parameter tree. The training step calls it.

Why not ``module.apply`` in the step? Under ``jax.jit`` the two compile to the same program, but
in eager mode (op by op) Flax's module machinery runs in Python on every call, on top of JAX's
dispatch (``experiments/bench_core.py`` measures how much). graphduo's eager baseline pays JAX's
dispatch and nothing of its own, so both paradigms share the lean ``apply``.

A model is a pure function of (parameters, inputs): nothing read from the process at trace time
changes what it computes or how it compiles. Every formulation here is plain JAX, the same on
every backend; formulations tuned to one backend or one jaxlib live in ``experiments/``.
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


def dense(layer: Params, x: jax.Array) -> jax.Array:
    """``nn.Dense``: ``x @ kernel + bias``."""
    return x @ layer["kernel"] + layer["bias"]


@jax.jit
def relu(x: jax.Array) -> jax.Array:
    """ReLU with ``nn.relu``'s values and gradient (0 at 0; ``jnp.maximum(x, 0)``'s is 1/2 there,
    which makes the zero inputs common in images train differently). NaN in, NaN out (``x * (x >
    0)`` would map NaN to 0). Plain selects and no custom derivative rule: ``jax.nn.relu``'s
    ``custom_jvp`` hides the NaNs it passes from ``jax_debug_nans`` (seen in jax 0.10.2 and 0.12.0.1:
    ``--debug-nans`` then never names an op). One ``jax.jit`` function: one dispatched op in eager
    mode, as a framework's ReLU is."""
    return jnp.where(x > 0, x, jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype)))


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """``MLP.apply`` as plain ``jnp`` on the same parameter tree."""
    n = len(params)
    x = x.reshape((x.shape[0], -1))
    for i in range(n - 1):
        x = relu(dense(params[f"Dense_{i}"], x))
    return dense(params[f"Dense_{n - 1}"], x)


def lax_conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``nn.Conv(padding="SAME", use_bias=False)``: NHWC input, HWIO kernel, stride 1."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.jit
def _single_channel_multiply_adds(x, kernel):
    kh, kw = kernel.shape[:2]
    (top, bottom), (left, right) = jax.lax.padtype_to_pads((kh, kw), (kh, kw), (1, 1), "SAME")
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i:i + h, j:j + w, :] * kernel[i, j, 0]
            out = term if out is None else out + term
    return out


@jax.jit
def _conv_input_gradient(kernel, g, x_like):
    return jax.linear_transpose(lambda v: lax_conv_same(v, kernel), x_like)(g)[0]


@jax.jit
def _conv_kernel_gradient(x, g, kernel_like):
    return jax.linear_transpose(lambda k: lax_conv_same(x, k), kernel_like)(g)[0]


@jax.custom_vjp
def _conv_same_single_channel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _single_channel_multiply_adds(x, kernel)


def _single_channel_fwd(x, kernel):
    # x and kernel are CustomVJPPrimal: keep only what the gradients that will be asked for need
    out = _single_channel_multiply_adds(x.value, kernel.value)
    return out, (x.value, kernel.value, x.perturbed, kernel.perturbed)


def _single_channel_bwd(res, g):
    # The convolution's own gradients, each one jitted op, each computed only when asked for: the
    # image's gradient is never needed, and the forward convolution is never recomputed.
    x, kernel, x_perturbed, kernel_perturbed = res
    dx = _conv_input_gradient(kernel, g, x) if x_perturbed else None
    dk = _conv_kernel_gradient(x, g, kernel) if kernel_perturbed else None
    return dx, dk


_conv_same_single_channel.defvjp(_single_channel_fwd, _single_channel_bwd, symbolic_zeros=True)


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``lax_conv_same``; for a one-input-channel image (the CNN's first layer) its forward pass as
    kh*kw shifted multiply-adds in one fused loop, its gradients the convolution's own.

    A convolution of one input channel has almost no reuse: it is memory traffic, which one
    elementwise loop serves as well as a library convolution and without its scratch buffers. Plain
    JAX, the same values and gradients (``tests/test_models.py``); what it buys on the CPU at both
    ends of the supported JAX range is in ``experiments/cnn_step.py`` (``graphduo`` against
    ``lax-convolutions``). One ``jax.jit`` function: one dispatched op in eager mode.
    """
    if x.shape[-1] == 1:
        return _conv_same_single_channel(x, kernel)
    return lax_conv_same(x, kernel)


def _window_first_max(x6: jax.Array, m: jax.Array) -> jax.Array:
    """Mask of the first maximum, in row-major window order, of each 2x2 window.

    ``x6``: (N, H/2, 2, W/2, 2, C) windows; ``m``: (N, H/2, W/2, C) their maxima. The first maximum
    is the element ``lax.reduce_window``'s gradient (XLA's select-and-scatter with ``>=``) picks.
    """
    eq = x6 == m[:, :, None, :, None, :]
    top_row_has_max = jnp.any(eq[:, :, :1], axis=4, keepdims=True)
    left_col_is_max = eq[:, :, :, :, :1]
    row = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 2, 1, 1, 1), 2)
    col = jax.lax.broadcasted_iota(jnp.int32, (1, 1, 1, 1, 2, 1), 4)
    earlier = ((row == 1) & top_row_has_max) | ((col == 1) & left_col_is_max)
    return eq & ~earlier


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)


@jax.jit
def _max_pool_values(x):
    return _windows(x).max(axis=(2, 4))


@jax.jit
def _max_pool_gradient(x, m, g):
    n, h, w, c = x.shape
    dx = jnp.where(_window_first_max(_windows(x), m), g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    if dx.shape != x.shape:  # odd edges: their gradient is 0
        dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return dx


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2, VALID (odd edges dropped): ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

    Same values and same gradient as Flax's (``lax.reduce_window``): each window's gradient goes
    to its first maximum. Forward as a reshape and a max, backward as one elementwise select,
    where ``reduce_window``'s own gradient is a ``select_and_scatter`` (how much that costs per
    backend and jaxlib: ``experiments/cnn_step.py``), and JAX's gradient of a plain ``max`` would
    split ties. Forward and backward are each one ``jax.jit`` function, so in eager mode each is
    one dispatched op, as a framework's pooling op is; inside a traced step they are inlined.
    """
    return _max_pool_values(x)


def _max_pool_fwd(x):
    m = _max_pool_values(x)
    return m, (x, m)


def _max_pool_bwd(res, g):
    return (_max_pool_gradient(*res, g),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def cnn_apply(params: Params, x: jax.Array) -> jax.Array:
    """``CNN.apply`` as plain ``jnp``/``lax`` on the same parameter tree.

    Flax's order per block is ``conv + bias -> ReLU -> max-pool``; this computes
    ``ReLU(max-pool(conv) + bias)``, the same outputs: max-pooling commutes with adding a
    per-channel constant (float rounding is monotone, so even rounded values agree) and with
    ReLU (monotone). Gradients agree too, ties included (each window's gradient goes to its first
    maximum, and ReLU's gradient is 0 at 0), except where rounding ``conv + bias`` turns two
    different values into a tie: then Flax may pick the other one of the pair. Bias and ReLU
    touch a quarter of the values this way, on any backend.
    """
    n_conv = sum(name.startswith("Conv_") for name in params)
    for i in range(n_conv):
        layer = params[f"Conv_{i}"]
        x = relu(max_pool_2x2(conv_same(x, layer["kernel"])) + layer["bias"])
    x = x.reshape((x.shape[0], -1))
    x = relu(dense(params["Dense_0"], x))
    return dense(params["Dense_1"], x)


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
