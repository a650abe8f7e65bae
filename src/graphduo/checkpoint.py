"""Checkpoints with orbax-checkpoint: asynchronous, atomic, and restored only into the right shapes.

A checkpoint holds the whole ``TrainState`` (parameters, optimizer state, step, RNG). The data
iterator's position is the step itself: batches are a pure function of (seed, epoch, index), so
step ``s`` resumes at batch ``s % steps_per_epoch`` of epoch ``s // steps_per_epoch``.

Orbax writes each step into a temporary folder and renames it when complete, so a checkpoint is
either whole or absent; a temporary folder left by a killed writer is never listed as a step.
A checkpoint that fails to restore (a truncated file) is skipped with a warning in favour of the
previous one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import sys
import threading
import warnings
import zlib
from typing import Any

import jax

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the run directory can be restored. ``str(err)`` is one line."""


def is_key(x) -> bool:
    """A typed PRNG key (``jax.random.key``), which orbax cannot store as it is."""
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(state):
    """Typed PRNG keys (the run's, an NNX module's streams) are not plain arrays: store their raw
    bits, rebuild them on restore."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, state)


def _restored(saved, template):
    return jax.tree.map(lambda s, t: jax.random.wrap_key_data(s, impl=jax.random.key_impl(t)) if is_key(t) else s,
                        saved, template)


class Checkpointer:
    """Save and restore ``TrainState`` in ``directory`` with orbax's ``CheckpointManager``.

    Args:
      directory: where step folders go (``<run_dir>/checkpoints``).
      keep: how many of the newest checkpoints to keep (``None``: all).
    """

    def __init__(self, directory: str | pathlib.Path, *, keep: int | None = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        self.manifests = self.directory.with_name(self.directory.name + "-manifests")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start saving ``state`` as ``step`` (device-to-host copy now, file writes in the background)."""
        self._write_manifests()
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(_saveable(state)))
        self.manager.save(step, args=args, force=True)

    # Integrity manifests: the size and CRC-32 of every file of a finished checkpoint, written by
    # process 0 once orbax has finalized it. A checkpoint whose files no longer match is known to be
    # damaged before orbax reads it (a failed orbax read leaves error noise from background threads).
    def _manifest_path(self, step: int) -> pathlib.Path:
        return self.manifests / f"{step}.json"

    def _write_manifests(self) -> None:
        if jax.process_index() != 0:
            return
        self.manifests.mkdir(parents=True, exist_ok=True)
        steps = set(self.steps())
        for stale in self.manifests.glob("*.json"):
            if stale.stem.isdigit() and int(stale.stem) not in steps:
                stale.unlink(missing_ok=True)
        for step in steps:
            path = self._manifest_path(step)
            if not path.exists():
                tmp = path.with_name(f".{path.name}.tmp")
                tmp.write_text(json.dumps(_fingerprint(self.directory / str(step))))
                os.replace(tmp, path)

    def _damage(self, step: int) -> str | None:
        """Why ``step``'s files differ from its manifest, or ``None`` (intact, or no manifest yet)."""
        path = self._manifest_path(step)
        if not path.exists():
            return None
        want = json.loads(path.read_text())
        have = _fingerprint(self.directory / str(step))
        for name, (size, crc) in want.items():
            if name not in have:
                return f"{name} is missing"
            if have[name][0] != size:
                return f"{name} has {have[name][0]} bytes, not {size}"
            if have[name][1] != crc:
                return f"{name} has changed (checksum mismatch)"
        return None

    def _read(self, step: int, target) -> tuple[Any, str | None]:
        """``(saved, None)``, or ``(None, why)`` when ``step``'s files are damaged or unreadable."""
        reason = self._damage(step)
        if reason is not None:
            return None, reason
        args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target))
        try:
            with _quiet_event_loops():
                return self.manager.restore(step, args=args)["state"], None
        except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
            _ignore_unawaited_reads()
            return None, _first_line(err)

    def restore_latest(self, template) -> tuple[Any, int] | None:
        """The newest checkpoint that restores into ``template``'s shapes, dtypes and shardings.

        Returns ``(state, step)``, or ``None`` when there is no checkpoint at all. An unreadable
        checkpoint is skipped with a warning; if every one is unreadable, ``CheckpointError``.
        """
        steps = self.steps()
        if not steps:
            return None
        target = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, _saveable(template))
        _filter_leftover_read_reports()  # before a damaged checkpoint's reads can race the message below
        damaged = []
        for step in reversed(steps):
            saved, reason = self._read(step, target)
            if reason is not None:
                log.warning("checkpoint at step %d in %s cannot be restored (%s); trying the previous one",
                            step, self.directory, reason)
                damaged.append(step)
                continue
            for bad in damaged:  # training will reach these steps again and save them afresh
                self.manager.delete(bad)
            return _restored(saved, template), step
        raise CheckpointError(f"none of the checkpoints in {self.directory} (steps {', '.join(map(str, steps))}) "
                              f"can be restored: delete that folder to start afresh")

    def restore(self, step: int, template) -> Any:
        """The checkpoint of ``step``, restored into ``template``'s shapes: ``CheckpointError`` (one
        line, naming the steps there are) when there is none or it cannot be read."""
        steps = self.steps()
        if step not in steps:
            have = ", ".join(map(str, steps)) or "none"
            raise CheckpointError(f"no checkpoint of step {step} in {self.directory} (steps: {have}): give one of "
                                  f"those steps")
        target = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, _saveable(template))
        _filter_leftover_read_reports()
        saved, reason = self._read(step, target)
        if reason is not None:
            raise CheckpointError(f"the checkpoint of step {step} in {self.directory} cannot be restored ({reason})")
        return _restored(saved, template)

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self._write_manifests()
        self.manager.close()


