"""Process settings for a CPU, applied by entry points only: the CLI, the experiment scripts, the
test suite's ``conftest.py``, or a program using graphduo as a library, first thing.

Importing this module changes nothing (``tests/test_portable.py`` checks every graphduo module).
The settings change how fast a step runs on a CPU, never what it computes; no model reads them.
Two of them, each recorded with the results it produced (``ProcessSettings.record``):

* ``cpu_convolutions``: the library behind the convolutions XLA:CPU compiles. ``xla`` leaves this
  jaxlib's choice (YNNPACK in the jaxlibs graphduo supports); ``eigen`` asks for XLA's Eigen
  convolutions through an ``XLA_FLAGS`` entry, read once when JAX's backend starts. It touches
  nothing on a GPU or TPU, whose convolutions are their own libraries'.
* ``host_memory``: ``system`` leaves glibc's ``malloc`` as it comes; ``reuse`` keeps freed host
  memory mapped for the next step (``mallopt``). XLA:CPU takes each compiled step's scratch memory
  from ``malloc`` and frees it when the step ends; glibc hands large freed blocks back to the
  system and maps fresh pages for the next step, each page zeroed by the kernel on first touch.
  ``reuse`` acts at once and lasts for the life of the process.

Which default each has, and why, is measured on both ends of the supported JAX range by
``experiments/cnn_step.py`` (experiments/RESULTS.md): the defaults below follow that record.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import re
import threading
from importlib import metadata

CPU_CONVOLUTIONS = ("eigen", "xla")
"""``eigen``: XLA:CPU's Eigen convolutions; ``xla``: whatever this jaxlib picks."""
HOST_MEMORY = ("system", "reuse")
"""``system``: the C library's own policy; ``reuse``: freed host memory kept for the next step."""
DEFAULT_CPU_CONVOLUTIONS = "eigen"
DEFAULT_HOST_MEMORY = "reuse"

_YNN_TYPES = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_FLAG = f"--{_YNN_TYPES}=-individual_convolution"
"""Removes convolutions from the ops XLA:CPU gives to YNNPACK; they fall back to Eigen."""

# XLA flags graphduo may add, with the jaxlib releases each was checked in (tests/test_runtime.py
# compiles a convolution with and without it at both ends of pyproject's jax range). An unknown
# name in XLA_FLAGS aborts the process when the backend starts, so a flag is added only for the
# releases listed; any other jaxlib gets a one-line note instead.
KNOWN_FLAGS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    _YNN_TYPES: ((0, 10, 2), (0, 12, 0, 1)),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    """``"0.12.0.1"`` -> ``(0, 12, 0, 1)``; a suffix (``"0.11.0rc1"``) ends the release numbers."""
    match = re.match(r"\d+(?:\.\d+)*", text)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def jaxlib_version() -> str | None:
    """The installed jaxlib's version, read from its package metadata (JAX is not imported)."""
    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def jaxlib_knows(flag_name: str, version: str | None = None) -> bool:
    """Whether ``flag_name`` was checked in the jaxlib release ``version`` (default: the installed
    one): decided from the version and ``KNOWN_FLAGS``, never by reading the library."""
    version = jaxlib_version() if version is None else version
    if version is None or flag_name not in KNOWN_FLAGS:
        return False
    low, high = KNOWN_FLAGS[flag_name]
    v = _version_tuple(version)
    return low <= v and v[:len(high)] <= high


