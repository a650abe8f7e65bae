"""graphduo.runtime: the XLA:CPU convolution choice, added to XLA_FLAGS only when it can take effect."""

import os
import subprocess
import sys
import textwrap

import pytest

from graphduo import runtime


@pytest.fixture
def fresh(monkeypatch):
    """Pretend JAX has not started yet (in this test process it has)."""
    monkeypatch.setattr(runtime, "_backend_started", lambda: False)


def test_eigen_is_added_to_xla_flags(fresh):
    flags, note = runtime.cpu_convolution_flags("eigen", "--xla_cpu_enable_fast_math=false")
    assert note == "XLA:CPU convolutions: Eigen"
    assert flags == f"--xla_cpu_enable_fast_math=false {runtime.EIGEN_FLAG}"
    assert runtime.cpu_convolution_flags("eigen", flags) == (flags, note)  # idempotent
    assert runtime.cpu_convolution_flags("eigen", "")[0] == runtime.EIGEN_FLAG


def test_users_own_choice_wins(fresh):
    mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
    flags, note = runtime.cpu_convolution_flags("eigen", mine)
    assert flags == mine and "as XLA_FLAGS sets them" in note


def test_xla_choice_changes_nothing(fresh):
    flags, note = runtime.cpu_convolution_flags("xla", "--xla_cpu_enable_fast_math=false")
    assert flags == "--xla_cpu_enable_fast_math=false" and "default" in note


def test_too_late_is_reported_not_applied(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: True)
    flags, note = runtime.cpu_convolution_flags("eigen", "")
    assert flags == "" and "before any JAX computation" in note


def test_unknown_jaxlib_flag_is_never_added(fresh, monkeypatch):
    """An unknown name in XLA_FLAGS aborts the process, so a jaxlib without it gets nothing."""
    monkeypatch.setattr(runtime, "_jaxlib_knows", lambda name: False)
    flags, note = runtime.cpu_convolution_flags("eigen", "")
    assert flags == "" and "no YNNPACK choice" in note


def test_this_jaxlib_knows_the_flag():
    assert runtime._jaxlib_knows("xla_cpu_experimental_ynn_fusion_type")
    assert not runtime._jaxlib_knows("xla_cpu_no_such_flag_graphduo")


def test_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match="choose one of eigen, xla"):
        runtime.cpu_convolution_flags("mkl", "")


PROBE = textwrap.dedent("""
    import os, sys
    from graphduo import runtime
    os.environ["XLA_FLAGS"], note = runtime.cpu_convolution_flags(sys.argv[1])
    print(note, file=sys.stderr)
    import jax, jax.numpy as jnp
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(conv).lower(jnp.ones((16, 14, 14, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    print("library" if "ynn_fusion" in entry else "eigen")
""")


@pytest.mark.parametrize("choice,expected", [("eigen", "eigen"), ("xla", "library")])
def test_choice_reaches_the_compiled_convolution(choice, expected):
    """In a fresh process (XLA reads its flags once): with ``eigen`` the compiled convolution is
    XLA's own; with ``xla`` jax 0.10 hands it to YNNPACK (the negative control)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", PROBE, choice], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected, out.stderr
