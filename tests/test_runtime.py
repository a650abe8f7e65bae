"""graphduo.runtime: the entry points' process settings. XLA:CPU's convolution library, added to
XLA_FLAGS only when it can take effect and only for the jaxlib releases it was checked in; the host
memory policy, applied only when the user has not chosen one."""

import os
import subprocess
import sys
import textwrap

import pytest

from graphduo import cli, runtime

CHECKED = "0.10.2"  # a jaxlib release the flag was checked in


@pytest.fixture
def fresh(monkeypatch):
    """Pretend JAX has not started yet (in this test process it has)."""
    monkeypatch.setattr(runtime, "_backend_started", lambda: False)


def test_eigen_is_added_to_xla_flags(fresh):
    flags, note = runtime.cpu_convolution_flags("eigen", "--xla_cpu_enable_fast_math=false", jaxlib=CHECKED)
    assert note == "XLA:CPU convolutions: Eigen"
    assert flags == f"--xla_cpu_enable_fast_math=false {runtime.EIGEN_FLAG}"
    assert runtime.cpu_convolution_flags("eigen", flags, jaxlib=CHECKED) == (flags, note)  # idempotent
    assert runtime.cpu_convolution_flags("eigen", "", jaxlib=CHECKED)[0] == runtime.EIGEN_FLAG


def test_users_own_choice_wins(fresh):
    mine = "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution"
    flags, note = runtime.cpu_convolution_flags("eigen", mine, jaxlib=CHECKED)
    assert flags == mine and "as XLA_FLAGS sets them" in note


def test_xla_choice_changes_nothing(fresh):
    flags, note = runtime.cpu_convolution_flags("xla", "--xla_cpu_enable_fast_math=false")
    assert flags == "--xla_cpu_enable_fast_math=false" and "default" in note


def test_too_late_is_reported_not_applied(monkeypatch):
    monkeypatch.setattr(runtime, "_backend_started", lambda: True)
    flags, note = runtime.cpu_convolution_flags("eigen", "", jaxlib=CHECKED)
    assert flags == "" and "before any JAX computation" in note


@pytest.mark.parametrize("version", ["0.10.1", "0.12.1", "0.13.0", "1.0.0"])
def test_a_jaxlib_the_flag_was_not_checked_in_gets_a_note_not_the_flag(fresh, version):
    """An unknown name in XLA_FLAGS aborts the process: a jaxlib outside the checked releases gets
    nothing added, and one line saying so."""
    flags, note = runtime.cpu_convolution_flags("eigen", "", jaxlib=version)
    assert flags == "" and f"skipped: its flag was not checked in jaxlib {version}" in note
    assert "\n" not in note


@pytest.mark.parametrize("version,known", [("0.10.2", True), ("0.11.2", True), ("0.12.0.1", True),
                                           ("0.10.1", False), ("0.12.1", False), ("0.11.0rc1", True)])
def test_known_flags_are_decided_from_the_version(version, known):
    assert runtime.jaxlib_knows("xla_cpu_experimental_ynn_fusion_type", version) is known
    assert not runtime.jaxlib_knows("xla_cpu_no_such_flag_graphduo", version)


def test_the_installed_jaxlib_is_one_the_flag_was_checked_in():
    """The suite runs at both ends of pyproject's range (Python 3.11 with constraints.txt, 3.12 with
    constraints-py312.txt): each end must be a release KNOWN_FLAGS lists."""
    assert runtime.jaxlib_knows("xla_cpu_experimental_ynn_fusion_type"), runtime.jaxlib_version()


def test_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match="choose one of eigen, xla"):
        runtime.cpu_convolution_flags("mkl", "")


def test_apply_process_settings_sets_xla_flags_and_records_what_it_did(fresh, monkeypatch):
    monkeypatch.setattr(runtime, "_host_memory_applied", None)  # as in a fresh process
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    settings = cli.apply_process_settings("eigen", "system")
    assert os.environ["XLA_FLAGS"] == settings.xla_flags
    record = settings.record()
    assert record["cpu_convolutions"] == "eigen" and record["host_memory"] == "system"
    assert record["notes"][1] == "host memory: the C library's default" and len(record["notes"]) == 2


PROBE = textwrap.dedent("""
    import os, sys
    from graphduo import runtime
    os.environ["XLA_FLAGS"], note = runtime.cpu_convolution_flags(sys.argv[1])
    print(note, file=sys.stderr)
    import jax, jax.numpy as jnp
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hlo = jax.jit(conv).lower(jnp.ones((16, 14, 14, 32)), jnp.ones((3, 3, 32, 64))).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    print("library" if "ynn_fusion" in entry else "eigen")
""")


