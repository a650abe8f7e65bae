"""Data parallelism: every strategy computes the single-device gradient of the whole global batch."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import NUM_DEVICES, tree_allclose
from graphduo import Config, build_model, create_train_state, epoch_batches, train_and_evaluate
from graphduo.launch import free_port
from graphduo.parallel import DATA_AXIS, ParallelError, data_mesh, plan
from graphduo.step import make_optimizer, make_train_step
from graphduo.train import load_params

# One SGD step with lr=1 moves the parameters by exactly minus the gradient, so comparing
# parameters compares gradients. Data-parallel and single-device gradients differ only in the order
# float32 sums are taken (per-device partial sums, then the all-reduce): measured max abs difference
# <= 6e-8. atol 1e-6 keeps a >15x margin; the negative control's error is ~1e-2.
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-5
# After 10 Adam steps (lr 1e-3) rounding differences grow slightly: measured <= 1e-7.
ADAM_ATOL, ADAM_RTOL = 1e-6, 1e-5
GLOBAL_BATCH = 32


@pytest.fixture(scope="module")
def setup(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(32,))
    batches = list(epoch_batches(digits.x_train, digits.y_train, GLOBAL_BATCH, seed=0, epoch=0))[:10]
    return model, batches


def _run(model, tx, batches, mode="traced", strategy="none", devices=None):
    p = plan(mode, model, tx, strategy=strategy, devices=devices)
    state = p.put_state(create_train_state(model, tx, jax.random.key(0)))
    for batch in batches:
        state, _ = p.train_step(state, p.put_batch(batch))
    return p.host_params(state)


STRATEGY_CASES = [pytest.param(s, n, id=f"{s}-{n}dev") for s in ("shard_map", "pmap", "auto") for n in (1, 2, 4)]


@pytest.mark.parametrize("strategy", ["shard_map", "pmap", "auto"])
def test_train_and_evaluate_runs_every_strategy_end_to_end(strategy, tmp_path):
    """The whole loop, evaluation included: pmap's train step takes a per-device stack of the batch,
    its evaluation the batch as it comes (passing it the stack failed every pmap run)."""
    want = train_and_evaluate(Config(model="mlp", mlp_features=(16,), steps=4, run_dir=str(tmp_path / "one")),
                              progress=False)
    got = train_and_evaluate(Config(model="mlp", mlp_features=(16,), steps=4, strategy=strategy, devices=2,
                                    run_dir=str(tmp_path / strategy)), progress=False)
    assert got["devices"] == 2 and got["steps"] == 4
    assert np.isclose(got["test_loss"], want["test_loss"], rtol=1e-4) and got["test_accuracy"] == want["test_accuracy"]


@pytest.mark.parametrize("strategy,devices", STRATEGY_CASES)
def test_gradient_equals_single_device_gradient_on_the_global_batch(setup, strategy, devices):
    model, batches = setup
    tx = make_optimizer("sgd", 1.0)
    want = _run(model, tx, batches[:1])
    got = _run(model, tx, batches[:1], strategy=strategy, devices=devices)
    assert tree_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)


@pytest.mark.parametrize("strategy,devices", STRATEGY_CASES)
def test_ten_adam_steps_match_single_device(setup, strategy, devices):
    model, batches = setup
    tx = make_optimizer("adam", 1e-3)
    want = _run(model, tx, batches)
    got = _run(model, tx, batches, strategy=strategy, devices=devices)
    assert tree_allclose(got, want, rtol=ADAM_RTOL, atol=ADAM_ATOL)


def test_eager_shard_map_matches_single_device(setup):
    model, batches = setup
    tx = make_optimizer("sgd", 1.0)
    want = _run(model, tx, batches[:1])
    got = _run(model, tx, batches[:1], mode="eager", strategy="shard_map", devices=2)
    assert tree_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_without_the_gradient_collective_the_step_diverges(setup):
    """Negative control: the same shard_map step with no pmean trains each device on its own slice."""
    model, batches = setup
    tx = make_optimizer("sgd", 1.0)
    want = _run(model, tx, batches[:1])
    mesh = data_mesh(NUM_DEVICES)
    local_only = jax.jit(jax.shard_map(make_train_step(model.apply, tx), mesh=mesh,
                                       in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()),
                                       check_vma=False))
    p = plan("traced", model, tx, strategy="shard_map", devices=NUM_DEVICES)
    state = p.put_state(create_train_state(model, tx, jax.random.key(0)))
    state, _ = local_only(state, p.put_batch(batches[0]))
    got = p.host_params(state)
    assert not tree_allclose(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL)


def test_plan_errors_are_one_line(setup):
    model, _ = setup
    tx = make_optimizer("sgd", 0.1)
    with pytest.raises(ParallelError, match=rf"--devices 8: only {NUM_DEVICES} cpu device\(s\) exist"):
        plan("traced", model, tx, strategy="shard_map", devices=8)
    with pytest.raises(ParallelError, match="eager mode runs data-parallel only with --strategy shard_map"):
        plan("eager", model, tx, strategy="auto", devices=2)


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--strategy", "shard_map", "--devices", "4", "--batch-size", "30"],
                 "--batch-size 30 is not divisible by 4 devices: use a multiple of 4, such as 32", id="indivisible"),
    pytest.param(["--strategy", "auto", "--devices", "8"], "--devices 8: only 4 cpu device(s) exist", id="too-many"),
    pytest.param(["--devices", "2"], "--devices 2 needs a data-parallel --strategy", id="no-strategy"),
    pytest.param(["--coordinator", "127.0.0.1:1"], "--coordinator, --num-processes and --process-id go together",
                 id="partial-coordinator"),
])
def test_bad_parallel_settings_exit_2_with_one_line(argv, message, capsys, tmp_path, monkeypatch):
    from graphduo.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet", "--steps", "2", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_bf16_reaches_fp32_accuracy_within_one_point(tmp_path):
    # Measured on digits, 6 epochs: fp32 98.1%, bf16 ~98%.
    fp32 = train_and_evaluate(Config(model="cnn", epochs=6, run_dir=str(tmp_path / "a")), progress=False)
    bf16 = train_and_evaluate(Config(model="cnn", epochs=6, precision="bf16", run_dir=str(tmp_path / "b")),
                              progress=False)
    assert bf16["precision"] == "bf16"
    assert bf16["test_accuracy"] >= fp32["test_accuracy"] - 0.01, (bf16["test_accuracy"], fp32["test_accuracy"])


def _graphduo(*argv, timeout=240, devices=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return subprocess.run([sys.executable, "-m", "graphduo", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_200_data_parallel_steps_finish_without_a_collective_deadlock(tmp_path):
    """Back-to-back async shard_map steps on CPU can deadlock (JAX_FACTS); the loop bounds steps in flight."""
    result = _graphduo("train", "--strategy", "shard_map", "--devices", "4", "--model", "mlp",
                       "--mlp-features", "32", "--steps", "200", "--json", "--quiet", "--run-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["steps"] == 200 and summary["devices"] == 4


def test_two_processes_match_one_process_with_four_devices(tmp_path):
    common = ["--strategy", "shard_map", "--model", "mlp", "--mlp-features", "64", "--steps", "20", "--quiet"]
    one = _graphduo("train", *common, "--devices", "4", "--run-dir", str(tmp_path / "one"),
                    "--params-out", str(tmp_path / "one.npz"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = _graphduo("launch", "--processes", "2", "--devices-per-process", "2", "--timeout", "200", "--",
                    "train", *common, "--json", "--run-dir", str(tmp_path / "two"),
                    "--params-out", str(tmp_path / "two.npz"))
    assert two.returncode == 0, two.stderr[-2000:]
    summaries = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["processes"] == 2 and summaries[0]["devices"] == 4
    a, b = load_params(tmp_path / "one.npz"), load_params(tmp_path / "two.npz")
    assert a.keys() == b.keys()
    # gloo's all-reduce sums in another order than XLA:CPU's in-process one: rounding, ~1e-7 here.
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_a_peer_that_never_starts_is_a_timeout_with_a_clear_message(tmp_path):
    result = _graphduo("train", "--strategy", "shard_map", "--steps", "2", "--coordinator",
                       f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0",
                       "--init-timeout", "3", "--run-dir", str(tmp_path / "r"), timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "graphduo train: error: timed out after 3 s waiting for 2 processes at "
        f"{result.args[result.args.index('--coordinator') + 1]}: start every process with the same "
        "settings, or raise --init-timeout")
    assert not (tmp_path / "r").exists()


def test_launch_stops_everyone_when_a_process_fails(tmp_path):
    result = _graphduo("launch", "--processes", "2", "--", "train", "--strategy", "shard_map",
                       "--dataset", "mnist", "--data-dir", str(tmp_path), "--steps", "2")
    assert result.returncode == 2
    assert "graphduo launch: error: process" in result.stderr
