"""graphduo export and predict: the static graph as an artefact that outlives the program that traced it."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import Config, export, train_and_evaluate
from graphduo.cli import main
from graphduo.step import make_train_step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small finished CNN run on digits with checkpoints, its final step among them."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    summary = train_and_evaluate(Config(model="cnn", cnn_channels=(4, 8), cnn_dense=16, steps=40,
                                        checkpoint_every=20, run_dir=str(run_dir)), progress=False)
    return run_dir, summary


def _images(n, shape, seed):
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_artefact_logits_equal_the_in_process_model_at_unseen_batch_sizes(trained, tmp_path):
    run_dir, _ = trained
    run = export.load_run(run_dir)
    path = tmp_path / "model.jaxexport"
    export.save(export.export_inference(run.model, run.params), path)
    loaded = jax.export.deserialize(path.read_bytes())
    apply = jax.jit(run.model.apply)
    for n in (3, 17):  # neither is a size the export saw: it saw a symbolic one
        x = _images(n, run.model.input_shape, n)
        got, want = np.asarray(loaded.call(x)), np.asarray(apply(run.params, x))
        assert got.shape == (n, 10)
        # the same ops on the same backend; XLA may fuse the two programs differently: rounding only
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # negative control: parameters one step of noise away are told apart by the same check
    moved = jax.tree.map(lambda p: p + 1e-3, run.params)
    assert not np.allclose(loaded.call(x), apply(moved, x), rtol=1e-5, atol=1e-6)


README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def _readme_loading_lines() -> str:
    return next(block for block in README.split("```python\n")[1:] if "jax.export.deserialize" in block).split("```")[0]


def test_the_artefact_loads_without_graphduo_flax_or_the_model_code(trained, tmp_path, capsys):
    """README's loading lines, exactly as written, in a fresh process: it never imports graphduo,
    Flax or optax, and computes the model's logits."""
    run_dir, _ = trained
    assert main(["export", str(run_dir), "--out", str(tmp_path / "model.jaxexport")]) == 0
    x = _images(5, (8, 8, 1), 0)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy\nimages = numpy.load('x.npy')\n" + _readme_loading_lines()
              + "\nnumpy.save('y.npy', numpy.asarray(logits))\n"
              + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('graphduo', 'flax', 'optax')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"  # nothing of graphduo, flax or optax was imported
    run = export.load_run(run_dir)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), jax.jit(run.model.apply)(run.params, x), rtol=1e-5, atol=1e-6)


def test_predict_reproduces_the_runs_recorded_test_accuracy(trained, tmp_path, capsys):
    run_dir, summary = trained
    path = tmp_path / "m.jaxexport"
    assert main(["export", str(run_dir), "--out", str(path)]) == 0
    capsys.readouterr()
    assert main(["predict", str(path), "--dataset", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"test_accuracy", "test_loss", "samples_per_s"} <= result.keys()
    n = result["count"]
    assert round(result["test_accuracy"] * n) == round(summary["test_accuracy"] * n)  # the same test images right
    assert result["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    # --images / --out writes the same model's logits
    x = _images(7, (8, 8, 1), 1)
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(path), "--images", str(tmp_path / "x.npy"), "--out", str(tmp_path / "y.npy")]) == 0
    assert np.load(tmp_path / "y.npy").shape == (7, 10)


def test_a_checkpoint_exports_with_step_and_other_platforms(trained, tmp_path, capsys):
    run_dir, _ = trained
    path = tmp_path / "m20.jaxexport"
    assert main(["export", str(run_dir), "--step", "20", "--platforms", "cpu,cuda", "--out", str(path)]) == 0
    loaded = export.load(path)
    assert loaded.platforms == ("cpu", "cuda")
    x = _images(4, (8, 8, 1), 2)
    at20 = export.load_run(run_dir, step=20)
    np.testing.assert_allclose(loaded.call(x), jax.jit(at20.model.apply)(at20.params, x), rtol=1e-5, atol=1e-6)
    final = export.load_run(run_dir)
    assert not np.allclose(loaded.call(x), jax.jit(final.model.apply)(final.params, x), rtol=1e-5, atol=1e-6)


