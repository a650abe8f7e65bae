"""The compiled loop (--steps-per-call K) and the eager variant with a fused update (--eager-update fused).

K steps per executable must train exactly what one step per call trains: the same batches in the
same order, from the same permutation, with metrics, the NaN stop, checkpoints and resume per step.
"""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from graphduo import Config, TrainingDiverged, data, eager, train, train_and_evaluate
from graphduo.cli import main
from graphduo.models import build_model
from graphduo.step import make_optimizer, make_train_step
from graphduo.train import load_params

# K steps in one lax.scan compile the step's body once for the loop; XLA may fuse it differently
# from the single-step program, so each step could differ by float32 rounding (~1e-7 relative).
# Measured after 60 Adam steps on digits (jax 0.10.2, CPU): largest parameter difference 0, with
# the split on the device and streamed. 1e-5 leaves room for another backend's fusion choices;
# batches taken in another order moved the parameters by 4e-2 (the negative control).
ATOL = 1e-5
BASE = Config(model="mlp", mlp_features=(32,), steps=60, batch_size=32)


def _params(tmp_path, name, **changes):
    config = dataclasses.replace(BASE, run_dir=str(tmp_path / name), params_out=str(tmp_path / f"{name}.npz"),
                                 **changes)
    summary = train_and_evaluate(config, progress=False, log_every=20)
    return load_params(tmp_path / f"{name}.npz"), summary


