"""cuBLAS through ctypes: the matrix products of the CUDA-graph step (:mod:`minivae.fast.cuda_graph`).

Why not CuPy's cuBLAS?  During stream capture CuPy refuses every cuBLAS call it wraps
(``NotImplementedError: calling cuBLAS API during stream capture is currently unsupported``), while cuBLAS
itself supports capture.  So the graph step calls the cuBLAS library that CuPy has already loaded, through
``ctypes``, with a handle of its own, set to the capturing stream (``cublasSetStream_v2``).  Nothing here needs
a GPU to be imported or loaded; :class:`Handle` does.

cuBLAS is column-major and minivae's arrays are row-major.  A row-major (R, C) matrix with row stride ``ld``
is, read column-major, its transpose, a (C, R) matrix with leading dimension ``ld``.  So the row-major product
``C = op(A) @ op(B)`` is the column-major product ``C^T = op(B)^T op(A)^T``: cuBLAS is called with the
operands swapped, m = C's columns, n = C's rows (:func:`rowmajor_gemm`).  ``tests/test_cuda_graph.py``
checks that mapping against a column-major reference written from the cuBLAS documentation, and the
prototypes below against ``cublas_api.h``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
from dataclasses import dataclass

OP_N, OP_T = 0, 1                  # cublasOperation_t: CUBLAS_OP_N, CUBLAS_OP_T
STATUS_SUCCESS = 0                 # cublasStatus_t
MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL = 0, 1, 2     # libraryPropertyType
CUBLAS_DEFAULT_MATH = 0            # cublasMath_t: no TF32 (CUBLAS_TF32_TENSOR_OP_MATH = 3 would allow it)

_p, _i, _ll, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
# name -> (restype, argtypes), as declared in cublas_api.h (pointers as void*, enums as int)
PROTOTYPES = {
    "cublasCreate_v2": (_i, (_p,)),                                       # cublasHandle_t*
    "cublasDestroy_v2": (_i, (_p,)),
    "cublasGetVersion_v2": (_i, (_p, _p)),                                # handle, int*
    "cublasGetProperty": (_i, (_i, _p)),                                  # libraryPropertyType, int*
    "cublasSetStream_v2": (_i, (_p, _p)),                                 # handle, cudaStream_t
    "cublasSetWorkspace_v2": (_i, (_p, _p, _sz)),                         # handle, void*, size_t
    "cublasSetMathMode": (_i, (_p, _i)),                                  # handle, cublasMath_t
    "cublasGetStatusString": (ctypes.c_char_p, (_i,)),
    # handle, transa, transb, m, n, k, alpha*, A, lda, B, ldb, beta*, C, ldc
    "cublasSgemm_v2": (_i, (_p, _i, _i, _i, _i, _i, _p, _p, _i, _p, _i, _p, _p, _i)),
    # ... the same with a stride after each matrix, then batchCount
    "cublasSgemmStridedBatched": (_i, (_p, _i, _i, _i, _i, _i, _p, _p, _i, _ll, _p, _i, _ll, _p, _p, _i, _ll, _i)),
}
REQUIRED = ("cublasCreate_v2", "cublasDestroy_v2", "cublasSetStream_v2", "cublasSgemm_v2")


class CublasError(RuntimeError):
    """A cuBLAS call failed, or the library cannot be found or lacks a function."""


def loaded_cublas_paths():
    """Paths of the ``libcublas`` libraries mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcublas" in line}
    except OSError:
        return []
    return sorted(p for p in paths if re.match(r"libcublas\.so(\.\d+)*$", os.path.basename(p)))


def _pathfinder_cublas():
    """The libcublas CuPy 14's path finder (cuda-pathfinder) loads, or None."""
    try:
        from cuda import pathfinder
        return getattr(pathfinder.load_nvidia_dynamic_lib("cublas"), "abs_path", None)
    except Exception:  # noqa: BLE001  (no cuda-pathfinder, or it found nothing)
        return None


def _cuda_major():
    try:
        import cupy
        return int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
    except Exception:  # noqa: BLE001  (no CUDA driver: a CPU machine)
        return None


def find_library():
    """The path (or soname) of the libcublas CuPy uses: the one it has loaded, loading it first if need be.

    CuPy loads libcublas when its cuBLAS module is imported (``from cupy_backends.cuda.libs import cublas``), through
    cuda-pathfinder (the CUDA 12 wheel: ``libcublas.so.12``, the CUDA 13 one: ``libcublas.so.13``); the path
    finder says which file.  Without it, the one mapped into the process; if several are (PyTorch brings its
    own), the one of CuPy's CUDA major version; if that is still ambiguous, an error, not a guess.
    """
    try:
        import cupy  # noqa: F401
        # through the package's __getattr__, which has CuPy's path finder load libcublas first
        from cupy_backends.cuda.libs import cublas  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        if not loaded_cublas_paths():
            raise CublasError(f"CuPy's cuBLAS module cannot be imported ({type(exc).__name__}: {exc})") from None
    path = _pathfinder_cublas()
    if path and os.path.exists(path):
        return path
    paths = loaded_cublas_paths()
    if len(paths) > 1:
        major = _cuda_major()
        same = [p for p in paths if major is not None and os.path.basename(p).startswith(f"libcublas.so.{major}")]
        if len(same) != 1:
            raise CublasError(f"several libcublas are loaded ({', '.join(paths)}); cannot tell which one CuPy uses")
        paths = same
    if paths:
        return paths[0]
    name = ctypes.util.find_library("cublas")         # not Linux, or no /proc: the loader's search
    if name is None:
        raise CublasError("libcublas not found: neither loaded by CuPy nor on the library path")
    return name


