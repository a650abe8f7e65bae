"""Faults injected into real training processes: kill -9, SIGTERM, damaged checkpoints, wrong run dirs."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from graphduo.train import load_params

# Per case: the model is small so each process starts and finishes in a few seconds; the runs are
# long enough (hundreds of steps) that a kill lands mid-run.
CASES = {
    "traced": ["--model", "mlp", "--mlp-features", "64", "--steps", "400"],
    "eager": ["--model", "mlp", "--mlp-features", "16", "--mode", "eager", "--steps", "150"],
    "shard_map-2dev": ["--model", "mlp", "--mlp-features", "64", "--steps", "400", "--strategy", "shard_map",
                       "--devices", "2"],
}


def _env():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _cmd(run_dir, params, extra, every=5):
    return [sys.executable, "-m", "graphduo", "train", *extra, "--quiet", "--checkpoint-every", str(every),
            "--run-dir", str(run_dir), "--params-out", str(params)]


def _run(cmd, timeout=180):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    return result


def _complete_steps(ckpt_dir: pathlib.Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def _start_and_wait_for_checkpoint(cmd, ckpt_dir, min_step, timeout=120):
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        steps = _complete_steps(ckpt_dir)
        if steps and steps[-1] >= min_step:
            return proc
        if proc.poll() is not None:
            pytest.fail(f"training ended before step {min_step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no checkpoint at step {min_step} within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each case trained once without faults: the reference every resumed run must equal exactly."""
    cache = {}

    def get(case):
        if case not in cache:
            d = tmp_path_factory.mktemp(f"ref-{case}")
            result = _run(_cmd(d / "run", d / "params.npz", CASES[case]))
            assert result.returncode == 0, result.stderr[-2000:]
            cache[case] = load_params(d / "params.npz")
        return cache[case]

    return get


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), f"{key} differs: max {np.max(np.abs(a[key] - b[key]))}"


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("case", list(CASES))
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(case, tmp_path, uninterrupted):
    kill_after = random.Random(f"kill-{case}").randrange(20, 60, 5)
    cmd = _cmd(tmp_path / "run", tmp_path / "params.npz", CASES[case])
    proc = _start_and_wait_for_checkpoint(cmd, tmp_path / "run" / "checkpoints", kill_after)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "params.npz").exists()

    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr and "from the checkpoint at step" in resumed.stderr
    _assert_identical(load_params(tmp_path / "params.npz"), uninterrupted(case))
    steps = [r["step"] for r in _train_records(tmp_path / "run") if r["kind"] == "train"]
    assert steps == sorted(set(steps)), "metrics duplicated or out of order after resume"


def _partial(ckpt: pathlib.Path) -> list[str]:
    return [p.name for p in ckpt.iterdir() if "tmp" in p.name] if ckpt.is_dir() else []


def test_kill_9_during_a_checkpoint_write_never_loads_the_partial_one(tmp_path, uninterrupted):
    """Checkpoint every step; kill -9 at a moment an orbax temporary folder (a write) is on disk."""
    ckpt = tmp_path / "run" / "checkpoints"
    cmd = _cmd(tmp_path / "run", tmp_path / "params.npz", CASES["traced"], every=1)
    for attempt in range(10):
        proc = _start_and_wait_for_checkpoint(cmd, ckpt, 20 + 30 * attempt)
        end = time.monotonic() + 30
        while not _partial(ckpt) and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.0005)
        proc.kill()
        proc.wait()
        if _partial(ckpt):
            break
    else:
        pytest.fail("never caught a checkpoint mid-write in 10 kills")
    complete = _complete_steps(ckpt)
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"from the checkpoint at step {complete[-1]}" in resumed.stderr
    _assert_identical(load_params(tmp_path / "params.npz"), uninterrupted("traced"))


def test_sigterm_checkpoints_exits_143_and_resume_continues(tmp_path, uninterrupted):
    cmd = _cmd(tmp_path / "run", tmp_path / "params.npz", CASES["traced"], every=100)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    # Wait until training is under way (the metrics file gets its first record at step 50).
    end = time.monotonic() + 120
    while not (tmp_path / "run" / "metrics.jsonl").exists() or not _train_records(tmp_path / "run"):
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "got SIGTERM: saving a checkpoint at the next step boundary" in err
    stopped = _complete_steps(tmp_path / "run" / "checkpoints")[-1]
    assert f"stopped by SIGTERM at step {stopped}; checkpoint saved in" in err
    resumed = _run(cmd)
    assert resumed.returncode == 0 and f"at step {stopped}" in resumed.stderr
    _assert_identical(load_params(tmp_path / "params.npz"), uninterrupted("traced"))