def _max_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def test_k_steps_per_call_train_what_one_step_per_call_trains(tmp_path):
    one, s1 = _params(tmp_path, "k1")
    many, s16 = _params(tmp_path, "k16", steps_per_call=16)
    assert s1["device_split"] and s16["device_split"]  # digits fits: batches gathered on the device
    assert s16["steps"] == 60 and s16["steps_per_call"] == 16
    # calls of 16, 16, 12 (the epoch's end at 44), then 16: two executables
    assert s16["compiles"] == 2 and s1["compiles"] == 1
    assert _max_diff(one, many) <= ATOL
    assert s16["final_loss"] == pytest.approx(s1["final_loss"], rel=1e-5)
    # the metrics are per step: train records at the same steps, with the same values
    records = [[json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
               for n in ("k1", "k16")]
    steps = [[(r["kind"], r["step"]) for r in recs] for recs in records]
    assert steps[0] == steps[1] == [("train", 20), ("train", 40), ("eval", 44), ("train", 60), ("eval", 60)]
    assert records[1][0]["loss"] == pytest.approx(records[0][0]["loss"], rel=1e-5)


def test_the_check_catches_batches_in_another_order(tmp_path, monkeypatch):
    """Negative control: the same K=16 run with each epoch's permutation reversed fails the check."""
    one, _ = _params(tmp_path, "k1")
    real = data.epoch_permutation
    monkeypatch.setattr(train, "epoch_permutation", lambda n, **kw: real(n, **kw)[::-1].copy())
    other, _ = _params(tmp_path, "reversed", steps_per_call=16)
    assert _max_diff(one, other) > 100 * ATOL


def test_a_split_too_large_for_the_device_streams_k_batches_per_call(tmp_path, monkeypatch, capsys):
    one, _ = _params(tmp_path, "k1")
    monkeypatch.setattr(train, "fits_on_device", lambda nbytes, device=None: False)
    streamed, summary = _params(tmp_path, "streamed", steps_per_call=8)
    assert not summary["device_split"]
    assert _max_diff(one, streamed) <= ATOL
    assert "too large to keep on the device: batches stream from the host, 8 stacked per call" in capsys.readouterr().err


def test_the_nan_stop_names_the_same_step_with_k_steps_per_call(tmp_path):
    steps = []
    for k in (1, 16):
        config = Config(model="mlp", optimizer="sgd", lr=1e6, steps=50, steps_per_call=k,
                        run_dir=str(tmp_path / f"k{k}"))
        with pytest.raises(TrainingDiverged) as err:
            train_and_evaluate(config, progress=False)
        steps.append(int(re.search(r"at step (\d+)", str(err.value)).group(1)))
    assert steps[0] == steps[1] > 1


def test_checkpoints_land_between_calls_and_resume_where_they_stopped(tmp_path, capsys):
    config = dataclasses.replace(BASE, steps=100, steps_per_call=16, checkpoint_every=30, keep=5,
                                 run_dir=str(tmp_path / "run"))
    train_and_evaluate(config, progress=False)
    assert "each at the end of the call that reaches or passes a multiple of --checkpoint-every 30" in \
        capsys.readouterr().err
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [32, 60, 100]  # calls end at 16, 32, 44, 60, 76, 88, 100
    # resumed from step 60 with more steps, against one run of 140 steps straight through
    more = dataclasses.replace(config, steps=140, params_out=str(tmp_path / "resumed.npz"))
    summary = train_and_evaluate(more, progress=False)
    assert summary["resumed_from"] == 100 and summary["steps"] == 140
    straight = dataclasses.replace(more, run_dir=str(tmp_path / "straight"), params_out=str(tmp_path / "straight.npz"))
    train_and_evaluate(straight, progress=False)
    assert _max_diff(load_params(tmp_path / "resumed.npz"), load_params(tmp_path / "straight.npz")) <= ATOL


@pytest.mark.parametrize("argv,message", [
    (["--steps-per-call", "4", "--mode", "eager"], "--steps-per-call 4 needs --mode traced"),
    (["--steps-per-call", "4", "--strategy", "shard_map", "--devices", "2"], "--steps-per-call 4 runs on one device"),
    (["--steps-per-call", "0"], "--steps-per-call must be a positive integer, got 0"),
    (["--eager-update", "fused"], "--eager-update fused changes eager mode only"),
    (["--eager-update", "jit"], "invalid choice: 'jit'"),
])
def test_bad_combinations_are_one_line_exit_2(capsys, tmp_path, argv, message):
    try:
        code = main(["train", "--quiet", "--model", "mlp", "--steps", "5", "--run-dir", str(tmp_path / "r"), *argv])
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_compare_and_inspect_take_steps_per_call(capsys):
    assert main(["compare", "--model", "mlp", "--mlp-features", "32", "--steps", "40", "--steps-per-call", "4",
                 "--eager-update", "fused", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["modes"]["traced"]["steps_per_call"] == 4 and result["modes"]["eager"]["eager_update"] == "fused"
    assert result["same_loss"] and result["modes"]["traced"]["compiles"] == 1
    assert main(["inspect", "--model", "mlp", "--mlp-features", "16", "--steps-per-call", "4", "--format", "json"]) == 0
    scan = json.loads(capsys.readouterr().out)["traced"]["scan"]
    assert scan["steps_per_call"] == 4 and scan["while_loops"] == 1 and scan["kernels_in_loop_body"] > 0


def test_fused_eager_update_is_one_op_and_trains_the_same(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, features=(32,))
    tx = make_optimizer("adam", 1e-3)
    from graphduo import create_train_state, epoch_batches

    state = create_train_state(model, tx, jax.random.key(0))
    batch = next(epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0))
    ops = jax.make_jaxpr(make_train_step(model.apply, tx))(state, batch).jaxpr.eqns
    fused = jax.make_jaxpr(make_train_step(model.apply, tx, wrap_update=eager.fused_update))(state, batch).jaxpr.eqns
    # Adam op by op is dozens of dispatched ops; fused, one jitted call named for the update
    assert len(ops) - len(fused) > 30
    assert sum(e.params.get("name") == "update" for e in fused) == 1
    finals = []
    for wrap in (None, eager.fused_update):
        step = eager.EagerStep(make_train_step(model.apply, tx, wrap_update=wrap))
        s = create_train_state(model, tx, jax.random.key(0))
        for _, b in zip(range(10), epoch_batches(digits.x_train, digits.y_train, 32, seed=0, epoch=0)):
            s, _ = step(s, b)
        finals.append(jax.device_get(s.params))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), *finals))
    assert max(diffs) <= ATOL


def test_the_steps_per_call_experiment_runs_quick(tmp_path):
    from test_experiments import check_environment, check_plots, run_quick

    out = tmp_path / "out"
    result = run_quick("steps_per_call.py", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    check_environment(results["environment"])
    (workload,) = results["workloads"]
    assert workload["model"] == "mlp" and workload["batch_size"] == 32 and workload["same_loss"]
    summary = (out / "SUMMARY.md").read_text()
    assert "K=16 / K=1" in summary and "compile s, bare" in summary
    check_plots(out, "samples_per_s.png")
