"""The experiment scripts check their arguments before measuring anything, and their help is clean.

A bad argument must stop a script within seconds with argparse's usage and one ``error:`` line naming
the bad value (exit status 2): no traceback, nothing written, nothing measured. Also: ``--help``
states each default once and shows the docstring's examples, and neither help nor docstring states a
measured figure (those go stale; experiments/RESULTS.md holds them); the default ``--out`` lies next to
the script; peers.py exits with status 1 when its variants' losses disagree and pairs each round's
fraction of peak with that round's ceiling; cnn_step.py, bench_core.py and mlp_step.py plot their
recorded results.
"""

import argparse
import copy
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from test_experiments import check_plots, load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SCRIPTS = ("bench_core", "cnn_step", "compile_cost", "data_parallel", "dynamic_control_flow",
           "eager_vs_traced", "export", "memory", "mlp_step", "peers", "trees")


@pytest.fixture(scope="module")
def args_mod():
    return load_script("_common")


# --- The shared argparse types (experiments/_common.py), in process. --------------------------


def test_positive_number_types(args_mod):
    assert args_mod.positive_int("7") == 7 and args_mod.positive_float("0.25") == 0.25
    assert args_mod.nonnegative_int("0") == 0
    for bad in ("0", "-1", "1.5", "x", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer"):
            args_mod.positive_int(bad)
    for bad in ("0", "-2", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
            args_mod.positive_float(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        args_mod.nonnegative_int("-1")


def test_list_types(args_mod):
    assert args_mod.batch_sizes("1, 8,64") == [1, 8, 64]
    assert args_mod.positive_ints("512,512") == [512, 512]  # layer widths may repeat
    assert args_mod.positive_floats("0.1,2") == [0.1, 2.0]
    assert args_mod.models("cnn,mlp") == ["cnn", "mlp"]
    for fn, bad, words in ((args_mod.batch_sizes, "32,0", "'0' in '32,0'"),
                           (args_mod.batch_sizes, "32,,64", "'32,,64'"),
                           (args_mod.batch_sizes, "32,32", "'32' appears twice"),
                           (args_mod.positive_floats, "0.1,-2", "'-2'"),
                           (args_mod.models, "mlp,resnet", "unknown model 'resnet'"),
                           (args_mod.models, "mlp,mlp", "'mlp' appears twice")):
        with pytest.raises(argparse.ArgumentTypeError, match=words):
            fn(bad)


def test_check_out_reports_through_the_parser(args_mod, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="x.py")
    made = args_mod.check_out(parser, tmp_path / "a" / "b")
    assert made.is_dir()
    (tmp_path / "afile").write_text("")
    for bad in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(SystemExit) as exit_info:
            args_mod.check_out(parser, bad)
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("x.py: error: --out") and str(tmp_path / "afile") in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "afile"]


# --- Help and defaults of every script, in process. ------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_states_each_default_once_and_shows_examples(name):
    module = load_script(name)
    parser = module.build_parser()
    text = parser.format_help()
    assert "(default: " not in text  # ArgumentDefaultsHelpFormatter's addition
    for action in parser._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._StoreTrueAction):
            assert "default" not in action.help, action.option_strings
        else:
            assert action.help.count("default") == 1, (action.option_strings, action.help)
    assert "examples" in text and f"python experiments/{name}.py --quick" in text
    assert module.DEFAULT_OUT == EXPERIMENTS / "results" / name  # next to the script, wherever run from


# A duration or a speed-up written into prose: "about five minutes", "under a minute", "~40 us more",
# "1.45x faster", "2-3x slower". Options may name units ("seconds of timed steps") and rules may name
# factors ("within 2x of its batch-1 time"): an amount measured on some machine is the issue.
MEASURED = re.compile(r"(?:about|under|~)\s*(?:a|an|one|two|three|four|five|ten|\d[\d.,-]*)\s*"
                      r"(?:minutes?|seconds?|s|ms|us|hours?)\b|\b\d[\d.]*(?:-\d[\d.]*)?x (?:faster|slower)",
                      re.IGNORECASE)


def test_the_pattern_finds_measured_figures_only():
    assert MEASURED.search("a full run, about five minutes") and MEASURED.search("1.45x faster here")
    assert MEASURED.search("each call costs ~40 us more") and MEASURED.search("runs 2-3x faster")
    assert MEASURED.search("python x.py --quick    # smoke test, under a minute")
    assert not MEASURED.search("a 3 x 4 design on 28x28x1 inputs within 2x of batch 1")  # shapes, rules


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_and_docstring_state_no_measured_figures(name):
    module = load_script(name)
    for where, text in (("--help", module.build_parser().format_help()), ("docstring", module.__doc__)):
        assert not MEASURED.findall(text), (where, MEASURED.findall(text))


# --- Each script fails fast on a bad argument, as a user runs it. -----------------------------

# (script, arguments after --out or None when --out itself is bad, text the error line must name)
BAD = {
    "bench_core": (["--batch-sizes", "32,0"], "'0' in '32,0'"),
    "cnn_step": (None, "afile"),  # --out under a file
    "compile_cost": (["--max-batch", "96"], "power of two, got 96"),
    "data_parallel": (["--batch-size", "255"], "255 is not divisible by N=[2]"),
    "dynamic_control_flow": (None, "afile"),  # --out is a file
    "eager_vs_traced": (["--models", "transformer"], "unknown model 'transformer'"),
    "memory": (["--batch-sizes", "-1"], "'-1'"),
    "mlp_step": (["--omp-wait-policy", "lazy"], "invalid choice: 'lazy'"),
    "peers": (["--rounds", "0"], "got '0'"),
    "export": (["--models", "mlp,mlp"], "'mlp' appears twice"),
    "trees": (["--tree", "nowhere"], "--tree must be NAME=PATH, got 'nowhere'"),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_argument_fails_fast_with_one_line(name, tmp_path):
    extra, words = BAD[name]
    (tmp_path / "afile").write_text("")
    if extra is None:  # cnn_step: a folder under a file; dynamic_control_flow: the file itself
        argv = ["--quick", "--out", str(tmp_path / "afile" / "sub" if name == "cnn_step" else tmp_path / "afile")]
    else:
        argv = ["--quick", "--out", str(tmp_path / "new"), *extra]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(EXPERIMENTS / f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=60, env=env, cwd=tmp_path)
    took = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage:")
    assert [line for line in lines if "error" in line] == [lines[-1]]
    assert lines[-1].startswith(f"{name}.py: error: ") and words in lines[-1], lines[-1]
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and (tmp_path / "afile").read_text() == ""
    assert took < 45, f"took {took:.0f} s: it measured before failing"


# --- peers.py: a loss mismatch is an error, after the results are written. --------------------


def _peers_args(out: pathlib.Path) -> argparse.Namespace:
    return argparse.Namespace(quick=False, out=out, models=["mlp"], batch_sizes=[32], rounds=3, budget=0.8,
                              min_steps=5, max_steps=300)


def _recorded_peers():
    payload = json.loads((EXPERIMENTS / "results" / "peers" / "results.json").read_text())
    (workload,) = [w for w in payload["workloads"] if (w["model"], w["batch_size"]) == ("mlp", 32)]
    return payload, workload


@pytest.mark.parametrize("agree", [True, False])
def test_peers_loss_mismatch_exits_1_after_writing_results(agree, tmp_path, capsys):
    peers = load_script("peers")
    payload, workload = _recorded_peers()
    if not agree:  # forge a mismatch: graphduo-eager's losses off by 5%
        workload = copy.deepcopy(workload)
        workload["checks"]["losses"]["graphduo-eager"] = [x * 1.05 for x in workload["checks"]["losses"]["graphduo-eager"]]
        workload["checks"].update(max_rel_diff=0.05, ok=False)
    status = peers.report(_peers_args(tmp_path), "python experiments/peers.py", payload["environment"], [workload],
                          12.0)
    err = capsys.readouterr().err.strip().splitlines()
    results = json.loads((tmp_path / "results.json").read_text())
    summary = (tmp_path / "SUMMARY.md").read_text()
    if agree:
        assert status == 0 and results["losses_agree"] and results["loss_mismatch"] is None
        assert not any("error" in line for line in err) and "Loss check failed" not in summary
    else:
        assert status == 1 and not results["losses_agree"]
        assert "mlp b32" in results["loss_mismatch"] and results["workloads"][0]["checks"]["ok"] is False
        assert [line for line in err if "error" in line] == [err[-1]]
        assert err[-1].startswith("peers.py: error: ") and "mlp b32 (max 5.0e-02)" in err[-1]
        assert "Loss check failed" in summary and "OUTSIDE" in summary


def test_peers_fraction_of_peak_pairs_each_round_with_its_own_ceiling():
    # The machine's speed drifts: round 2 runs everything at half speed, the step and the ceiling alike.
    peers = load_script("peers")
    rounds = [{"median_ms": 10.0}, {"median_ms": 20.0}, {"median_ms": 10.0}]
    peaks = [200e9, 100e9, 200e9]
    frac = peers.peak_fraction(1e9, rounds, peaks)
    assert frac["per_round"] == [0.5, 0.5, 0.5] and frac["median"] == frac["min"] == frac["max"] == 0.5
    # Negative control: the same figures paired with the wrong rounds' ceilings no longer cancel the drift.
    assert peers.peak_fraction(1e9, rounds, peaks[::-1][1:] + peaks[:1])["per_round"] != frac["per_round"]


def test_peers_install_hint_uses_the_constraints_file():
    peers = load_script("peers")
    text = (EXPERIMENTS / "peers.py").read_text()
    assert 'pip install -c constraints.txt ".[peers]"' in peers.INSTALL_TORCH
    assert "graphduo[peers]" not in text


# --- cnn_step.py, bench_core.py and mlp_step.py plot their results dicts. ----------------------------------


@pytest.mark.parametrize("name, record, png", [("cnn_step", "cnn_step/jax-0.10.2-b256", "step_time.png"),
                                               ("bench_core", "bench_core", "ratios.png"),
                                               ("mlp_step", "mlp_step", "step_time.png")])
def test_plot_from_recorded_results(name, record, png, tmp_path):
    module = load_script(name)
    result = json.loads((EXPERIMENTS / "results" / record / "results.json").read_text())
    assert module.write_plot(tmp_path, result) == png
    check_plots(tmp_path, png)


def test_peers_runs_torch_where_jax_runs_and_matches_its_precision(capsys):
    # On a GPU, torch must run on CUDA in TF32 (JAX's default there), or the script must refuse in
    # one line; timing JAX's GPU against torch's CPU would compare hardware, not frameworks.
    import types

    peers = load_script("peers")
    settings = []
    fake = types.SimpleNamespace(
        __version__="2.x", cuda=types.SimpleNamespace(is_available=lambda: False),
        set_float32_matmul_precision=settings.append,
        backends=types.SimpleNamespace(cudnn=types.SimpleNamespace(allow_tf32=False)))
    assert peers.torch_device(fake, "cpu")[0] == "cpu" and settings == []
    with pytest.raises(SystemExit) as exit_info:
        peers.torch_device(fake, "gpu")
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("experiments/peers.py: error: JAX runs on gpu but this PyTorch") and "CUDA" in line
    with pytest.raises(SystemExit):  # a TPU: no PyTorch counterpart, even with CUDA present
        peers.torch_device(types.SimpleNamespace(**{**vars(fake), "cuda": types.SimpleNamespace(is_available=lambda: True)}), "tpu")
    assert "JAX runs on tpu" in capsys.readouterr().err
    fake.cuda.is_available = lambda: True
    device, note = peers.torch_device(fake, "gpu")
    assert device == "cuda" and settings == ["high"] and fake.backends.cudnn.allow_tf32 and "TF32" in note
    assert peers.loss_rtol("cpu") == peers.LOSS_RTOL == 1e-3 and peers.loss_rtol("cuda") == peers.TF32_LOSS_RTOL
