"""Process-wide settings for the CPU. Entry points apply them, libraries don't.

Three settings live here. First, which kernels run the models' convolutions. By default
(``use_cpu_convolutions("onednn")``) graphduo's models call oneDNN's convolutions through JAX's FFI
(``graphduo.onednn``): the default CNN's traced step at batch 256 61 -> 42 ms against XLA's best
(experiments/RESULTS.md, "The CNN step"; convolutions under 100 MFLOP stay XLA's, where oneDNN's
per-call cost outweighs its speed). The choice is read when a model is traced, so it covers
eager ops and compiled steps alike, and the eager-vs-traced comparison stays like for like.

Second, which library runs the convolutions XLA:CPU compiles itself (those of ``--cpu-convolutions
eigen|xla``, Flax's ``nn.Conv``). jaxlib 0.10 hands them to YNNPACK by default; XLA's older Eigen
path runs the CNN's convolutions 2-3x faster on the CPU measured, their weight gradients most
(with graphduo's formulation the default CNN's traced step at batch 256 took 87 ms on Eigen, 196 ms
on YNNPACK). The choice is an ``XLA_FLAGS`` entry, read once when the backend starts.

``apply_cpu_settings`` applies the first and third and returns the ``XLA_FLAGS`` value of the
second for the caller to set, before any JAX computation: ``graphduo
train|compare|inspect`` (``--cpu-convolutions``, ``--host-memory``), the experiment scripts, the
test suite's ``conftest.py``, and a program using graphduo as a library, first thing (README, "As
a library"). ``cpu_convolution_flags`` only computes the ``XLA_FLAGS`` value.

Third, whether freed host memory is kept for reuse (``reuse_host_memory``). XLA:CPU takes each
compiled step's scratch memory from ``malloc`` (on a worker thread) and frees it when the step ends.
glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh ``mmap`` pages, every call,
trims a heap's freed top back to the system, and unmaps a thread arena's heap once it empties, so a
large step touches tens of MiB of new pages every time:
the default CNN's traced step at batch 256 took ~15,600 page faults and ~30 ms of kernel time per
step (87 ms in all; 63 ms once freed memory was reused, ``experiments/cnn_step.py``). PyTorch's CPU
tensors come from the same ``malloc``, and its CNN step paid the same in a process shared with JAX
(98 ms against 45 ms in a probe).
``reuse_host_memory("reuse")`` tells glibc to serve every size from its heap and keep what is freed,
as a caching allocator does; the price is that the process holds on to its peak host memory. It
acts at once (``mallopt``); the same entry points call it, with ``--host-memory``, before the work
starts, and a library user calls ``graphduo.runtime.reuse_host_memory("reuse")`` the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import pathlib
import platform
import threading

CPU_CONVOLUTIONS = ("onednn", "eigen", "xla")
"""``onednn``: graphduo's models run their convolutions on oneDNN through JAX's FFI
(``graphduo.onednn``; graphduo's default), and whatever convolution XLA still compiles on Eigen;
``eigen``: XLA's Eigen convolutions; ``xla``: whatever this jaxlib picks."""

_YNN_TYPES = "xla_cpu_experimental_ynn_fusion_type"
EIGEN_FLAG = f"--{_YNN_TYPES}=-individual_convolution"
"""Removes convolutions from the ops XLA:CPU gives to YNNPACK; they fall back to Eigen."""


@functools.cache
def _jaxlib_knows(flag_name: str) -> bool:
    """Whether this jaxlib's XLA registers ``flag_name``. An unknown name in ``XLA_FLAGS`` aborts
    the process when the backend starts, so a flag is only ever added once its name is found in
    the library that parses it."""
    import jaxlib

    for lib in sorted(pathlib.Path(jaxlib.__file__).parent.glob("*.so"), key=lambda p: -p.stat().st_size):
        if lib.stat().st_size < (1 << 20):
            continue
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(flag_name.encode()) >= 0:
                return True
    return False


def _backend_started() -> bool:
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def cpu_convolution_flags(choice: str = "onednn", flags: str | None = None) -> tuple[str, str]:
    """``(XLA_FLAGS value, one-line account)`` that picks the library behind XLA:CPU's convolutions.

    ``flags`` defaults to the current ``XLA_FLAGS``. The value only ever adds to them, and only when
    the addition can take effect: JAX's backend has not started, the user's flags say nothing about
    YNNPACK fusions (theirs win), and this jaxlib knows the flag. ``choice="xla"`` changes nothing;
    ``"onednn"`` sets what ``"eigen"`` sets (for any convolution left to XLA).
    Pure: putting the value into the environment is the caller's (an entry point's) job.
    """
    if choice not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution choice {choice!r}: choose one of {', '.join(CPU_CONVOLUTIONS)}")
    flags = os.environ.get("XLA_FLAGS", "") if flags is None else flags
    if choice == "xla":
        return flags, "XLA:CPU convolutions: this jaxlib's default"
    choice = "eigen"
    if _YNN_TYPES in flags and EIGEN_FLAG not in flags:
        return flags, f"XLA:CPU convolutions: as XLA_FLAGS sets them ({flags.strip()})"
    if EIGEN_FLAG in flags:
        return flags, "XLA:CPU convolutions: Eigen"
    if not _jaxlib_knows(_YNN_TYPES):
        return flags, "XLA:CPU convolutions: this jaxlib's default (it has no YNNPACK choice to change)"
    if _backend_started():
        return flags, ("XLA:CPU convolutions: this jaxlib's default (JAX had already started; set XLA_FLAGS "
                       "before any JAX computation)")
    return f"{flags} {EIGEN_FLAG}".strip(), "XLA:CPU convolutions: Eigen"


_onednn_convolutions = False
_convolution_note = "convolutions: XLA's"


def use_cpu_convolutions(choice: str = "onednn") -> str:
    """Which kernels graphduo's models run their convolutions on, process-wide; a one-line account.

    ``"onednn"``: oneDNN, through the FFI calls of ``graphduo.onednn``, for float32 convolutions on
    the CPU backend (on another backend, or in another dtype, models keep ``lax`` convolutions).
    When oneDNN cannot be loaded here (no ``onednn-cpu-gomp`` package, no GNU OpenMP runtime, not
    Linux x86-64) the models keep XLA's convolutions and the account says why. ``"eigen"`` and
    ``"xla"``: XLA's convolutions (which library runs them is ``cpu_convolution_flags``' business).
    Read when a model is traced: call it before building steps. Entry points call it (the CLI's
    ``--cpu-convolutions``, the experiment scripts, the test suite); a library never does.
    """
    global _onednn_convolutions, _convolution_note
    if choice not in CPU_CONVOLUTIONS:
        raise ValueError(f"unknown CPU convolution choice {choice!r}: choose one of {', '.join(CPU_CONVOLUTIONS)}")
    if choice == "onednn":
        from graphduo import onednn

        reason = onednn.available()
        _onednn_convolutions = reason is None
        _convolution_note = ("convolutions: oneDNN (graphduo's FFI calls)" if reason is None
                             else f"convolutions: XLA's (oneDNN unavailable: {reason})")
    else:
        _onednn_convolutions = False
        _convolution_note = "convolutions: XLA's"
    return _convolution_note


_tracing = threading.local()  # xla_convolutions(): per thread, so another thread's tracing is untouched


def onednn_convolutions() -> bool:
    """Whether graphduo's models run their CPU convolutions on oneDNN (``use_cpu_convolutions``),
    here and now (not inside ``xla_convolutions``)."""
    return _onednn_convolutions and not getattr(_tracing, "xla_only", False)


@contextlib.contextmanager
def xla_convolutions():
    """Within, in this thread: models trace their convolutions as XLA's, whatever was chosen. For
    what XLA must see whole: its cost analysis counts nothing inside a custom call, and its
    partitioner cannot split one across devices."""
    before = getattr(_tracing, "xla_only", False)
    _tracing.xla_only = True
    try:
        yield
    finally:
        _tracing.xla_only = before


def convolution_note() -> str:
    """What the last ``use_cpu_convolutions`` call chose in this process (for result files)."""
    return _convolution_note


def apply_cpu_settings(convolutions: str = "onednn", host_memory: str = "reuse") -> tuple[str, list[str]]:
    """An entry point's first call: the models' convolution kernels and the host memory policy,
    applied now; and the ``XLA_FLAGS`` value for ``convolutions``, returned for the entry point to
    put in its environment before JAX's backend starts (``os.environ["XLA_FLAGS"], notes =
    apply_cpu_settings()``: XLA's flags are set by entry points, never by a library module).
    ``notes``: the three one-line accounts."""
    flags, flags_note = cpu_convolution_flags(convolutions)
    return flags, [flags_note, use_cpu_convolutions(convolutions), reuse_host_memory(host_memory)]


HOST_MEMORY = ("reuse", "system")
"""``reuse``: freed host memory kept for the next step (graphduo's default); ``system``: the C
library's own policy."""

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4  # glibc's mallopt parameters (malloc.h)
_KEEP_FREED = 1 << 30  # bytes of freed heap top glibc may keep instead of returning them
_HEAP_PAD = 64 << 20  # a thread arena's heap size: with this pad glibc never unmaps an emptied one
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold",
             "glibc.malloc.top_pad")
