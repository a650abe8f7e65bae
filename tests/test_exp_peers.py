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

STEP_VARIANTS = {"torch-eager", "torch-eager-fused", "torch-compile", "graphduo-eager", "graphduo-eager-fused",
                 "graphduo-traced", "graphduo-traced-k16", "graphduo-traced-k16-unrolled"}


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
    rounds = [{"median_ms": 2.0, "times_ms": [1.0, 2.0, 3.0]}, {"median_ms": 4.0, "times_ms": [3.0, 4.0, 9.0]},
              {"median_ms": 3.0, "times_ms": [2.0, 3.0, 4.0]}]
    summary = peers.summarize(rounds, 32)
    check_summary_against_rounds({"batch_size": 32, "rounds": {"v": rounds}, "summary": {"v": summary}})
    assert summary["median_ms"] == 3.0


def _rounds(**medians):
    return {name: [{"median_ms": m, "times_ms": [m]} for m in ms] for name, ms in medians.items()}


def test_ratios_are_against_the_rounds_fastest_pytorch_variant():
    """PyTorch's fastest variant is taken round by round: here eager-fused wins round 1, compile
    round 2; graphduo's traced step runs 2 ms in both, so it is 1.5x faster in each round."""
    peers = load_script("peers")
    rounds = _rounds(**{"torch-eager": [5.0, 5.0], "torch-eager-fused": [3.0, 4.0], "torch-compile": [4.0, 3.0],
                        "graphduo-eager": [20.0, 20.0], "graphduo-eager-fused": [10.0, 10.0],
                        "graphduo-traced": [2.0, 2.0], "graphduo-traced-k16": [1.0, 1.0],
                        "graphduo-traced-k16-unrolled": [1.5, 1.5]})
    r = peers.step_ratios(rounds, ["torch-eager", "torch-eager-fused", "torch-compile"])
    assert r["traced_speedup_vs_torch_fastest"]["per_round"] == [1.5, 1.5]
    assert r["best_k_speedup_vs_torch_fastest"]["median"] == 3.0  # K=16 as a loop: 1 ms
    assert r["eager_time_vs_torch_eager"]["median"] == 4.0 and r["eager_fused_time_vs_torch_eager_fused"]["per_round"] == [10 / 3, 2.5]
    # Negative control: against one fixed variant the figure differs
    only_fused = peers.step_ratios(rounds, ["torch-eager-fused"])
    assert only_fused["traced_speedup_vs_torch_fastest"]["per_round"] != [1.5, 1.5]


def test_goals_name_the_fastest_variant_and_say_what_was_not_measured():
    peers = load_script("peers")
    ratio = {"median": 1.2, "min": 1.1, "max": 1.3, "per_round": [1.2]}
    slow = {"median": 0.9, "min": 0.8, "max": 1.0, "per_round": [0.9]}
    workload = {"model": "mlp", "batch_size": 32, "torch_fastest": "torch-eager-fused",
                "ratios": {"traced_speedup_vs_torch_fastest": slow, "best_k_speedup_vs_torch_fastest": ratio},
                "loops": {"median_ms": {}}}
    k1, best, keras1, keras16 = peers.goals([workload], "cpu")
    assert k1["met"] is False and "torch-eager-fused" in k1["reading"] and "on the CPU" in k1["goal"]
    assert best["met"] is True
    assert keras1["met"] is None and "not measured" in keras1["reading"]  # Keras not installed: said, not hidden


def test_quick_run_or_clear_install_message(tmp_path):
    out = tmp_path / "peers"
    result = run_quick("peers.py", out, timeout=600)

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
    has_keras = importlib.util.find_spec("keras") is not None
    assert (env_out["keras"] is not None) == has_keras
    (w,) = results["workloads"]
    assert (w["model"], w["batch_size"]) == ("mlp", 32)
    assert w["checks"]["ok"], w["checks"]  # every variant reaches the same losses from the same weights
    assert set(w["summary"]) == set(w["rounds"]) == STEP_VARIANTS
    assert w["torch_fastest"] in {"torch-eager", "torch-eager-fused", "torch-compile"}
    check_summary_against_rounds(w)
    assert all(w["first_call_s"][name] > 0 for name in STEP_VARIANTS)
    assert w["cost"]["flops"] > 0 and w["checks"]["k_max_rel_diff"] <= w["checks"]["k_rtol"]
    assert len(w["torch_matmul_flops_per_round"]) == len(w["matmul_peak_flops_per_round"]) == 1
    assert {"graphduo-train-k1", "graphduo-train-k16", "graphduo-train-k16-unrolled"} <= set(w["loops"]["median_ms"])
    if has_keras:
        assert {"keras-eager", "keras-jit", "keras-jit-spe16"} <= set(w["loops"]["median_ms"])
        assert set(w["checks"]["losses"]) >= {"keras-jit"}
    b = w["eager_breakdown"]
    assert b["graphduo_ops_per_step"] > 10 and {"forward", "backward"} <= set(b["graphduo_by_phase"])
    assert len(results["goals"]) == 4
    summary = (out / "SUMMARY.md").read_text()
    assert "PyTorch's fastest" in summary and "## Loops" in summary and "torch.set_num_threads" in summary
    assert results["losses_agree"] and results["loss_mismatch"] is None
    check_plots(out, "step_time.png")
