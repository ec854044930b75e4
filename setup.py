"""Build the optional native kernels (``somad._native._kernels``); everything else is declared in pyproject.toml.

The extension is optional: where it cannot be compiled (no C compiler), somad installs without it and scores
with its torch implementation, which is slower on CPU. OpenMP is used where the compiler supports it.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = {"msvc": (["/openmp"], [])}  # compiler type -> (compile, link) flags; the default is GCC/Clang's
OPTIMISE = {"msvc": ["/O2"]}


class BuildExt(build_ext):
    def build_extension(self, ext):
        kind = self.compiler.compiler_type
        omp_compile, omp_link = OPENMP.get(kind, (["-fopenmp"], ["-fopenmp"]))
        ext.extra_compile_args = OPTIMISE.get(kind, ["-O3"]) + omp_compile
        ext.extra_link_args = omp_link
        try:
            super().build_extension(ext)
        except Exception as exc:  # e.g. Apple clang without libomp: build single-threaded instead
            self.warn(f"building {ext.name} with OpenMP failed ({exc}); building it without (one thread)")
            ext.extra_compile_args, ext.extra_link_args = OPTIMISE.get(kind, ["-O3"]), []
            super().build_extension(ext)


setup(
    ext_modules=[Extension("somad._native._kernels", ["src/somad/_native/_kernels.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
