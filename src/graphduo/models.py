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

from graphduo import onednn, runtime

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


def _dense(layer, x, mm=jnp.matmul):
    return mm(x, layer["kernel"]) + layer["bias"]


@jax.jit
def _weight_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x.T @ g`` from an explicit copy of ``x.T``: ``lax.optimization_barrier`` keeps XLA from
    folding the transpose back into the dot, which leaves a dot of the canonical form (left operand
    contracted on its last axis) that jaxlib 0.10's XLA:CPU gives to YNNPACK. The dot ``jax.grad``
    writes for a weight gradient contracts the batch axis, the first of both operands, and XLA:CPU
    runs that one on Eigen: alone, 1.3-1.6x slower than the copy and YNNPACK's dot together for the
    MLP's second and third layers, about even for its 784-wide first; the whole step about 3% slower
    (``experiments/mlp_step.py``, variant ``eigen-weight-gradients``; experiments/RESULTS.md section
    8). One ``jax.jit`` function: in eager mode one dispatched op, as the dot it replaces was."""
    return jax.lax.optimization_barrier(x.T) @ g


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for a batch ``x`` (N, K) and a weight ``w`` (K, M), the same values and gradients,
    with the weight gradient formulated for XLA:CPU (``_weight_gradient``). The input gradient is
    ``jax.grad``'s own dot, and either gradient is computed only when asked for (``symbolic_zeros``:
    no input gradient for a batch of data, as with plain ``x @ w``)."""
    return x @ w


def _matmul_fwd(x, w):
    # x and w are CustomVJPPrimal: keep only what the gradients that will be asked for need
    return x.value @ w.value, (x.value if w.perturbed else None, w.value if x.perturbed else None)


def _matmul_bwd(res, g):
    x, w = res
    dx = None if w is None else jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())))
    return dx, None if x is None else _weight_gradient(x, g)


matmul.defvjp(_matmul_fwd, _matmul_bwd, symbolic_zeros=True)


@jax.jit
def relu(x: jax.Array) -> jax.Array:
    """ReLU with ``nn.relu``'s gradient, 0 at 0 (``jnp.maximum(x, 0)``'s is 1/2 there, which makes
    zero inputs, common in images, train differently from the Flax definition). NaN in, NaN out
    (``x * (x > 0)`` would not: XLA rewrites it into a select that maps NaN to 0). Plain selects, no
    custom derivative rule. One ``jax.jit`` function: one dispatched op in eager mode, as
    ``torch.relu`` is."""
    return jnp.where(x > 0, x, jnp.where(jnp.isnan(x), x, jnp.zeros((), x.dtype)))


def mlp_apply(params: Params, x: jax.Array) -> jax.Array:
    """``MLP.apply`` as plain ``jnp`` on the same parameter tree, its matmuls ``matmul``'s."""
    n = len(params)
    x = x.reshape((x.shape[0], -1))
    for i in range(n - 1):
        x = relu(_dense(params[f"Dense_{i}"], x, matmul))
    return _dense(params[f"Dense_{n - 1}"], x, matmul)


# --- The CNN's building blocks, written for XLA:CPU (see experiments/RESULTS.md, "The CNN step").
# Each computes what the Flax layer computes, outputs and gradients (tests/test_models.py), ties
# included; they differ only in how XLA is asked to do it.


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


@jax.jit
def _max_pool_values(x):
    n, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@jax.jit
