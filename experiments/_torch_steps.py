"""PyTorch's side, at its best: graphduo's MLP and CNN as ``torch.nn`` modules holding graphduo's very
weights, and one Adam training step (forward, softmax cross-entropy, backward, update) in each of
the forms a careful PyTorch user would try.

Variants (``variants(device)``):

* ``eager``:         ``loss.backward()`` and ``torch.optim.Adam`` with its defaults (on the CPU a
                     per-parameter Python loop; ``foreach`` is the default on CUDA only).
* ``eager-fused``:   the same with ``Adam(fused=True)``: one kernel for the whole update. PyTorch
                     never picks it by default.
* ``compile``:       the whole step (forward, ``backward()``, ``optimizer.step()``) under
                     ``torch.compile``, with compiled autograd on, so the backward pass is compiled
                     too, and the optimizer step traced into the compiled region (PyTorch's
                     "compiling the optimizer" recipe). ``zero_grad`` runs outside it (Dynamo skips
                     it by design). The graph breaks that remain are reported (``graph_breaks``).
* ``compile-reduce-overhead`` (CUDA only): the same in ``mode="reduce-overhead"``: CUDA graphs,
                     PyTorch's answer to launch-bound small steps.
* ``compile-max-autotune`` (CUDA only): ``mode="max-autotune"``: kernel search plus CUDA graphs.

Every variant starts from the same weights (``torch_model``) and the same optimizer settings as
graphduo's Adam (lr, b1 0.9, b2 0.999, eps 1e-8: ``torch.optim.Adam``'s defaults equal
``optax.adam``'s); callers check that the losses agree. Needs PyTorch (the ``peers`` extra).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

INSTALL_TORCH = 'from the repository root, pip install -c constraints.txt ".[peers]"'
CPU_VARIANTS = ("eager", "eager-fused", "compile")
CUDA_VARIANTS = (*CPU_VARIANTS, "compile-reduce-overhead", "compile-max-autotune")


def need_torch(script: str):
    """Import torch, or exit with status 2 and one line saying how to install it."""
    try:
        import torch
    except ImportError:
        print(f"{script} needs PyTorch, which is not installed: {INSTALL_TORCH}", file=sys.stderr)
        sys.exit(2)
    return torch


def variants(device: str) -> tuple[str, ...]:
    return CUDA_VARIANTS if device == "cuda" else CPU_VARIANTS


def settings(torch) -> dict[str, Any]:
    """What the results should record about this torch."""
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_cuda": torch.version.cuda, "compiled_autograd": hasattr(torch._dynamo.config, "compiled_autograd")}


def torch_model(torch, name: str, params, device: str = "cpu") -> Any:
    """graphduo's MLP or CNN as a ``torch.nn`` module holding a copy of ``params``, on ``device``."""
    nn = torch.nn

    def t(a, perm=None):
        a = np.array(a)  # a writable host copy
        return torch.from_numpy(np.ascontiguousarray(a.transpose(perm) if perm else a)).clone()

    def linear(p):
        layer = nn.Linear(*p["kernel"].shape)
        with torch.no_grad():
            layer.weight.copy_(t(p["kernel"], (1, 0)))  # (in, out) -> (out, in)
            layer.bias.copy_(t(p["bias"]))
        return layer

    def conv(p):
        h, w, i, o = p["kernel"].shape
        layer = nn.Conv2d(i, o, (h, w), padding="same")
        with torch.no_grad():
            layer.weight.copy_(t(p["kernel"], (3, 2, 0, 1)))  # HWIO -> OIHW
            layer.bias.copy_(t(p["bias"]))
        return layer

    class NHWCFlatten(nn.Module):
        """Flatten in graphduo's (NHWC) order, so the first Dense kernel's rows line up."""

        def forward(self, x):
            return x.permute(0, 2, 3, 1).flatten(1)

    if name == "mlp":
        n = len(params)
        layers: list[Any] = [nn.Flatten()]
        for i in range(n):
            layers.append(linear(params[f"Dense_{i}"]))
            if i < n - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers).to(device)
    layers = []
    n_conv = sum(k.startswith("Conv_") for k in params)
    for i in range(n_conv):  # pool before ReLU, as graphduo's cnn_apply: the same function, less work
        layers += [conv(params[f"Conv_{i}"]), nn.MaxPool2d(2), nn.ReLU()]
    layers += [NHWCFlatten(), linear(params["Dense_0"]), nn.ReLU(), linear(params["Dense_1"])]
    return nn.Sequential(*layers).to(device)


def torch_batch(torch, batch, model_name: str, device: str = "cpu") -> tuple[Any, Any]:
    """A graphduo batch (NHWC numpy) as ``(images, labels)`` torch tensors on ``device``: NCHW for
    the CNN, flat for the MLP."""
    x = np.asarray(batch["image"])
    x = x.transpose(0, 3, 1, 2) if model_name == "cnn" else x.reshape(len(x), -1)
    return (torch.from_numpy(np.ascontiguousarray(x)).to(device),
            torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)).to(device))


def sync_fn(torch, device: str) -> Callable[[], None]:
    """What waits for torch's queued work: ``torch.cuda.synchronize`` on CUDA; nothing on the CPU,
    where an op has finished when it returns."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


class TorchTrainer:
    """One variant's model, optimizer and step: ``loss = trainer.step(x, y)`` runs one Adam step to
    completion and returns the loss of the weights before it (as graphduo's metrics do)."""

    def __init__(self, torch, variant: str, model_name: str, params, *, lr: float, device: str = "cpu"):
        if variant not in variants(device):
            raise ValueError(f"unknown torch variant {variant!r} on {device}: choose one of {', '.join(variants(device))}")
        self.torch, self.variant, self.device = torch, variant, device
        self.model = torch_model(torch, model_name, params, device)
        fused = {"fused": True} if variant == "eager-fused" else {}
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, **fused)  # b1 .9, b2 .999, eps 1e-8
        self._sync = sync_fn(torch, device)
        self.graph_breaks: dict[str, int] = {}
        F = torch.nn.functional

        def step(x, y):
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            return loss.detach()

        if variant.startswith("compile"):
            torch._dynamo.reset()  # no cached graph (or automatic-dynamic shapes) from another workload
            mode = {"compile": None, "compile-reduce-overhead": "reduce-overhead",
                    "compile-max-autotune": "max-autotune"}[variant]
            self._step = torch.compile(step, mode=mode)
        else:
            self._step = step
        self._first = True

    def _compiled_autograd(self):
        config = self.torch._dynamo.config
        if self.variant.startswith("compile") and hasattr(config, "compiled_autograd"):
            return config.patch(compiled_autograd=True)
        return contextlib.nullcontext()

    def step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        if self._first and self.variant.startswith("compile"):
            from torch._dynamo.utils import counters

            counters["graph_break"].clear()
        with self._compiled_autograd():
            loss = self._step(x, y)
        self._sync()
        if self._first and self.variant.startswith("compile"):
            from torch._dynamo.utils import counters

            self.graph_breaks = {reason.split("\n")[0]: n for reason, n in counters["graph_break"].items()}
        self._first = False
        return loss