def _fingerprint(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            crc = 0
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    crc = zlib.crc32(chunk, crc)
            out[str(path.relative_to(folder))] = (path.stat().st_size, crc)
    return out


def _ignore_unawaited_reads() -> None:
    """After orbax failed to read a damaged checkpoint, the reads that never ran are coroutines
    collected unawaited, each warned about ("coroutine ... was never awaited") at exit at the latest;
    the failure is already reported in one line. From then on this process ignores that warning."""
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)


_POLICY_LOCK = threading.Lock()


@contextlib.contextmanager
def _quiet_event_loops():
    """Event loops created inside (orbax runs each restore on a fresh one) drop asyncio's "Future
    exception was never retrieved" reports: when one read of a damaged checkpoint fails, its sibling
    futures and tasks fail too and, once garbage-collected, would each log that with a traceback, at
    any later moment. The restore's own exception still propagates and is reported in one line;
    every other report of those loops goes to asyncio's default handler. (When the caller already
    runs an event loop, orbax may use uvloop's, which this does not reach: the reports then show.)"""
    import asyncio

    def handler(loop, context):
        # "Future ...", "Task ...", "_GatheringFuture exception was never retrieved": the class's name
        if not str(context.get("message", "")).endswith(" exception was never retrieved"):
            loop.default_exception_handler(context)

    # Python 3.14 deprecates the public getter in favour of a private one: use that where it exists.
    policy = getattr(asyncio.events, "_get_event_loop_policy", asyncio.get_event_loop_policy)()
    with _POLICY_LOCK:  # one restore at a time patches the policy, and puts back what it found
        own = vars(policy).get("new_event_loop")  # an instance attribute someone set, if any
        make_loop = policy.new_event_loop

        def new_event_loop():
            loop = make_loop()
            loop.set_exception_handler(handler)
            return loop

        policy.new_event_loop = new_event_loop
        try:
            yield
        finally:
            if own is None:
                del policy.new_event_loop  # the class's method again
            else:
                policy.new_event_loop = own


def _filter_leftover_read_reports() -> None:
    """Filters for what a failed restore's leftover reads report, sometimes while the main thread is
    still receiving the restore's exception; so they are installed before any restore is tried.
    A tensorstore read finishing after orbax closed its event loop fails to schedule its callback
    ("Event loop is closed") on tensorstore's own thread, which reports it as an unraisable exception
    (a bare traceback on stderr; dropped from ``sys.unraisablehook`` and ``sys.excepthook`` alike);
    and orbax's unfinished read coroutines, finalized with their errors, report those as unraisable
    ("Exception ignored in: <coroutine ...>"; dropped when the coroutine's code is orbax's). Every
    other error still prints."""
    if not getattr(sys.excepthook, "_graphduo_filter", False):
        previous = sys.excepthook

        def hook(exc_type, exc, tb):
            if not _is_closed_loop_error(exc_type, exc):
                previous(exc_type, exc, tb)

        hook._graphduo_filter = True
        sys.excepthook = hook
    if not getattr(sys.unraisablehook, "_graphduo_filter", False):
        previous_unraisable = sys.unraisablehook

        def unraisable_hook(unraisable):
            if not (_is_closed_loop_error(unraisable.exc_type, unraisable.exc_value)
                    or _is_orbax_coroutine(unraisable.object)):
                previous_unraisable(unraisable)

        unraisable_hook._graphduo_filter = True
        sys.unraisablehook = unraisable_hook


def _is_orbax_coroutine(obj) -> bool:
    """A coroutine of orbax's (a sibling read of a failed restore, finalized with its error)."""
    code = getattr(obj, "cr_code", None)
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _is_closed_loop_error(exc_type, exc) -> bool:
    return exc_type is not None and issubclass(exc_type, RuntimeError) and str(exc) == "Event loop is closed"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
