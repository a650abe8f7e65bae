"""The portable core: importing graphduo changes nothing in the process, the built-in models are
pure functions whose traced step exports with ``jax.export``, and their first step lands on
recorded values."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import build_model, create_train_state, make_optimizer, make_train_step
from graphduo.models import MODELS

# Everything a module could change at import: the environment (XLA_FLAGS...), JAX's configuration,
# whether a backend started, signal handlers, the exception hooks, logging, warnings filters, the
# working directory, the umask, and any shared library loaded through ctypes (mallopt...).
PROBE = textwrap.dedent("""
    import ctypes, importlib, json, logging, os, pkgutil, signal, sys, warnings
    loaded = []
    real_init = ctypes.CDLL.__init__
    def spy(self, name, *args, **kwargs):
        loaded.append(str(name))
        real_init(self, name, *args, **kwargs)
    ctypes.CDLL.__init__ = spy
    import jax
    from jax._src import xla_bridge

    def snapshot():
        mask = os.umask(0o022); os.umask(mask)
        return {
            "environ": dict(os.environ),
            "jax_config": {k: repr(v) for k, v in jax.config.values.items()},
            "backend_started": xla_bridge.backends_are_initialized(),
            "signals": {s.name: repr(signal.getsignal(s)) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)},
            "hooks": [repr(sys.excepthook), repr(sys.unraisablehook)],
            "logging": [repr(logging.root.handlers), logging.root.level],
            "warnings": repr(warnings.filters),
            "cwd": os.getcwd(),
            "umask": mask,
        }

    before = snapshot()
    import graphduo
    names = [m.name for m in pkgutil.walk_packages(graphduo.__path__, "graphduo.") if not m.name.endswith("__main__")]
    for name in names:
        importlib.import_module(name)
    after = snapshot()
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    print(json.dumps({"modules": names, "changed": changed, "ctypes": loaded}))
""")


def _probe(extra: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run([sys.executable, "-c", PROBE.replace("import graphduo\n", "import graphduo\n" + extra)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_graphduo_changes_no_process_setting():
    result = _probe()
    assert "graphduo.cli" in result["modules"] and "graphduo.runtime" in result["modules"]
    assert result["changed"] == {}
    assert result["ctypes"] == []


def test_the_import_probe_sees_a_changed_setting():
    """Negative control: a module that sets XLA_FLAGS, a JAX option and starts the backend at import
    is caught by the same probe."""
    result = _probe("import os, jax; os.environ['XLA_FLAGS'] = '--xla_dump_to=/tmp/x'; "
                    "jax.config.update('jax_enable_x64', True); jax.devices()\n")
    assert {"environ", "jax_config", "backend_started"} <= result["changed"].keys()


def _example(name: str, batch_size: int = 4):
    model = build_model(name, (28, 28, 1), 10)
    tx = make_optimizer("adam", 1e-3)
    state = create_train_state(model, tx, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.random((batch_size, 28, 28, 1), dtype=np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, batch_size).astype(np.int32))}
    return model, tx, state, batch


@pytest.mark.parametrize("name", MODELS)
def test_the_traced_train_step_exports_with_jax_export(name):
    """``jax.export`` with its default checks (every custom call on JAX's stable list): the step
    serializes, deserializes and computes what the jitted step computes."""
    model, tx, state, batch = _example(name)
    step = make_train_step(model, tx)
    leaves, treedef = jax.tree.flatten((state, batch))
    key_positions = [i for i, x in enumerate(leaves) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)]

    def flat_step(*flat):  # plain arrays in and out: no pytree node types to register for serialization
        flat = list(flat)
        for i in key_positions:
            flat[i] = jax.random.wrap_key_data(flat[i])
        new_state, metrics = step(*jax.tree.unflatten(treedef, flat))
        new_state = new_state._replace(rng=jax.random.key_data(new_state.rng))
        return jax.tree.leaves((new_state, metrics))

    args = [jax.random.key_data(x) if i in key_positions else x for i, x in enumerate(leaves)]
    exported = jax.export.export(jax.jit(flat_step))(*args)
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(*args)
    want = jax.jit(flat_step)(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7)


# The loss of each built-in model on a fixed batch after one Adam step (lr 1e-3) from seed 0. Update
# these only for a deliberate change of what a model computes from its seed: its definition, its
# initializers, the optimizer, the loss. A new jax, flax or CPU moves them by rounding alone
# (float32 sums reordered: ~1e-6 relative), far inside RTOL; a move beyond it after an upgrade is a
# numeric change to understand before updating anything.
GOLDEN_LOSS_AFTER_ONE_STEP = {"mlp": 1.6881824, "cnn": 1.9659765, "resnet": 2.1795557, "rnn": 2.3781271,
                              "vit": 2.2171237}
RTOL = 1e-4


@pytest.mark.parametrize("name", MODELS)
def test_golden_loss_after_one_step(name):
    model, tx, state, batch = _example(name, batch_size=16)
    step = jax.jit(make_train_step(model, tx))
    state, first = step(state, batch)
    _, second = step(state, batch)
    assert float(second["loss"]) < float(first["loss"])  # the step moved downhill
    np.testing.assert_allclose(float(second["loss"]), GOLDEN_LOSS_AFTER_ONE_STEP[name], rtol=RTOL,
                               err_msg=f"{name}: loss after one step moved; see the comment above "
                                       "GOLDEN_LOSS_AFTER_ONE_STEP before updating it")


def test_golden_check_catches_a_changed_model():
    """Negative control: the same check fails for the MLP one layer wider."""
    model = build_model("mlp", (28, 28, 1), 10, features=(512, 513))
    _, tx, _, batch = _example("mlp", batch_size=16)
    state = create_train_state(model, tx, jax.random.key(0))
    step = jax.jit(make_train_step(model, tx))
    state, _ = step(state, batch)
    _, second = step(state, batch)
    assert not np.isclose(float(second["loss"]), GOLDEN_LOSS_AFTER_ONE_STEP["mlp"], rtol=RTOL)
