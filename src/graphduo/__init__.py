"""graphduo: the same Flax models trained eagerly (op by op) and traced (jax.jit + XLA), measured side by side.

Library use::

    import jax, graphduo
    ds = graphduo.load_dataset("digits")
    model = graphduo.build_model("cnn", ds.input_shape, ds.num_classes)
    tx = graphduo.make_optimizer("adam", 1e-3)
    state = graphduo.create_train_state(model, tx, jax.random.key(0))
    step = graphduo.TracedStep(graphduo.make_train_step(model.apply, tx), donate_argnums=0)
    for batch in graphduo.epoch_batches(ds.x_train, ds.y_train, 32, seed=0, epoch=0):
        state, metrics = step(state, batch)
"""

from graphduo.config import Config, ConfigError
from graphduo.data import DATASETS, Dataset, DataError, epoch_batches, load_dataset
from graphduo.eager import EagerStep
from graphduo.models import MODELS, Model, ModelError, build_model
from graphduo.step import (OPTIMIZERS, TrainState, create_train_state, make_eval_step, make_optimizer,
                           make_train_step)
from graphduo.traced import TracedStep, TracingError
from graphduo.train import TrainingDiverged, evaluate, train_and_evaluate, wrap_steps

__version__ = "0.1.0"

__all__ = [
    "Config", "ConfigError", "DATASETS", "Dataset", "DataError", "EagerStep", "MODELS", "Model",
    "ModelError", "OPTIMIZERS", "TracedStep", "TracingError", "TrainState", "TrainingDiverged", "build_model",
    "create_train_state", "epoch_batches", "evaluate", "load_dataset", "make_eval_step",
    "make_optimizer", "make_train_step", "train_and_evaluate", "wrap_steps",
]
