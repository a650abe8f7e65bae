"""Checks on the paths a command will write, made before it computes anything.

A run that fails on its output path after minutes of work, or after writing half its files, is
the worst way to learn of a typo: these checks fail at once, with one line naming the flag, the
path, the problem and the fix.
"""

from __future__ import annotations

import os
import pathlib
import tempfile


def output_folder(path: str | os.PathLike, what: str, *, create: bool) -> pathlib.Path:
    """``path`` as a folder that this process can write into; ``ValueError`` (one line) if not.

    With ``create`` the folder is made (with its parents) and written to by a probe file that is
    removed again. Without it nothing is made: the nearest existing ancestor must be a folder this
    process can write into, so that the folder can be made later, when there is something to put
    in it. ``what`` names the setting in the message (``"--out"``, ``"--run-dir"``).
    """
    folder = pathlib.Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {folder} is a file, not a folder: give a folder path")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what} {folder}: {existing} is a file, not a folder: give another path")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            existing = folder
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise ValueError(f"{what} {folder}: cannot write in {existing} ({reason}): give a writable path") from None
    return folder


def output_file(path: str | os.PathLike, what: str, example: str) -> pathlib.Path:
    """``path`` as a file this process can write later (its folder made then if missing);
    ``ValueError`` (one line) if it names a folder or its folder cannot be written. ``example`` is a
    file name for the message."""
    target = pathlib.Path(path)
    if target.is_dir():
        raise ValueError(f"{what} {target} is a folder: give a file path, such as {target / example}")
    output_folder(target.parent, f"{what}'s folder", create=False)
    return target
