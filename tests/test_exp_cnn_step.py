"""experiments/cnn_step.py runs end to end in --quick mode, its six cells train the same function,
and the two convolution libraries really differ in the compiled step (checked in the children's HLO
through graphduo.runtime's own test). Timings live in the recorded results, not here."""

import json
import os
import pathlib
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
    assert len(cells) == 6 and all(c["median_ms"] > 0 for c in cells.values())
    assert result["analysis"]["loss_check"]["ok"]
    rnd = result["rounds"][0]
    assert rnd["eigen"]["note"] == "XLA:CPU convolutions: Eigen"
    assert "-individual_convolution" in rnd["eigen"]["environment"]["xla_flags"]
    assert rnd["xla"]["environment"]["xla_flags"] == ""
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| graphduo | eigen |" in summary and "Machine:" in summary


def test_bad_arguments_exit_2_with_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--rounds must be at least 1, got 0" in proc.stderr.strip().splitlines()[-1]
