"""Every CuPy kernel of minivae, compiled with NVRTC for sm_80 and sm_90 in float32 and float64, without a GPU.

The kernels are declared as data in :mod:`minivae.fast.kernels`' registry.  For each one we regenerate the
full CUDA source CuPy would compile for it (with CuPy's own code generators, which are private API) and
compile it with NVRTC, as CuPy does on an A100 (sm_80) or H100 (sm_90).  This needs CuPy and the NVRTC
library, not a GPU: ``pip install -e '.[cuda12x]'`` brings both, and ``pytest -m nvrtc`` runs this file.

Without CuPy or NVRTC the compile tests skip, with the reason.  If CuPy changes the private helpers used
here, the tests fail and say so: they never pass without compiling.  Planted bugs (a missing ``;``, an
undefined name, a write to an input...) must fail to compile, so a check that compiles nothing would fail
too.  The registry tests at the top need no CuPy and always run.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest

import minivae
from minivae.fast import kernels

ARCHS = ("80", "90")
DTYPES = (np.float32, np.float64)
PACKAGE_DIR = Path(minivae.__file__).parent
KERNEL_BUILDERS = re.compile(r"\b(ElementwiseKernel|ReductionKernel|RawKernel|RawModule)\s*\(|\bfuse\s*\(")


def _import_every_module():
    """Import every module of the package, so that each one that declares kernels has registered them."""
    for info in pkgutil.walk_packages([str(PACKAGE_DIR)], prefix="minivae."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return dict(kernels.REGISTRY)


SPECS = _import_every_module()


# ----------------------------------------------------------------------------- the registry (no CuPy needed)
def test_every_cupy_kernel_of_the_package_is_in_the_registry():
    # A kernel built directly with cupy.ElementwiseKernel & co. would escape the NVRTC check below.
    offenders = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path == PACKAGE_DIR / "fast" / "kernels.py":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if KERNEL_BUILDERS.search(line.split("#", 1)[0]):
                offenders.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{n}: {line.strip()}")
    assert not offenders, "declare CuPy kernels in minivae.fast.kernels' registry instead:\n" + "\n".join(offenders)


def test_registry_holds_the_fast_path_kernels():
    fast = {k.split(".")[-1] for k in SPECS if k.startswith("minivae.fast.")}
    assert {"bias_relu", "relu_bwd", "reparam", "latent_bwd", "kl_terms", "bernoulli", "adam"} <= fast
    names = [s.name for s in SPECS.values()]
    assert len(names) == len(set(names)), "two kernels share a CUDA function name"
    for key, spec in SPECS.items():
        inputs = [p.split()[-1] for p in spec.in_params.split(",") if p.strip()]
        assert set(spec.scalar_args) <= set(inputs), f"{key}: scalar_args not among the inputs"


def test_registry_rejects_incomplete_or_conflicting_specs():
    with pytest.raises(ValueError, match="needs operation"):
        kernels.elementwise("minivae_x", "T a", "T b", "")
    with pytest.raises(ValueError, match="kind"):
        kernels.KernelSpec("fused", "minivae_x")
    spec = kernels.elementwise("minivae_test_dup", "T a", "T b", "b = a")
    kernels.register("tests.dup", {"k": spec})
    try:
        with pytest.raises(ValueError, match="registered twice"):
            kernels.register("tests.dup", {"k": kernels.elementwise("minivae_test_dup", "T a", "T b", "b = -a")})
    finally:
        kernels.REGISTRY.pop("tests.dup.k")


# ----------------------------------------------------------------------------- compiling with NVRTC
class Toolchain:
    """CuPy's code generators and NVRTC, used without a device (no CUDA driver call anywhere)."""

    # cupy/_core/_kernel.pxd: enum _ArgKind {ARG_KIND_NDARRAY = 1, ARG_KIND_INDEXER, ARG_KIND_SCALAR, ...}
    NDARRAY, INDEXER, SCALAR = 1, 2, 3

    def __init__(self):
        import cupy
        from cupy._core import _carray, _kernel, _reduction, _scalar, core
        from cupy.cuda import compiler
        from cupy_backends.cuda.libs import nvrtc
        self.cupy, self.K, self.R, self.nvrtc, self.compiler = cupy, _kernel, _reduction, nvrtc, compiler
        self.version = nvrtc.getVersion()                       # raises if libnvrtc cannot be loaded
        self.ndarray, self.Indexer, self.CScalar = cupy.ndarray, _carray.Indexer, _scalar.CScalar
        self.header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
        self.assemble = core.assemble_cupy_compiler_options

    def _array(self, dtype, ndim):
        return self.K._ArgInfo(self.NDARRAY, self.ndarray, dtype, ndim, True, True)

    def _scalar(self, dtype):
        return self.K._ArgInfo(self.SCALAR, self.CScalar, dtype, 0, True, True)

    def _indexer(self, ndim):
        return self.K._ArgInfo(self.INDEXER, self.Indexer, None, ndim, True, True)

    def source(self, spec, dtype, ndim=2, header=True):
        """The CUDA source CuPy generates for ``spec`` with ``ndim``-D arrays of ``dtype`` (reductions to ndim - 1)."""
        if spec.kind == "raw":
            return spec.code
        kernel = kernels.build(spec)
        if spec.kind == "elementwise":
            in_args = tuple(None if p.name in spec.scalar_args else dtype for p in kernel.in_params)
            _, _, type_map = self.K._decide_params_type(kernel.in_params, kernel.out_params,
                                                        in_args, (dtype,) * kernel.nout)
            infos = tuple(self._scalar(dtype) if p.name in spec.scalar_args else self._array(dtype, ndim)
                          for p in kernel.in_params)
            infos += tuple(self._array(dtype, ndim) for _ in kernel.out_params) + (self._indexer(ndim),)
            code = self.K._get_elementwise_kernel_code(infos, type_map, kernel.params, kernel.operation,
                                                       kernel.name, kernel.preamble)
        else:
            _, _, type_map = self.K._decide_params_type(kernel.in_params, kernel.out_params,
                                                        (dtype,) * kernel.nin, (dtype,) * kernel.nout)
            infos = tuple(self._scalar(dtype) if p.name in spec.scalar_args else self._array(dtype, ndim)
                          for p in kernel.in_params)
            infos += tuple(self._array(dtype, ndim - 1) for _ in kernel.out_params)
            # _in_ind, _out_ind, _block_stride
            infos += (self._indexer(ndim), self._indexer(ndim - 1), self._scalar(np.int32))
            # the reduction's index type, chosen per call by CuPy (32-bit when the sizes allow it)
            type_map = self.K._TypeMap(type_map._pairs + (("IndexT", np.int32),))
            code = self.R._ReductionKernel_get_cached_function_code(
                kernel.nin, kernel.nout, kernel._params, infos, type_map, kernel.name, 128, kernel.reduce_type,
                kernel.identity, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr, kernel.preamble,
                tuple(spec.options))
        return self.header + code if header else code

    def compile(self, spec, source, arch):
        """NVRTC -> cubin for sm_<arch>, with the options CuPy uses (raises CompileException)."""
        options = self.assemble(tuple(spec.options)) + (
            "-ftz=true", "--device-as-default-execution-space", f"-arch=sm_{arch}")
        program = self.compiler._NVRTCProgram(source, f"{spec.name}.cu", method="cubin")
        cubin, _ = program.compile(options)
        return cubin


