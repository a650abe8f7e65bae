"""oneDNN's convolutions inside XLA:CPU programs, through JAX's FFI and ``ctypes``: an experiment.

Why: oneDNN (the library behind PyTorch's CPU convolutions) ran the CNN's larger convolutions and
their gradients faster than XLA:CPU's own paths on the CPUs measured (experiments/RESULTS.md, "The
CNN step"); jaxlib carries oneDNN, but its XLA never hands convolutions to it. graphduo's models do
not use this module: they are portable JAX. ``experiments/cnn_step.py`` measures a CNN formulation
that calls ``conv_same``, and ``experiments/mlp_step.py`` one whose matmuls are oneDNN's GEMM through
``ffi_handler``. It needs the ``onednn`` extra (``pip install -c constraints.txt ".[onednn]"``: the
``onednn-cpu-gomp`` wheel, Linux x86-64 only); elsewhere ``available()`` says why it cannot load.

How: ``libdnnl`` from the ``onednn-cpu-gomp`` wheel (oneDNN 3.2, GNU OpenMP) is loaded with
``ctypes``; there is no compiled code here. For each convolution shape, oneDNN's primitives
(forward, backward data, backward weights, and the reorders of the kernel between the HWIO layout
and the blocked layout oneDNN picks) are built once and cached. Activations stay in the NHWC layout,
which oneDNN reads and writes directly. Three FFI targets (``graphduo_onednn_conv_*``) are
registered with XLA once per process; their handlers are ``ctypes`` callbacks that XLA calls with
its own buffers, so nothing is copied: oneDNN reads the operands where XLA keeps them and writes
into the output buffer XLA gives it. Every call runs on one dedicated thread of this module's,
whatever XLA worker asked for it: GNU OpenMP keeps a thread pool per calling thread, so calls from
XLA's many workers would each grow one; one call at a time (two at once would only share the same
cores); oneDNN itself runs with the GIL released.

The FFI side is XLA's C API (version 0.3) as hand-copied ``ctypes`` structs: a layout change in a
later jaxlib would corrupt memory rather than raise, which is one reason this lives in experiments/
and not in the library; ``tests/test_exp_onednn.py`` checks the calls against XLA's convolution at
each end of graphduo's jax range. XLA's partitioner knows no rule for these calls (under ``jit``
with shardings it would gather the batch and run each call in full on every device): the
experiments call them on one device.

What it computes is ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME")`` on NHWC/HWIO float32
arrays, with its gradients: the same sums in another order (``tests/test_exp_onednn.py`` bounds the
difference against XLA's convolution and against a float64 reference).
"""

from __future__ import annotations

import concurrent.futures
import ctypes as C
import functools
import os
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any

import jax

DISTRIBUTION = "onednn-cpu-gomp"
TARGETS = ("graphduo_onednn_conv_fwd", "graphduo_onednn_conv_bwd_data", "graphduo_onednn_conv_bwd_weights")

# oneDNN's C API constants (oneapi/dnnl/dnnl_types.h, v3).
_F32, _CPU, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, _FORMAT_ANY = 3, 1, 64, 1, 1
_Q_WEIGHTS, _Q_DIFF_WEIGHTS = 131, 132
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 1, 17, 33, 129, 145, 161
_MEMORY_ALLOCATE = C.c_void_p((1 << 64) - 1)  # DNNL_MEMORY_ALLOCATE: the library allocates
_STREAM_IN_ORDER = 1
_Dims = C.c_int64 * 12  # dnnl_dims_t

# XLA's FFI C API (jaxlib/include/xla/ffi/api/c_api.h, API version 0.3).
_FFI_API_VERSION = (0, 3)
_FFI_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
_FFI_METADATA_EXTENSION = 1  # XLA_FFI_Extension_Metadata
_FFI_F32 = 11  # XLA_FFI_DataType_F32
_FFI_INTERNAL = 13  # XLA_FFI_Error_Code_INTERNAL


class OneDNNUnavailable(RuntimeError):
    """libdnnl cannot be loaded or used here; ``str(err)`` says why in one line."""


class _ExtensionBase(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("type", C.c_int), ("next", C.c_void_p)]


class _ApiVersion(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("major", C.c_int),
                ("minor", C.c_int)]


class _Metadata(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("api_version", _ApiVersion), ("traits", C.c_uint32),
                ("state_type_id", C.c_int64)]