def _max_pool_gradient(x, m, g):
    n, h, w, c = x.shape
    x6 = x[:, : h // 2 * 2, : w // 2 * 2, :].reshape(n, h // 2, 2, w // 2, 2, c)
    dx = jnp.where(_window_first_max(x6, m), g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
    dx = dx.reshape(n, h // 2 * 2, w // 2 * 2, c)
    if dx.shape != x.shape:  # odd edges: their gradient is 0
        dx = jnp.pad(dx, ((0, 0), (0, h - dx.shape[1]), (0, w - dx.shape[2]), (0, 0)))
    return dx


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pooling, stride 2, VALID (odd edges dropped): ``nn.max_pool(x, (2, 2), strides=(2, 2))``.

    Same values and same gradient as Flax's (which is ``lax.reduce_window``): the gradient of each
    window goes to its first maximum. Forward as a reshape and a max; backward as one elementwise
    select. ``reduce_window``'s own gradient is a ``select_and_scatter``, with which XLA:CPU ran the
    whole CNN step ~2x slower, and JAX's gradient of a plain ``max`` splits ties.

    Forward and backward are each one ``jax.jit`` function, so in eager mode each is one dispatched
    op, as a framework's pooling op is (PyTorch's ``max_pool2d`` and its backward are one kernel
    each); inside a traced step they are inlined.
    """
    return _max_pool_values(x)


def _max_pool_fwd(x):
    m = _max_pool_values(x)
    return m, (x, m)


def _max_pool_bwd(res, g):
    return (_max_pool_gradient(*res, g),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``nn.Conv(padding="SAME")`` without bias: NHWC input, HWIO kernel, stride 1."""
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


@jax.custom_vjp
def _conv_same_single_channel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``_conv_same`` for one input channel, as kh*kw shifted multiply-adds (one XLA loop fusion).

    A convolution with one input channel is all memory traffic and no reuse: XLA:CPU's library
    convolutions take 3-8 ms for it at batch 256 on 28x28, the fused multiply-adds ~1 ms. One
    ``jax.jit`` function, so one dispatched op in eager mode too. The gradient is the ordinary
    convolution gradient.
    """
    return _single_channel_multiply_adds(x, kernel)


_conv_same_single_channel.defvjp(
    lambda x, kernel: (_single_channel_multiply_adds(x, kernel), (x, kernel)),
    lambda res, g: jax.vjp(_library_conv, *res)[1](g),
)


ONEDNN_MIN_FLOPS = 100e6
"""Smallest convolution (forward FLOPs) given to oneDNN. Each oneDNN call costs ~40 us more than an
XLA kernel, and its OpenMP threads keep spinning for a while after it on cores XLA's next kernels
want: on the CPU measured the CNN's step on 28x28 inputs was slower on oneDNN at batch 8 (3.5-4.0
against 2.7-3.6 ms; its second convolution 58 MFLOP), even within the noise at 16-32 (116-231
MFLOP), 1.3-1.6x faster at 64 and more (462 MFLOP up); on digits (8x8, batch 32) 2x slower. At
batch 256 both convolutions' oneDNN calls clear it (the first one's weight gradient: 116 MFLOP)."""


def _library_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``_conv_same`` on oneDNN where the entry point chose it (``runtime.use_cpu_convolutions``),
    it applies (float32 on the CPU backend) and pays (``ONEDNN_MIN_FLOPS``), else on XLA."""
    kh, kw, ci, co = kernel.shape
    flops = 2 * x.shape[0] * x.shape[1] * x.shape[2] * ci * co * kh * kw
    if (runtime.onednn_convolutions() and x.dtype == kernel.dtype == jnp.float32
            and jax.default_backend() == "cpu" and flops >= ONEDNN_MIN_FLOPS):
        return onednn.conv_same(x, kernel)
    return _conv_same(x, kernel)


def conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``nn.Conv(padding="SAME", use_bias=False)``, choosing the formulation the CPU runs fastest:
    oneDNN's convolutions where chosen (their gradients too), except the forward pass of a
    one-channel input, which is nine fused multiply-adds either way."""
    if x.shape[-1] == 1:
        return _conv_same_single_channel(x, kernel)
    return _library_conv(x, kernel)


def cnn_apply(params: Params, x: jax.Array) -> jax.Array:
    """``CNN.apply`` as plain ``jnp``/``lax`` on the same parameter tree.

    Flax's order per block is ``conv + bias -> ReLU -> max-pool``; this computes
    ``ReLU(max-pool(conv) + bias)``, the same outputs: max-pooling commutes with adding a
    per-channel constant (float rounding is monotone, so even rounded values agree) and with
    ReLU (monotone). Gradients agree too, ties included (each window's gradient goes to its first
    maximum, and ReLU's gradient is 0 at 0), except where rounding ``conv + bias`` turns two
    different values into a tie: then Flax may pick the other one of the pair. Bias and ReLU
    touch 4x fewer values this way.
    """
    n_conv = sum(name.startswith("Conv_") for name in params)
    for i in range(n_conv):
        layer = params[f"Conv_{i}"]
        x = relu(max_pool_2x2(conv_same(x, layer["kernel"])) + layer["bias"])
    x = x.reshape((x.shape[0], -1))
    x = relu(_dense(params["Dense_0"], x))
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
