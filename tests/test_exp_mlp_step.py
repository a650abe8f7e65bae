"""experiments/mlp_step.py: it runs end to end in --quick mode, its variants are what they say they are
(each compiled graph has the kernels its name promises) and compute the same function, and its loss
check fails when a variant computes something else. Timings live in the recorded results, not here."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import onednn

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
SCRIPT = EXPERIMENTS / "mlp_step.py"
needs_onednn = pytest.mark.skipif(onednn.available() is not None, reason=f"oneDNN: {onednn.available()}")


def _load():
    if str(EXPERIMENTS) not in sys.path:  # as `python experiments/mlp_step.py` has it: for _args
        sys.path.insert(0, str(EXPERIMENTS))
    spec = importlib.util.spec_from_file_location("experiment_mlp_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mlp_step():
    return _load()


def test_quick_run_writes_results_and_checks_losses(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env.pop("OMP_WAIT_POLICY", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    if onednn.available() is not None:  # the script needs oneDNN and says so in one line
        assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("mlp_step.py: error: oneDNN")
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    mod = _load()
    assert result["checks"]["ok"] and set(result["checks"]["losses"]) == set(mod.VARIANTS)
    assert result["omp_wait_policy"] == "passive" and result["environment"]["jax"]
    variants = result["analysis"]["variants"]
    assert list(variants) == list(mod.VARIANTS) and all(v["median_ms"] > 0 for v in variants.values())
    assert variants["shipped"]["speedup_vs_shipped"] == 1.0
    assert 0 < variants["shipped"]["peak_fraction"] and result["rounds"][0]["matmul_peak_flops"] > 0
    # FLOPs: every full variant is charged the shipped step's; the reference computes less (no Adam).
    assert 0 < result["flops"]["gradient-only"] < result["flops"]["shipped"]
    matmuls = result["analysis"]["matmuls"]
    assert [m["name"] for m in matmuls] == ["forward 0", "weight gradient 0", "forward 1", "weight gradient 1",
                                           "input gradient 1", "forward 2", "weight gradient 2", "input gradient 2"]
    assert sum(m["flops"] for m in matmuls) == 2 * 32 * (784 * 512 * 2 + 512 * 512 * 3 + 512 * 10 * 3)
    assert all(m["xla_ms"] > 0 and m["onednn_sgemm_ms"] > 0 for m in matmuls)
    # weight gradients are timed both as shipped and as jax.grad's batch-contracting dot
    assert [m["name"] for m in matmuls if m.get("xla_batch_contracting_ms", 0) > 0] == [
        "weight gradient 0", "weight gradient 1", "weight gradient 2"]
    assert result["analysis"]["adam_update_ms"] > 0 and result["rounds"][0]["adam_update_ms"] > 0
    assert result["analysis"]["parts_estimate"]["ms"] > result["analysis"]["adam_update_ms"]
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "| shipped |" in summary and "| onednn-sgemm |" in summary and "Machine:" in summary
    assert "## Its matmuls alone" in summary and "OMP_WAIT_POLICY=passive" in summary
    assert "## What these parts allow" in summary and "Adam's update alone" in summary
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "step_time.png").stat().st_size > 0 and "(step_time.png)" in summary
    else:
        assert not (tmp_path / "step_time.png").exists()


def _small_problem(mlp_step, batch_size=8):
    from graphduo.models import build_model
    from graphduo.step import create_train_state, make_optimizer

    model = build_model("mlp", mlp_step.INPUT_SHAPE, mlp_step.NUM_CLASSES, features=(16, 16))
    tx = make_optimizer("adam", mlp_step.LR)
    rng = np.random.default_rng(1)
    batches = [jax.device_put({"image": rng.random((batch_size, *mlp_step.INPUT_SHAPE), dtype=np.float32),
                               "label": rng.integers(0, 10, batch_size).astype(np.int32)}) for _ in range(3)]
    return model, tx, (lambda: create_train_state(model, tx, jax.random.key(0))), batches


@needs_onednn
def test_each_variant_compiles_to_what_its_name_says(mlp_step):
    model, tx, fresh, batches = _small_problem(mlp_step)
    steps = mlp_step.build_steps(model, tx, fresh(), batches[0])
    hlo = {name: (step.stages(fresh(), batches[0]).compiled if name == "shipped" else step).as_text()
           for name, (step, _) in steps.items()}
    entry = {name: text.split("ENTRY", 1)[1] for name, text in hlo.items()}
    # shipped: every dot on YNNPACK, the weight gradients from transposed copies of the layers' inputs;
    # jax.grad's own weight gradients contract the batch axis and go to Eigen (jaxlib 0.10's split)
    assert "__ynn_fusion" in entry["shipped"] and " dot(" not in entry["shipped"]
    assert entry["eigen-weight-gradients"].count(" dot(") == 3 and "__ynn_fusion" in entry["eigen-weight-gradients"]
    assert entry["shipped"].count("transpose") > entry["eigen-weight-gradients"].count("transpose")
    for name in ("eigen-dots", "xnnpack-dots"):  # no dot left to YNNPACK
        assert "__ynn_fusion" not in entry[name] and "__onednn" not in entry[name], name
    assert "__onednn_fusion" in entry["onednn-dots"]
    assert entry["shipped"].count(" copy(") > entry["no-param-copies"].count(" copy(")
    assert "gather" in hlo["shipped"] and "gather" not in hlo["one-hot-loss"]
    sgemm_calls = entry["onednn-sgemm"].count('custom_call_target="mlp_step_sgemm_')
    assert sgemm_calls == 8 and " dot(" not in entry["onednn-sgemm"]  # every matmul, none left to XLA


@needs_onednn
def test_variants_train_the_same_function_and_the_check_catches_one_that_does_not(mlp_step):
    model, tx, fresh, batches = _small_problem(mlp_step)
    steps = mlp_step.build_steps(model, tx, fresh(), batches[0])
    checks = mlp_step.check_losses(steps, fresh, batches)
    assert checks["ok"], checks
    assert len(checks["losses"]["gradient-only"]) == 1 and len(checks["losses"]["onednn-sgemm"]) == 3
    # the losses move between steps, so agreeing on all three says the updates agree too
    assert len(set(checks["losses"]["shipped"])) == 3

    # Negative control: one variant's step at twice the learning rate.
    from graphduo.step import make_optimizer, make_train_step

    wrong = jax.jit(make_train_step(model.apply, make_optimizer("adam", 2 * mlp_step.LR)), donate_argnums=0)
    bad = mlp_step.check_losses({**steps, "one-hot-loss": (wrong, 0.0)}, fresh, batches)
    assert not bad["ok"] and bad["max_rel_diff"] > 10 * mlp_step.LOSS_RTOL


@needs_onednn
def test_sgemm_matmul_and_its_gradients_against_float64(mlp_step):
    matmul = mlp_step.sgemm_matmul()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((12, 7)).astype(np.float32)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    g = rng.standard_normal((12, 5)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(matmul), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    # float32 products of 7-12 terms of unit size: rounding ~1e-6 relative; a wrong transpose is O(1) off
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # negative control: the tolerance separates a transposed result
        np.testing.assert_allclose(dw, (x64.T @ g64)[::-1], rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_call_that_does_not_fit_is_an_error_not_a_result(mlp_step):
    mlp_step._register_sgemm()
    a, b = jnp.ones((4, 3)), jnp.ones((3, 2))
    bad = jax.jit(lambda a, b: mlp_step._sgemm("nn", a, b, (4, 5)))  # output buffer of the wrong width
    with pytest.raises(Exception, match=r"oneDNN sgemm \(nn\) failed: ValueError: shapes"):
        jax.block_until_ready(bad(a, b))
    np.testing.assert_array_equal(jax.jit(lambda a, b: mlp_step._sgemm("nn", a, b, (4, 2)))(a, b), 3 * np.ones((4, 2)))


def test_parts_estimate_takes_each_matmuls_fastest_kernel_plus_adam_per_round(mlp_step):
    # Two rounds; the second machine-wide twice as slow (step parts and ceiling alike).
    rounds = [{"matmuls": [{"xla_ms": 1.0, "onednn_sgemm_ms": 2.0}, {"xla_ms": 3.0, "onednn_sgemm_ms": 1.5}],
               "adam_update_ms": 0.5, "matmul_peak_flops": 1e9},
              {"matmuls": [{"xla_ms": 2.0, "onednn_sgemm_ms": 4.0}, {"xla_ms": 6.0, "onednn_sgemm_ms": 3.0}],
               "adam_update_ms": 1.0, "matmul_peak_flops": 0.5e9}]
    f = mlp_step.parts_estimate(rounds, flops=3e6)
    assert f["ms_range"] == [3.0, 6.0]  # 1.0 + 1.5 + 0.5, and twice that
    assert f["peak_fraction_range"] == [1.0, 1.0]  # 3 MFLOP in 3 ms at 1 GFLOP/s; the slow round cancels
    # Negative control: an estimate without Adam reads differently.
    no_adam = [{**r, "adam_update_ms": 0.0} for r in rounds]
    assert mlp_step.parts_estimate(no_adam, flops=3e6)["ms_range"] == [2.5, 5.0]
    # ... and when one kernel gets faster, the estimate follows it.
    faster = [{**r, "matmuls": [{"xla_ms": 0.5, "onednn_sgemm_ms": 2.0}, r["matmuls"][1]]} for r in rounds[:1]]
    assert mlp_step.parts_estimate(faster, flops=3e6)["ms"] == 2.5
    # ... including a weight gradient's third kernel, jax.grad's own dot, where it is the fastest.
    third = [{**rounds[0], "matmuls": [{**rounds[0]["matmuls"][0], "xla_batch_contracting_ms": 0.25},
                                       rounds[0]["matmuls"][1]]}]
    assert mlp_step.parts_estimate(third, flops=3e6)["ms"] == 2.25
