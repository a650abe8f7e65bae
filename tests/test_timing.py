"""The timing harness and the break-even arithmetic."""

import re
import tempfile

import jax.numpy as jnp
import pytest

from graphduo import runtime
from graphduo.timing import (StepTimes, break_even_steps, describe_machine, environment, time_steps,
                             writable_folder)


@pytest.mark.parametrize("eager,traced,expected", [
    ((0.1, 0.010), (1.0, 0.001), 101),  # 1 + ceil(0.9 / 0.009) = 1 + 100
    ((0.5, 0.020), (0.2, 0.010), 1),    # traced is ahead from the first step
    ((0.1, 0.010), (1.0, 0.010), None),  # equal step times: compiling never pays
    ((0.1, 0.010), (1.0, 0.020), None),  # traced slower: never
])
def test_break_even_steps(eager, traced, expected):
    assert break_even_steps(*eager, *traced) == expected
    if expected not in (None, 1):  # n steps: traced total <= eager total, and not at n - 1
        total = lambda first, step, n: first + (n - 1) * step  # noqa: E731
        assert total(*traced, expected) <= total(*eager, expected) + 1e-12
        assert total(*traced, expected - 1) > total(*eager, expected - 1)


def test_time_steps_separates_first_warmup_and_steady_state():
    calls = []

    def step(state, batch):
        calls.append(batch)
        return state + batch, {"loss": jnp.float32(batch)}

    state, metrics, times = time_steps(step, jnp.float32(0), list(range(10)), warmup=3)
    assert float(state) == sum(range(10)) and len(metrics) == 10 and len(calls) == 10
    assert len(times.times_s) == 10 - 1 - 3
    assert times.first_s > 0 and times.p10_ms <= times.median_ms <= times.p90_ms
    with pytest.raises(ValueError, match="need at least 5 batches"):
        time_steps(step, jnp.float32(0), [1, 2, 3], warmup=3)


def test_step_times_summary():
    times = StepTimes(first_s=2.0, times_s=(0.001, 0.002, 0.003))
    summary = times.summary(batch_size=32)
    assert summary["step_time_ms"] == pytest.approx(2.0)
    assert summary["samples_per_s"] == pytest.approx(16000)
    assert summary["first_step_s"] == 2.0


def test_environment_names_the_machine():
    env = environment()
    assert {"jax", "jaxlib", "backend", "device_kind", "cpu", "xla_flags", "host_memory"} <= env.keys()
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", env["recorded_utc"])  # when it was measured
    assert env["host_memory"] == runtime.host_memory_note()  # conftest.py applied graphduo's default
    if runtime.platform.libc_ver()[0] == "glibc" and "as the environment" not in env["host_memory"]:
        assert "kept for reuse" in env["host_memory"]
    assert env["backend"] == "cpu"
    assert env["convolutions"] == runtime.convolution_note()


def test_describe_machine_names_an_accelerator_only_when_there_is_one():
    # A GPU run's results must say which GPU (the CPU model alone would hide it).
    env = environment()
    assert describe_machine(env).startswith(f"{env['cpu']}, {env['cpu_count']} cores; jax ")  # CPU: its model
    gpu = dict(env, backend="gpu", device_kind="NVIDIA H100 80GB HBM3", cpu_count=16)
    assert describe_machine(gpu).startswith(f"{env['cpu']}, 16 cores; NVIDIA H100 80GB HBM3; jax ")
    assert "(gpu)" in describe_machine(gpu)


def test_writable_folder_makes_the_folder_or_names_the_problem(tmp_path, monkeypatch):
    assert writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/f is a file, not a folder: give a folder path$"):
        writable_folder(tmp_path / "f")
    with pytest.raises(ValueError, match=r"^--out .*/f/sub: .*/f is a file, not a folder"):
        writable_folder(tmp_path / "f" / "sub")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"^--results .*/c: cannot write in .*/c \(Permission denied\): give a "
                                         r"writable path$"):
        writable_folder(tmp_path / "c", "--results")
