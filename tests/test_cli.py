"""The ``graphduo`` command as a user meets it: defaults, --json, and every kind of bad input."""

import json
import os
import subprocess
import sys

import pytest

from graphduo.cli import main
from test_data import make_idx_arrays, write_idx_files

TRAIN_KEYS = {"model", "mode", "dataset", "steps", "final_loss", "test_accuracy", "step_time_ms",
              "compile_time_s"}
MODE_KEYS = {"first_step_s", "step_time_ms", "samples_per_s"}


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Every CLI test runs in an empty folder, so 'nothing written' can be checked by listing it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRAPHDUO_DATA", str(tmp_path / "no-data-here"))
    return tmp_path


def run(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as exit_info:  # argparse exits on its own usage errors
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_train_with_defaults(capsys, in_tmp):
    code, out, err = run(capsys, "train", "--quiet")
    assert code == 0, err
    assert "cnn (traced) on digits: 440 steps, test accuracy" in out
    (run_dir,) = (in_tmp / "runs").iterdir()
    assert {p.name for p in run_dir.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "params.npz"}


def test_train_json_and_progress_bar(capsys, in_tmp):
    code, out, err = run(capsys, "train", "--model", "mlp", "--mode", "eager", "--optimizer", "sgd",
                         "--lr", "0.05", "--steps", "30", "--batch-size", "16", "--json",
                         "--run-dir", "r")
    assert code == 0, err
    summary = json.loads(out)
    assert TRAIN_KEYS <= summary.keys()
    assert summary["model"] == "mlp" and summary["mode"] == "eager" and summary["steps"] == 30
    assert "mlp/eager" in err and "30/30" in err  # the live progress bar, on stderr
    assert "test accuracy" in err  # the per-epoch evaluation line


def test_compare_with_defaults(capsys):
    code, out, err = run(capsys, "compare")
    assert code == 0, err
    assert "cnn on digits, batch 32, adam, 200 steps" in out
    for line in ("time to first step", "step time, median", "samples/s", "speedup", "break-even",
                 "largest parameter difference", "same loss (rtol 0.001): yes"):
        assert line in out


def test_compare_json(capsys):
    code, out, err = run(capsys, "compare", "--model", "mlp", "--steps", "20", "--batch-size", "64",
                         "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert {"modes", "speedup", "break_even_steps", "max_param_diff"} <= result.keys()
    for mode in ("eager", "traced"):
        assert MODE_KEYS <= result["modes"][mode].keys()
    assert result["modes"]["traced"]["compiles"] == 1
    assert result["max_param_diff"] < 1e-5 and result["same_loss"]
    assert err == ""


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_compare_fails_when_the_modes_compute_different_steps(backend, capsys, monkeypatch):
    # Negative control for compare's equivalence check, at the CPU's tolerance and at the looser one
    # for TF32 accelerators: traced mode trains with twice the learning rate, and the check must say so.
    from graphduo import compare as compare_module
    from graphduo.step import make_optimizer
    real_plan = compare_module.parallel.plan

    def skewed(mode, model, tx, **options):
        return real_plan(mode, model, make_optimizer("sgd", 0.1) if mode == "traced" else tx, **options)

    monkeypatch.setattr(compare_module.parallel, "plan", skewed)
    real_rtol = compare_module.loss_rtol
    monkeypatch.setattr(compare_module, "loss_rtol", lambda _: real_rtol(backend))
    code, out, err = run(capsys, "compare", "--model", "mlp", "--optimizer", "sgd", "--lr", "0.05",
                         "--steps", "40", "--quiet")
    assert code == 1, out
    assert f"same loss (rtol {real_rtol(backend):g}): NO" in out
    assert err.startswith("graphduo compare: error: eager and traced ended at different losses")
    assert real_rtol("cpu") == 1e-3 and real_rtol("gpu") == 1e-2


BAD_INPUTS = [
    pytest.param(["--model", "transformer"], "unknown model 'transformer': choose one of mlp, cnn, resnet, rnn, vit",
                 id="model"),
    pytest.param(["--dataset", "imagenet"], "invalid choice: 'imagenet'", id="dataset"),
    pytest.param(["--optimizer", "lion"], "(choose from 'sgd', 'momentum', 'adam', 'adamw')", id="optimizer"),
    pytest.param(["--mode", "lazy"], "invalid choice: 'lazy'", id="mode"),
    pytest.param(["--host-memory", "jemalloc"], "(choose from 'system', 'reuse')", id="host-memory"),
    pytest.param(["--cpu-convolutions", "mkl"], "(choose from 'eigen', 'xla')", id="cpu-convolutions"),
    pytest.param(["--lr", "0"], "--lr must be a positive number, got 0", id="lr-zero"),
    pytest.param(["--lr", "-0.1"], "--lr must be a positive number, got -0.1", id="lr-negative"),
    pytest.param(["--lr", "nan"], "--lr must be a positive number, got nan", id="lr-nan"),
    pytest.param(["--lr", "fast"], "argument --lr: invalid", id="lr-text"),
    pytest.param(["--steps", "0"], "--steps must be a positive integer, got 0", id="steps-zero"),
    pytest.param(["--epochs", "-2"], "--epochs must be a positive integer, got -2", id="epochs-negative"),
    pytest.param(["--steps", "5", "--epochs", "1"], "give --epochs or --steps, not both", id="steps-and-epochs"),
    pytest.param(["--batch-size", "0"], "--batch-size must be a positive integer, got 0", id="batch-zero"),
    pytest.param(["--batch-size", "5000"], "--batch-size 5000 is larger than the 1438 training examples",
                 id="batch-too-large"),
    pytest.param(["--mlp-features", "512,x"], "invalid value '512,x' for --mlp-features", id="widths"),
    pytest.param(["--dataset", "mnist"], "mnist: missing train-images-idx3-ubyte", id="missing-data"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, in_tmp, argv, message):
    code, out, err = run(capsys, "train", "--quiet", *argv)
    assert code == 2
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert out == ""
    assert sorted(p.name for p in in_tmp.iterdir()) == []  # no run directory, no data folder


# Output paths that cannot be written: refused before any training, with nothing left on disk (the
# folder each test runs in holds only the file and folder made here).
BAD_OUTPUTS = [
    pytest.param(["--run-dir", "afile"], "--run-dir afile is a file, not a folder", id="run-dir-file"),
    pytest.param(["--run-dir", "afile/run"], "afile is a file, not a folder", id="run-dir-under-file"),
    pytest.param(["--params-out", "adir"], "--params-out adir is a folder: give a file path", id="params-out-folder"),
    pytest.param(["--params-out", "afile/p.npz"], "--params-out's folder afile is a file", id="params-out-under-file"),
    pytest.param(["--profile", "afile"], "--profile afile is a file, not a folder", id="profile-file"),
]


@pytest.mark.parametrize("argv,message", BAD_OUTPUTS)
def test_unwritable_outputs_fail_before_training(capsys, in_tmp, argv, message):
    (in_tmp / "afile").write_text("not a folder")
    (in_tmp / "adir").mkdir()
    code, out, err = run(capsys, "train", "--quiet", "--model", "mlp", "--steps", "3", *argv)
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err and out == ""
    assert sorted(p.name for p in in_tmp.iterdir()) == ["adir", "afile"]
    assert list((in_tmp / "adir").iterdir()) == []


def test_a_folder_that_cannot_be_written_is_named(capsys, in_tmp, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)  # as a read-only folder would (tests may run as root)
    code, _, err = run(capsys, "train", "--quiet", "--model", "mlp", "--steps", "3", "--run-dir", "r")
    assert code == 2 and "--run-dir r: cannot write in . (Permission denied): give a writable path" in err, err
    assert list(in_tmp.iterdir()) == []


def test_running_a_finished_run_again_changes_nothing(capsys, in_tmp):
    def argv(steps, *extra):
        return ["train", "--quiet", "--model", "mlp", "--mlp-features", "16", "--steps", steps,
                "--checkpoint-every", "3", "--run-dir", "r", "--json", *extra]

    code, out, _ = run(capsys, *argv("6"))
    assert code == 0
    first = json.loads(out)
    files = {name: (in_tmp / "r" / name).read_bytes() for name in ("summary.json", "metrics.jsonl", "config.json")}
    for steps in ("6", "4"):  # the same command (a requeued job), or one asking for fewer steps
        code, out, err = run(capsys, *argv(steps, "--params-out", "p.npz"))
        assert code == 0, err
        assert json.loads(out) == first  # the run's own summary, not figures of zero steps
        assert "r already finished at step 6" in err and "nothing to train" in err
        assert {name: (in_tmp / "r" / name).read_bytes() for name in files} == files
    assert (in_tmp / "p.npz").exists()  # asked for: the finished run's parameters


@pytest.mark.parametrize("corrupt,message", [
    pytest.param("truncate", "truncated", id="truncated-file"),
    pytest.param("label", "out of range", id="label-out-of-range"),
])
def test_bad_data_file_is_one_line_exit_2(capsys, in_tmp, corrupt, message):
    arrays = make_idx_arrays()
    if corrupt == "label":
        arrays["train_labels"][3] = 12
    paths = write_idx_files(in_tmp / "data" / "mnist", arrays, gz=False)
    if corrupt == "truncate":
        data = paths["train_images"].read_bytes()
        paths["train_images"].write_bytes(data[: len(data) // 2])
    code, out, err = run(capsys, "train", "--dataset", "mnist", "--data-dir", str(in_tmp / "data"),
                         "--batch-size", "8", "--steps", "2", "--run-dir", "r")
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (in_tmp / "r").exists()


def test_diverging_run_names_the_step_and_exits_1(capsys):
    code, out, err = run(capsys, "train", "--quiet", "--model", "mlp", "--optimizer", "sgd",
                         "--lr", "1e6", "--steps", "50", "--run-dir", "r")
    assert code == 1
    assert "loss became" in err and "at step" in err and "lower --lr" in err


def test_help_teaches(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model MODEL", "mlp, cnn, resnet, rnn, vit", "FILE.py:NAME", "--mode {eager,traced}", "--optimizer {sgd,momentum,adam,adamw}",
                 "--dataset {digits,mnist,fashion-mnist,cifar10,synthetic}", "(default: 32)", "--json",
                 "--cpu-convolutions {eigen,xla}", "--host-memory {system,reuse}"):
        assert flag in " ".join(out.split())  # argparse wraps the help text
    assert "examples: graphduo train" in out


@pytest.mark.parametrize("command,wording,not_there", [
    ("compare", ("model to compare", "steps to train in each mode", "no progress line"), "instead of --epochs"),
    ("inspect", ("model whose training step to inspect", "batch size of the inspected step"), "partial batch"),
])
def test_each_command_words_its_own_help(capsys, command, wording, not_there):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert all(w in out for w in wording) and not_there not in out and "examples: graphduo" in out


def test_version_and_launch_names_what_it_runs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("graphduo ")
    code, _, err = run(capsys, "launch", "--", "compare", "--model", "mlp")
    assert code == 2 and "launch runs 'train' only, not 'compare'" in err and err.count("\n") == 1


def test_compare_checks_its_data_before_announcing_a_run(capsys, in_tmp):
    code, out, err = run(capsys, "compare", "--dataset", "mnist", "--data-dir", str(in_tmp / "none"))
    assert code == 2 and err.startswith("graphduo compare: error: mnist: missing") and err.count("\n") == 1, err


def test_real_process_exit_codes_and_no_traceback(in_tmp):
    """The installed entry point, as a shell runs it: bad input is exit 2 with one line."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    bad = subprocess.run([sys.executable, "-m", "graphduo", "train", "--steps", "-1"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "graphduo train: error: --steps must be a positive integer, got -1"
    none = subprocess.run([sys.executable, "-m", "graphduo"], capture_output=True, text=True, timeout=120)
    assert none.returncode == 2 and "compare" in none.stdout
