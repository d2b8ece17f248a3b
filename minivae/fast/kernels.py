"""The CuPy kernels of minivae, as data: one registry that builds them and lets them be checked without a GPU.

Every fused CuPy kernel the library uses is declared here, or by a module through :func:`register`, as a
:class:`KernelSpec` (its kind, parameters and C++ expressions), not built directly with
``cupy.ElementwiseKernel``.  Two things read the registry:

* the module that runs the kernel builds it on first use with :func:`build` (CuPy is imported only then);
* ``tests/test_nvrtc.py`` regenerates the CUDA source CuPy would compile for each spec and compiles it
  with NVRTC for sm_80 and sm_90, in float32 and float64.  That needs CuPy and NVRTC but no GPU, so
  the kernels are compiled on every machine with ``pip install -e '.[cuda12x]'``, and a typo in a
  kernel shows up there instead of on the first GPU that runs it.

A test also fails if any module of the package builds a CuPy kernel outside this registry.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("elementwise", "reduction", "raw")


@dataclass(frozen=True)
class KernelSpec:
    """One CuPy kernel.

    kind           ``"elementwise"`` (``cupy.ElementwiseKernel``), ``"reduction"`` (``cupy.ReductionKernel``)
                   or ``"raw"`` (``cupy.RawKernel``: ``code`` is the whole CUDA source)
    name           the CUDA function name (``minivae_...``)
    in_params      ``"T x, T y"`` (elementwise / reduction)
    out_params     ``"T z"``
    operation      elementwise: the loop body
    map_expr, reduce_expr, post_map_expr, identity, reduce_type
                   reduction: as ``cupy.ReductionKernel``
    code           raw: the CUDA source, ``extern "C" __global__`` function ``name``
    scalar_args    inputs passed as host scalars, not arrays (the check compiles them as CuPy would)
    preamble       code placed before the kernel (elementwise / reduction)
    options        extra NVRTC options
    """

    kind: str
    name: str
    in_params: str = ""
    out_params: str = ""
    operation: str = ""
    map_expr: str = ""
    reduce_expr: str = ""
    post_map_expr: str = ""
    identity: str = ""
    reduce_type: str | None = None
    code: str = ""
    scalar_args: tuple = ()
    preamble: str = ""
    options: tuple = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kernel {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.name.isidentifier():
            raise ValueError(f"kernel name must be a C identifier, got {self.name!r}")
        needed = {"elementwise": ("in_params", "out_params", "operation"),
                  "reduction": ("in_params", "out_params", "map_expr", "reduce_expr", "post_map_expr", "identity"),
                  "raw": ("code",)}[self.kind]
        missing = [f for f in needed if not getattr(self, f)]
        if missing:
            raise ValueError(f"kernel {self.name!r} ({self.kind}) needs {', '.join(missing)}")


def elementwise(name, in_params, out_params, operation, scalar_args=(), **kw):
    return KernelSpec("elementwise", name, in_params, out_params, operation=operation,
                      scalar_args=tuple(scalar_args), **kw)


def reduction(name, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity, **kw):
    return KernelSpec("reduction", name, in_params, out_params, map_expr=map_expr, reduce_expr=reduce_expr,
                      post_map_expr=post_map_expr, identity=identity, **kw)


def raw(name, code, **kw):
    return KernelSpec("raw", name, code=code, **kw)


REGISTRY: dict = {}   # "module.key" -> KernelSpec, filled when the defining modules are imported


def register(owner, specs):
    """Add ``specs`` (a dict key -> :class:`KernelSpec`) under ``owner`` (the module name); returns ``specs``."""
    for key, spec in specs.items():
        if not isinstance(spec, KernelSpec):
            raise TypeError(f"{owner}.{key}: expected a KernelSpec, got {type(spec).__name__}")
        full = f"{owner}.{key}"
        if REGISTRY.get(full, spec) != spec:
            raise ValueError(f"kernel {full} registered twice with different definitions")
        REGISTRY[full] = spec
    return specs


def build(spec):
    """The CuPy kernel object of ``spec`` (imports CuPy)."""
    import cupy as cp
    extra = {k: v for k, v in (("preamble", spec.preamble), ("options", spec.options)) if v}
    if spec.kind == "elementwise":
        return cp.ElementwiseKernel(spec.in_params, spec.out_params, spec.operation, spec.name, **extra)
    if spec.kind == "reduction":
        return cp.ReductionKernel(spec.in_params, spec.out_params, spec.map_expr, spec.reduce_expr,
                                  spec.post_map_expr, spec.identity, spec.name, reduce_type=spec.reduce_type,
                                  **extra)
    return cp.RawKernel(spec.code, spec.name, options=spec.options)


def build_all(specs):
    """``{key: kernel}`` for a dict of specs."""
    return {key: build(spec) for key, spec in specs.items()}
