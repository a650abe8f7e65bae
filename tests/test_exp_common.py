"""experiments/_common.py: the preamble applies graphduo's process settings before JAX starts and the
environment every results.json carries records them; the helpers the scripts share (several moved
here from graphduo.timing: the matmul ceiling, page faults, timing a call, the machine line, the
output folder check) do what they say."""

import json
import mmap
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import textwrap

import jax
import numpy as np
import pytest

from conftest import PROCESS_SETTINGS
from graphduo import runtime
from test_experiments import check_environment

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
if str(EXPERIMENTS) not in sys.path:  # as `python experiments/NAME.py` has it
    sys.path.insert(0, str(EXPERIMENTS))
import _common  # noqa: E402

PREAMBLE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import _common
    settings = _common.setup(sys.argv[2], sys.argv[3])  # first thing, as every script's main
    env = _common.environment(settings)  # starts JAX's backend
    late = _common.setup("eigen", "reuse")  # too late for XLA_FLAGS; host memory keeps its first policy
    print(json.dumps({"environment": env, "late": late.record()}))
""")


@pytest.mark.parametrize("convolutions,host_memory", [("eigen", "system"), ("xla", "reuse")])
def test_setup_applies_the_settings_before_jax_and_the_environment_records_them(convolutions, host_memory):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "GLIBC_TUNABLES", "LD_PRELOAD") and not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", PREAMBLE, str(EXPERIMENTS), convolutions, host_memory],
                          env={**env, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    check_environment(out["environment"], convolutions, host_memory)  # the flag only where this jaxlib knows it
    late, first = out["late"], out["environment"]["process_settings"]
    if convolutions == "xla" and runtime.jaxlib_knows(runtime.EIGEN_FLAG[2:].split("=")[0]):
        # the flag would have been added before JAX started; now it is not, and the note says why
        assert late["xla_flags"] == "" and "before any JAX computation" in late["notes"][0]
    if host_memory == "reuse":  # mallopt lasts for the process: a later call only repeats what the first did
        assert late["notes"][1] == first["notes"][1]
        if platform.libc_ver()[0] == "glibc":
            assert "kept for reuse" in first["notes"][1]
    else:  # "system" changed nothing, so the later "reuse" is the first to act
        assert first["notes"][1] == "host memory: the C library's default" != late["notes"][1]


def test_environment_records_this_process_settings():
    env = _common.environment(PROCESS_SETTINGS)  # conftest.py applied them, as an entry point does
    assert env["process_settings"] == PROCESS_SETTINGS.record() and env["jax"] == jax.__version__
    assert env["xla_flags"] == PROCESS_SETTINGS.xla_flags


def test_describe_machine_names_the_settings_and_an_accelerator_only_when_there_is_one():
    env = _common.environment(PROCESS_SETTINGS)
    line = _common.describe_machine(env)
    assert line.startswith(f"{env['cpu']}, {env['cpu_count']} cores; jax {jax.__version__} (cpu)")  # CPU: its model
    assert line.endswith("; ".join(PROCESS_SETTINGS.notes)) and "\n" not in line
    # A GPU run's results must say which GPU (the CPU model alone would hide it).
    gpu = dict(env, backend="gpu", device_kind="NVIDIA H100 80GB HBM3", cpu_count=16)
    assert _common.describe_machine(gpu).startswith(f"{env['cpu']}, 16 cores; NVIDIA H100 80GB HBM3; jax ")
    assert "(gpu)" in _common.describe_machine(gpu)
    # Results recorded before the process settings were still read, with the notes they had.
    old = {k: v for k, v in env.items() if k != "process_settings"}
    old.update(convolutions="convolutions: XLA's", host_memory="host memory: the C library's default")
    assert _common.describe_machine(old).endswith("; convolutions: XLA's; host memory: the C library's default")
    assert _common.describe_machine({**old, "process_settings": "not recorded by the caller"}).endswith(
        "host memory: the C library's default")
    del old["convolutions"], old["host_memory"]
    assert _common.describe_machine(old).endswith("; process settings: not recorded")


def test_writable_folder_makes_the_folder_or_names_the_problem(tmp_path, monkeypatch):
    assert _common.writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^--out .*/f is a file, not a folder: give a folder path$"):
        _common.writable_folder(tmp_path / "f")
    with pytest.raises(ValueError, match=r"^--out .*/f/sub: .*/f is a file, not a folder"):
        _common.writable_folder(tmp_path / "f" / "sub")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(ValueError, match=r"^--results .*/c: cannot write in .*/c \(Permission denied\): give a "
                                         r"writable path$"):
        _common.writable_folder(tmp_path / "c", "--results")


def test_command_line_can_be_pasted_back():
    assert _common.command_line(["--out", "a dir", "--quick"]).endswith(" --out 'a dir' --quick")


def test_batches_are_synthetic_images_with_labels():
    a, b = _common.host_batch(16), _common.host_batch(16)
    assert a["image"].shape == (16, *_common.INPUT_SHAPE) and a["image"].dtype == np.float32
    assert a["label"].dtype == np.int32 and 0 <= a["label"].min() and a["label"].max() < _common.NUM_CLASSES
    assert 0 <= a["image"].min() and a["image"].max() < 1
    np.testing.assert_array_equal(a["image"], b["image"])  # seed 0 unless told: runs start from the same batch
    rng = np.random.default_rng(0)
    first, second = _common.host_batch(4, rng=rng), _common.host_batch(4, rng=rng)
    assert not np.array_equal(first["image"], second["image"])  # one generator: successive batches differ
    on_device = _common.make_batch(4, input_shape=(8, 8, 3), seed=1)
    assert isinstance(on_device["image"], jax.Array) and on_device["image"].shape == (4, 8, 8, 3)
    np.testing.assert_array_equal(on_device["label"], _common.host_batch(4, input_shape=(8, 8, 3),
                                                                         rng=np.random.default_rng(1))["label"])


def test_time_call_times_each_call_after_the_first_and_the_warmup():
    calls = []
    times = _common.time_call(lambda: calls.append(1) or jax.numpy.ones(2), repeats=5, warmup=3)
    assert len(calls) == 1 + 3 + 5 and len(times.times_s) == 5 and times.first_s > 0


def test_matmul_ceiling():
    assert _common.peak_matmul_size("cpu") == 2048 and _common.peak_matmul_size("gpu") == 8192
    assert _common.matmul_peak_flops(64, repeats=3) > 0


def test_minor_page_faults_count_freshly_touched_pages():
    pages = 2048
    with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
        m.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, not one per huge page

        def touch():
            before = _common.minor_page_faults()
            for i in range(pages):
                m[i * mmap.PAGESIZE] = 1
            return _common.minor_page_faults() - before

        fresh, again = touch(), touch()  # first touch: the kernel maps and zeroes each page
    assert fresh >= pages // 2 and again < pages // 10, (fresh, again)  # pages already mapped: no fault


def test_results_summary_and_plot_helpers(tmp_path):
    import argparse

    args = argparse.Namespace(out=tmp_path, quick=True)
    assert _common.settings_record(args) == {"out": str(tmp_path), "quick": True}
    path = _common.write_results(tmp_path, {"environment": {"jax": jax.__version__}})
    assert json.loads(path.read_text()) == {"environment": {"jax": jax.__version__}}
    assert _common.write_summary(tmp_path, ["# title", "", "text"]).read_text() == "# title\n\ntext\n"
    assert _common.write_summary(tmp_path, "one line").read_text() == "one line\n"
    plt = _common.pyplot()  # matplotlib is in the dev extra
    assert plt is not None and plt.get_backend().lower() == "agg"
