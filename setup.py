"""Only the compiled part lives here; all metadata is in setup.cfg.

``contrastive.index._kernels._topk`` is the fused threshold top-k filter of the exact index
(``contrastive/index/_kernels/_topk.c``). It is optional: without a C compiler the install still
succeeds and :func:`contrastive.index.exact_topk` uses its torch-op path (same results, slower; see
benchmarks/RESULTS.md); without OpenMP it is built single-threaded.
"""
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"


class BuildExt(build_ext):
    """Build with OpenMP, and retry without it when the compiler has none (e.g. Apple clang)."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception:
            if OPENMP not in ext.extra_compile_args:
                raise
            self.warn(f"building {ext.name} without OpenMP: the top-k filter will use one thread")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            super().build_extension(ext)


setup(
    ext_modules=[
        Extension(
            "contrastive.index._kernels._topk",
            sources=["contrastive/index/_kernels/_topk.c"],
            extra_compile_args=["-O3", "-std=c11", OPENMP],
            extra_link_args=[OPENMP],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
