"""experiments/mlp_step.py: it runs end to end in --quick mode, with or without oneDNN and whatever
compiler options the installed jaxlib knows; its variants are what they say they are (each compiled
graph has the kernels its name promises, in the jaxlib releases that was checked in) and compute the
same function, and its loss check fails when a variant computes something else. Timings live in the
recorded results, not here."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import runtime
from test_experiments import check_environment, check_plots, load_script, run_quick

# The jaxlib releases whose XLA:CPU was seen to split the MLP step's dots as the compiled-kernel test
# below says (YNNPACK for a dot contracting its left operand's last axis, Eigen for jax.grad's
# batch-contracting weight gradients) and to know every compiler option the variants use.
KERNELS_CHECKED_IN = ("0.10.2", "0.12.0.1")


@pytest.fixture(scope="module")
def mlp_step():
    return load_script("mlp_step")


def _onednn_reason():
    return load_script("_onednn").available()


needs_onednn = pytest.mark.skipif(_onednn_reason() is not None, reason=f"oneDNN: {_onednn_reason()}")
kernels_checked = pytest.mark.skipif(
    runtime.jaxlib_version() not in KERNELS_CHECKED_IN,
    reason=f"XLA:CPU's library choices were checked in jaxlib {', '.join(KERNELS_CHECKED_IN)}, "
           f"not {runtime.jaxlib_version()}")


def test_quick_run_writes_results_and_checks_losses(tmp_path, mlp_step):
    out = tmp_path / "out"
    proc = run_quick("mlp_step.py", out)  # the script sets OMP_WAIT_POLICY itself
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    check_environment(result["environment"])
    assert result["omp_wait_policy"] == "passive"
    reason = _onednn_reason()
    unavailable = result["unavailable"]
    if reason is not None:
        assert unavailable.pop(mlp_step.SGEMM) == f"oneDNN unavailable: {reason}"
    if runtime.jaxlib_version() in KERNELS_CHECKED_IN:  # it knows every compiler option
        assert unavailable == {}
    assert all(why.startswith(f"not available in jaxlib {runtime.jaxlib_version()}: ") and "\n" not in why
               for why in unavailable.values())
    measured = [n for n in mlp_step.VARIANTS if n not in result["unavailable"]]
    assert result["checks"]["ok"] and list(result["checks"]["losses"]) == measured
    variants = result["analysis"]["variants"]
    assert list(variants) == measured and all(v["median_ms"] > 0 for v in variants.values())
    assert variants["shipped"]["speedup_vs_shipped"] == 1.0
    assert 0 < variants["shipped"]["peak_fraction"] and result["rounds"][0]["matmul_peak_flops"] > 0
    # FLOPs: every full variant is charged the shipped step's; the reference computes less (no Adam).
    assert 0 < result["flops"]["gradient-only"] < result["flops"]["shipped"]
    matmuls = result["analysis"]["matmuls"]
    assert [m["name"] for m in matmuls] == ["forward 0", "weight gradient 0", "forward 1", "weight gradient 1",
                                           "input gradient 1", "forward 2", "weight gradient 2", "input gradient 2"]
    assert sum(m["flops"] for m in matmuls) == 2 * 32 * (784 * 512 * 2 + 512 * 512 * 3 + 512 * 10 * 3)
    assert all(m["xla_ms"] > 0 for m in matmuls)
    assert all(("onednn_sgemm_ms" in m) == (reason is None) for m in matmuls)
    # weight gradients are timed both as shipped and as the transposed copy's dot
    assert [m["name"] for m in matmuls if m.get("xla_transposed_ms", 0) > 0] == [
        "weight gradient 0", "weight gradient 1", "weight gradient 2"]
    assert result["analysis"]["adam_update_ms"] > 0 and result["rounds"][0]["adam_update_ms"] > 0
    assert result["analysis"]["parts_estimate"]["ms"] > result["analysis"]["adam_update_ms"]
    summary = (out / "SUMMARY.md").read_text()
    assert "| shipped |" in summary and f"| {mlp_step.TRANSPOSED} |" in summary and "Machine: " in summary
    assert ("| onednn-sgemm |" in summary) == (reason is None)
    assert "## Its matmuls alone" in summary and "OMP_WAIT_POLICY=passive" in summary
    assert "## What these parts allow" in summary and "Adam's update alone" in summary
    assert "(step_time.png)" in summary
    check_plots(out, "step_time.png")


def _small_problem(mlp_step, batch_size=8):
    from graphduo.models import build_model
    from graphduo.step import create_train_state, make_optimizer

    model = build_model("mlp", mlp_step.INPUT_SHAPE, mlp_step.NUM_CLASSES, features=(16, 16))
    tx = make_optimizer("adam", mlp_step.LR)
    rng = np.random.default_rng(1)
    batches = [jax.device_put({"image": rng.random((batch_size, *mlp_step.INPUT_SHAPE), dtype=np.float32),
                               "label": rng.integers(0, 10, batch_size).astype(np.int32)}) for _ in range(3)]
    return model, tx, (lambda: create_train_state(model, tx, jax.random.key(0))), batches


@kernels_checked
def test_each_variant_compiles_to_what_its_name_says(mlp_step):
    model, tx, fresh, batches = _small_problem(mlp_step)
    steps, unavailable = mlp_step.build_steps(model, tx, fresh(), batches[0])
    assert set(unavailable) <= {mlp_step.SGEMM}
    hlo = {name: (step.stages(fresh(), batches[0]).compiled if name == "shipped" else step).as_text()
           for name, (step, _) in steps.items()}
    entry = {name: text.split("ENTRY", 1)[1] for name, text in hlo.items()}
    # shipped: jax.grad's weight gradients contract the batch axis and go to Eigen, one plain dot per
    # layer; every other dot is a YNNPACK fusion
    assert entry["shipped"].count(" dot(") == 3 and "__ynn_fusion" in entry["shipped"]
    # transposed-weight-gradients: no dot left to Eigen, the weight gradients from transposed copies
    transposed = entry[mlp_step.TRANSPOSED]
    assert " dot(" not in transposed and "__ynn_fusion" in transposed
    assert transposed.count("transpose") > entry["shipped"].count("transpose")
    for name in ("eigen-dots", "xnnpack-dots"):  # no dot left to YNNPACK
        assert "__ynn_fusion" not in entry[name] and "__onednn" not in entry[name], name
    assert "__onednn_fusion" in entry["onednn-dots"] and " dot(" not in entry["onednn-dots"]
    assert entry["shipped"].count(" copy(") > entry["no-param-copies"].count(" copy(")
    assert "gather" in hlo["shipped"] and "gather" not in hlo["one-hot-loss"]
    if mlp_step.SGEMM in steps:
        sgemm_calls = entry[mlp_step.SGEMM].count('custom_call_target="mlp_step_sgemm_')
        assert sgemm_calls == 8 and " dot(" not in entry[mlp_step.SGEMM]  # every matmul, none left to XLA


def test_an_option_this_jaxlib_does_not_know_is_recorded_not_raised(mlp_step, monkeypatch):
    model, tx, fresh, batches = _small_problem(mlp_step)
    monkeypatch.setitem(mlp_step.COMPILER_OPTIONS, "eigen-dots", {"xla_cpu_no_such_option_graphduo": True})
    steps, unavailable = mlp_step.build_steps(model, tx, fresh(), batches[0],
                                              variants=("shipped", "eigen-dots", "no-param-copies"))
    assert list(steps) == ["shipped", "no-param-copies"]  # the known option still compiled
    (why,) = unavailable.values()
    assert why.startswith(f"not available in jaxlib {runtime.jaxlib_version()}: ") and "\n" not in why
    assert "xla_cpu_no_such_option_graphduo" in why
    # Any other compile failure is an error, not an unavailable variant.
    assert mlp_step._unknown_option(RuntimeError("INVALID_ARGUMENT: No such compile option: 'x_y'"), {"x_y": 1})
    assert not mlp_step._unknown_option(RuntimeError("RESOURCE_EXHAUSTED: out of memory"), {"x_y": 1})


def test_without_onednn_its_variant_is_recorded_and_the_rest_reads(mlp_step, monkeypatch):
    model, tx, fresh, batches = _small_problem(mlp_step)
    monkeypatch.setattr(mlp_step._onednn, "available", lambda: "no libdnnl here")
    steps, unavailable = mlp_step.build_steps(model, tx, fresh(), batches[0], variants=("shipped", mlp_step.SGEMM))
    assert list(steps) == ["shipped"] and unavailable == {mlp_step.SGEMM: "oneDNN unavailable: no libdnnl here"}
    # The matmuls alone without oneDNN's column: the table says n/a where a figure would be.
    rows = mlp_step.time_matmuls(mlp_step.matmul_shapes(fresh().params, 8), calls=2, sgemm=False)
    assert not any("onednn_sgemm_ms" in r for r in rows)
    result = {"rounds": [{"steps": {"shipped": {"median_ms": 1.0}}, "matmul_peak_flops": 1e9, "matmuls": rows,
                          "adam_update_ms": 0.1}],
              "flops": {"shipped": 1e6}, "matmul_shapes": mlp_step.matmul_shapes(fresh().params, 8)}
    analysis = mlp_step.analyse(result)
    assert analysis["matmuls_alone_ms"]["onednn_sgemm"] is None
    table = mlp_step.matmul_rows(analysis)
    assert all(line.rstrip().endswith("| n/a | n/a |") for line in table[2:]), table


def test_variants_train_the_same_function_and_the_check_catches_one_that_does_not(mlp_step):
    model, tx, fresh, batches = _small_problem(mlp_step)
    steps, _ = mlp_step.build_steps(model, tx, fresh(), batches[0])
    checks = mlp_step.check_losses(steps, fresh, batches)
    assert checks["ok"], checks
    assert len(checks["losses"]["gradient-only"]) == 1 and len(checks["losses"][mlp_step.TRANSPOSED]) == 3
    # the losses move between steps, so agreeing on all three says the updates agree too
    assert len(set(checks["losses"]["shipped"])) == 3

    # Negative control: one variant's step at twice the learning rate.
    from graphduo.step import make_optimizer, make_train_step

    wrong = jax.jit(make_train_step(model.apply, make_optimizer("adam", 2 * mlp_step.LR)), donate_argnums=0)
    bad = mlp_step.check_losses({**steps, "one-hot-loss": (wrong, 0.0)}, fresh, batches)
    assert not bad["ok"] and bad["max_rel_diff"] > 10 * mlp_step.LOSS_RTOL


def _against_float64(matmul, seed):
    """``matmul``'s values and both gradients against NumPy in float64."""
    rng = np.random.default_rng(seed)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((12, 7), (7, 5), (12, 5)))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    y, vjp = jax.vjp(jax.jit(matmul), jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    # float32 sums of 5-12 products of unit size: ~1e-6 relative; a transposed or wrong operand is O(1) off
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):  # negative control: the tolerance separates a permuted result
        np.testing.assert_allclose(dw, (x64.T @ g64)[::-1], rtol=1e-5, atol=1e-5)
    return x, w, g


