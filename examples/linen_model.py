"""Your own Flax linen model, trained by graphduo:

    graphduo train --model examples/linen_model.py:make --epochs 3
    graphduo compare --model examples/linen_model.py:make --steps 100
    graphduo inspect --model examples/linen_model.py:make

graphduo calls ``make(num_classes)`` and trains the module it returns, whatever the data set's image
shape. Its ``__call__`` may take a ``train`` keyword: graphduo passes ``True`` in the train step
(batch statistics, dropout) and ``False`` in evaluation (running statistics, no dropout). Dropout
draws from the ``dropout`` random stream, which graphduo feeds with a new key every step.
"""

import flax.linen as nn


class SmallConvNet(nn.Module):
    """``conv3x3 -> BatchNorm -> ReLU -> 2x2 average pool``, dropout, and a linear classifier."""

    num_classes: int
    channels: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.channels, (3, 3), use_bias=False)(x)  # BatchNorm's shift is the bias
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(0.2, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)


def make(num_classes: int) -> nn.Module:
    return SmallConvNet(num_classes)
