"""Any model: the built-in ResNet, RNN and ViT, and a user's own Flax module (linen or NNX), through
every part of graphduo: both paradigms, model state (BatchNorm) and randomness (dropout),
data parallelism, checkpoints, the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from conftest import tree_allclose
from graphduo import Config, Model, create_train_state, epoch_batches, train_and_evaluate
from graphduo.cli import main
from graphduo.models import ModelError, build_model
from graphduo.step import make_optimizer, make_train_step
from graphduo.train import wrap_steps

ROOT = pathlib.Path(__file__).resolve().parents[1]
LINEN = str(ROOT / "examples" / "linen_model.py") + ":make"
NNX = str(ROOT / "examples" / "nnx_model.py") + ":make"
STEPS = 20
# Eager and traced run the same float32 ops; XLA fuses and reorders them, so each step differs by
# rounding (~1e-7 relative). BatchNorm's and LayerNorm's variance sums and attention's softmax carry
# it further than the MLP's matmuls: measured after 20 Adam steps on digits, largest difference in
# parameters and running statistics 1e-6 to 4e-6 across these models. 5e-5 leaves a 10x margin; a 1%
# learning-rate change moves the parameters by 1e-3 or more (the negative control).
ATOL = 5e-5
RTOL = 1e-4

BUILTINS = [
    pytest.param("resnet", {"width": 8, "stages": (1, 1)}, id="resnet"),
    pytest.param("rnn", {"hidden": 32}, id="rnn-unrolled"),
    pytest.param("rnn", {"hidden": 32, "loop": "scan"}, id="rnn-scan"),
    pytest.param("rnn", {"hidden": 32, "cell": "lstm"}, id="rnn-lstm"),
    pytest.param("vit", {"dim": 32, "depth": 1, "heads": 2}, id="vit"),
]


def _comparable(tree):
    """Typed PRNG keys (an NNX module's random streams) as their raw data, for ``tree_allclose``."""
    is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)  # noqa: E731
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x)) if is_key(x) else np.asarray(x), tree)


def _train(mode, model, digits, *, steps=STEPS, lr=1e-3, optimizer="adam"):
    tx = make_optimizer(optimizer, lr)
    step, _ = wrap_steps(mode, model, tx)
    state = create_train_state(model, tx, jax.random.key(0))
    for _, batch in zip(range(steps), epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0)):
        state, metrics = step(state, batch)
    return _comparable(jax.device_get((state.params, state.model_state))), float(metrics["loss"])


