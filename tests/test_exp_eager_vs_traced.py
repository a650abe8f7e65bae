"""experiments/eager_vs_traced.py and experiments/memory.py run end to end in --quick mode.

These check that the scripts work and write what they promise (results with their environment,
summary, plots), not the figures.
"""

import json

from test_experiments import check_environment, check_plots, run_quick


def _run(script: str, out) -> None:
    result = run_quick(script, out)
    assert result.returncode == 0, result.stderr[-3000:]


def test_quick_runs_write_results_summary_and_plots(tmp_path):
    evt, mem = tmp_path / "eager_vs_traced", tmp_path / "memory"
    _run("eager_vs_traced.py", evt)
    _run("memory.py", mem)

    results = json.loads((evt / "results.json").read_text())
    check_environment(results["environment"])
    assert results["environment"]["matmul_peak_flops"] > 0
    modes = {(r["mode"], r["batch_size"]) for r in results["rows"]}
    assert {("eager", 1), ("traced", 1), ("eager", 64), ("traced", 64)} <= modes
    for r in results["rows"]:
        assert r["step_time_p10_ms"] <= r["step_time_ms"] <= r["step_time_p90_ms"]
        assert r["timed_steps"] >= 3 and r["samples_per_s"] > 0
    mlp = results["analysis"]["mlp"]["per_batch"]
    assert all(p["speedup"] > 0 and p["flops_per_step"] > 0 and 0 < p["traced_peak_fraction"] for p in mlp)
    summary = (evt / "SUMMARY.md").read_text()
    assert "|" in summary and "Machine: " in summary and "Dispatch-bound rule" in summary
    check_plots(evt, "step_time.png", "speedup.png")

    results = json.loads((mem / "results.json").read_text())
    check_environment(results["environment"], cpu_convolutions="eigen")  # memory.py names Eigen itself
    for r in results["rows"]:
        t, e = r["traced"], r["eager"]
        assert t["peak_bytes"] > 0 and t["argument_size_in_bytes"] > 0
        # the eager peak holds at least the inputs and the outputs (old and new state, no donation)
        assert e["peak_bytes"] >= e["input_bytes"] + e["output_bytes"] * 0.9
        assert e["no_free_peak_bytes"] >= e["peak_bytes"]
    by_batch = {r["batch_size"]: r for r in results["rows"]}
    assert by_batch[64]["traced"]["peak_bytes"] > by_batch[1]["traced"]["peak_bytes"]
    summary = (mem / "SUMMARY.md").read_text()
    assert "|" in summary and "Machine: " in summary and "live_arrays" in summary
    check_plots(mem, "memory.png")
