"""experiments/_onednn.py: oneDNN's convolutions through JAX's FFI compute the same function as XLA's
convolution, gradients included, against an independent float64 reference, at the installed jaxlib
(the FFI structs are hand-copied: each end of graphduo's jax range must pass); cnn_step.py's
``onednn`` formulation calls them only where it says; failures are reported, never silent."""

import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import build_model, make_optimizer
from graphduo.models import cnn_apply
from test_experiments import load_script

onednn = load_script("_onednn")

# The dev extra installs onednn-cpu-gomp where its wheel exists (pyproject.toml): there oneDNN must
# load, and these tests fail if it does not. Its wheel exists for Linux x86-64 only.
pytestmark = pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                reason="onednn-cpu-gomp exists for Linux x86-64 only")


@pytest.fixture(scope="module")
def cnn_step():
    return load_script("cnn_step")


def reference_conv(x, kernel):
    """SAME, stride 1, NHWC x HWIO, in float64 with numpy: an implementation that shares nothing with
    XLA's or oneDNN's."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    n, h, w, _ = x.shape
    out = np.zeros((n, h, w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += xp[:, i:i + h, j:j + w, :] @ kernel[i, j]
    return out


def lax_conv(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


SHAPES = [
    pytest.param((4, 14, 14, 32), (3, 3, 32, 64), id="cnn-second-layer"),
    pytest.param((3, 28, 28, 1), (3, 3, 1, 32), id="one-input-channel"),
    pytest.param((2, 7, 9, 3), (2, 4, 3, 5), id="even-kernel-rectangular"),
    pytest.param((1, 5, 5, 2), (5, 1, 2, 3), id="tall-kernel"),
]


def _inputs(x_shape, k_shape, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(x_shape, dtype=np.float32)),
            jnp.asarray(rng.standard_normal(k_shape, dtype=np.float32)))


def _close(a, b, scale):
    # float32 sums of at most kh*kw*ci (forward) or n*h*w (weight gradient) products: relative
    # error ~ eps * sqrt(terms) in practice; 2e-5 of the output's scale leaves 10x room.
    return np.abs(np.asarray(a, np.float64) - b).max() <= 2e-5 * scale


@pytest.mark.parametrize("x_shape,k_shape", SHAPES)
def test_forward_matches_a_float64_reference_and_xla(x_shape, k_shape):
    x, kernel = _inputs(x_shape, k_shape)
    want = reference_conv(x, kernel)
    scale = np.abs(want).max()
    assert _close(onednn.conv_same(x, kernel), want, scale)
    assert _close(jax.jit(onednn.conv_same)(x, kernel), want, scale)
    assert _close(lax_conv(x, kernel), want, scale)  # the reference itself agrees with XLA
    # Negative control: the kernel flipped in space (a convolution, not XLA's cross-correlation).
    assert not _close(onednn.conv_same(x, kernel[::-1, ::-1]), want, scale)


@pytest.mark.parametrize("x_shape,k_shape", SHAPES)
def test_gradients_match_xla(x_shape, k_shape):
    x, kernel = _inputs(x_shape, k_shape)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((*x_shape[:3], k_shape[3]), dtype=np.float32))

    def grads(conv):
        return jax.grad(lambda x, k: jnp.vdot(conv(x, k), g), argnums=(0, 1))(x, kernel)

    for mine, want in zip(grads(onednn.conv_same), grads(lax_conv)):
        scale = np.abs(np.asarray(want)).max()
        assert _close(mine, np.asarray(want, np.float64), scale)
    # Negative control: the two gradients swapped between their FFI targets would not even agree
    # in shape; the data gradient of another kernel must not agree in value.
    other = grads(lambda x, k: lax_conv(x, k[::-1, ::-1]))[0]
    assert not _close(grads(onednn.conv_same)[0], np.asarray(other, np.float64), np.abs(np.asarray(other)).max())


@pytest.fixture
def every_convolution(cnn_step, monkeypatch):
    """cnn_step with no size threshold for oneDNN: the test models are small."""
    monkeypatch.setattr(cnn_step, "ONEDNN_MIN_FLOPS", 0)
    return cnn_step


def _hlo(apply, model, tx):
    from graphduo.step import create_train_state, make_train_step

    state = create_train_state(model, tx, jax.random.key(0))
    batch = {"image": jnp.zeros((8, 28, 28, 1)), "label": jnp.zeros((8,), jnp.int32)}
    return jax.jit(make_train_step(apply, tx)).lower(state, batch).as_text()


def test_the_cnn_runs_on_onednn_only_in_its_formulation(every_convolution):
    cnn_step = every_convolution
    model, tx = build_model("cnn", (28, 28, 1), 10, channels=(4, 8), dense=16), make_optimizer("adam", 1e-3)
    fns, unavailable = cnn_step.formulations(model)
    assert unavailable == {} and list(fns) == list(cnn_step.FORMULATIONS)
    hlo = _hlo(fns["onednn"], model, tx)
    # both convolutions forward, both weight gradients, conv2's input gradient (the image's is never
    # needed: it is data); no convolution left to XLA
    calls = {t: hlo.count(f"@{t}(") for t in onednn.TARGETS}
    assert calls == {onednn.TARGETS[0]: 2, onednn.TARGETS[1]: 1, onednn.TARGETS[2]: 2}, calls
    assert "convolution(" not in hlo.replace("conv_general_dilated", "")
    for name in ("graphduo", "lax-convolutions", "flax"):  # the others never call it
        assert not any(t in _hlo(fns[name], model, tx) for t in onednn.TARGETS), name


def test_the_cnn_computes_the_same_on_either(every_convolution):
    model = build_model("cnn", (28, 28, 1), 10, channels=(4, 8), dense=16)
    params = model.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).random((8, 28, 28, 1), dtype=np.float32))

    def loss_and_grads(apply):
        return jax.value_and_grad(lambda p: jnp.sum(jnp.sin(apply(p, x))))(params)

    mine = loss_and_grads(every_convolution.formulations(model)[0]["onednn"])
    want = loss_and_grads(cnn_apply)
    for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(want)):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_small_convolutions_stay_on_xla(cnn_step):
    small, large = (8, 14, 14, 32), (32, 14, 14, 32)  # second CNN layer at batch 8 and 32: 58 and 231 MFLOP
    kernel = jnp.zeros((3, 3, 32, 64))
    assert cnn_step.conv_flops(small, kernel.shape) < cnn_step.ONEDNN_MIN_FLOPS <= cnn_step.conv_flops(large, kernel.shape)

    def targets(x_shape):
        hlo = jax.jit(cnn_step.onednn_conv).lower(jnp.zeros(x_shape), kernel).as_text()
        return [t for t in onednn.TARGETS if t in hlo]

    assert targets(small) == [] and targets(large) == [onednn.TARGETS[0]]


def test_bfloat16_keeps_xla(every_convolution):
    x, kernel = _inputs((2, 6, 6, 3), (3, 3, 3, 4))
    lowered = jax.jit(every_convolution.onednn_conv).lower(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))
    hlo = lowered.as_text()
    assert not any(t in hlo for t in onednn.TARGETS) and "convolution" in hlo


def test_a_failing_call_is_an_error_not_a_wrong_result(monkeypatch):
    def broken(x_shape, kernel_shape):
        raise RuntimeError("no primitive for you")

    monkeypatch.setattr(onednn, "_convolution", broken)
    x, kernel = _inputs((1, 4, 4, 2), (3, 3, 2, 2))
    with pytest.raises(Exception, match=r"graphduo oneDNN convolution \(fwd\) failed: RuntimeError: no primitive"):
        jax.block_until_ready(jax.jit(onednn.conv_same)(x, kernel + 1))  # a new input: no cached result


def test_missing_library_is_a_one_line_reason(monkeypatch, cnn_step):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    with pytest.raises(onednn.OneDNNUnavailable, match="the onednn-cpu-gomp package is not installed") as err:
        onednn.library_path()
    assert "\n" not in str(err.value) and 'pip install -c constraints.txt ".[onednn]"' in str(err.value)

    def cannot_load():
        raise onednn.OneDNNUnavailable("libdnnl does not load (no libgomp)")

    monkeypatch.setattr(onednn, "_dnnl", cannot_load)
    assert onednn.available() == "libdnnl does not load (no libgomp)"
    # cnn_step then runs its other formulations and records why this one is missing
    fns, unavailable = cnn_step.formulations(build_model("cnn", (28, 28, 1), 10))
    assert "onednn" not in fns and unavailable == {"onednn": "oneDNN unavailable: libdnnl does not load (no libgomp)"}


def test_shapes_and_dtypes_that_do_not_fit_are_refused():
    x, kernel = _inputs((1, 4, 4, 2), (3, 3, 3, 2))  # the kernel expects 3 input channels, x has 2
    with pytest.raises(ValueError, match="matching channels"):
        onednn.conv_same(x, kernel)
    with pytest.raises(TypeError, match="float32"):
        onednn.conv_same(x, kernel[:, :, :2].astype(jnp.bfloat16))
    # The handlers check the buffers XLA hands them too (a mismatch would read or write outside them).
    assert onednn._shapes("fwd", (1, 4, 4, 2), (3, 3, 2, 5), (1, 4, 4, 5)) == ((1, 4, 4, 2), (3, 3, 2, 5))
    assert onednn._shapes("bwd_data", (1, 4, 4, 5), (3, 3, 2, 5), (1, 4, 4, 2)) == ((1, 4, 4, 2), (3, 3, 2, 5))
    assert onednn._shapes("bwd_weights", (1, 4, 4, 2), (1, 4, 4, 5), (3, 3, 2, 5)) == ((1, 4, 4, 2), (3, 3, 2, 5))
    for kind, shapes in [("fwd", ((1, 4, 4, 2), (3, 3, 2, 5), (1, 4, 4, 4))),
                         ("bwd_data", ((1, 4, 4, 5), (3, 3, 3, 5), (1, 4, 4, 2))),
                         ("bwd_weights", ((1, 4, 4, 2), (2, 4, 4, 5), (3, 3, 2, 5)))]:
        with pytest.raises(ValueError, match="do not fit"):
            onednn._shapes(kind, *shapes)


def test_calls_run_on_one_thread_of_graphdous(monkeypatch):
    import threading

    names = []
    real = onednn._Convolution.forward

    def forward(self, *pointers):
        names.append(threading.current_thread().name)
        return real(self, *pointers)

    monkeypatch.setattr(onednn._Convolution, "forward", forward)
    x, kernel = _inputs((2, 6, 6, 3), (3, 3, 3, 4), seed=3)
    for _ in range(3):
        jax.block_until_ready(jax.jit(onednn.conv_same)(x, kernel + len(names)))
    assert len(names) == 3 and all(n.startswith("graphduo-onednn") for n in names), names