@pytest.mark.parametrize("choice,expected", [("eigen", "eigen"), ("xla", "library")])
def test_choice_reaches_the_compiled_convolution(choice, expected):
    """In a fresh process (XLA reads its flags once): with ``eigen`` the compiled convolution is
    XLA's own; with ``xla`` the jaxlib hands it to YNNPACK (the negative control). A fact about the
    jaxlib releases in ``KNOWN_FLAGS`` (checked at both ends of the supported range)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", PROBE, choice], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected, out.stderr


# --- reuse_host_memory ------------------------------------------------------------------------


@pytest.fixture
def unset(monkeypatch):
    """Pretend no earlier call acted in this test process."""
    monkeypatch.setattr(runtime, "_host_memory_applied", None)


def test_host_memory_unknown_choice_names_the_choices():
    with pytest.raises(ValueError, match="choose one of system, reuse"):
        runtime.reuse_host_memory("jemalloc")


@pytest.mark.parametrize("environ", [{"MALLOC_MMAP_MAX_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"},
                                     {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_host_memory_users_own_allocator_settings_win(unset, environ):
    note = runtime.reuse_host_memory("reuse", environ)
    assert "as the environment sets it" in note
    assert runtime._host_memory_applied is None


@pytest.fixture
def fake_glibc(monkeypatch):
    """A glibc whose ``mallopt`` records its calls and refuses the parameters in ``refuse``."""
    fake = type("FakeLibc", (), {"calls": [], "refuse": ()})()

    def mallopt(param, value):
        fake.calls.append((param, value))
        return 0 if param in fake.refuse else 1

    fake.mallopt = mallopt
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.35"))
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: fake)
    return fake


def test_host_memory_other_malloc_settings_do_not_stop_it(unset, fake_glibc):
    """``MALLOC_ARENA_MAX`` (which RESULTS.md suggests for steps with blocks over 64 MiB) or an
    unrelated tunable is not a choice about these settings: graphduo's still apply."""
    note = runtime.reuse_host_memory("reuse", {"MALLOC_ARENA_MAX": "1", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"})
    assert "kept for reuse" in note
    assert fake_glibc.calls == [(runtime._M_MMAP_MAX, 0), (runtime._M_TRIM_THRESHOLD, 1 << 30),
                                (runtime._M_TOP_PAD, 64 << 20)]


def test_host_memory_says_what_glibc_accepted(unset, fake_glibc):
    fake_glibc.refuse = (runtime._M_TOP_PAD,)
    note = runtime.reuse_host_memory("reuse", {})
    assert note == "host memory: partly kept for reuse (glibc accepted only: no mmap, no trim)"
    assert runtime._host_memory_applied == note  # what glibc accepted lasts: no second attempt


def test_host_memory_leaves_other_c_libraries_alone(unset, monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert "not glibc" in runtime.reuse_host_memory("reuse", {})
    assert runtime._host_memory_applied is None


def test_host_memory_system_changes_nothing(unset):
    assert runtime.reuse_host_memory("system", {}) == "host memory: the C library's default"
    assert runtime._host_memory_applied is None


RESIDENT = textwrap.dedent("""
    import ctypes, ctypes.util, importlib.util, mmap, sys, threading
    spec = importlib.util.spec_from_file_location("runtime", sys.argv[3])  # alone: no JAX, no thread pools
    runtime = sys.modules["runtime"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runtime)
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if sys.argv[1] == "reuse-without-pad":  # reuse's other two settings, without its top pad
        assert libc.mallopt(runtime._M_MMAP_MAX, 0) == 1 and libc.mallopt(runtime._M_TRIM_THRESHOLD, 1 << 30) == 1
    else:
        print(runtime.reuse_host_memory(sys.argv[1]), file=sys.stderr)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size, page, result = 40 << 20, mmap.PAGESIZE, []

    def resident(p):
        start = p // page * page
        length = p + size - start
        vec = ctypes.create_string_buffer((length + page - 1) // page)
        assert libc.mincore(start, length, vec) == 0, ctypes.get_errno()
        return sum(b & 1 for b in vec.raw) / len(vec.raw)

    def step():
        kept = libc.malloc(size)  # state that lives on
        libc.memset(kept, 1, size)
        scratch = libc.malloc(size)  # a step's scratch memory: filled, then freed
        libc.memset(scratch, 1, size)
        libc.free(scratch)
        again = libc.malloc(size)  # the next step's, not yet touched: how much is mapped already?
        result.append(resident(again))
        libc.free(again)
        libc.free(kept)

    if sys.argv[2] == "thread":  # where XLA:CPU allocates a step's scratch memory
        worker = threading.Thread(target=step)
        worker.start()
        worker.join()
    else:
        step()
    print(result[0])
""")


@pytest.mark.skipif(runtime.platform.libc_ver()[0] != "glibc" or sys.maxsize <= 2**32,
                    reason="the policy is 64-bit glibc's malloc (32-bit thread heaps are 1 MiB)")
@pytest.mark.parametrize("choice,where", [("reuse", "main"), ("reuse", "thread"), ("system", "main"),
                                          ("system", "thread"), ("reuse-without-pad", "thread")])
def test_host_memory_reuse_serves_pages_already_mapped(choice, where):
    """In a fresh process, on the main thread or a worker thread: keep one 40 MiB block, fill and free
    a second, then ask for a third (what XLA:CPU does with a step's scratch memory, step after
    step). With ``reuse`` the third is memory already mapped (resident before it is touched: no page
    faults to come). Negative controls: with ``system`` glibc serves it with fresh ``mmap`` pages,
    none resident until touched; on a worker thread, ``reuse`` without its top pad is not enough:
    the thread's arena unmaps the second 64 MiB heap the freed block had emptied."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", RESIDENT, choice, where, runtime.__file__], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resident = float(out.stdout.strip())
    if choice == "reuse":  # the controls below: nothing of the new block mapped yet
        assert "kept for reuse" in out.stderr, out.stderr
        assert resident > 0.99, (resident, out.stderr)
    else:
        assert resident < 0.01, (resident, out.stderr)