def _truncate_largest_file(folder: pathlib.Path) -> pathlib.Path:
    files = [p for p in folder.rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
    return target


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted):
    cmd = _cmd(tmp_path / "run", tmp_path / "params.npz", CASES["traced"], every=50)
    proc = _start_and_wait_for_checkpoint(cmd, tmp_path / "run" / "checkpoints", 150)
    proc.kill()
    proc.wait()
    steps = _complete_steps(tmp_path / "run" / "checkpoints")
    _truncate_largest_file(tmp_path / "run" / "checkpoints" / str(steps[-1]))
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"checkpoint at step {steps[-1]}" in resumed.stderr and "trying the previous one" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    assert "never retrieved" not in resumed.stderr and "never awaited" not in resumed.stderr
    assert f"from the checkpoint at step {steps[-2]}" in resumed.stderr
    _assert_identical(load_params(tmp_path / "params.npz"), uninterrupted("traced"))


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    extra = ["--model", "mlp", "--mlp-features", "16", "--steps", "20"]
    cmd = _cmd(tmp_path / "run", tmp_path / "params.npz", extra, every=10)
    assert _run(cmd).returncode == 0
    steps = _complete_steps(tmp_path / "run" / "checkpoints")
    for step in steps:
        _truncate_largest_file(tmp_path / "run" / "checkpoints" / str(step))
    # Without its manifest, the newest is read by orbax itself and fails there: both paths covered.
    (tmp_path / "run" / "checkpoints-manifests" / f"{steps[-1]}.json").unlink()
    result = _run(cmd)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("graphduo train: error: none of the checkpoints in") and "delete that folder" in last
    assert "Traceback" not in result.stderr
    assert "never retrieved" not in result.stderr and "never awaited" not in result.stderr


def test_a_run_directory_of_another_configuration_is_refused(tmp_path):
    base = ["--mlp-features", "16", "--steps", "10"]
    assert _run(_cmd(tmp_path / "run", tmp_path / "p.npz", ["--model", "mlp", *base])).returncode == 0
    before = (tmp_path / "run" / "config.json").read_text()
    other = _run(_cmd(tmp_path / "run", tmp_path / "p.npz", ["--model", "cnn", *base]))
    assert other.returncode == 2
    assert other.stderr.strip() == (f"graphduo train: error: {tmp_path / 'run'} holds a run with --model mlp, "
                                    f"not cnn: use another --run-dir, or the same --model to resume it")
    wider = _run(_cmd(tmp_path / "run", tmp_path / "p.npz", ["--model", "mlp", "--mlp-features", "32", "--steps", "10"]))
    assert wider.returncode == 2 and "--mlp-features 16, not 32" in wider.stderr
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_multi_process_run_checkpoints_on_sigterm_and_resumes(tmp_path, uninterrupted):
    common = ["train", "--strategy", "shard_map", "--model", "mlp", "--mlp-features", "64", "--steps", "400",
              "--quiet", "--checkpoint-every", "20"]
    launch = [sys.executable, "-m", "graphduo", "launch", "--processes", "2", "--devices-per-process", "1", "--"]
    one = _run([sys.executable, "-m", "graphduo", *common, "--devices", "2", "--run-dir", str(tmp_path / "one"),
                "--params-out", str(tmp_path / "one.npz")])
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [*launch, *common, "--run-dir", str(tmp_path / "two"), "--params-out", str(tmp_path / "two.npz")]
    proc = _start_and_wait_for_checkpoint(cmd, tmp_path / "two" / "checkpoints", 60)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, err
    assert "graphduo launch: stopped by SIGTERM; exit statuses 143, 143" in err
    resumed = _run(cmd)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    a, b = load_params(tmp_path / "one.npz"), load_params(tmp_path / "two.npz")
    for key in a:  # two processes all-reduce through gloo: same values up to summation order
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def _orbax_coroutine():
    """A coroutine whose code says it is orbax's, as a failed restore's unfinished reads are."""
    namespace = {}
    exec(compile("async def _read_array_index_and_device_put():\n    pass\n",
                 f"{os.sep}site-packages{os.sep}orbax{os.sep}serialization.py", "exec"), namespace)
    return namespace["_read_array_index_and_device_put"]()


