"""experiments/peers.py runs end to end in --quick mode, or, without PyTorch, says how to install it.

This checks that the script works and writes what it promises, not the figures. It never skips:
with torch installed the quick run must succeed; without it, the script must exit with status 2 and
a one-line message naming ``pip install -c constraints.txt ".[peers]"`` (never PyPI's graphduo).
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {"torch-eager", "torch-compile", "graphduo-eager", "graphduo-traced"}


def test_quick_run_or_clear_install_message(tmp_path):
    out = tmp_path / "peers"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run([sys.executable, str(ROOT / "experiments" / "peers.py"), "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    if importlib.util.find_spec("torch") is None:
        assert result.returncode == 2, result.stderr[-3000:]
        message = result.stderr.strip().splitlines()
        assert len(message) == 1 and 'pip install -c constraints.txt ".[peers]"' in message[0], result.stderr
        assert not out.exists()
        return

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    env_out = results["environment"]
    assert env_out["jax"] and env_out["torch"] and env_out["torch_threads"] == os.cpu_count()
    assert env_out["matmul_peak_flops"] > 0
    (w,) = results["workloads"]
    assert (w["model"], w["batch_size"]) == ("mlp", 32)
    assert w["checks"]["ok"], w["checks"]  # all four variants reach the same losses from the same weights
    assert set(w["checks"]["losses"]) == VARIANTS
    assert set(w["summary"]) == VARIANTS
    for name, s in w["summary"].items():
        assert s["p10_ms"] <= s["median_ms"] <= s["p90_ms"] or s["p10_ms"] <= s["p90_ms"], name
        assert s["samples_per_s"] > 0 and w["first_step_s"][name] > 0
    assert w["cost"]["flops"] > 0
    assert w["ratios"]["traced_speedup_vs_torch_compile"]["median"] > 0
    # torch's GEMM rate beside JAX's, round by round, and their ratio in the table
    assert len(w["torch_matmul_flops_per_round"]) == len(w["matmul_peak_flops_per_round"]) == 1
    g = w["torch_vs_jax_matmul"]
    assert g["median"] == w["torch_matmul_flops_per_round"][0] / w["matmul_peak_flops_per_round"][0] > 0
    b = w["eager_breakdown"]
    assert b["graphduo_ops_per_step"] > 10 and {"forward", "backward"} <= set(b["graphduo_by_phase"])
    assert len(results["goals"]) == 3  # not evaluated at batch 32 only, but stated
    summary = (out / "SUMMARY.md").read_text()
    assert "|" in summary and "Goals" in summary and "torch.set_num_threads" in summary
    assert "torch.mm / jax matmul rate" in summary
    assert results["losses_agree"] and results["loss_mismatch"] is None
