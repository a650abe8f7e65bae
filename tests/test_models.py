"""The lean ``apply`` of each model computes what its Flax module computes, and gradients are right."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo.models import build_model, conv_same, count_params, max_pool_2x2
from graphduo.step import create_train_state, cross_entropy, make_optimizer, make_train_step

# float32 matmuls and convolutions summed in a different order differ by a few ulps per output;
# 1e-5 relative / 1e-5 absolute is ~100 ulps on logits of order 1: rounding, not a different function.
RTOL = ATOL = 1e-5

CASES = [
    pytest.param("mlp", (8, 8, 1), {"features": (16, 12)}, id="mlp-8x8"),
    pytest.param("cnn", (8, 8, 1), {"channels": (4, 6), "dense": 12}, id="cnn-8x8"),
    pytest.param("cnn", (28, 28, 1), {}, id="cnn-28x28-default"),
    pytest.param("cnn", (7, 9, 3), {"channels": (5,), "dense": 8}, id="cnn-odd-edges"),
]


def _inputs(shape, n=4, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, *shape))


@pytest.mark.parametrize("name,shape,options", CASES)
def test_apply_matches_flax_module(name, shape, options):
    model = build_model(name, shape, 10, **options)
    params = model.init(jax.random.key(0))
    x = _inputs(shape)
    want = model.module.apply({"params": params}, x)
    got = model.apply(params, x)
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,shape,options", CASES)
def test_gradients_match_flax_module(name, shape, options):
    model = build_model(name, shape, 10, **options)
    params = model.init(jax.random.key(0))
    x, y = _inputs(shape), jnp.arange(4) % 10
    want = jax.grad(lambda p: cross_entropy(model.module.apply({"params": p}, x), y))(params)
    got = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_equivalence_check_can_fail():
    """Negative control: a shift of one output bias by 1e-3 is caught by the same tolerance."""
    model = build_model("cnn", (8, 8, 1), 10, channels=(4, 6), dense=12)
    params = model.init(jax.random.key(0))
    x = _inputs((8, 8, 1))
    perturbed = jax.tree.map(lambda p: p, params)
    perturbed["Dense_1"]["bias"] = perturbed["Dense_1"]["bias"].at[0].add(1e-3)
    want = model.module.apply({"params": params}, x)
    assert not np.allclose(model.apply(perturbed, x), want, rtol=RTOL, atol=ATOL)


def test_max_pool_matches_reduce_window():
    x = _inputs((9, 6, 3), n=2)
    np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))


def _tied(shape, n=2, seed=3):
    """Values in {0, 1, 2}: most 2x2 windows hold a tie for their maximum."""
    return jnp.floor(jax.random.uniform(jax.random.key(seed), (n, *shape)) * 3.0)


@pytest.mark.parametrize("shape", [(4, 4, 3), (9, 7, 2)], ids=["even", "odd-edges"])
def test_max_pool_gradient_matches_reduce_window_with_ties(shape):
    """Each window's gradient goes to its first maximum, as ``lax.reduce_window``'s does: exactly."""
    x = _tied(shape)
    ct = jax.random.normal(jax.random.key(4), max_pool_2x2(x).shape)
    want = jax.vjp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)), x)[1](ct)[0]
    got = jax.vjp(max_pool_2x2, x)[1](ct)[0]
    np.testing.assert_array_equal(got, want)
    # Negative control: JAX's gradient of a plain max splits ties, which the same check rejects.
    split = jax.vjp(lambda v: v[:, :shape[0] // 2 * 2, :shape[1] // 2 * 2].reshape(
        2, shape[0] // 2, 2, shape[1] // 2, 2, shape[2]).max(axis=(2, 4)), x)[1](ct)[0]
    assert not np.allclose(split, want)


def test_cnn_gradients_match_flax_on_inputs_with_ties():
    """Digit-like inputs (exact zeros around the strokes) and zero-initialised biases make many
    conv outputs exactly 0 and many pooling ties; the gradients must still be Flax's."""
    model = build_model("cnn", (28, 28, 1), 10)
    params = model.init(jax.random.key(0))
    u = jax.random.uniform(jax.random.key(1), (8, 28, 28, 1))
    x, y = jnp.where(u < 0.6, 0.0, u), jnp.arange(8) % 10
    want = jax.grad(lambda p: cross_entropy(model.module.apply({"params": p}, x), y))(params)
    got = jax.grad(lambda p: cross_entropy(model.apply(p, x), y))(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)

    # Negative control: the same block with ReLU as jnp.maximum (gradient 1/2 at 0) and JAX's
    # tie-splitting max is a different function at ties, and the same check catches it.
    def splitting(p, v):
        for i in range(2):
            c = p[f"Conv_{i}"]
            v = jax.lax.conv_general_dilated(v, c["kernel"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC")) + c["bias"]
            n, h, w, ch = v.shape
            v = jnp.maximum(v.reshape(n, h // 2, 2, w // 2, 2, ch).max(axis=(2, 4)), 0.0)
        v = jnp.maximum(v.reshape(v.shape[0], -1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"], 0.0)
        return v @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]

    bad = jax.grad(lambda p: cross_entropy(splitting(p, x), y))(params)
    assert not all(np.allclose(g, w, rtol=1e-4, atol=1e-6)
                   for g, w in zip(jax.tree.leaves(bad), jax.tree.leaves(want)))


def _lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("kshape", [(3, 3, 1, 5), (4, 2, 1, 3)], ids=["3x3", "even-4x2"])
def test_single_channel_convolution_matches_lax(kshape):
    """The one-input-channel convolution (shifted multiply-adds) against ``lax.conv``: outputs and
    both gradients, for a 3x3 and an even 4x2 kernel (asymmetric SAME padding)."""
    x = jax.random.uniform(jax.random.key(4), (3, 7, 6, 1))
    k = jax.random.normal(jax.random.key(5), kshape)
    mine = conv_same  # one input channel: the multiply-adds
    # float32 sums of at most 8 products of unit size in another order: ~1e-6
    np.testing.assert_allclose(mine(x, k), _lax_conv(x, k), rtol=1e-5, atol=1e-5)
    ct = jax.random.normal(jax.random.key(6), _lax_conv(x, k).shape)
    for g, w in zip(jax.vjp(mine, x, k)[1](ct), jax.vjp(_lax_conv, x, k)[1](ct)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # negative control: the kernel flipped is a convolution, not XLA's
        np.testing.assert_allclose(mine(x, k[::-1, ::-1]), _lax_conv(x, k), rtol=1e-5, atol=1e-5)
    # its forward is multiply-adds, no convolution; its gradient the ordinary convolution's
    assert "conv_general_dilated" not in str(jax.make_jaxpr(mine)(x, k))
    assert "conv_general_dilated" in str(jax.make_jaxpr(lambda x, k: jax.vjp(mine, x, k)[1](ct))(x, k))


def test_param_count_of_default_models():
    mlp = build_model("mlp", (28, 28, 1), 10)
    assert count_params(mlp.init(jax.random.key(0))) == 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    cnn = build_model("cnn", (28, 28, 1), 10)
    expected = (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (7 * 7 * 64 * 128 + 128) + (128 * 10 + 10)
    assert count_params(cnn.init(jax.random.key(0))) == expected


def test_unknown_model_names_choices():
    with pytest.raises(ValueError, match="unknown model 'transformer': choose one of mlp, cnn, resnet, rnn, vit"):
        build_model("transformer", (8, 8, 1), 10)


def _numpy_mlp_loss(params, x, y):
    """An independent float64 NumPy reference of the MLP and its loss (no JAX involved)."""
    h = x.reshape(len(x), -1)
    n = len(params)
    for i in range(n):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    h = h - h.max(axis=1, keepdims=True)
    logp = h - np.log(np.exp(h).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(y)), y].mean()


def test_mlp_gradient_against_float64_finite_differences():
    model = build_model("mlp", (3, 2, 1), 4, features=(5,))
    params = model.init(jax.random.key(3))
    x = np.asarray(_inputs((3, 2, 1), n=6), np.float64)
    y = np.array([0, 1, 2, 3, 0, 1])
    grads = jax.grad(lambda p: cross_entropy(model.apply(p, jnp.asarray(x, jnp.float32)), y))(params)

    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps = 1e-6  # central differences in float64: truncation ~eps^2, rounding ~1e-16/eps: both << 1e-6
    checked = 0
    for layer in p64:
        for name, value in p64[layer].items():
            fd = np.zeros_like(value)
            for idx in np.ndindex(value.shape):
                orig = value[idx]
                value[idx] = orig + eps
                up = _numpy_mlp_loss(p64, x, y)
                value[idx] = orig - eps
                down = _numpy_mlp_loss(p64, x, y)
                value[idx] = orig
                fd[idx] = (up - down) / (2 * eps)
            # JAX computes in float32: agreement to ~1e-5 absolute on gradients of order 0.1.
            np.testing.assert_allclose(grads[layer][name], fd, rtol=1e-4, atol=2e-6)
            checked += value.size
    assert checked == count_params(params)


def test_cnn_gradient_against_float64_finite_differences():
    """The CNN's autodiff gradient against central differences of the same function in float64."""
    model = build_model("cnn", (4, 4, 1), 3, channels=(2,), dense=3)
    x = np.asarray(_inputs((4, 4, 1), n=3), np.float64)
    y = np.array([0, 1, 2])
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(5)))
        loss = jax.jit(lambda p: cross_entropy(model.apply(p, jnp.asarray(x)), y))
        grads = jax.grad(lambda p: cross_entropy(model.apply(p, jnp.asarray(x)), y))(params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        eps = 1e-6
        basis = np.eye(flat.size)
        fd = np.array([(loss(unravel(flat + eps * e)) - loss(unravel(flat - eps * e))) / (2 * eps)
                       for e in basis])
        g = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


def test_cross_entropy_matches_optax():
    """graphduo's lean cross-entropy against optax's reference implementation."""
    import optax

    logits = jax.random.normal(jax.random.key(0), (16, 10)) * 5
    labels = jnp.arange(16) % 10
    want = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(cross_entropy(logits, labels), want, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(cross_entropy)(logits, labels),
                               jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean())(logits),
                               rtol=1e-5, atol=1e-7)
