"""experiments/compile_cost.py and experiments/dynamic_control_flow.py run end to end in --quick mode,
write what they promise (results with their environment, summary, plots), and the control-flow
variants compute the same thing.

These check that the scripts work, not the timings: those live in the recorded results.
"""

import json
import pathlib

import numpy as np
import pytest

import graphduo
from test_experiments import check_environment, check_plots, load_script, run_quick


def _run_quick(script: str, out: pathlib.Path, *plots: str) -> dict:
    result = run_quick(script, out, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    check_environment(results["environment"])
    summary = (out / "SUMMARY.md").read_text()
    assert "|" in summary and "Machine: " in summary
    check_plots(out, *plots)
    return results


def _load(script: str):
    return load_script(script.removesuffix(".py"))


def test_compile_cost_quick(tmp_path):
    results = _run_quick("compile_cost.py", tmp_path, "compile_stages.png", "recompiles.png")
    families = {r["family"] for r in results["configs"]}
    assert families == {"mlp-depth", "mlp-width", "cnn-depth"}
    for r in results["configs"]:
        assert r["trace_s"] > 0 and r["lower_s"] > 0 and r["compile_s"] > 0
        assert r["traced_first_step_s"] >= r["compile_total_s"]
        assert r["break_even_steps"] is None or r["break_even_steps"] >= 1
    policies = {p["policy"]: p for p in results["shapes"]["policies"]}
    sizes = results["shapes"]["batch_sizes"]
    assert policies["as-is"]["compiles"] == len(set(sizes))  # one compile per distinct batch size
    assert policies["pad-fixed"]["compiles"] == 1
    assert policies["bucket-down-pow2"]["compiles"] == len({1 << (b.bit_length() - 1) for b in sizes})
    assert policies["bucket-down-pow2"]["padding_frac"] == 0 and policies["pad-fixed"]["dropped_frac"] == 0
    cold, warm = results["cache"]["runs"]
    assert cold["run"] == "cold" and warm["run"] == "warm" and warm["cache_files_after"] > 0
    assert (tmp_path / "SUMMARY.md").read_text().count("| as-is |") == 1


def test_compile_cost_pow2_helpers():
    cc = _load("compile_cost.py")
    assert [cc.pow2_floor(b) for b in (1, 2, 3, 64, 127, 128)] == [1, 2, 2, 64, 64, 128]
    assert [cc.pow2_ceil(b) for b in (1, 2, 3, 64, 65, 128)] == [1, 2, 4, 64, 128, 128]


def test_dynamic_control_flow_quick(tmp_path):
    payload = _run_quick("dynamic_control_flow.py", tmp_path, "time_per_call.png")
    # float32 matmuls in float32 on every backend (a GPU's TF32 default broke the tolerances' premise)
    assert payload["model"]["matmul_precision"] == "highest"
    results = payload["results"]
    assert len(set(results["iterations"])) > 1, "inputs should need different iteration counts"
    by = {v["variant"]: v for v in results["variants"]}
    assert set(by) == {"eager", "while_loop", "fori_cond", "unrolled"}
    assert by["eager"]["compiles"] == 0
    assert by["while_loop"]["compiles"] == 1 and by["fori_cond"]["compiles"] == 1
    assert by["unrolled"]["compiles"] == len(set(results["iterations"]))
    assert "TracingError" not in results["tracing_error"] and "lax" in results["tracing_error"]


def test_dynamic_control_flow_variants_agree():
    dcf = _load("dynamic_control_flow.py")
    params = dcf.init_params()
    inputs = dcf.make_inputs((0.05, 1.0, 10.0))
    variants = dcf.build_variants()
    reference = [variants["eager"][1](params, x, None) for x in inputs]
    counts = [r[2] for r in reference]
    assert len(set(counts)) == 3 and all(1 < n < dcf.MAX_ITERS for n in counts)
    tol = dcf.tolerances(params)
    for name in ("while_loop", "fori_cond", "unrolled"):
        for x, (logits, h, n) in zip(inputs, reference):
            out_logits, out_h, out_n = variants[name][1](params, x, n)
            assert abs(int(out_n) - n) <= 1, name
            np.testing.assert_allclose(np.asarray(out_h), np.asarray(h), rtol=tol["rtol"], atol=tol["atol_h"])
            np.testing.assert_allclose(np.asarray(out_logits), np.asarray(logits), rtol=tol["rtol"],
                                       atol=tol["atol_logits"])
    # The converged state is a fixed point: one more update moves it by less than the tolerance.
    logits, h, n = reference[0]
    z = inputs[0] @ params["U"]
    assert float(np.max(np.abs(dcf._update(params, h, z)))) < dcf.TOL


def test_eager_loop_under_tracing_raises_tracing_error():
    dcf = _load("dynamic_control_flow.py")
    params = dcf.init_params()
    x = dcf.make_inputs((1.0,))[0]
    with pytest.raises(graphduo.TracingError, match="lax"):
        graphduo.TracedStep(dcf.eager_forward)(params, x)
    assert dcf.tracing_error_message(params, x) is not None
