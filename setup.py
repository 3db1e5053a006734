"""Builds the one C extension, genarm_local.core._fused; everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -O3 turns on the vectoriser in GCC and Clang. -fno-trapping-math lets GCC turn the kernel's `a ? b : c` on floats
# into vector selects; it changes no result, only assumes nobody reads floating-point exception flags (Clang's
# default already). No -ffast-math: the kernel relies on -inf and NaN behaving as IEEE says (masked tokens, corrupt
# logits) and on sums not being reassociated. No -march=native: wheels move between machines; the kernel picks its
# AVX2 build at load time where it can.
UNIX_FLAGS = ["-O3", "-ftree-vectorize", "-fno-trapping-math"]
MSVC_FLAGS = ["/O2"]


class BuildExt(build_ext):
    """Pick optimisation flags for the compiler actually used."""

    def build_extensions(self) -> None:
        flags = MSVC_FLAGS if self.compiler.compiler_type == "msvc" else UNIX_FLAGS
        for extension in self.extensions:
            extension.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[
        Extension(
            "genarm_local.core._fused",
            ["kernels/fused.c", "kernels/mix.c"],
            depends=["kernels/mix.h"],
        )
    ],
    cmdclass={"build_ext": BuildExt},
)
