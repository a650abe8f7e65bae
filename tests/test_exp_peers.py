"""experiments/peers.py runs end to end in --quick mode, or, without PyTorch, says how to install it;
its per-variant summary is what its per-round data say.

This checks that the script works and writes what it promises, not the figures. It never skips:
with torch installed the quick run must succeed; without it, the script must exit with status 2 and
a one-line message naming ``pip install -c constraints.txt ".[peers]"`` (never PyPI's graphduo).
"""

import importlib.util
import json
import os
import statistics

import numpy as np
import pytest

from test_experiments import EXPERIMENTS, check_environment, check_plots, load_script, run_quick

VARIANTS = {"torch-eager", "torch-compile", "graphduo-eager", "graphduo-traced"}


def check_summary_against_rounds(workload: dict) -> None:
    """Each variant's summary recomputed from its raw per-round data: the median of the rounds'
    medians, p10 and p90 over every timed step, samples/s from the median."""
    for name, rounds in workload["rounds"].items():
        s = workload["summary"][name]
        pooled = [t for r in rounds for t in r["times_ms"]]
        assert s["median_ms"] == statistics.median(r["median_ms"] for r in rounds), name
        assert s["p10_ms"] == pytest.approx(float(np.percentile(pooled, 10))), name
        assert s["p90_ms"] == pytest.approx(float(np.percentile(pooled, 90))), name
        assert s["p10_ms"] <= s["p90_ms"], name
        assert s["samples_per_s"] == pytest.approx(workload["batch_size"] / (s["median_ms"] / 1e3)), name


def test_recorded_summaries_are_what_their_rounds_say():
    payload = json.loads((EXPERIMENTS / "results" / "peers" / "results.json").read_text())
    assert payload["workloads"]
    for workload in payload["workloads"]:
        check_summary_against_rounds(workload)
    # Negative control: one round's median moved, the summary no longer matches.
    workload = payload["workloads"][0]
    for r in workload["rounds"]["graphduo-traced"]:
        r["median_ms"] *= 10
    with pytest.raises(AssertionError):
        check_summary_against_rounds(workload)


def test_summarize_computes_what_the_check_recomputes():
    peers = load_script("peers")
    rounds = [{"median_ms": 2.0, "times_ms": [1.0, 2.0, 3.0], "page_faults_per_step": 5.0},
              {"median_ms": 4.0, "times_ms": [3.0, 4.0, 9.0], "page_faults_per_step": 1.0},
              {"median_ms": 3.0, "times_ms": [2.0, 3.0, 4.0], "page_faults_per_step": 2.0}]
    summary = peers.summarize(rounds, 32)
    check_summary_against_rounds({"batch_size": 32, "rounds": {"v": rounds}, "summary": {"v": summary}})
    assert summary["median_ms"] == 3.0 and summary["page_faults_per_step"] == 2.0
    assert summary["page_faults_per_step_max"] == 5.0


def test_quick_run_or_clear_install_message(tmp_path):
    out = tmp_path / "peers"
    result = run_quick("peers.py", out)

    if importlib.util.find_spec("torch") is None:
        assert result.returncode == 2, result.stderr[-3000:]
        message = result.stderr.strip().splitlines()
        assert len(message) == 1 and 'pip install -c constraints.txt ".[peers]"' in message[0], result.stderr
        assert not out.exists()
        return

    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    env_out = results["environment"]
    check_environment(env_out)
    assert env_out["torch"] and env_out["torch_threads"] == os.cpu_count()
    assert env_out["matmul_peak_flops"] > 0
    (w,) = results["workloads"]
    assert (w["model"], w["batch_size"]) == ("mlp", 32)
    assert w["checks"]["ok"], w["checks"]  # all four variants reach the same losses from the same weights
    assert set(w["checks"]["losses"]) == VARIANTS
    assert set(w["summary"]) == set(w["rounds"]) == VARIANTS
    check_summary_against_rounds(w)
    for name in VARIANTS:
        assert w["first_step_s"][name] > 0
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
    check_plots(out, "step_time.png")
