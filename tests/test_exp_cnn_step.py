"""experiments/cnn_step.py runs end to end in --quick mode, its cells train the same function, each
child applies and records its own process settings (that they take effect is graphduo.runtime's own
test), and its one-input-channel convolution computes what ``lax.conv`` computes. Timings live in the
recorded results, not here."""

import json
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from graphduo import runtime
from graphduo.models import build_model, conv_same, lax_conv_same
from test_experiments import EXPERIMENTS, check_environment, check_plots, load_script, run_quick

SCRIPT = EXPERIMENTS / "cnn_step.py"
YNN_FLAG = runtime.EIGEN_FLAG[2:].split("=")[0]


@pytest.fixture(scope="module")
def cnn_step():
    return load_script("cnn_step")


def test_quick_run_writes_results_and_checks_losses(tmp_path, cnn_step):
    out = tmp_path / "out"
    proc = run_quick("cnn_step.py", out, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    analysis = result["analysis"]
    onednn = cnn_step._onednn.available()
    formulations = [f for f in cnn_step.FORMULATIONS if f != "onednn" or onednn is None]
    assert analysis["unavailable"] == ({} if onednn is None else {"onednn": f"oneDNN unavailable: {onednn}"})
    cells = analysis["cells"]
    assert list(cells) == [f"{f}|{s}" for s in cnn_step.SETTINGS for f in formulations]
    assert all(c["median_ms"] > 0 for c in cells.values())
    assert cells["flax|xla+system"]["speedup_vs_defaults"] == 1.0
    assert analysis["loss_check"]["ok"] and analysis["loss_check"]["max_rel_diff"] <= cnn_step.LOSS_RTOL
    rnd = result["rounds"][0]
    for setting in cnn_step.SETTINGS:  # each child applied its own settings, and recorded them
        conv, mem = setting.split("+")
        child = rnd[setting]
        check_environment(child["environment"], conv, mem)
        assert child["environment"]["process_settings"] == child["process_settings"]
        conv_note, mem_note = child["process_settings"]["notes"]
        if conv == "xla":
            assert child["environment"]["xla_flags"] == "" and conv_note.endswith("this jaxlib's default")
        elif runtime.jaxlib_knows(YNN_FLAG):  # the releases the flag was checked in (KNOWN_FLAGS)
            assert conv_note == "XLA:CPU convolutions: Eigen"
        else:
            assert f"not checked in jaxlib {runtime.jaxlib_version()}" in conv_note
        if mem == "system":
            assert mem_note == "host memory: the C library's default"
        elif platform.libc_ver()[0] == "glibc":  # the parent strips the user's malloc settings for its children
            assert "kept for reuse" in mem_note, mem_note
    summary = (out / "SUMMARY.md").read_text()
    assert "| graphduo | eigen | reuse |" in summary and "Machine: " in summary and "(step_time.png)" in summary
    check_plots(out, "step_time.png")


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("cnn_step.py: error: argument --rounds: expected a positive "
                                                    "integer, got '0'")
    assert not (tmp_path / "out").exists()


def test_formulations_use_the_convolutions_their_names_say(cnn_step):
    x1, x32 = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 8, 8, 32))
    k1, k32 = jnp.zeros((3, 3, 1, 4)), jnp.zeros((3, 3, 32, 4))
    jaxpr = lambda f, x, k: str(jax.make_jaxpr(f)(x, k))  # noqa: E731
    fns, _ = cnn_step.formulations(build_model("cnn", (8, 8, 1), 10, channels=(4,), dense=8))
    assert "conv_general_dilated" not in jaxpr(conv_same, x1, k1)  # shipped, one channel: multiply-adds
    assert jaxpr(lax_conv_same, x1, k1) != jaxpr(conv_same, x1, k1)  # lax-convolutions: XLA's convolution
    params = build_model("cnn", (8, 8, 1), 10, channels=(4,), dense=8).init(jax.random.key(0))
    assert "conv_general_dilated" in str(jax.make_jaxpr(fns["lax-convolutions"])(params, x1))
    assert "conv_general_dilated" not in str(jax.make_jaxpr(fns["graphduo"])(params, x1))
    assert cnn_step.conv_flops((256, 28, 28, 1), (3, 3, 1, 32)) == 2 * 256 * 28 * 28 * 32 * 9
    small = (2, 8, 8, 32)  # far below ONEDNN_MIN_FLOPS: the shipped convolution, no oneDNN call
    assert jaxpr(cnn_step.onednn_conv, jnp.zeros(small), k32) == jaxpr(conv_same, jnp.zeros(small), k32)