def _one_line(e, n=200):
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:n]


@pytest.fixture(scope="module")
def toolchain():
    try:
        import cupy  # noqa: F401
    except ImportError as e:
        pytest.skip(f"CuPy cannot be imported ({_one_line(e)}); pip install -e '.[cuda12x]' to compile the kernels")
    try:
        from cupy_backends.cuda.libs import nvrtc
        nvrtc.getVersion()
    except Exception as e:                                       # the NVRTC library is missing
        pytest.skip(f"NVRTC cannot be loaded ({_one_line(e)}); pip install -e '.[cuda12x]'")
    probe = kernels.elementwise("minivae_probe", "T a", "T b", "b = a")
    try:
        tc = Toolchain()
        source = tc.source(probe, np.float32)
    except (ImportError, AttributeError, TypeError) as e:
        pytest.fail(f"CuPy's private code-generation API changed ({_one_line(e)}); "
                    f"update tests/test_nvrtc.py: the kernels were NOT compiled")
    # CuPy's headers include CUDA's (cuda_fp16.h...), from NVRTC's built-ins, the CUDA runtime wheel or a toolkit.
    try:
        tc.compile(probe, source, ARCHS[-1])
    except tc.compiler.CompileException as e:
        if "cannot open source file" in str(e):
            pytest.skip(f"CUDA headers missing for NVRTC ({str(e).splitlines()[0]}); "
                        f"pip install -e '.[cuda12x]' (CuPy's ctk extra) brings them")
        raise
    return tc


