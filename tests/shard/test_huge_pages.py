"""shard.huge_pages: quantized weights copied into memory advised for 2 MiB pages, values unchanged."""

from __future__ import annotations

import pytest
import torch

from shard import huge_pages, qkernels
from shard.quant import Int4Linear, Int8Linear


def anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding `address` (/proc/self/smaps), in KiB."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def test_a_copy_holds_the_same_values_from_a_huge_page_boundary():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (3000, 2048), dtype=torch.int8, generator=generator)  # 5.9 MiB
    moved = huge_pages.copy(weight)
    assert torch.equal(moved, weight) and moved.dtype == weight.dtype and moved.shape == weight.shape
    if not huge_pages.supported():
        assert moved is weight
        pytest.skip("this kernel has transparent huge pages off: the tensor stays where it is")
    assert moved.data_ptr() % huge_pages.HUGE_PAGE == 0 and moved.data_ptr() != weight.data_ptr()
    moved.add_(0)  # touched, as a forward reads it
    assert anon_huge_kib(moved.data_ptr()) >= 2048  # whole 2 MiB pages; the tail stays on small ones


def test_small_or_strided_tensors_are_left_alone():
    small = torch.zeros(1000, dtype=torch.int8)
    strided = torch.zeros(4096, 1024, dtype=torch.int8)[:, ::2]
    assert huge_pages.copy(small) is small and huge_pages.copy(strided) is strided


@pytest.mark.skipif(not qkernels.available(), reason=f"no compiled kernels: {qkernels.why_unavailable()}")
@pytest.mark.parametrize("layer", ["int8", "int4"])
def test_quantized_layers_run_on_the_copies_with_the_same_bits(monkeypatch, layer):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(2048, 2048, generator=generator) * 0.02  # int8: 4 MiB; int4 tiles: 2.1 MiB
    x = torch.randn(3, 2048, generator=generator)

    def make():
        return Int8Linear.from_float(weight) if layer == "int8" else Int4Linear.from_float(weight, group_size=64)

    monkeypatch.setattr(huge_pages, "_SUPPORTED", False)
    expected = make()(x)
    monkeypatch.setattr(huge_pages, "_SUPPORTED", huge_pages.supported())
    quantized = make()
    assert torch.equal(quantized(x), expected)
    held = quantized._buffers["weight" if layer == "int8" else "kernel_tiles"]
    assert quantized.compiled() is not None and quantized.path(1) == "compiled"
    if huge_pages.supported():
        assert held.data_ptr() % huge_pages.HUGE_PAGE == 0


@pytest.mark.skipif(not qkernels.available(), reason=f"no compiled kernels: {qkernels.why_unavailable()}")
def test_a_loaded_span_holds_its_large_weights_on_huge_pages_before_any_forward(checkpoint_factory):
    from shard.span import load_span

    # gate_up of 2 x 1024 outputs by 1024 inputs: 2 MiB of int8; the others stay below a huge page
    span = load_span(checkpoint_factory("llama", hidden_size=1024, intermediate_size=1024), 0, 2, quant="int8")
    mlp = span.blocks[0].mlp
    large, small = mlp.gate_up_proj._buffers["weight"], mlp.down_proj._buffers["weight"]
    assert large.nbytes >= huge_pages.HUGE_PAGE > small.nbytes
    if not huge_pages.supported():
        pytest.skip("this kernel has transparent huge pages off: the weights stay where they are")
    assert large.data_ptr() % huge_pages.HUGE_PAGE == 0 and anon_huge_kib(large.data_ptr()) >= 2048
    assert "_compiled" not in mlp.down_proj.__dict__  # small layers: their view comes at the first forward