def _backend_started() -> bool:
    import sys

    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def cpu_convolution_flags(choice: str = DEFAULT_CPU_CONVOLUTIONS, flags: str | None = None, *,
                          jaxlib: str | None = None) -> tuple[str, str]:
    """``(XLA_FLAGS value, one-line note)`` that picks the library behind XLA:CPU's convolutions.

    ``flags`` defaults to the current ``XLA_FLAGS``. The value only ever adds to them, and only when
    the addition can take effect: JAX's backend has not started, the user's flags say nothing about
    YNNPACK fusions (theirs win), and this jaxlib (``jaxlib``: its version, default the installed
    one) is one the flag was checked in. ``choice="xla"`` changes nothing. Pure: putting the value
    into the environment is the caller's (an entry point's) job.
    """
    if choice not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution choice {choice!r}: choose one of {', '.join(CPU_CONVOLUTIONS)}")
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    if choice == "xla":
        return flags, "XLA:CPU convolutions: this jaxlib's default"
    if EIGEN_FLAG in flags:
        return flags, "XLA:CPU convolutions: Eigen"
    if _YNN_TYPES in flags:
        return flags, f"XLA:CPU convolutions: as XLA_FLAGS sets them ({flags.strip()})"
    version = jaxlib_version() if jaxlib is None else jaxlib
    if not jaxlib_knows(_YNN_TYPES, version):
        return flags, (f"XLA:CPU convolutions: this jaxlib's default (--cpu-convolutions eigen skipped: its flag "
                       f"was not checked in jaxlib {version})")
    if _backend_started():
        return flags, ("XLA:CPU convolutions: this jaxlib's default (JAX had already started; set XLA_FLAGS "
                       "before any JAX computation)")
    return f"{flags} {EIGEN_FLAG}".strip(), "XLA:CPU convolutions: Eigen"


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
_KEEP_FREED = 1 << 30  # bytes of freed heap top glibc may keep instead of returning them
_HEAP_PAD = 64 << 20  # a thread arena's heap size: with this pad glibc never unmaps an emptied one
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
             "glibc.malloc.top_pad")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")  # in LD_PRELOAD: another allocator
_host_memory_lock = threading.Lock()
_host_memory_applied: str | None = None  # the note of the call that acted: mallopt lasts for the process


def reuse_host_memory(choice: str = "reuse", environ: dict[str, str] | None = None) -> str:
    """Keep freed host memory for reuse (``choice="reuse"``) and return a one-line note.

    On glibc: ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap instead of fresh
    ``mmap`` pages, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` keeps freed memory instead of handing it
    back, and ``mallopt(M_TOP_PAD, 64 MiB)`` stops a worker thread's arena from unmapping each of
    its 64 MiB heaps as soon as it empties (XLA:CPU allocates a step's scratch memory on its worker
    threads), so a step's scratch buffers land on pages already mapped. The pad makes glibc grow a
    heap 64 MiB at a time: address space committed up front, pages resident only once touched.
    The price: the process holds on to its peak host memory.

    It changes where memory comes from, never what is computed. Nothing happens with
    ``choice="system"``, on another C library, or when the environment already sets one of these
    (``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``
    or their ``GLIBC_TUNABLES=glibc.malloc.*`` forms) or preloads another allocator (``LD_PRELOAD``):
    the user's choice wins. ``environ`` defaults to ``os.environ``. Process-wide, immediate, and for
    the life of the process: a later call only returns the note of the first that acted.
    """
    global _host_memory_applied
    if choice not in HOST_MEMORY:
        raise ValueError(f"unknown host memory choice {choice!r}: choose one of {', '.join(HOST_MEMORY)}")
    environ = os.environ if environ is None else environ
    preload = os.path.basename(environ.get("LD_PRELOAD", "")).lower()
    user_set = (any(environ.get(k) for k in _MALLOC_ENV) or any(t in environ.get("GLIBC_TUNABLES", "") for t in _TUNABLES)
                or any(a in preload for a in _ALLOCATORS))
    with _host_memory_lock:
        if _host_memory_applied is not None:
            return _host_memory_applied
        if user_set:
            return "host memory: as the environment sets it (MALLOC_*, GLIBC_TUNABLES or an LD_PRELOAD allocator)"
        if choice == "system":
            return "host memory: the C library's default"
        if platform.libc_ver()[0] != "glibc":
            return "host memory: the C library's default (not glibc, which is what graphduo knows how to tune)"
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        settings = {"no mmap": (_M_MMAP_MAX, 0), "no trim": (_M_TRIM_THRESHOLD, _KEEP_FREED),
                    "64 MiB top pad": (_M_TOP_PAD, _HEAP_PAD)}
        applied = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) == 1]
        if len(applied) == len(settings):
            note = f"host memory: freed buffers kept for reuse (glibc malloc: {', '.join(applied)})"
        elif applied:
            note = f"host memory: partly kept for reuse (glibc accepted only: {', '.join(applied)})"
        else:
            return "host memory: the C library's default (glibc refused mallopt)"
        _host_memory_applied = note
        return note


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """What an entry point set for its process, to be recorded with whatever it measures."""

    cpu_convolutions: str
    host_memory: str
    xla_flags: str
    notes: tuple[str, ...]

    def record(self) -> dict[str, object]:
        return {"cpu_convolutions": self.cpu_convolutions, "host_memory": self.host_memory,
                "xla_flags": self.xla_flags, "notes": list(self.notes)}