def test_transposed_matmul_and_its_gradients_against_float64(mlp_step):
    """``transposed_matmul``'s values and both gradients (asked for together and apart), and only the
    gradients asked for are computed."""
    matmul = mlp_step.transposed_matmul
    x, w, g = _against_float64(matmul, seed=4)
    only_w = jax.grad(lambda w: jnp.vdot(matmul(jnp.asarray(x), w), g))(jnp.asarray(w))
    np.testing.assert_allclose(only_w, x.astype(np.float64).T @ g, rtol=1e-5, atol=1e-5)
    # the gradient of a data batch is never asked for: no input-gradient dot in the traced program
    text = str(jax.make_jaxpr(jax.grad(lambda w, x: matmul(x, w).sum()))(jnp.asarray(w), jnp.asarray(x)))
    assert text.count("dot_general[") == 2  # forward and weight gradient
    both = str(jax.make_jaxpr(jax.grad(lambda w, x: matmul(x, w).sum(), argnums=(0, 1)))(jnp.asarray(w), jnp.asarray(x)))
    assert both.count("dot_general[") == 3  # control: the input gradient's dot is there when asked for
    assert "optimization_barrier" in both  # the weight gradient's transposed copy, kept as such


@needs_onednn
def test_sgemm_matmul_and_its_gradients_against_float64(mlp_step):
    _against_float64(mlp_step.sgemm_matmul(), seed=2)


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
    # ... including a weight gradient's third kernel, the transposed copy's dot, where it is the fastest.
    third = [{**rounds[0], "matmuls": [{**rounds[0]["matmuls"][0], "xla_transposed_ms": 0.25},
                                       rounds[0]["matmuls"][1]]}]
    assert mlp_step.parts_estimate(third, flops=3e6)["ms"] == 2.25