@dataclass
class Library:
    """A loaded libcublas: ``fn[name]`` the prototyped functions it has, ``missing`` those it lacks."""

    path: str
    cdll: ctypes.CDLL
    fn: dict
    missing: tuple

    def version(self):
        """(major, minor, patch) of the library (cublasGetProperty: needs no GPU)."""
        out = []
        for prop in (MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL):
            v = ctypes.c_int(-1)
            check(self, self.fn["cublasGetProperty"](prop, ctypes.byref(v)), "cublasGetProperty")
            out.append(v.value)
        return tuple(out)


def load(path=None):
    """Load libcublas (``path``, or :func:`find_library`) and give every function its prototype."""
    path = path or find_library()
    try:
        cdll = ctypes.CDLL(path)
    except OSError as exc:
        raise CublasError(f"cannot load {path}: {exc}") from None
    fn, missing = {}, []
    for name, (res, args) in PROTOTYPES.items():
        f = getattr(cdll, name, None)
        if f is None:
            missing.append(name)
            continue
        f.restype, f.argtypes = res, list(args)
        fn[name] = f
    lacking = [n for n in REQUIRED if n in missing]
    if lacking:
        raise CublasError(f"{path} lacks {', '.join(lacking)}")
    return Library(str(path), cdll, fn, tuple(missing))


def check(lib, status, what):
    if status != STATUS_SUCCESS:
        text = ""
        f = lib.fn.get("cublasGetStatusString")
        if f is not None:
            try:
                text = " " + (f(status) or b"").decode(errors="replace")
            except Exception:  # noqa: BLE001
                text = ""
        raise CublasError(f"{what} failed: cuBLAS status {status}{text}")


def rowmajor_gemm(c_rows, c_cols, k, ta, tb, A_ld, B_ld, C_ld):
    """Column-major gemm arguments for the row-major ``C (c_rows, c_cols) = op(A) @ op(B)``.

    ``op(X)`` is X or X^T (``ta``/``tb``); k is the inner dimension; ``*_ld`` the row strides (elements).
    Returns ``(transa, transb, m, n, k, first_is_B, lda, ldb, ldc)``: call cuBLAS with B as its first matrix
    and A as its second (``first_is_B`` is always True; it is returned to make the swap explicit).
    Row-major X with row stride ld is the column-major X^T with leading dimension ld, so
    C^T = op(B)^T op(A)^T needs cuBLAS's op N on B's storage when B is not transposed, op T when it is.
    """
    return (OP_T if tb else OP_N, OP_T if ta else OP_N, c_cols, c_rows, k, True, B_ld, A_ld, C_ld)


class Handle:
    """A cuBLAS handle of our own (needs a GPU): products on a given CUDA stream, capturable in a graph."""

    def __init__(self, lib=None):
        self.lib = lib if lib is not None else load()
        h = ctypes.c_void_p()
        check(self.lib, self.lib.fn["cublasCreate_v2"](ctypes.byref(h)), "cublasCreate_v2")
        self.h = h
        f = self.lib.fn.get("cublasSetMathMode")
        if f is not None:                                # full float32 products, whatever CuPy's handle does
            check(self.lib, f(self.h, CUBLAS_DEFAULT_MATH), "cublasSetMathMode")
        self._alpha = {}                                 # host scalars, kept alive

    def set_stream(self, stream_ptr, workspace_ptr=None, workspace_bytes=0):
        """Products go to ``stream_ptr`` (a cudaStream_t as an int).  cublasSetStream resets the workspace
        to cuBLAS's default pool, so a user workspace (recommended for graph capture) is set after it."""
        check(self.lib, self.lib.fn["cublasSetStream_v2"](self.h, ctypes.c_void_p(stream_ptr)), "cublasSetStream_v2")
        if workspace_ptr is not None:
            f = self.lib.fn.get("cublasSetWorkspace_v2")
            if f is None:
                return False
            check(self.lib, f(self.h, ctypes.c_void_p(workspace_ptr), workspace_bytes), "cublasSetWorkspace_v2")
        return True

    def _scalar(self, v):
        c = self._alpha.get(float(v))
        if c is None:
            c = self._alpha[float(v)] = ctypes.c_float(v)
        return ctypes.byref(c)

    def sgemm(self, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc):
        """Column-major ``C = alpha op(A) op(B) + beta C`` (pointers as ints; host alpha and beta)."""
        st = self.lib.fn["cublasSgemm_v2"](self.h, transa, transb, m, n, k, self._scalar(alpha), ctypes.c_void_p(A),
                                           lda, ctypes.c_void_p(B), ldb, self._scalar(beta), ctypes.c_void_p(C), ldc)
        check(self.lib, st, "cublasSgemm_v2")

    def sgemm_strided_batched(self, transa, transb, m, n, k, alpha, A, lda, sA, B, ldb, sB, beta, C, ldc, sC, count):
        f = self.lib.fn.get("cublasSgemmStridedBatched")
        if f is None:
            raise CublasError(f"{self.lib.path} lacks cublasSgemmStridedBatched")
        st = f(self.h, transa, transb, m, n, k, self._scalar(alpha), ctypes.c_void_p(A), lda, sA, ctypes.c_void_p(B),
               ldb, sB, self._scalar(beta), ctypes.c_void_p(C), ldc, sC, count)
        check(self.lib, st, "cublasSgemmStridedBatched")

    def close(self):
        if self.h is not None and self.h.value:
            self.lib.fn["cublasDestroy_v2"](self.h)
        self.h = None
