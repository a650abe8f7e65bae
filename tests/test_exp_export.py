"""experiments/export.py runs end to end in --quick mode and writes what it promises (the script
works; the figures are not checked)."""

import importlib.util
import json

from test_experiments import check_environment, check_plots, run_quick

HAS_TORCH = importlib.util.find_spec("torch") is not None


def test_export_quick_measures_the_artefact_against_the_code(tmp_path):
    out = tmp_path / "export"
    result = run_quick("export.py", out, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "results.json").read_text())
    check_environment(payload["environment"])
    (row,) = payload["rows"]
    assert row["model"] == "mlp" and row["same_logits"]
    # the parameters are baked into the artefact: it is at least as large as their bytes
    assert row["artefact_bytes"] >= 0.99 * row["param_bytes"] > 0
    assert {"jit", "load", "load-cache"} <= row["median"].keys()
    # the processes that met only the artefact imported neither graphduo nor flax
    assert all(c["imports"] == "jax only" for kind in ("load", "load-cache") for c in row["children"][kind])
    assert ("torch-load" in row["median"]) == HAS_TORCH
    summary = (out / "SUMMARY.md").read_text()
    assert "no graph" in summary and "deserialize" in summary
    check_plots(out, "first_call.png")
