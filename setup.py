"""Builds the optional compiled kernels of ``diffs`` (everything else is in pyproject.toml).

``optional=True``: where no C compiler is at hand the install still succeeds, and ``diffs``
runs its numpy code instead (``diffcast diff kernels`` says which is in use).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "diffs._native",
            sources=["diffs/_native.c"],
            optional=True,
            extra_compile_args=["-O3", "-std=c11", "-fno-fast-math"],
        )
    ]
)
