"""Builds shard/_qkernels (shard/csrc/qmatmul.c, attention.c, block_ops.c, block_step.c), the quantized
matmuls shard/quant.py and the attention, rotary embedding, SwiGLU and whole-step calls shard/blocks.py
and shard/block_step.py make through ctypes. Everything else is in pyproject.toml.

The library is compiled for the CPU that installs it (-march=native: AVX2, and VNNI where the CPU
has it). It is optional: where no C compiler or OpenMP is found, pip still installs Hearth and
shard/quant.py runs its pure-torch paths (`hearth run` says which it uses).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "shard._qkernels",
            sources=["shard/csrc/qmatmul.c", "shard/csrc/attention.c", "shard/csrc/block_ops.c",
                     "shard/csrc/block_step.c"],
            depends=["shard/csrc/exp8.h", "shard/csrc/kernels.h"],
            extra_compile_args=[
                "-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno",
                "-std=c11", "-Wall",
            ],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
