"""Keras 3 on its JAX backend, the second peer: the same MLP and CNN with graphduo's very weights,
trained through ``Model.fit`` in Keras's three forms of graphduo's question:

* ``keras-eager``: ``compile(run_eagerly=True)``, Keras's eager (op by op on JAX);
* ``keras-jit``:   ``compile(jit_compile=True)``, one compiled step per batch;
* ``keras-jit-spe16``: the same with ``steps_per_execution=16``, sixteen steps per executable.

Keras asks graphduo's question on the same JAX, so its figures sit beside graphduo's loop
(``graphduo train`` at ``--steps-per-call`` 1 and 16), not beside a single step. The backend is
chosen by ``KERAS_BACKEND``, read when Keras is first imported: an entry point sets it
(``need_keras``). Adam as optax's: lr 1e-3, b1 0.9, b2 0.999, eps 1e-8 (Keras's own default eps is
1e-7); softmax cross-entropy on logits.
"""

from __future__ import annotations

import os
import sys
import time

INSTALL_KERAS = 'pip install "keras==3.15.1" (Keras 3 runs on JAX without TensorFlow)'
VARIANTS = {"keras-eager": {"run_eagerly": True}, "keras-jit": {"jit_compile": True},
            "keras-jit-spe16": {"jit_compile": True, "steps_per_execution": 16}}


def need_keras():
    """Keras on its JAX backend, or None when it is not installed. Sets ``KERAS_BACKEND=jax`` unless
    the environment chose another backend, which is then refused in one line (exit status 2)."""
    backend = os.environ.setdefault("KERAS_BACKEND", "jax")
    if backend != "jax":
        print(f"KERAS_BACKEND={backend}: the Keras peer runs on JAX, beside graphduo: unset it or set it to jax",
              file=sys.stderr)
        sys.exit(2)
    try:
        import keras
    except ImportError:
        return None
    return keras


def settings(keras) -> dict:
    return {"keras": keras.__version__, "keras_backend": keras.backend.backend()}


def keras_model(keras, name: str, params, input_shape) -> object:
    """graphduo's MLP or CNN as a ``keras.Sequential`` holding a copy of ``params`` (Flax's Dense and
    Conv kernels have Keras's layouts already: (in, out) and HWIO, channels last)."""
    layers = keras.layers
    if name == "mlp":
        n = len(params)
        stack = [keras.Input(input_shape), layers.Flatten()]
        stack += [layers.Dense(params[f"Dense_{i}"]["kernel"].shape[1], activation="relu" if i < n - 1 else None)
                  for i in range(n)]
        weights = [params[f"Dense_{i}"][k] for i in range(n) for k in ("kernel", "bias")]
    else:
        n_conv = sum(k.startswith("Conv_") for k in params)
        stack = [keras.Input(input_shape)]
        for i in range(n_conv):  # pool before ReLU, as graphduo's cnn_apply: the same function
            stack += [layers.Conv2D(params[f"Conv_{i}"]["kernel"].shape[-1], 3, padding="same"),
                      layers.MaxPooling2D(2), layers.ReLU()]
        stack += [layers.Flatten(), layers.Dense(params["Dense_0"]["kernel"].shape[1], activation="relu"),
                  layers.Dense(params["Dense_1"]["kernel"].shape[1])]
        weights = [params[f"Conv_{i}"][k] for i in range(n_conv) for k in ("kernel", "bias")]
        weights += [params[f"Dense_{i}"][k] for i in range(2) for k in ("kernel", "bias")]
    model = keras.Sequential(stack)
    import numpy as np

    model.set_weights([np.asarray(w) for w in weights])
    return model


def compiled(keras, variant: str, name: str, params, input_shape, lr: float):
    model = keras_model(keras, name, params, input_shape)
    model.compile(optimizer=keras.optimizers.Adam(lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), **VARIANTS[variant])
    return model


def losses(keras, variant: str, name: str, params, input_shape, lr: float, batches) -> list[float]:
    """The loss of each of ``batches`` through ``train_on_batch`` (each the loss of the weights
    before its update), from ``params``."""
    model = compiled(keras, variant, name, params, input_shape, lr)
    return [float(model.train_on_batch(b["image"], b["label"])) for b in batches]


def time_fit(keras, variant: str, name: str, params, input_shape, lr: float, x, y, batch_size: int,
             rounds: int) -> dict:
    """``Model.fit`` over ``x, y`` (one epoch, no shuffling, silent): the first fit (Keras traces and
    compiles its step then) timed apart, then ``rounds`` more; seconds per step, each fit's."""
    model = compiled(keras, variant, name, params, input_shape, lr)
    steps = len(y) // batch_size
    t0 = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    first = time.perf_counter() - t0
    per_step = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        per_step.append((time.perf_counter() - t0) / steps)
    return {"first_fit_s": first, "step_s": per_step, "steps": steps}
