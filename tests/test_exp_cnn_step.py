"""experiments/cnn_step.py runs end to end in --quick mode, its fifteen cells train the same function,
and each child applies its own settings (that they take effect is graphduo.runtime's own test).
Timings live in the recorded results, not here."""

import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "cnn_step.py"


def test_quick_run_writes_results_and_checks_losses(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    cells = result["analysis"]["cells"]
    assert len(cells) == 15 and all(c["median_ms"] > 0 for c in cells.values())
    assert result["analysis"]["loss_check"]["ok"]
    rnd = result["rounds"][0]
    for mem in ("system", "reuse"):
        assert rnd[f"eigen+{mem}"]["note"] == "XLA:CPU convolutions: Eigen"
        assert "-individual_convolution" in rnd[f"eigen+{mem}"]["environment"]["xla_flags"]
        assert rnd[f"xla+{mem}"]["environment"]["xla_flags"] == ""
    assert rnd["onednn+reuse"]["convolution_note"] == "convolutions: oneDNN (graphduo's FFI calls)"
    assert "-individual_convolution" in rnd["onednn+reuse"]["environment"]["xla_flags"]
    assert rnd["eigen+reuse"]["convolution_note"] == "convolutions: XLA's"
    for conv in ("xla", "eigen"):
        assert rnd[f"{conv}+system"]["memory_note"] == "host memory: the C library's default"
        note = rnd[f"{conv}+reuse"]["memory_note"]
        assert note == rnd[f"{conv}+reuse"]["environment"]["host_memory"]
        if platform.libc_ver()[0] == "glibc":  # the parent strips the user's malloc settings for its children
            assert "kept for reuse" in note, note
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| graphduo | eigen | reuse |" in summary and "Machine:" in summary
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "step_time.png").stat().st_size > 0 and "(step_time.png)" in summary
    else:
        assert not (tmp_path / "step_time.png").exists() and "step_time.png" not in summary


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("cnn_step.py: error: argument --rounds: expected a positive "
                                                    "integer, got '0'")
    assert not (tmp_path / "out").exists()
