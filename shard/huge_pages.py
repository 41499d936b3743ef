"""Quantized weights in 2 MiB pages, where Linux's transparent huge pages allow it.

A decode step streams every weight of a span from memory once. On 4 KiB pages that is a TLB miss
every 4 KiB, and on a virtual machine each miss walks two page tables. Measured on issue 16's model
(AMD EPYC VM, THP in `madvise` mode), an 8-block span's decode step took 19.3 ms with int8 weights
on 4 KiB pages and 16.3 ms on 2 MiB pages at one thread, and 14.7 ms against 10.2 ms at two threads.
int4 went from 12.5 to 10.5 ms at one thread (benchmarks/RESULTS.md).

`copy` gives a tensor the same values in anonymous memory that the kernel is asked
(`madvise(MADV_HUGEPAGE)`) to back with huge pages. Only whole 2 MiB pages inside the tensor are
advised. Its first bytes start on a 2 MiB boundary, and the tail after the last whole page stays on
4 KiB pages, so resident memory is the tensor's bytes as before. The slack before the boundary
is never touched, so it costs address space only. Where THP is off, or on another system, the
tensor is returned unchanged.
"""

from __future__ import annotations

import mmap

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
    """Whether this kernel backs advised memory with transparent huge pages ("always" or "madvise")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open(_THP_MODE) as mode:
            return "[never]" not in mode.read()
    except OSError:
        return False


_SUPPORTED = supported()


def copy(tensor: Tensor) -> Tensor:
    """`tensor` (contiguous, CPU) with its values in memory advised for huge pages, or `tensor`
    itself where that cannot be had: THP off, smaller than one huge page, or the mapping refused."""
    if not _SUPPORTED or tensor.nbytes < HUGE_PAGE or not tensor.is_contiguous() or tensor.device.type != "cpu":
        return tensor
    try:
        region = mmap.mmap(-1, tensor.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return tensor
    base = torch.frombuffer(region, dtype=torch.uint8)  # to read the mapping's address
    offset = -base.data_ptr() % HUGE_PAGE
    del base
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, tensor.nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:
        pass  # still correct memory, on small pages
    # torch.frombuffer keeps a reference to the buffer (hence the mapping) as long as the tensor lives
    moved = torch.frombuffer(memoryview(region)[offset:offset + tensor.nbytes], dtype=tensor.dtype)
    moved = moved.view(tensor.shape)
    moved.copy_(tensor)
    return moved
