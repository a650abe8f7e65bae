"""Every setting of a run and its default, in one typed dataclass. The CLI is built from it."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

from graphduo.data import DATASETS
from graphduo.eager import EAGER_UPDATES
from graphduo.models import MODELS
from graphduo.parallel import PRECISIONS, STRATEGIES
from graphduo.runtime import CPU_CONVOLUTIONS, DEFAULT_CPU_CONVOLUTIONS, DEFAULT_HOST_MEMORY, HOST_MEMORY
from graphduo.step import OPTIMIZERS, SCHEDULES
from graphduo.zoo import RNN_CELLS, RNN_LOOPS

MODES = ("eager", "traced")
DEFAULT_EPOCHS = 10


class ConfigError(ValueError):
    """A setting is invalid. ``str(err)`` is one line naming the value and the fix."""


def _field(default, help: str, *, choices=None, metavar=None, parse=None):
    meta = {"help": help, "choices": choices, "metavar": metavar, "parse": parse}
    return dataclasses.field(default=default, metadata=meta)


def parse_ints(text: str, sep: str = ",") -> tuple[int, ...]:
    """``"512,512"`` -> ``(512, 512)``; ``"28x28x1"`` with ``sep="x"``."""
    try:
        values = tuple(int(v) for v in str(text).split(sep) if v.strip())
    except ValueError:
        raise ConfigError(f"expected integers separated by {sep!r}, got {text!r}") from None
    if not values:
        raise ConfigError(f"expected integers separated by {sep!r}, got {text!r}")
    return values


def lasting_spec(spec: str) -> str:
    """``spec`` as a run records it: a relative ``FILE.py:NAME`` made absolute, so resuming or
    exporting the run works from any directory; anything else as it is."""
    where, _, attr = spec.rpartition(":")
    if where.endswith(".py") and pathlib.Path(where).is_file() and not pathlib.Path(where).is_absolute():
        return f"{pathlib.Path(where).resolve()}:{attr}"
    return spec


@dataclasses.dataclass(frozen=True)
class Config:
    """A training run. Field names are the CLI flags (``batch_size`` -> ``--batch-size``)."""

    model: str = _field("cnn", f"model to train: a built-in one ({', '.join(MODELS)}) or your own Flax module, "
                        "FILE.py:NAME or package.module:NAME, where NAME(num_classes) returns a flax.linen.Module or "
                        "NAME(num_classes, rngs) a flax.nnx.Module", metavar="MODEL")
    mode: str = _field("traced", "eager: op by op (dynamic graph); traced: jax.jit + XLA (static graph)",
                       choices=MODES)
    dataset: str = _field("digits", "data set; digits ships with scikit-learn, the others are read from "
                          "--data-dir", choices=DATASETS)
    optimizer: str = _field("adam", "optax optimizer", choices=OPTIMIZERS)
    lr: float = _field(1e-3, "peak learning rate")
    batch_size: int = _field(32, "training batch size (the last partial batch of an epoch is dropped)")
    epochs: int | None = _field(None, f"epochs to train (default {DEFAULT_EPOCHS} unless --steps is given)")
    steps: int | None = _field(None, "optimizer steps to train (instead of --epochs)")
    seed: int = _field(0, "seed for initialization and shuffling")
    schedule: str = _field("constant", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int = _field(0, "linear warmup steps for --schedule warmup-cosine")
    momentum: float = _field(0.9, "momentum for --optimizer momentum")
    weight_decay: float | None = _field(None, "weight decay (default: 1e-4 for adamw, 0 otherwise)")
    mlp_features: tuple[int, ...] = _field((512, 512), "MLP hidden widths", metavar="W,W,...",
                                           parse=parse_ints)
    cnn_channels: tuple[int, ...] = _field((32, 64), "CNN convolution channels", metavar="C,C,...",
                                           parse=parse_ints)
    cnn_dense: int = _field(128, "width of the CNN's dense layer")
    resnet_width: int = _field(16, "channels of the ResNet's first stage (doubling every stage)")
    resnet_stages: tuple[int, ...] = _field((1, 1, 1), "residual blocks per ResNet stage", metavar="B,B,...",
                                            parse=parse_ints)
    rnn_cell: str = _field("gru", "the RNN's recurrent cell", choices=RNN_CELLS)
    rnn_hidden: int = _field(128, "the RNN cell's hidden units")
    rnn_loop: str = _field("unrolled", "the RNN's loop over image rows: unrolled (a Python loop: eager runs it op by op, "
                           "traced unrolls it) or scan (lax.scan: the cell compiled once)", choices=RNN_LOOPS)
    vit_patch: int = _field(4, "the ViT's patch side, in pixels")
    vit_dim: int = _field(64, "the ViT's embedding width")
    vit_depth: int = _field(2, "the ViT's transformer blocks")
    vit_heads: int = _field(4, "the ViT's attention heads")
    data_dir: str | None = _field(None, "folder holding data set files (default $GRAPHDUO_DATA or "
                                  "~/.cache/graphduo)")
    download: bool = _field(False, "download missing data set files (needs a network)")
    synthetic_shape: tuple[int, ...] = _field((28, 28, 1), "input shape of --dataset synthetic",
                                              metavar="HxWxC", parse=lambda s: parse_ints(s, "x"))
    synthetic_size: int = _field(2048, "training examples of --dataset synthetic")
    run_dir: str | None = _field(None, "where metrics go (default runs/<time>-<model>-<mode>-<dataset>)")
    params_out: str | None = _field(None, "save the final parameters to this .npz file")
    checkpoint_every: int | None = _field(None, "save a checkpoint (orbax, asynchronous, atomic) every K steps "
                                          "into <run-dir>/checkpoints; rerunning the same command resumes",
                                          metavar="K")
    keep: int = _field(3, "number of newest checkpoints to keep")
    debug_nans: bool = _field(False, "check every operation for NaN (slow) and name the first that makes one")
    profile: str | None = _field(None, "write a JAX profiler trace of the training loop into this folder "
                                 "(open it in Perfetto: ui.perfetto.dev)", metavar="DIR")
    strategy: str = _field("none", "data parallelism: shard_map and pmap average gradients with an explicit "
                           "pmean, auto lets XLA insert the all-reduce (jit + NamedSharding)",
                           choices=STRATEGIES)
    devices: int | None = _field(None, "devices per process for --strategy (on a CPU, creates this many "
                                 "virtual devices; default: all)")
    precision: str = _field("fp32", "bf16: compute in bfloat16 with float32 parameters and optimizer state",
                            choices=tuple(PRECISIONS))
    eager_update: str = _field("ops", "eager mode's optimizer update: ops (op by op, as every other eager op) or "
                               "fused (compiled into one op, as PyTorch's Adam(fused=True) is one kernel; the "
                               "forward and backward passes stay op by op)", choices=EAGER_UPDATES)
    steps_per_call: int = _field(1, "traced mode: optimizer steps per executable, a lax.scan over K batches "
                                 "gathered on the device; checkpoints, signals and evaluation happen between calls",
                                 metavar="K")
    unroll: int = _field(1, "with --steps-per-call: steps per iteration of the loop XLA compiles; --unroll K unrolls "
                         "the whole call (no loop, a longer compile). XLA:CPU runs convolutions inside a loop far "
                         "slower than outside one: see experiments/RESULTS.md", metavar="U")
    distributed: bool = _field(False, "multi-process run: call jax.distributed.initialize(), which detects "
                               "Slurm, Open MPI, Cloud TPU and Kubernetes")
    coordinator: str | None = _field(None, "HOST:PORT of process 0, for clusters JAX does not detect",
                                     metavar="HOST:PORT")
    num_processes: int | None = _field(None, "number of processes (with --coordinator)")
    process_id: int | None = _field(None, "this process's index, 0 to num-processes - 1 (with --coordinator)")
    init_timeout: int = _field(300, "seconds to wait for every process to join")
    cpu_convolutions: str = _field(
        DEFAULT_CPU_CONVOLUTIONS, "library behind XLA:CPU's convolutions, a process setting (XLA_FLAGS, unless "
        "XLA_FLAGS already chooses): eigen (XLA's Eigen convolutions) or xla (whatever this jaxlib picks); no "
        "effect on a GPU or TPU. Why the default: experiments/RESULTS.md", choices=CPU_CONVOLUTIONS)
    host_memory: str = _field(
        DEFAULT_HOST_MEMORY, "host memory policy, a process setting: system (the C library's own) or reuse (glibc "
        "malloc keeps freed memory mapped for the next step, at the price of holding the peak). Why the "
        "default: experiments/RESULTS.md", choices=HOST_MEMORY)

    @property
    def weight_decay_value(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 1e-4 if self.optimizer == "adamw" else 0.0

    @property
    def multi_process(self) -> bool:
        return self.distributed or self.coordinator is not None

    def model_options(self) -> dict[str, Any]:
        """The options ``graphduo.models.build_model`` takes for ``model``."""
        return {
            "mlp": lambda: {"features": self.mlp_features},
            "cnn": lambda: {"channels": self.cnn_channels, "dense": self.cnn_dense},
            "resnet": lambda: {"width": self.resnet_width, "stages": self.resnet_stages},
            "rnn": lambda: {"cell": self.rnn_cell, "hidden": self.rnn_hidden, "loop": self.rnn_loop},
            "vit": lambda: {"patch": self.vit_patch, "dim": self.vit_dim, "depth": self.vit_depth,
                            "heads": self.vit_heads},
        }.get(self.model, lambda: {"seed": self.seed})()

    def validate(self) -> Config:
        """Raise ``ConfigError`` naming the first bad setting; return ``self`` when all are valid."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ConfigError(f"unknown {f.name} {value!r}: choose one of {', '.join(choices)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        if self.model not in MODELS and ":" not in self.model:
            raise ConfigError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}, or give your own as "
                              f"FILE.py:NAME")
        positive = {"batch_size": self.batch_size, "cnn_dense": self.cnn_dense, "resnet_width": self.resnet_width,
                    "rnn_hidden": self.rnn_hidden, "vit_patch": self.vit_patch, "vit_dim": self.vit_dim,
                    "vit_depth": self.vit_depth, "vit_heads": self.vit_heads,
                    "synthetic_size": self.synthetic_size, "steps_per_call": self.steps_per_call,
                    "unroll": self.unroll}
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("give --epochs or --steps, not both")
        if self.vit_dim % self.vit_heads:
            raise ConfigError(f"--vit-dim {self.vit_dim} is not divisible by --vit-heads {self.vit_heads}: use a "
                              f"multiple of {self.vit_heads}")
        for name in ("mlp_features", "cnn_channels", "resnet_stages", "synthetic_shape"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ConfigError(f"--{name.replace('_', '-')} needs positive integers, got {getattr(self, name)}")
        if len(self.synthetic_shape) != 3:
            raise ConfigError(f"--synthetic-shape must be HxWxC, got {self.synthetic_shape}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ConfigError(f"--checkpoint-every must be a positive integer, got {self.checkpoint_every}")
        if self.keep <= 0:
            raise ConfigError(f"--keep must be a positive integer, got {self.keep}")
        if self.devices is not None and self.devices <= 0:
            raise ConfigError(f"--devices must be a positive integer, got {self.devices}")
        if self.devices not in (None, 1) and self.strategy == "none":
            raise ConfigError(f"--devices {self.devices} needs a data-parallel --strategy: add --strategy "
                              f"shard_map (or pmap, auto)")
        manual = (self.coordinator, self.num_processes, self.process_id)
        if any(v is not None for v in manual) and any(v is None for v in manual):
            raise ConfigError("--coordinator, --num-processes and --process-id go together: give all three")
        if self.num_processes is not None and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"--process-id must be in 0..{self.num_processes - 1}, got {self.process_id}")
        if self.coordinator is not None and ":" not in self.coordinator:
            raise ConfigError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
        if self.init_timeout <= 0:
            raise ConfigError(f"--init-timeout must be a positive number of seconds, got {self.init_timeout}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
