"""The timing harness and the break-even arithmetic."""

import re
import tempfile

import jax.numpy as jnp
import pytest

from conftest import PROCESS_SETTINGS
from graphduo.timing import StepTimes, break_even_steps, environment, time_steps


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


def test_environment_names_the_machine_and_the_process_settings():
    env = environment(PROCESS_SETTINGS.record())
    assert {"jax", "jaxlib", "flax", "optax", "backend", "device_kind", "cpu", "xla_flags", "process_settings"} <= env.keys()
    assert re.fullmatch(r"20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ", env["recorded_utc"])  # when it was measured
    assert env["process_settings"]["cpu_convolutions"] == PROCESS_SETTINGS.cpu_convolutions
    assert env["xla_flags"] == PROCESS_SETTINGS.xla_flags  # conftest.py put them in the environment
    assert env["backend"] == "cpu"
    assert environment()["process_settings"] == "not recorded by the caller"
