"""The benchmark scripts run end to end in --quick mode and write what they promise: results.json with
the environment and process settings the figures came from, SUMMARY.md and the plots.

These check that the scripts work, not the figures: timing goals live in the recorded results. The
helpers below (``load_script``, ``run_quick``, ``check_environment``, ``check_plots``) serve every
experiment's test.
"""

import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jaxlib
import pytest

from graphduo import runtime

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"


def load_script(name: str):
    """``experiments/NAME.py`` as a module, as ``python experiments/NAME.py`` sees it: experiments/ on
    ``sys.path``, for ``_common`` and ``_onednn``. A shared module (``_NAME``) is imported once, as the
    scripts import it: a second copy of ``_onednn`` would register its FFI targets again with other
    handlers (which jax 0.12 refuses), and a test patching one copy would miss the other."""
    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    if name.startswith("_"):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_quick(script: str, out: pathlib.Path, timeout: float = 300, extra_env: dict | None = None):
    """``python experiments/SCRIPT --quick --out OUT`` on the CPU, as a user runs it; the process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra_env or {})}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cwd = out.parent
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def check_environment(env: dict, cpu_convolutions: str = runtime.DEFAULT_CPU_CONVOLUTIONS,
                      host_memory: str = runtime.DEFAULT_HOST_MEMORY) -> None:
    """What ``_common.environment`` records: this process's versions and backend, and the process
    settings the script applied (``_common.setup``), consistent with the XLA flags in effect."""
    assert env["jax"] == jax.__version__ and env["jaxlib"] == jaxlib.__version__
    assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["cpu_count"] == os.cpu_count()
    settings = env["process_settings"]
    assert settings["cpu_convolutions"] == cpu_convolutions and settings["host_memory"] == host_memory
    assert settings["xla_flags"] == env["xla_flags"] and len(settings["notes"]) == 2
    eigen = cpu_convolutions == "eigen" and runtime.jaxlib_knows(runtime.EIGEN_FLAG[2:].split("=")[0])
    assert (runtime.EIGEN_FLAG in env["xla_flags"]) == eigen, env["xla_flags"]


def check_plots(out: pathlib.Path, *names: str) -> None:
    """Each plot was written: a non-empty PNG (matplotlib is in the dev extra, so never skipped)."""
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("script", ["bench_core.py", "data_parallel.py"])
def test_quick_run_writes_results_and_summary(script, tmp_path):
    out = tmp_path / "out"
    result = run_quick(script, out)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    check_environment(results["environment"])
    assert results["command"].endswith(f"{script} --quick --out {out}") and results["wall_s"] > 0
    summary = (out / "SUMMARY.md").read_text()
    assert "|" in summary and f"jax {jax.__version__} (cpu)" in summary  # the machine line
    check_plots(out, {"bench_core.py": "ratios.png", "data_parallel.py": "samples_per_s.png"}[script])
