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

import logging
import pathlib
from typing import Any

import jax

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No checkpoint in the run directory can be restored. ``str(err)`` is one line."""


def _saveable(state):
    """Typed PRNG keys are not plain arrays: store their raw bits, rebuild them on restore."""
    return state._replace(rng=jax.random.key_data(state.rng))


def _restored(saved, template):
    impl = jax.random.key_impl(template.rng)
    return saved._replace(rng=jax.random.wrap_key_data(saved.rng, impl=impl))


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
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        """Start saving ``state`` as ``step`` (device-to-host copy now, file writes in the background)."""
        args = self._ocp.args.Composite(state=self._ocp.args.StandardSave(_saveable(state)))
        self.manager.save(step, args=args, force=True)

    def restore_latest(self, template) -> tuple[Any, int] | None:
        """The newest checkpoint that restores into ``template``'s shapes, dtypes and shardings.

        Returns ``(state, step)``, or ``None`` when there is no checkpoint at all. An unreadable
        checkpoint is skipped with a warning; if every one is unreadable, ``CheckpointError``.
        """
        steps = self.steps()
        if not steps:
            return None
        target = jax.tree.map(self._ocp.utils.to_shape_dtype_struct, _saveable(template))
        damaged = []
        for step in reversed(steps):
            args = self._ocp.args.Composite(state=self._ocp.args.StandardRestore(target))
            try:
                saved = self.manager.restore(step, args=args)["state"]
            except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
                log.warning("checkpoint at step %d in %s cannot be restored (%s); trying the previous one",
                            step, self.directory, _first_line(err))
                damaged.append(step)
                continue
            for bad in damaged:  # training will reach these steps again and save them afresh
                self.manager.delete(bad)
            return _restored(saved, template), step
        raise CheckpointError(f"none of the checkpoints in {self.directory} (steps {', '.join(map(str, steps))}) "
                              f"can be restored: delete that folder to start afresh")

    def wait(self) -> None:
        """Block until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__