def _cases():
    for key, spec in sorted(SPECS.items()):
        for arch in ARCHS:
            for dtype in ((None,) if spec.kind == "raw" else DTYPES):
                yield pytest.param(key, arch, dtype, id=f"{key}-sm_{arch}" + (f"-{dtype.__name__}" if dtype else ""))


def _check_cubin(cubin, spec, arch):
    assert isinstance(cubin, bytes) and cubin[:4] == b"\x7fELF", "NVRTC returned no cubin"
    assert spec.name.encode() in cubin, f"the cubin has no function {spec.name}"


@pytest.mark.nvrtc
@pytest.mark.parametrize("key, arch, dtype", list(_cases()))
def test_kernel_compiles_with_nvrtc(toolchain, key, arch, dtype):
    spec = SPECS[key]
    source = toolchain.source(spec, dtype)
    if spec.kind != "raw":
        ctype = {np.float32: "float", np.float64: "double"}[dtype]
        assert f"typedef {ctype} T;" in source                     # the dtype really is the one asked for
        assert f'__global__ void {spec.name}(' in source
        for p in spec.scalar_args:                                  # scalars as C scalars, arrays as CArrays
            assert re.search(rf"const {ctype} {p}\b", source), f"{p} is not compiled as a scalar"
    _check_cubin(toolchain.compile(spec, source, arch), spec, arch)


# Bugs that must not compile: a check that silently compiled nothing (or compiled something else) fails here.
PLANTED = {
    "missing semicolon": kernels.elementwise("minivae_bad1", "T a", "T b", "b = a * (T)2\n b += a"),
    "ambiguous max": kernels.elementwise("minivae_bad2", "T a", "T b", "b = max(a, 0)"),
    "undefined name": kernels.elementwise("minivae_bad3", "T a", "T b", "b = a + undefined_c"),
    "write to an input": kernels.elementwise("minivae_bad4", "T a", "T b", "a = b"),
    "bad reduce expression": kernels.reduction("minivae_bad5", "T a", "T y", "a", "a +* b", "y = a", "0"),
    "write to a scalar input": kernels.elementwise("minivae_bad6", "T a, T c", "T b", "c = a; b = c",
                                                   scalar_args=("c",)),
}


@pytest.mark.nvrtc
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_fails_to_compile(toolchain, bug):
    spec = PLANTED[bug]
    dtype = np.float32
    with pytest.raises(toolchain.compiler.CompileException, match="error"):
        toolchain.compile(spec, toolchain.source(spec, dtype), ARCHS[-1])
    # ... and the same kernel without the bug compiles (so it is the bug that is caught)
    fixed = {"missing semicolon": "b = a * (T)2;\n b += a", "ambiguous max": "b = max(a, (T)0.5)",
             "undefined name": "b = a + (T)1", "write to an input": "b = a",
             "write to a scalar input": "b = a + c"}
    if bug in fixed:
        good = kernels.elementwise(spec.name, spec.in_params, spec.out_params, fixed[bug],
                                   scalar_args=spec.scalar_args)
    else:
        good = kernels.reduction(spec.name, "T a", "T y", "a", "a + b", "y = a", "0")
    _check_cubin(toolchain.compile(good, toolchain.source(good, dtype), ARCHS[-1]), good, ARCHS[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("key", sorted(k for k, v in SPECS.items() if v.kind == "elementwise"))
def test_regenerated_source_is_what_cupy_compiles_on_a_gpu(toolchain, key):
    # On a GPU, call the kernel on contiguous (3, 4) arrays (CuPy then indexes them as 1-D) and compare the
    # source CuPy compiled with the one this file regenerates without a GPU: they must be the same text.
    import cupy as cp
    spec = SPECS[key]
    kernel = kernels.build(spec)
    args = [np.float32(0.5) if p.name in spec.scalar_args else cp.full((3, 4), 0.5, dtype=cp.float32)
            for p in kernel.in_params]
    args += [cp.full((3, 4), 0.5, dtype=cp.float32) for _ in kernel.out_params]
    kernel(*args)
    assert toolchain.source(spec, np.float32, ndim=1, header=False) in set(kernel.cached_codes.values())
