"""The benchmark scripts run end to end in --quick mode and write what they promise.

These check that the scripts work, not the figures: timing goals live in the recorded results.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["bench_core.py", "data_parallel.py"])
def test_quick_run_writes_results_and_summary(script, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert "environment" in json.dumps(results) and "jax" in json.dumps(results)
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "|" in summary and "machine" in summary.lower()
    plot = {"bench_core.py": "ratios.png", "data_parallel.py": "samples_per_s.png"}[script]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / plot).stat().st_size > 0
    else:
        assert not (tmp_path / plot).exists()