def _without_key_biases(tree, lr=1e-3, steps=STEPS, other=None):
    """Attention's key biases set aside. Their true gradient is zero (adding a constant to every key's
    score for one query leaves its softmax unchanged), so what each paradigm computes for them is
    rounding noise, and Adam, which divides by the gradient's own scale, moves them by up to ``lr`` a
    step either way: measured 6e-4 to 9e-4 apart after 20 steps, where every other parameter agrees
    to within 1e-3 of the tolerance. They are checked against that bound instead."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    keep = {jax.tree_util.keystr(k): v for k, v in flat if "['key']['bias']" not in jax.tree_util.keystr(k)}
    if other is not None:
        for k, v in flat:
            if "['key']['bias']" in jax.tree_util.keystr(k):
                assert np.max(np.abs(v - other[jax.tree_util.keystr(k)])) <= lr * steps
    return keep


def _comparable_pair(a, b):
    """``a`` and ``b`` (trained trees) as flat dicts for ``tree_allclose``, key biases checked apart."""
    b_all = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(b)[0]}
    return _without_key_biases(a, other=b_all), _without_key_biases(b)


@pytest.mark.parametrize("name,options", BUILTINS)
def test_builtins_train_the_same_eagerly_and_traced(name, options, digits):
    model = build_model(name, digits.input_shape, digits.num_classes, **options)
    eager, eager_loss = _train("eager", model, digits)
    traced, traced_loss = _train("traced", model, digits)
    assert tree_allclose(*_comparable_pair(eager, traced), rtol=RTOL, atol=ATOL)  # parameters and running statistics
    assert eager_loss == pytest.approx(traced_loss, rel=1e-4)
    if name == "resnet":  # the running statistics moved, and are compared too
        assert jax.tree.leaves(eager[1]) and not tree_allclose(eager[1], build_model(
            name, digits.input_shape, digits.num_classes, **options).init_variables(jax.random.key(0))[1],
            rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name,options", [BUILTINS[0], BUILTINS[4]])
def test_the_equivalence_check_catches_a_small_difference(name, options, digits):
    """Negative control: a 1% different learning rate on one side fails the same check."""
    model = build_model(name, digits.input_shape, digits.num_classes, **options)
    eager, _ = _train("eager", model, digits)
    traced, _ = _train("traced", model, digits, lr=1.01e-3)
    assert not tree_allclose(_without_key_biases(eager), _without_key_biases(traced), rtol=RTOL, atol=ATOL)


def test_the_rnn_as_a_python_loop_and_as_a_scan_compute_the_same(digits):
    unrolled = build_model("rnn", digits.input_shape, 10, hidden=32)
    scanned = build_model("rnn", digits.input_shape, 10, hidden=32, loop="scan")
    params, _ = unrolled.init_variables(jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(scanned.init(jax.random.key(0)))  # the same weights
    x, y = jnp.asarray(digits.x_train[:16]), jnp.asarray(digits.y_train[:16])

    def loss(model, p):
        logits = model.apply(p, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

    a, b = jax.value_and_grad(lambda p: loss(unrolled, p))(params), jax.value_and_grad(lambda p: loss(scanned, p))(params)
    assert a[0] == pytest.approx(float(b[0]), rel=1e-5) and tree_allclose(a[1], b[1], rtol=1e-4, atol=1e-6)
    # the scan is one loop in the program; the Python loop is unrolled: one cell per row
    assert "scan" in str(jax.make_jaxpr(lambda p: scanned.apply(p, x))(params))
    assert "scan" not in str(jax.make_jaxpr(lambda p: unrolled.apply(p, x))(params))
    # negative control: one row fewer is another function
    shorter = unrolled.apply(params, x[:, :-1])
    assert not np.allclose(shorter, unrolled.apply(params, x), atol=1e-4)


class _LinenNet(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        # no bias before BatchNorm (it would be subtracted again: a parameter whose true gradient is
        # zero, which Adam moves by rounding noise, as every ResNet leaves it out)
        x = nn.Dense(32, use_bias=False)(x.reshape((x.shape[0], -1)))
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.3, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.num_classes)(x)


class _NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(64, 32, use_bias=False, rngs=rngs)  # no bias before BatchNorm
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.b = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.b(self.drop(nnx.relu(self.bn(self.a(x.reshape((x.shape[0], -1)))))))


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_a_flax_module_trains_in_both_paradigms_with_state_and_dropout(kind, digits):
    module = _LinenNet() if kind == "linen" else _NNXNet(nnx.Rngs(0))
    model = Model.from_flax(module, digits.input_shape, digits.num_classes)
    # SGD, not Adam: digits' border pixels are constant, so the weights they feed into BatchNorm have a
    # true gradient of zero (BatchNorm subtracts them again); Adam divides that rounding noise by its
    # own scale and moves those weights by up to lr a step either way (measured: 1e-2 apart after 20
    # steps), where SGD moves them by lr times the noise. Every other weight agrees either way.
    eager, _ = _train("eager", model, digits, lr=0.05, optimizer="sgd")
    traced, _ = _train("traced", model, digits, lr=0.05, optimizer="sgd")
    assert tree_allclose(eager, traced, rtol=RTOL, atol=ATOL)
    other, _ = _train("traced", model, digits, lr=0.0505, optimizer="sgd")  # negative control: 1% more lr
    assert not tree_allclose(eager, other, rtol=RTOL, atol=ATOL)
    initial = _comparable(model.init_variables(jax.random.key(0))[1])
    # BatchNorm's running statistics moved (in both paradigms alike)
    assert not tree_allclose(eager[1], initial, rtol=RTOL, atol=ATOL)
    # dropout draws a new mask every step: two steps on the same batch see different masks
    tx = make_optimizer("sgd", 0.0)  # lr 0: the weights stay, only the masks could change the loss
    step = jax.jit(make_train_step(model, tx))
    state = create_train_state(model, tx, jax.random.key(0))
    batch = {"image": digits.x_train[:32], "label": digits.y_train[:32]}
    state, first = step(state, batch)
    _, second = step(state, batch)
    assert float(first["loss"]) != float(second["loss"])


def test_from_flax_says_what_is_wrong_in_one_line():
    with pytest.raises(ModelError, match=r"^a dict is not a Flax module: return a flax.linen.Module or a flax.nnx.Module$"):
        Model.from_flax({}, (8, 8, 1), 10)
    with pytest.raises(ModelError, match=r"gives logits of shape \(1, 7\) for one image, not \(1, 10\)"):
        Model.from_flax(_LinenNet(num_classes=7), (8, 8, 1), 10)
    with pytest.raises(ModelError, match=r"fails on inputs of shape \(1, 9, 9, 1\)") as err:
        Model.from_flax(_NNXNet(nnx.Rngs(0)), (9, 9, 1), 10)  # its first layer takes 64 features
    assert "\n" not in str(err.value)


def test_synced_batch_norm_on_two_devices_equals_one_device_on_the_global_batch(digits):
    tx = make_optimizer("adam", 1e-3)
    one = build_model("resnet", digits.input_shape, 10, width=8, stages=(1, 1))
    synced = build_model("resnet", digits.input_shape, 10, width=8, stages=(1, 1), batch_norm_axis="data")
    from graphduo import parallel

    plan = parallel.plan("traced", synced, tx, strategy="shard_map", devices=2)
    single = jax.jit(make_train_step(one, tx))
    s1 = create_train_state(one, tx, jax.random.key(0))
    s2 = plan.put_state(create_train_state(synced, tx, jax.random.key(0)))
    for _, batch in zip(range(5), epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0)):
        s1, _ = single(s1, batch)
        s2, _ = plan.train_step(s2, plan.put_batch(batch))
    a, b = _comparable(jax.device_get((s1.params, s1.model_state))), _comparable(jax.device_get((s2.params, s2.model_state)))
    assert tree_allclose(a, b, rtol=RTOL, atol=ATOL)
    # negative control: per-device statistics (no axis) on the same two devices differ
    plain = parallel.plan("traced", one, tx, strategy="shard_map", devices=2)
    s3 = plain.put_state(create_train_state(one, tx, jax.random.key(0)))
    for _, batch in zip(range(5), epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0)):
        s3, _ = plain.train_step(s3, plain.put_batch(batch))
    assert not tree_allclose(a, _comparable(jax.device_get((s3.params, s3.model_state))), rtol=RTOL, atol=ATOL)


def _run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("spec", [LINEN, NNX], ids=["linen", "nnx"])
def test_a_user_model_file_through_every_command(spec, capsys, tmp_path):
    code, out, err = _run_cli(capsys, "train", "--model", spec, "--steps", "30", "--quiet", "--json",
                              "--run-dir", str(tmp_path / "run"), "--checkpoint-every", "10")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["model"] == spec and summary["steps"] == 30 and summary["test_accuracy"] > 0.1
    # exported with its BatchNorm statistics baked in, predict gives the run's own test accuracy
    code, out, err = _run_cli(capsys, "export", str(tmp_path / "run"), "--out", str(tmp_path / "m.jaxexport"))
    assert code == 0, err
    code, out, err = _run_cli(capsys, "predict", str(tmp_path / "m.jaxexport"), "--dataset", "digits", "--json")
    assert code == 0, err
    predicted = json.loads(out)
    assert round(predicted["test_accuracy"] * predicted["count"]) == round(summary["test_accuracy"] * predicted["count"])
    code, out, err = _run_cli(capsys, "compare", "--model", spec, "--steps", "20", "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["same_loss"]
    code, out, err = _run_cli(capsys, "inspect", "--model", spec, "--format", "json")
    assert code == 0, err
    eager = json.loads(out)["eager"]
    assert eager["framework_ms"] == pytest.approx(eager["eager_step_ms"] - eager["dispatch_ms"])
    assert eager["ops_per_step"] > 10
    # resumed from its checkpoint with more steps, against the same run straight through: the same
    code, out, err = _run_cli(capsys, "train", "--model", spec, "--steps", "40", "--quiet", "--run-dir",
                              str(tmp_path / "run"), "--checkpoint-every", "10", "--params-out", str(tmp_path / "a.npz"))
    assert code == 0 and "resuming" in err
    code, out, err = _run_cli(capsys, "train", "--model", spec, "--steps", "40", "--quiet", "--run-dir",
                              str(tmp_path / "straight"), "--checkpoint-every", "10", "--params-out", str(tmp_path / "b.npz"))
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


@pytest.mark.parametrize("argv,message", [
    (["--model", "nowhere.py:make"], "no file nowhere.py"),
    (["--model", "{examples}/linen_model.py:nothing"], "has no function or class nothing"),
    (["--model", "{examples}/linen_model.py:SmallConvNet.channels"], "has no function or class"),
    (["--model", "json:dumps"], "json:dumps gave a str, which is not a Flax module"),
    (["--model", "{tmp}/notflax.py:make"], "gave a int, which is not a Flax module"),
    (["--model", "{examples}/nnx_model.py:make", "--dataset", "synthetic", "--synthetic-shape", "8x8x3"],
     "fails on inputs of shape (1, 8, 8, 3)"),
    (["--model", "transformer"], "unknown model 'transformer': choose one of mlp, cnn, resnet, rnn, vit"),
])
def test_a_bad_model_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, argv, message):
    (tmp_path / "notflax.py").write_text("def make(num_classes):\n    return 3\n")
    fill = {"examples": str(ROOT / "examples"), "tmp": str(tmp_path)}
    code, out, err = _run_cli(capsys, "train", "--steps", "5", "--quiet", "--run-dir", str(tmp_path / "run"),
                              *[a.format(**fill) for a in argv])
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_the_examples_run_as_the_readme_shows():
    readme = (ROOT / "README.md").read_text()
    assert "--model examples/linen_model.py:make" in readme and "--model examples/nnx_model.py:make" in readme
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    out = subprocess.run([sys.executable, "-m", "graphduo", "train", "--model", "examples/nnx_model.py:make",
                          "--steps", "10", "--quiet", "--run-dir", "/dev/null/x"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 2 and "--run-dir" in out.stderr  # found the file from the repository root


@pytest.mark.parametrize("strategy,precision", [("pmap", "fp32"), ("auto", "fp32"), ("shard_map", "bf16"),
                                                ("none", "bf16")])
def test_state_and_dropout_models_train_under_every_strategy_and_bf16(strategy, precision, tmp_path):
    """The ResNet (BatchNorm) and the ViT (dropout) through each data-parallel strategy on 2 CPU
    devices and in bf16: they train (the logged loss falls) and evaluate with their running statistics."""
    devices = None if strategy == "none" else 2
    for name, options in (("resnet", {"resnet_width": 8, "resnet_stages": (1,)}),
                          ("vit", {"vit_dim": 16, "vit_depth": 1, "vit_heads": 2})):
        config = Config(model=name, strategy=strategy, devices=devices, precision=precision, steps=30,
                        batch_size=32, run_dir=str(tmp_path / f"{name}-{strategy}"), **options)
        summary = train_and_evaluate(config, progress=False, log_every=10)
        records = [json.loads(line) for line in (tmp_path / f"{name}-{strategy}" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r.get("kind", r.get("type")) == "train" and "loss" in r]
        assert summary["steps"] == 30 and np.isfinite(summary["final_loss"]) and 0 <= summary["test_accuracy"] <= 1
        assert losses and losses[-1] < losses[0], (name, strategy, losses)


class _SowingNNX(nnx.Module):
    """An NNX module that sows an intermediate (as NNX's own examples do for activations) and drops out."""

    def __init__(self, num_classes, *, rngs):
        self.a = nnx.Linear(64, 16, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.b = nnx.Linear(16, num_classes, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.a(x.reshape((x.shape[0], -1))))
        self.sow(nnx.Intermediate, "hidden", h)
        return self.b(self.drop(h))


# flax 0.12 deprecates ``Module.sow`` outside ``nnx.capture`` but still runs it: users' modules do
@pytest.mark.filterwarnings("ignore:Using 'Module.sow\\(\\)' outside:DeprecationWarning")
def test_an_nnx_module_draws_dropout_from_the_steps_key_and_may_sow(digits):
    model = Model.from_flax(_SowingNNX(10, rngs=nnx.Rngs(0)), digits.input_shape, digits.num_classes)
    params, state = model.init_variables(jax.random.key(0))
    x = jnp.asarray(digits.x_train[:8])
    a, new_state = model.forward(params, state, x, True, jax.random.key(1))
    b, _ = model.forward(params, state, x, True, jax.random.key(1))
    c, _ = model.forward(params, state, x, True, jax.random.key(2))
    # the step's key decides the mask (so each device's key gives its own), and only the key
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # the carried streams and state keep their structure (nothing sown leaks into the next step)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert tree_allclose(_comparable(new_state["streams"]), _comparable(state["streams"]), rtol=0, atol=0)
    eager, _ = _train("eager", model, digits, steps=3)
    traced, _ = _train("traced", model, digits, steps=3)
    assert tree_allclose(eager, traced, rtol=RTOL, atol=ATOL)


FUTURE_LINEN = '''from __future__ import annotations

import flax.linen as nn


class Net(nn.Module):
    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.width)(x.reshape((x.shape[0], -1)))))
'''


def test_model_files_in_every_style_and_a_relative_path_that_lasts(tmp_path, monkeypatch, capsys):
    """A linen class with string annotations, an NNX class named directly (its ``rngs`` keyword), and a
    relative FILE.py that the run records absolute, so it exports from another directory."""
    (tmp_path / "mine.py").write_text(FUTURE_LINEN)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    for spec in ("mine.py:Net", f"{ROOT / 'examples' / 'nnx_model.py'}:SmallConvNet"):
        run = tmp_path / spec.rsplit(":", 1)[1]
        code, out, err = _run_cli(capsys, "train", "--model", spec, "--steps", "5", "--quiet", "--run-dir", str(run))
        assert code == 0, err
    assert json.loads((tmp_path / "Net" / "config.json").read_text())["model"] == f"{tmp_path / 'mine.py'}:Net"
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, err = _run_cli(capsys, "export", str(tmp_path / "Net"), "--out", "m.jaxexport")
    assert code == 0, err
