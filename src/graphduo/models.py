"""The models: ``Model``, a pure function of (parameters, model state, inputs) that every part of
graphduo trains, and the built-in ones (``MODELS``).

A ``Model`` comes from any Flax module (``Model.from_flax``: ``flax.linen`` or ``flax.nnx``), from a
user's file (``load_model``: ``--model FILE.py:NAME``), or from the built-ins (``build_model``). Its
``forward(params, model_state, images, train, rng) -> (logits, new_model_state)`` is pure: the
model state (BatchNorm's running statistics, an NNX module's random streams) goes in and comes
out, dropout draws from ``rng``, and nothing read from the process at trace time changes what it
computes or how it compiles.

The MLP and the CNN have a second face: a lean ``jnp``/``lax`` apply of the very parameter tree
their Flax module initializes, which the step calls instead of ``module.apply``. Under ``jax.jit``
the two compile to the same program, but in eager mode Flax's module machinery runs in Python on
every call, on top of JAX's dispatch (``graphduo inspect`` says how much, for any model). The other
built-ins (``graphduo.zoo``: ResNet, RNN, ViT) run through their modules, as a user's model does.
Every formulation here is plain JAX, the same on every backend; formulations tuned to one backend
or one jaxlib live in ``experiments/``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import pathlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

Params = Any
ModelState = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
ForwardFn = Callable[[Params, ModelState, jax.Array, bool, "jax.Array | None"], tuple[jax.Array, ModelState]]


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


class ModelError(ValueError):
    """A model cannot be built or loaded. ``str(err)`` is one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Model:
    """A model ready to train: a pure ``forward`` and where its first parameters and state come from.

    ``forward(params, model_state, images, train, rng) -> (logits, new_model_state)``: ``train``
    picks the training behaviour (batch statistics, dropout), ``rng`` feeds dropout (``None`` in
    evaluation). ``init_variables(rng) -> (params, model_state)``; ``model_state`` is ``{}`` for a
    model that keeps none. ``options``: how the model was built, for the run's records.
    """

    name: str
    module: Any
    input_shape: tuple[int, ...]
    forward: ForwardFn
    init_variables: Callable[[jax.Array], tuple[Params, ModelState]]
    options: dict = dataclasses.field(default_factory=dict)

    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters for one ``input_shape`` example (``init_variables``' first half)."""
        return self.init_variables(rng)[0]

    def apply(self, params: Params, x: jax.Array, model_state: ModelState | None = None) -> jax.Array:
        """Logits in evaluation mode: ``forward`` without its state update or randomness."""
        return self.forward(params, {} if model_state is None else model_state, x, False, None)[0]

    @classmethod
    def from_flax(cls, module, input_shape: Sequence[int], num_classes: int, *, name: str | None = None) -> Model:
        """Any Flax module as a ``Model``: a ``flax.linen.Module`` (whose ``__call__`` may take a
        ``train`` keyword: graphduo passes ``True`` in the train step, ``False`` in evaluation), or an
        ``flax.nnx.Module``, already built (its parameters are the ones it was built with; it is
        switched with ``.train()`` / ``.eval()``). Checked on one example of ``input_shape``: it must
        give logits of shape (1, ``num_classes``); ``ModelError`` (one line) if it cannot."""
        shape = _checked_shape(input_shape)
        label = name or type(module).__name__
        if isinstance(module, nnx.Module):
            model = _from_nnx(label, module, shape)
        elif isinstance(module, nn.Module):
            model = _from_linen(label, module, shape)
        else:
            what = f"{name} gave a {type(module).__name__}, which" if name else f"a {type(module).__name__}"
            raise ModelError(f"{what} is not a Flax module: return a flax.linen.Module or a flax.nnx.Module")
        _check_logits(model, num_classes)
        return model


def _checked_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ModelError(f"input shape must be (H, W, C) of positive sizes, got {tuple(input_shape)}")
    return tuple(int(d) for d in input_shape)


def _check_logits(model: Model, num_classes: int) -> None:
    """Initialize and run ``model`` abstractly on one example (no arrays computed): it must work and
    give (1, num_classes) logits, in training and evaluation mode alike."""
    x = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
    try:
        params, state = jax.eval_shape(model.init_variables, jax.random.key(0))
        for train in (True, False):
            logits, _ = jax.eval_shape(lambda p, s, v, t=train: model.forward(p, s, v, t, jax.random.key(0)),
                                       params, state, x)
    except Exception as err:  # a user's module can fail in any way: say which, in one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelError(f"the model {model.name} fails on inputs of shape {(1, *model.input_shape)} "
                         f"({type(err).__name__}: {reason}): make it accept the data set's images") from None
    if logits.shape != (1, num_classes):
        raise ModelError(f"the model {model.name} gives logits of shape {logits.shape} for one image, not "
                         f"{(1, num_classes)}: its last layer must have the data set's {num_classes} classes")


