"""experiments/trees.py runs end to end in --quick mode and writes what it promises (the script
works; the figures are not checked)."""

import importlib.util
import json

import jax

from test_experiments import check_plots, run_quick

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_trees_quick_times_this_tree_and_checks_the_losses(tmp_path):
    out = tmp_path / "trees"
    result = run_quick("trees.py", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    worker = f"this/jax-{jax.__version__}"
    assert list(payload["workers"])[0] == worker
    hello = payload["workers"][worker]
    assert hello["jax"] == jax.__version__ and hello["settings"]["notes"]  # its tree's own settings, recorded
    assert payload["loss_check"]["ok"], payload["loss_check"]
    assert set(payload["analysis"]) == {"mlp32", "cnn32"}
    cells = payload["analysis"]["mlp32"]["median_ms"]
    assert {f"{worker}/eager", f"{worker}/traced"} <= cells.keys() and all(v > 0 for v in cells.values())
    # the reported median is the median over rounds of the per-round medians (one round here)
    assert cells[f"{worker}/traced"] == payload["per_round"][0][worker]["mlp32/traced"]
    if HAS_TORCH:
        assert payload["analysis"]["mlp32"]["torch_fastest"].startswith("torch/")
        assert f"{worker}/traced vs torch fastest" in payload["analysis"]["mlp32"]["ratios"]
    summary = (out / "SUMMARY.md").read_text()
    assert "## mlp32" in summary and "Same function" in summary
    check_plots(out, "step_time.png")
