"""Your own Flax NNX model, trained by graphduo:

    graphduo train --model examples/nnx_model.py:make --epochs 3
    graphduo compare --model examples/nnx_model.py:make --steps 100

graphduo calls ``make(num_classes, rngs)`` with an ``nnx.Rngs`` seeded from ``--seed`` and trains the
module it returns: its ``nnx.Param`` variables are the parameters, everything else it holds
(BatchNorm's statistics, its random streams) the model state the train step carries. graphduo
switches it with ``.train()`` in the train step and ``.eval()`` in evaluation. NNX layers are
built for a known input: this one takes single-channel images of any size (digits, MNIST).
"""

import jax.numpy as jnp
from flax import nnx


class SmallConvNet(nnx.Module):
    """``conv3x3 -> BatchNorm -> ReLU``, global average pooling, dropout, and a linear classifier."""

    def __init__(self, num_classes: int, rngs: nnx.Rngs, channels: int = 16):
        self.conv = nnx.Conv(1, channels, (3, 3), use_bias=False, rngs=rngs)  # BatchNorm's shift is the bias
        self.norm = nnx.BatchNorm(channels, rngs=rngs)
        self.dropout = nnx.Dropout(0.2, rngs=rngs)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.conv(x)))
        return self.head(self.dropout(jnp.mean(x, axis=(1, 2))))


def make(num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
    return SmallConvNet(num_classes, rngs)
