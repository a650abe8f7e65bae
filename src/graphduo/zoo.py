"""Three built-in models where eager and traced differ most, each a ``flax.linen`` module trained
through its own ``apply`` (as a user's model is):

* ``ResNet``: a small residual network with BatchNorm, state a step updates (running statistics);
* ``RNNClassifier``: a GRU or LSTM reading an image row by row (sequence length = image height),
  its loop over time either a Python loop (eager: one op at a time, per row; traced: unrolled) or
  a ``lax.scan`` (``nn.scan``) that compiles the cell once;
* ``ViT``: a small vision transformer (patch embedding, attention, MLP blocks) with dropout,
  randomness drawn every step.

Each takes ``train`` (batch statistics and dropout on) and builds for 28x28x1, 32x32x3 and the
8x8x1 digits alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

RNN_CELLS = ("gru", "lstm")
RNN_LOOPS = ("unrolled", "scan")


class ResidualBlock(nn.Module):
    """``conv3x3 -> BN -> ReLU -> conv3x3 -> BN``, plus the input (projected when its shape changes),
    then ReLU."""

    channels: int
    strides: int = 1
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 axis_name=self.batch_norm_axis)
        y = nn.Conv(self.channels, (3, 3), (self.strides, self.strides), padding="SAME", use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False)(y)
        y = norm()(y)
        if x.shape != y.shape:
            x = norm()(nn.Conv(self.channels, (1, 1), (self.strides, self.strides), use_bias=False)(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A stem (``conv3x3 -> BN -> ReLU``), ``stages`` of residual blocks (channels doubling and the
    image halving from one stage to the next), global average pooling and a linear classifier.

    ``batch_norm_axis``: the device axis BatchNorm averages its batch statistics over under a
    data-parallel ``shard_map`` or ``pmap`` (PyTorch's SyncBatchNorm); ``None`` on one device."""

    num_classes: int = 10
    width: int = 16
    stages: Sequence[int] = (1, 1, 1)
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.batch_norm_axis)(x)
        x = nn.relu(x)
        for i, blocks in enumerate(self.stages):
            for b in range(blocks):
                x = ResidualBlock(self.width * 2**i, strides=2 if i > 0 and b == 0 else 1,
                                  batch_norm_axis=self.batch_norm_axis)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


class RNNClassifier(nn.Module):
    """A recurrent cell (``cell``: ``gru`` or ``lstm``, ``hidden`` units) reading an image row by row,
    then a linear classifier on its last output.

    ``loop``: ``unrolled`` runs the cell in a Python loop over the rows (in eager mode one op at a
    time, per row, the case dynamic graphs were invented for; traced, XLA sees every row unrolled);
    ``scan`` runs it as ``nn.scan`` (``lax.scan``: the cell compiled once, looped by XLA). Both have
    the same parameters (the cell's, shared by every row) and compute the same function."""

    num_classes: int = 10
    hidden: int = 128
    cell: str = "gru"
    loop: str = "unrolled"

    def _cell_type(self):
        return nn.GRUCell if self.cell == "gru" else nn.OptimizedLSTMCell

    @nn.compact
    def __call__(self, x):
        n, h, w, c = x.shape
        rows = x.reshape(n, h, w * c)
        cell_type = self._cell_type()
        carry = cell_type(self.hidden, parent=None).initialize_carry(jax.random.key(0), (n, w * c))
        if self.loop == "scan":
            scanned = nn.scan(cell_type, variable_broadcast="params", split_rngs={"params": False},
                              in_axes=1, out_axes=1)
            carry, outputs = scanned(self.hidden, name="cell")(carry, rows)
            last = outputs[:, -1]
        else:
            cell = cell_type(self.hidden, name="cell")
            for t in range(h):
                carry, last = cell(carry, rows[:, t])
        return nn.Dense(self.num_classes)(last)


class ViT(nn.Module):
    """Patches of ``patch`` x ``patch`` pixels embedded to ``dim`` (a strided convolution), a learned
    position embedding, ``depth`` pre-norm transformer blocks (multi-head self-attention and a GELU
    MLP, each with dropout), mean pooling and a linear classifier."""

    num_classes: int = 10
    patch: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 4
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, train: bool = False):
        p = self.patch
        x = nn.Conv(self.dim, (p, p), (p, p), padding="VALID", name="patch_embedding")(x)
        n, h, w, d = x.shape
        x = x.reshape(n, h * w, d)
        x = x + self.param("position_embedding", nn.initializers.normal(0.02), (1, h * w, d))
        for _ in range(self.depth):
            y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x), deterministic=True)
            x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
            y = nn.Dense(self.dim)(nn.gelu(nn.Dense(2 * self.dim)(nn.LayerNorm()(x))))
            x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        return nn.Dense(self.num_classes)(nn.LayerNorm()(x).mean(axis=1))

    def check_input(self, shape) -> None:
        if min(shape[:2]) < self.patch:
            from graphduo.models import ModelError

            raise ModelError(f"the ViT cuts {self.patch}x{self.patch} patches and needs images of at least that "
                             f"size, got {shape[0]}x{shape[1]}: use a smaller --vit-patch")