class _MetadataExtension(C.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", C.POINTER(_Metadata))]


class _Buffer(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("dtype", C.c_int),
                ("data", C.c_void_p), ("rank", C.c_int64), ("dims", C.POINTER(C.c_int64))]


class _Values(C.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have the same layout
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.c_void_p), ("values", C.POINTER(C.c_void_p))]


class _Attrs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("size", C.c_int64),
                ("types", C.c_void_p), ("names", C.c_void_p), ("attrs", C.c_void_p)]


class _CallFrame(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.POINTER(_ExtensionBase)),
                ("api", C.c_void_p), ("ctx", C.c_void_p), ("stage", C.c_int), ("args", _Values),
                ("rets", _Values), ("attrs", _Attrs), ("future", C.c_void_p)]


class _ErrorCreateArgs(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("message", C.c_char_p),
                ("errc", C.c_int)]


class _ApiHead(C.Structure):  # the first fields of XLA_FFI_Api
    _fields_ = [("struct_size", C.c_size_t), ("extension_start", C.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", C.c_void_p),
                ("error_create", C.CFUNCTYPE(C.c_void_p, C.POINTER(_ErrorCreateArgs)))]


_HANDLER = C.CFUNCTYPE(C.c_void_p, C.POINTER(_CallFrame))


def library_path() -> str:
    """Where the ``onednn-cpu-gomp`` wheel put ``libdnnl.so.3``; ``OneDNNUnavailable`` if it is not installed."""
    try:
        files = metadata.distribution(DISTRIBUTION).files or []
    except metadata.PackageNotFoundError:
        raise OneDNNUnavailable(f"the {DISTRIBUTION} package is not installed (from the repository root: "
                                f"pip install -c constraints.txt \".[onednn]\")") from None
    for f in files:
        if f.name == "libdnnl.so.3":
            return str(f.locate().resolve())
    raise OneDNNUnavailable(f"the {DISTRIBUTION} package has no libdnnl.so.3")


class _Dnnl:
    """libdnnl's C functions used here, with their argument types, and a CPU engine and stream."""

    def __init__(self, path: str):
        try:
            lib = C.CDLL(path)
        except OSError as err:
            raise OneDNNUnavailable(f"libdnnl does not load ({err})") from None
        V, I, P = C.c_void_p, C.c_int, C.POINTER(C.c_void_p)
        signatures = {
            "dnnl_engine_create": [P, I, C.c_size_t],
            "dnnl_stream_create": [P, V, C.c_uint],
            "dnnl_memory_desc_create_with_strides": [P, I, _Dims, I, _Dims],
            "dnnl_memory_desc_create_with_tag": [P, I, _Dims, I, I],
            "dnnl_convolution_forward_primitive_desc_create":
                [P, V, I, I, V, V, V, V, _Dims, _Dims, _Dims, _Dims, V],
            "dnnl_convolution_backward_data_primitive_desc_create":
                [P, V, I, V, V, V, _Dims, _Dims, _Dims, _Dims, V, V],
            "dnnl_convolution_backward_weights_primitive_desc_create":
                [P, V, I, V, V, V, V, _Dims, _Dims, _Dims, _Dims, V, V],
            "dnnl_reorder_primitive_desc_create": [P, V, V, V, V, V],
            "dnnl_primitive_create": [P, V],
            "dnnl_memory_create": [P, V, V, V],
            "dnnl_memory_set_data_handle": [V, V],
            "dnnl_primitive_execute": [V, V, I, V],
            "dnnl_stream_wait": [V],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, C.c_int
        lib.dnnl_primitive_desc_query_md.argtypes, lib.dnnl_primitive_desc_query_md.restype = [V, I, I], V
        self.lib = lib
        self.engine, self.stream = V(), V()
        self.check(lib.dnnl_engine_create(C.byref(self.engine), _CPU, 0), "creating a CPU engine")
        self.check(lib.dnnl_stream_create(C.byref(self.stream), self.engine, _STREAM_IN_ORDER), "creating a stream")

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise OneDNNUnavailable(f"oneDNN failed {what} (status {status})")

    def desc(self, dims, strides=None):
        """A float32 memory descriptor: ``strides`` given, or any layout oneDNN prefers."""
        md = C.c_void_p()
        if strides is None:
            status = self.lib.dnnl_memory_desc_create_with_tag(C.byref(md), len(dims), _Dims(*dims), _F32, _FORMAT_ANY)
        else:
            status = self.lib.dnnl_memory_desc_create_with_strides(C.byref(md), len(dims), _Dims(*dims), _F32,
                                                                   _Dims(*strides))
        self.check(status, "creating a memory descriptor")
        return md

    def query(self, pd, what: int):
        return C.c_void_p(self.lib.dnnl_primitive_desc_query_md(pd, what, 0))

    def primitive(self, pd):
        p = C.c_void_p()
        self.check(self.lib.dnnl_primitive_create(C.byref(p), pd), "creating a primitive")
        return p

    def memory(self, md, handle=None):
        m = C.c_void_p()
        self.check(self.lib.dnnl_memory_create(C.byref(m), md, self.engine, handle), "creating a memory object")
        return m

    def reorder(self, src_md, dst_md):
        pd = C.c_void_p()
        self.check(self.lib.dnnl_reorder_primitive_desc_create(C.byref(pd), src_md, self.engine, dst_md, self.engine,
                                                               None), "creating a reorder")
        return self.primitive(pd)

    def run(self, primitive, args: dict[int, Any]) -> None:
        pairs = (_ExecArg * len(args))(*(_ExecArg(k, v) for k, v in args.items()))
        self.check(self.lib.dnnl_primitive_execute(primitive, self.stream, len(args), pairs), "executing a primitive")
        self.check(self.lib.dnnl_stream_wait(self.stream), "waiting for its stream")

    def point(self, memory, address: int) -> None:
        self.check(self.lib.dnnl_memory_set_data_handle(memory, C.c_void_p(address)), "setting a buffer")


class _ExecArg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", C.c_void_p)]


@functools.cache
def _dnnl() -> _Dnnl:
    return _Dnnl(library_path())


def available() -> str | None:
    """None when oneDNN's convolutions can be used in this process, else why not (one line)."""
    try:
        _dnnl()
    except OneDNNUnavailable as err:
        return str(err)
    return None


class _Convolution:
    """oneDNN's primitives for one convolution shape: NHWC ``x`` (n, h, w, ci), HWIO kernel
    (kh, kw, ci, co), stride 1, SAME padding (XLA's: the extra row or column of an even kernel
    goes at the end)."""

    def __init__(self, d: _Dnnl, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...]):
        n, h, w, ci = x_shape
        kh, kw, _, co = kernel_shape
        self.d = d
        src = d.desc((n, ci, h, w), (h * w * ci, 1, w * ci, ci))  # logical NCHW, stored NHWC
        dst = d.desc((n, co, h, w), (h * w * co, 1, w * co, co))
        user_w = d.desc((co, ci, kh, kw), (1, co, kw * ci * co, ci * co))  # logical OIHW, stored HWIO
        any_w = d.desc((co, ci, kh, kw))
        pad_l = _Dims((kh - 1) // 2, (kw - 1) // 2)
        pad_r = _Dims(kh // 2, kw // 2)
        stride, dilation = _Dims(1, 1), _Dims(0, 0)
        lib = d.lib
        fwd = C.c_void_p()
        d.check(lib.dnnl_convolution_forward_primitive_desc_create(
            C.byref(fwd), d.engine, _FORWARD_TRAINING, _CONVOLUTION_DIRECT, src, any_w, None, dst, stride, dilation,
            pad_l, pad_r, None), f"creating a convolution for {x_shape} x {kernel_shape}")
        bwd_data = C.c_void_p()
        d.check(lib.dnnl_convolution_backward_data_primitive_desc_create(
            C.byref(bwd_data), d.engine, _CONVOLUTION_DIRECT, src, any_w, dst, stride, dilation, pad_l, pad_r, fwd,
            None), "creating a convolution's input gradient")
        bwd_weights = C.c_void_p()
        d.check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
            C.byref(bwd_weights), d.engine, _CONVOLUTION_DIRECT, src, any_w, None, dst, stride, dilation, pad_l, pad_r,
            fwd, None), "creating a convolution's weight gradient")
        self.fwd, self.bwd_data, self.bwd_weights = map(d.primitive, (fwd, bwd_data, bwd_weights))
        fwd_w, bwd_w, diff_w = d.query(fwd, _Q_WEIGHTS), d.query(bwd_data, _Q_WEIGHTS), d.query(bwd_weights, _Q_DIFF_WEIGHTS)
        # The kernel in oneDNN's layouts (its own buffers), and the reorders between them and HWIO.
        self.fwd_w, self.bwd_w, self.diff_w = d.memory(fwd_w, _MEMORY_ALLOCATE), d.memory(bwd_w, _MEMORY_ALLOCATE), \
            d.memory(diff_w, _MEMORY_ALLOCATE)
        self.to_fwd_w, self.to_bwd_w, self.from_diff_w = d.reorder(user_w, fwd_w), d.reorder(user_w, bwd_w), \
            d.reorder(diff_w, user_w)
        # XLA's buffers, pointed at anew by every call.
        self.x, self.y, self.w = d.memory(src), d.memory(dst), d.memory(user_w)

    def forward(self, x: int, kernel: int, out: int) -> None:
        d = self.d
        d.point(self.w, kernel)
        d.run(self.to_fwd_w, {_ARG_SRC: self.w, _ARG_DST: self.fwd_w})
        d.point(self.x, x)
        d.point(self.y, out)
        d.run(self.fwd, {_ARG_SRC: self.x, _ARG_WEIGHTS: self.fwd_w, _ARG_DST: self.y})

    def backward_data(self, g: int, kernel: int, out: int) -> None:
        d = self.d
        d.point(self.w, kernel)
        d.run(self.to_bwd_w, {_ARG_SRC: self.w, _ARG_DST: self.bwd_w})
        d.point(self.y, g)
        d.point(self.x, out)
        d.run(self.bwd_data, {_ARG_DIFF_DST: self.y, _ARG_WEIGHTS: self.bwd_w, _ARG_DIFF_SRC: self.x})

    def backward_weights(self, x: int, g: int, out: int) -> None:
        d = self.d
        d.point(self.x, x)
        d.point(self.y, g)
        d.run(self.bwd_weights, {_ARG_SRC: self.x, _ARG_DIFF_DST: self.y, _ARG_DIFF_WEIGHTS: self.diff_w})
        d.point(self.w, out)
        d.run(self.from_diff_w, {_ARG_SRC: self.diff_w, _ARG_DST: self.w})


_CONVOLUTIONS: dict[tuple, _Convolution] = {}  # touched only by the executor thread
_EXECUTOR: concurrent.futures.ThreadPoolExecutor | None = None
_REGISTER_LOCK = threading.Lock()


def _convolution(x_shape, kernel_shape) -> _Convolution:
    key = (x_shape, kernel_shape)
    conv = _CONVOLUTIONS.get(key)
    if conv is None:
        conv = _CONVOLUTIONS[key] = _Convolution(_dnnl(), x_shape, kernel_shape)
    return conv


def _buffers(values: _Values) -> list[_Buffer]:
    return [C.cast(values.values[i], C.POINTER(_Buffer)).contents for i in range(values.size)]


def _shape(buffer: _Buffer) -> tuple[int, ...]:
    return tuple(buffer.dims[i] for i in range(buffer.rank))


def _shapes(kind: str, a, b, out) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(x shape, kernel shape)`` of one call, after checking that its three buffers fit together
    (a mismatch would have oneDNN read or write outside XLA's buffers)."""
    x, kernel, y = {"fwd": (a, b, out), "bwd_data": (out, b, a), "bwd_weights": (a, out, b)}[kind]
    if not (len(x) == len(kernel) == len(y) == 4 and y == (*x[:3], kernel[3]) and x[3] == kernel[2]):
        raise ValueError(f"buffer shapes {a}, {b} -> {out} do not fit a convolution")
    return x, kernel


def _run(kind: str, frame: _CallFrame) -> None:
    """One FFI call: ``kind`` is fwd (x, kernel -> y), bwd_data (g, kernel -> dx) or bwd_weights
    (x, g -> dkernel); run on the executor thread, this XLA worker waiting for it."""
    args, rets = frame_buffers(frame)
    if len(args) != 2 or len(rets) != 1 or any(b.dtype != _FFI_F32 for b in (*args, *rets)):
        raise TypeError("these oneDNN convolutions take two float32 arrays and return one")
    (a, b), (out,) = args, rets
    x_shape, kernel_shape = _shapes(kind, _shape(a), _shape(b), _shape(out))
    pointers = (a.data, b.data, out.data)

    def execute():
        conv = _convolution(x_shape, kernel_shape)
        {"fwd": conv.forward, "bwd_data": conv.backward_data, "bwd_weights": conv.backward_weights}[kind](*pointers)

    _EXECUTOR.submit(execute).result()


def _error(frame: _CallFrame, message: str):
    """An ``XLA_FFI_Error`` for XLA to raise (as ``JaxRuntimeError``) instead of a wrong result."""
    api = C.cast(frame.api, C.POINTER(_ApiHead)).contents
    args = _ErrorCreateArgs(C.sizeof(_ErrorCreateArgs), None, message.encode(), _FFI_INTERNAL)
    return api.error_create(C.byref(args))


def ffi_handler(run: Callable[[_CallFrame], None], what: str):
    """An XLA:CPU FFI handler (a ``ctypes`` callback) around ``run(frame)``, for ``register_handler``.

    It answers XLA's question about the FFI version it speaks, calls ``run`` with the call frame at
    the execute stage (``frame_buffers`` reads its operands and results), and turns any exception
    into an FFI error that XLA raises in the caller (``JaxRuntimeError``) instead of handing on
    whatever is in the output buffer. ``what`` names the call in that error. This module's
    convolutions are built on it, and so is the GEMM ``experiments/mlp_step.py`` measures."""

    def handle(frame_pointer):
        frame = frame_pointer.contents
        try:
            ext = frame.extension_start
            if ext and ext.contents.type == _FFI_METADATA_EXTENSION:  # XLA asks which FFI version this is
                meta = C.cast(ext, C.POINTER(_MetadataExtension)).contents.metadata.contents
                meta.api_version = _ApiVersion(C.sizeof(_ApiVersion), None, *_FFI_API_VERSION)
                meta.traits, meta.state_type_id = 0, 0
                return None
            if frame.stage == _FFI_EXECUTE:
                run(frame)
            return None
        except BaseException as err:  # noqa: BLE001 - reported to XLA, which raises it in the caller
            message = f"{what} failed: {type(err).__name__}: {err}"
            try:
                return _error(frame, message)
            except BaseException:  # returning NULL would tell XLA the garbage in the output is a result
                print(f"{message}; could not report it to XLA: aborting", file=sys.stderr, flush=True)
                os.abort()

    return _HANDLER(handle)


def frame_buffers(frame: _CallFrame) -> tuple[list[_Buffer], list[_Buffer]]:
    """The operands and results of one FFI call: buffers with ``dtype``, ``data`` (an address),
    ``rank`` and ``dims``."""
    return _buffers(frame.args), _buffers(frame.rets)


def register_handler(target: str, handler) -> None:
    """Register ``handler`` (from ``ffi_handler``) as the CPU FFI target ``target``. XLA keeps only
    its address: the caller keeps ``handler`` alive for as long as the target can be called."""
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(C.cast(handler, C.c_void_p).value), platform="cpu")


def library() -> C.CDLL:
    """libdnnl, loaded once per process (``OneDNNUnavailable`` if it cannot be)."""
    return _dnnl().lib


_HANDLERS: dict[str, Any] = {}


def register() -> None:
    """Register the three FFI targets with XLA (once per process); ``OneDNNUnavailable`` if libdnnl
    does not load."""
    global _EXECUTOR
    if _HANDLERS:  # the common case, every call: no lock (one would wait for running convolutions)
        return
    with _REGISTER_LOCK:
        if _HANDLERS:
            return
        _dnnl()
        _EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="graphduo-onednn")
        kinds = {target: target.rsplit("_conv_", 1)[1] for target in TARGETS}
        handlers = {target: ffi_handler(functools.partial(_run, kind), f"graphduo oneDNN convolution ({kind})")
                    for target, kind in kinds.items()}
        for target, handler in handlers.items():
            register_handler(target, handler)
        _HANDLERS.update(handlers)  # kept alive: XLA holds only their addresses