def _takes_train(module: nn.Module) -> bool:
    try:
        return "train" in inspect.signature(module.__call__).parameters
    except (TypeError, ValueError):
        return False


def _from_linen(name: str, module: nn.Module, input_shape: tuple[int, ...]) -> Model:
    train_kw = _takes_train(module)

    def init_variables(rng):
        dummy = jnp.zeros((1, *input_shape), jnp.float32)
        params_rng, dropout_rng = jax.random.split(rng)
        variables = module.init({"params": params_rng, "dropout": dropout_rng}, dummy,
                                **({"train": False} if train_kw else {}))
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def forward(params, model_state, x, train, rng):
        kwargs = {"train": train} if train_kw else {}
        rngs = {"dropout": rng} if train and rng is not None else None
        variables = {"params": params, **model_state}
        if train and model_state:  # the collections the step may update (batch statistics)
            logits, updates = module.apply(variables, x, rngs=rngs, mutable=list(model_state), **kwargs)
            return logits, {**model_state, **updates}
        return module.apply(variables, x, rngs=rngs, **kwargs), model_state

    return Model(name, module, input_shape, forward, init_variables)


def _fresh_copy(a: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):  # typed keys copy through their data
        return jax.random.wrap_key_data(jnp.copy(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    return jnp.copy(a)


def _from_nnx(name: str, module: nnx.Module, input_shape: tuple[int, ...]) -> Model:
    # Three parts: parameters, the module's random streams, and the rest of its state (BatchNorm's
    # statistics). What it sows (nnx.Intermediate) is left out: it appears only after a call.
    graphdef, params, streams, rest = nnx.split(module, nnx.Param, nnx.RngState, nnx.Not(nnx.Intermediate))

    def init_variables(rng):
        # An NNX module made its parameters when it was built. Fresh copies each time: a traced step
        # donates its state's buffers, which would otherwise delete the module's own arrays.
        return jax.tree.map(_fresh_copy, (params, {"streams": streams, "state": rest}))

    def forward(params, model_state, x, train, rng):
        # Fresh Variables in this trace: NNX refuses to update a Variable made under another trace
        # (one passed in from outside jax.grad), and a tree map rebuilds each one here.
        carried = model_state
        params, model_state = jax.tree.map(lambda v: v, (params, model_state))
        m = nnx.merge(graphdef, params, model_state["streams"], model_state["state"])
        m.train() if train else m.eval()
        if train and rng is not None:
            # The step's own key (fold_in(rng, step), one per device under data parallelism) feeds
            # dropout, as for a linen module; the carried streams stay as they were, so every
            # device's state is the same and eager and traced draw alike.
            nnx.reseed(m, dropout=rng, default=jax.random.fold_in(rng, 1))
        logits = m(x)
        if not train:
            return logits, carried
        nnx.pop(m, nnx.Intermediate)
        _, _, _, new_rest = nnx.split(m, nnx.Param, nnx.RngState, nnx.Not(nnx.Intermediate))
        return logits, {"streams": carried["streams"], "state": new_rest}

    return Model(name, module, input_shape, forward, init_variables)


def _lean(name: str, module: nn.Module, apply: ApplyFn, input_shape: tuple[int, ...], options: dict) -> Model:
    """A stateless built-in whose step calls ``apply`` (plain ``jnp``) on the module's parameters."""

    def init_variables(rng):
        return module.init(rng, jnp.zeros((1, *input_shape), jnp.float32))["params"], {}

    def forward(params, model_state, x, train, rng):
        return apply(params, x), model_state

    return Model(name, module, input_shape, forward, init_variables, options)


def _registry():
    from graphduo import zoo

    return {"mlp": MLP, "cnn": CNN, "resnet": zoo.ResNet, "rnn": zoo.RNNClassifier, "vit": zoo.ViT}


MODELS = ("mlp", "cnn", "resnet", "rnn", "vit")


def build_model(name: str, input_shape: Sequence[int], num_classes: int, **options) -> Model:
    """Build a built-in model (``MODELS``) for inputs of ``input_shape`` (H, W, C), or a user's model
    (``FILE.py:NAME`` or ``package.module:NAME``, see ``load_model``; ``options`` then may hold ``seed``
    for an NNX model's ``nnx.Rngs``).

    ``options`` go to the Flax module: ``features=(512, 512)`` for the MLP, ``channels=(32, 64),
    dense=128`` for the CNN, ``width``, ``stages`` for the ResNet, ``cell``, ``hidden``, ``loop``
    for the RNN, ``patch``, ``dim``, ``depth``, ``heads`` for the ViT.
    """
    if ":" in name:
        return load_model(name, input_shape, num_classes, seed=options.get("seed", 0))
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}, or give FILE.py:NAME")
    shape = _checked_shape(input_shape)
    if name == "cnn":
        min_side = 2 ** len(options.get("channels", CNN.channels))
        if min(shape[:2]) < min_side:
            raise ModelError(f"the CNN pools {len(options.get('channels', CNN.channels))} times and needs images "
                             f"of at least {min_side}x{min_side}, got {shape[0]}x{shape[1]}: use "
                             f"--model mlp or fewer --cnn-channels")
    module = _registry()[name](num_classes=num_classes, **options)
    if name in ("mlp", "cnn"):
        return _lean(name, module, mlp_apply if name == "mlp" else cnn_apply, shape, options)
    model = _from_linen(name, module, shape)
    if hasattr(module, "check_input"):
        module.check_input(shape)
    return dataclasses.replace(model, options=options)


def _rngs_argument(factory) -> str | None:
    """How ``factory`` takes an NNX module's ``rngs``: ``"keyword"`` (a parameter named ``rngs``, the
    NNX convention, positional or keyword-only), ``"positional"`` (a second positional parameter
    without a default: ``NAME(num_classes, rngs)``), or ``None`` (``NAME(num_classes)``: a linen
    module's other fields all have defaults; keyword-only options never count). An NNX module class
    is read through its ``__init__`` (NNX's metaclass hides the signature)."""
    target = factory.__init__ if inspect.isclass(factory) and issubclass(factory, nnx.Module) else factory
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if target is not factory:
        params = params[1:]  # self
    if any(p.name == "rngs" for p in params):
        return "keyword"
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return "positional" if len([p for p in positional if p.default is p.empty]) >= 2 else None


def load_model(spec: str, input_shape: Sequence[int], num_classes: int, *, seed: int = 0) -> Model:
    """A user's model from ``FILE.py:NAME`` or ``package.module:NAME``: ``NAME(num_classes)`` returns a
    ``flax.linen.Module``, or ``NAME(num_classes, rngs)`` a ``flax.nnx.Module`` (``rngs`` is
    ``nnx.Rngs(seed)``). ``ModelError`` (one line) for a missing file or name, something that is not
    a Flax module, or a module that fails on ``input_shape``."""
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ModelError(f"--model {spec!r}: give FILE.py:NAME or package.module:NAME")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise ModelError(f"--model {spec}: no file {path}: give the path of a Python file")
        module_name = f"graphduo_user_model_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        source = importlib.util.module_from_spec(loader)
        # Registered while it runs, as an import registers a module: dataclasses (so Flax's linen
        # modules) look their string annotations up there (``from __future__ import annotations``).
        sys.modules[module_name] = source
        try:
            loader.loader.exec_module(source)
        except Exception as err:
            del sys.modules[module_name]
            raise ModelError(f"--model {spec}: {path} fails to import ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:160]})") from None
    else:
        try:
            source = importlib.import_module(where)
        except Exception as err:
            raise ModelError(f"--model {spec}: cannot import {where} ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:160]})") from None
    factory = getattr(source, attr, None)
    if not callable(factory):
        raise ModelError(f"--model {spec}: {where} has no function or class {attr}")
    rngs = _rngs_argument(factory)
    try:
        if rngs == "keyword":
            module = factory(num_classes, rngs=nnx.Rngs(seed))
        else:
            module = factory(num_classes, nnx.Rngs(seed)) if rngs else factory(num_classes)
    except Exception as err:
        raise ModelError(f"--model {spec}: {attr}(num_classes{', rngs' if rngs else ''}) failed "
                         f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]})") from None
    model = Model.from_flax(module, input_shape, num_classes, name=spec)
    return dataclasses.replace(model, options={"seed": seed} if isinstance(module, nnx.Module) else {})


def count_params(params: Params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