_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")  # in LD_PRELOAD: another allocator
_host_memory_note = "host memory: the C library's default"
_host_memory_set = False
_host_memory_lock = threading.Lock()


def reuse_host_memory(choice: str = "reuse", environ: dict[str, str] | None = None) -> str:
    """Keep freed host memory for reuse (``choice="reuse"``) and return a one-line account.

    On glibc: ``mallopt(M_MMAP_MAX, 0)`` serves large blocks from the heap instead of fresh
    ``mmap`` pages, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)`` keeps freed memory instead of handing it
    back, and ``mallopt(M_TOP_PAD, 64 MiB)`` stops a worker thread's arena from unmapping each of
    its 64 MiB heaps as soon as it empties (XLA:CPU allocates a step's scratch memory on its worker
    threads), so a step's scratch buffers land on pages already mapped (see the module docstring
    for what that saves). The pad makes glibc grow a heap 64 MiB at a time: address space committed
    up front (it counts under ``vm.overcommit_memory=2``), pages resident only once touched.

    Side effects, besides holding on to the peak: a large ``calloc`` (``np.zeros``) served from
    reused memory is zeroed by ``memset`` instead of arriving as fresh zero pages, a large
    ``realloc`` copies instead of remapping, and freed blocks in the middle of the heap stay
    resident.

    What it cannot cover: a single block over 64 MiB asked for on a worker thread (the CNN's scratch
    memory from batch ~512 up), which glibc maps directly whatever ``M_MMAP_MAX`` says. One arena
    for all threads (``MALLOC_ARENA_MAX=1`` in the environment; graphduo's settings still apply)
    covers that too, at the price of one lock for every thread's allocations: the CNN step at batch
    512 ran 138 -> 114 ms with it, at batch 256 53 -> 56-70 ms, so graphduo does not set it.

    It changes where memory comes from, never what is computed. Nothing happens with
    ``choice="system"``, on another C library, or when the environment already sets one of these
    (``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``
    or their ``GLIBC_TUNABLES=glibc.malloc.*`` forms) or preloads another allocator (``LD_PRELOAD``):
    the user's choice wins. ``environ`` defaults to ``os.environ``.

    Process-wide, immediate, and for the life of the process (a later call only returns the account
    of the first that acted). Entry points call it (the CLI's ``--host-memory``, the experiment
    scripts, the test suite); a library never does.
    """
    global _host_memory_note, _host_memory_set
    if choice not in HOST_MEMORY:
        raise ValueError(f"unknown host memory choice {choice!r}: choose one of {', '.join(HOST_MEMORY)}")
    environ = os.environ if environ is None else environ
    preload = os.path.basename(environ.get("LD_PRELOAD", "")).lower()
    user_set = (any(environ.get(k) for k in _MALLOC_ENV) or any(t in environ.get("GLIBC_TUNABLES", "") for t in _TUNABLES)
                or any(a in preload for a in _ALLOCATORS))
    with _host_memory_lock:
        if _host_memory_set:  # mallopt lasts for the life of the process
            return _host_memory_note
        if user_set:
            note = ("host memory: as the environment sets it (MALLOC_*, GLIBC_TUNABLES or an LD_PRELOAD "
                    "allocator)")
        elif choice == "system":
            note = "host memory: the C library's default"
        elif platform.libc_ver()[0] != "glibc":
            note = "host memory: the C library's default (not glibc, which is what graphduo knows how to tune)"
        else:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.mallopt.restype = ctypes.c_int
            settings = {"no mmap": (_M_MMAP_MAX, 0), "no trim": (_M_TRIM_THRESHOLD, _KEEP_FREED),
                        "64 MiB top pad": (_M_TOP_PAD, _HEAP_PAD)}
            applied = [name for name, (param, value) in settings.items() if libc.mallopt(param, value) == 1]
            _host_memory_set = bool(applied)
            if len(applied) == len(settings):
                note = f"host memory: freed buffers kept for reuse (glibc malloc: {', '.join(applied)})"
            elif applied:
                note = f"host memory: partly kept for reuse (glibc accepted only: {', '.join(applied)})"
            else:
                note = "host memory: the C library's default (glibc refused mallopt)"
        _host_memory_note = note
        return note


def host_memory_note() -> str:
    """What the last ``reuse_host_memory`` call did in this process (for result files)."""
    return _host_memory_note