def test_an_exported_train_step_trains_on_as_the_in_process_step(trained, tmp_path, capsys, digits):
    """10 steps of the artefact, in a process that has only JAX, from the state written beside it,
    equal 10 more steps of graphduo's own step from the same checkpoint."""
    run_dir, _ = trained
    path = tmp_path / "step.jaxexport"
    assert main(["export", str(run_dir), "--what", "train-step", "--out", str(path)]) == 0
    layout = json.loads(bytes(np.load(export.state_file(path))["layout"]).decode())
    assert layout[0]["path"] == ".step" and any(e["path"] == ".rng" and e["dtype"] == "uint32" for e in layout)
    batches = [{"image": digits.x_train[i * 32:(i + 1) * 32], "label": digits.y_train[i * 32:(i + 1) * 32]}
               for i in range(10)]
    np.savez(tmp_path / "batches.npz", **{f"x{i}": b["image"] for i, b in enumerate(batches)},
             **{f"y{i}": b["label"] for i, b in enumerate(batches)})
    script = textwrap.dedent("""
        import sys
        import jax, numpy as np
        step = jax.export.deserialize(open(sys.argv[1], "rb").read())
        saved = np.load(sys.argv[1] + ".state.npz")
        state = [saved[f"state_{i:03d}"] for i in range(len(saved.files) - 1)]
        data = np.load(sys.argv[2])
        losses = []
        for i in range(10):
            *state, loss, accuracy = step.call(*state, data[f"x{i}"], data[f"y{i}"])
            losses.append(float(loss))
        np.savez(sys.argv[3], *state, losses=np.array(losses))
        assert not any(m.split(".")[0] in ("graphduo", "flax", "optax") for m in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "batches.npz"),
                          str(tmp_path / "after.npz")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    after = np.load(tmp_path / "after.npz")
    run = export.load_run(run_dir, step=40)
    step = jax.jit(make_train_step(run.model.apply, run.tx))
    state, losses = run.state, []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(after["losses"], losses, rtol=1e-5)
    want = export.flatten_state(state)
    for i, w in enumerate(want):
        np.testing.assert_allclose(after[f"arr_{i}"], w, rtol=1e-5, atol=1e-6)
    assert int(after["arr_0"]) == 50  # the step counter went on from the checkpoint's 40


@pytest.mark.parametrize("argv,message", [
    (["export", "{tmp}/nowhere", "--out", "{tmp}/m"], "run directory {tmp}/nowhere does not exist"),
    (["export", "{run}", "--out", "{tmp}/m", "--step", "7"], "no checkpoint of step 7"),
    (["export", "{run}", "--out", "{tmp}/m", "--platforms", "cpu,quantum"], "unknown platform 'quantum'"),
    (["export", "{run}", "--out", "{tmp}"], "is a folder: give a file path"),
    (["predict", "{tmp}/missing", "--dataset", "digits"], "does not exist: give a file written by graphduo export"),
    (["predict", "{tmp}/foreign", "--dataset", "digits"], "is not a jax.export artefact"),
    (["predict", "{tmp}/truncated", "--dataset", "digits"], "is not a jax.export artefact, or it is truncated"),
    (["predict", "{tmp}/good", "--images", "{tmp}/wrong_shape.npy", "--out", "{tmp}/y.npy"],
     "images of shape (4, 9, 8, 1), but the model takes (N, 8, 8, 1)"),
    (["predict", "{tmp}/good", "--images", "{tmp}/ints.npy", "--out", "{tmp}/y.npy"], "images of dtype int64"),
    (["predict", "{tmp}/good", "--images", "{tmp}/x.npy"], "--images and --out go together"),
    (["predict", "{tmp}/good", "--dataset", "synthetic", "--synthetic-shape", "28x28x1"],
     "images of shape (512, 28, 28, 1), but the model takes (N, 8, 8, 1)"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(trained, tmp_path, capsys, argv, message):
    run_dir, _ = trained
    good = tmp_path / "good"
    export.save(export.export_inference(*_model_and_params(run_dir)), good)
    (tmp_path / "foreign").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (tmp_path / "truncated").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    np.save(tmp_path / "wrong_shape.npy", np.zeros((4, 9, 8, 1), np.float32))
    np.save(tmp_path / "ints.npy", np.zeros((4, 8, 8, 1), np.int64))
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 1), np.float32))
    before = sorted(p.name for p in tmp_path.iterdir())
    fill = {"tmp": str(tmp_path), "run": str(run_dir)}
    code = main([a.format(**fill) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message.format(**fill) in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def _model_and_params(run_dir):
    run = export.load_run(run_dir)
    return run.model, run.params


def test_the_readme_shows_the_loading_lines():
    assert 'jax.export.deserialize(open("model.jaxexport", "rb").read())' in _readme_loading_lines()
    assert "graphduo export" in README and "graphduo predict" in README