def _call(target: str, like, *operands):
    register()
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(like.shape, like.dtype))(*operands)


def _out_shape(x, kernel):
    return jax.ShapeDtypeStruct((*x.shape[:3], kernel.shape[3]), x.dtype)


def conv_same(x, kernel):
    """``lax.conv_general_dilated(x, kernel, (1, 1), "SAME")`` for NHWC ``x`` and HWIO ``kernel``,
    float32, on oneDNN; its gradients too. Shapes and dtypes are checked here, when traced."""
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"conv_same takes NHWC x and HWIO kernel with matching channels, got {x.shape} and "
                         f"{kernel.shape}")
    if x.dtype != jax.numpy.float32 or kernel.dtype != jax.numpy.float32:
        raise TypeError(f"these oneDNN convolutions take float32, got {x.dtype} and {kernel.dtype}")
    return _conv(x, kernel)


@jax.custom_vjp
def _conv(x, kernel):
    return _call(TARGETS[0], _out_shape(x, kernel), x, kernel)


def _conv_fwd(x, kernel):
    return _conv(x, kernel), (x, kernel)


def _conv_bwd(res, g):
    x, kernel = res
    return _call(TARGETS[1], x, g, kernel), _call(TARGETS[2], kernel, x, g)


_conv.defvjp(_conv_fwd, _conv_bwd)