def test_background_read_errors_are_dropped_and_nothing_else(monkeypatch, capsys):
    """What a failed restore's leftover reads report from other threads, at any moment: a tensorstore
    read finishing after orbax closed the event loop ("Event loop is closed", an unraisable exception
    on tensorstore's thread: a bare traceback, 1 run in 6 here before the filter), and orbax's
    unfinished read coroutines finalized with their errors ("Exception ignored in: <coroutine>").
    graphduo drops exactly these, through either hook; any other error still prints."""
    import threading
    import types

    from graphduo import checkpoint

    class RaisesWhenCollected:
        def __init__(self, err):
            self.err = err

        def __del__(self):
            raise self.err

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # restored after the test
    unraisable = []  # what reaches the hook graphduo's filter passes on to (pytest's, otherwise)
    monkeypatch.setattr(sys, "unraisablehook", lambda args: unraisable.append(repr(args.exc_value)))
    thread_hook = threading.excepthook
    checkpoint._filter_leftover_read_reports()
    checkpoint._filter_leftover_read_reports()  # idempotent: one filter, not a chain
    for err in (RuntimeError("Event loop is closed"), ValueError("a real failure")):
        try:
            raise err
        except Exception:
            sys.excepthook(*sys.exc_info())
    RaisesWhenCollected(RuntimeError("Event loop is closed"))
    RaisesWhenCollected(KeyError("another real failure"))
    for coroutine in (_orbax_coroutine(), (lambda: (yield))()):  # orbax's, and a generator (not)
        sys.unraisablehook(types.SimpleNamespace(exc_type=OSError, exc_value=OSError("read failed"),
                                                 exc_traceback=None, err_msg=None, object=coroutine))
        coroutine.close()
    printed = capsys.readouterr().err
    assert "Event loop is closed" not in printed
    assert "ValueError: a real failure" in printed
    assert unraisable == ["KeyError('another real failure')", "OSError('read failed')"]
    assert threading.excepthook is thread_hook  # other threads' errors untouched


def test_a_failed_restores_orphaned_reads_are_not_reported(monkeypatch, caplog):
    """When one read of a damaged checkpoint fails, orbax's other reads fail or never run; their
    futures would log "... exception was never retrieved" when collected, and their coroutines warn
    "never awaited" at exit. The event loops a restore creates drop the former and pass any other
    report on; the latter is ignored once a restore has failed. Loops created elsewhere still report
    (negative control)."""
    import asyncio
    import gc
    import warnings

    from graphduo import checkpoint

    for name in ("excepthook", "unraisablehook"):
        monkeypatch.setattr(sys, name, getattr(sys, name))  # restored after the test

    def orphan_a_failed_future(loop):
        loop.create_future().set_exception(ValueError("a sibling read failed"))
        gc.collect()

    with checkpoint._quiet_event_loops():
        loop = asyncio.new_event_loop()
    assert "new_event_loop" not in vars(asyncio.get_event_loop_policy())  # the policy's own again
    orphan_a_failed_future(loop)
    assert "never retrieved" not in caplog.text
    loop.call_exception_handler({"message": "something else went wrong"})
    assert "something else went wrong" in caplog.text
    loop.close()
    other = asyncio.new_event_loop()
    orphan_a_failed_future(other)
    other.close()
    assert "Future exception was never retrieved" in caplog.text

    async def read():
        pass

    with warnings.catch_warnings(record=True) as seen:  # the filters are restored on leaving
        warnings.simplefilter("always")
        read()
        gc.collect()
        assert [str(w.message) for w in seen] == ["coroutine 'test_a_failed_restores_orphaned_reads_are_not_reported."
                                                  "<locals>.read' was never awaited"]
        checkpoint._ignore_unawaited_reads()
        read()
        gc.collect()
        assert len(seen) == 1
