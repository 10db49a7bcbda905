"""Build fastjepa and its optional C++/CUDA extension ``fastjepa._C``.

* torch without CUDA (e.g. a CPU machine): a ``CppExtension`` (CPU sampler and ops).
* torch with CUDA: a ``CUDAExtension`` (adds the ``csrc/cuda/*.cu`` kernels);
  ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX" (A100 and H100/H200 machine code,
  plus sm_90 PTX that the driver compiles for newer GPUs at first load).
* ``FASTJEPA_NO_EXT=1``: no extension (the package runs on its Python/Triton paths).
* ``MAX_JOBS`` bounds ninja's parallel compile jobs.

Sources are globbed from ``csrc/``. Build with ``pip install --no-build-isolation -e .``
so the extension compiles against the torch you already have.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PACKAGES = find_packages(include=["fastjepa", "fastjepa.*"])
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # +PTX: GPUs newer than sm_90 JIT-compile the embedded PTX


def extension_build():
    """(ext_modules, cmdclass), or ([], {}) with a message when the extension is skipped."""
    if os.environ.get("FASTJEPA_NO_EXT", "0") == "1":
        print("fastjepa: FASTJEPA_NO_EXT=1, building without the C++ extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "fastjepa: torch is not importable in this build environment, building without the C++ extension "
            "(install torch first and use `pip install --no-build-isolation`)",
            file=sys.stderr,
        )
        return [], {}
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("FASTJEPA_NO_CUDA", "0") != "1"
    # no -std flag: torch's build adds the standard its headers need (C++20 for torch >= 2.10)
    cxx = ["-O3", "-fopenmp"]
    define_macros = []
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
        ext = CUDAExtension(
            "fastjepa._C",
            sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
            **kwargs,
        )
    else:
        ext = CppExtension("fastjepa._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
