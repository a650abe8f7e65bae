"""One fresh process of ``experiments/export.py``: how a process meets a model, timed.

    python experiments/_export_child.py jit MODEL            # graphduo's code: build, jax.jit, call
    python experiments/_export_child.py load FILE CACHE|-    # only JAX: deserialize the artefact, call
    python experiments/_export_child.py torch FILE MODEL     # torch.export.load, call

Prints one JSON line. A ``load`` process imports JAX and NumPy and nothing else (no graphduo, no
Flax, none of the experiments' helpers): it is what a server that only has the artefact runs, and
it reports which of graphduo, Flax and optax it found imported at its end. It inherits the
parent's ``XLA_FLAGS``, so every child compiles under the same options.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

WARM_CALLS = 20
BATCH = 32  # the batch of every first and warm call
INPUT_SHAPE = (28, 28, 1)  # experiments/_common.py's, repeated: a load process must not import it


def images(shape, batch: int):
    import numpy as np

    return np.random.default_rng(1).random((batch, *shape), dtype=np.float32)


def torch_images(model_name: str, batch: int):
    """The same images as ``images`` in PyTorch's layout: flat for the MLP, NCHW for the CNN."""
    x = images(INPUT_SHAPE, batch)
    return x.reshape(batch, -1) if model_name == "mlp" else x.transpose(0, 3, 1, 2).copy()


def _timed_calls(call, x, block) -> tuple[float, float, object]:
    t0 = time.perf_counter()
    out = block(call(x))
    first = time.perf_counter() - t0
    warm = []
    for _ in range(WARM_CALLS):
        t0 = time.perf_counter()
        block(call(x))
        warm.append(time.perf_counter() - t0)
    return first, statistics.median(warm), out


def from_code(model_name: str) -> dict:
    import jax

    t0 = time.perf_counter()
    jax.devices()
    backend_s = time.perf_counter() - t0
    from graphduo.models import build_model

    t0 = time.perf_counter()
    model = build_model(model_name, INPUT_SHAPE, 10)
    params = jax.block_until_ready(model.init(jax.random.key(0)))
    build_s = time.perf_counter() - t0
    apply = jax.jit(model.apply)
    first, warm, out = _timed_calls(lambda v: apply(params, v), images(INPUT_SHAPE, BATCH), jax.block_until_ready)
    return {"backend_s": backend_s, "build_s": build_s, "first_call_s": first, "warm_call_s": warm,
            "logits": out.tolist(), "imports": "graphduo, flax"}


def from_artefact(path: str, cache_dir: str | None) -> dict:
    import jax

    if cache_dir is not None:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t0 = time.perf_counter()
    jax.devices()  # the backend starts here, not inside the first call (as in from_code)
    backend_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    load_s = time.perf_counter() - t0
    x = images(tuple(exported.in_avals[0].shape[1:]), BATCH)
    first, warm, out = _timed_calls(exported.call, x, jax.block_until_ready)
    # Exported.call re-enters JAX's call machinery every time; wrapped in jax.jit it is looked up once
    _, warm_jit, _ = _timed_calls(jax.jit(exported.call), x, jax.block_until_ready)
    imported = sorted({m.split(".")[0] for m in sys.modules} & {"graphduo", "flax", "optax", "_common"})
    return {"backend_s": backend_s, "load_s": load_s, "first_call_s": first, "warm_call_s": warm,
            "warm_jit_call_s": warm_jit, "logits": out.tolist(), "imports": ", ".join(imported) or "jax only"}


def from_torch(path: str, model_name: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    t0 = time.perf_counter()
    module = torch.export.load(path).module()
    load_s = time.perf_counter() - t0
    x = torch.from_numpy(torch_images(model_name, BATCH))
    with torch.no_grad():
        first, warm, out = _timed_calls(module, x, lambda v: v)
    return {"load_s": load_s, "first_call_s": first, "warm_call_s": warm, "logits": out.numpy().tolist()}


def main(argv: list[str]) -> int:
    kind, *rest = argv
    if kind == "jit":
        result = from_code(rest[0])
    elif kind == "load":
        result = from_artefact(rest[0], None if rest[1] == "-" else rest[1])
    else:
        result = from_torch(rest[0], rest[1])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
