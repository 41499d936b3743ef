"""This process's compute: torch's thread count, which quantized kernels run, the memory available.

Every command that computes (`hearth run`, `node`, `generate`, `api`, `demo`, `swarm`) takes
`--threads N` and calls `use_threads`; nodes print `describe()` when they start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch

from shard import qkernels
from shard.errors import InvalidInput

MAX_THREADS = 1024


def use_threads(threads: int) -> None:
    """Run torch's intra-op work and the compiled kernels on `threads` threads (0: torch's choice,
    one per core)."""
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= MAX_THREADS:
        raise InvalidInput(f"--threads must be 0 (one per core) to {MAX_THREADS}, got {threads!r}")
    if threads:
        torch.set_num_threads(threads)


def threads() -> int:
    """The threads torch's intra-op work and the compiled kernels run on now."""
    return torch.get_num_threads()


def describe() -> str:
    """One line: threads and quantized kernels, e.g. '2 threads, quantized matmuls compiled (avx2+avx512vnni)'."""
    count = torch.get_num_threads()
    return f"{count} thread{'s' if count != 1 else ''}, quantized matmuls {qkernels.describe()}"


def kernel_signature() -> str:
    """What computes spans in this process, as `protocol.SpanInfo.kernels` carries it: two processes
    with the same signature and quantization give bit-identical results (whatever their thread
    counts and batches: benchmarks/bench_verify.py); others differ by rounding (docs/security.md)."""
    return f"torch {torch.__version__}; {qkernels.isa()}"[:64]


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing):
    a loader that built large temporaries calls it, so resident memory is what stays in use."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable; the free pages where /proc is missing): what a
    node's span and a client's own blocks (`mesh.first_blocks`) are weighed against."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
