"""Putting quantized linears (shard/quant.py) in place of a module's `nn.Linear` layers, in place:
from float weights (`quantize_linears_`) or empty, for `load_state_dict` to fill
(`empty_quantized_linears_`). Everything is validated before the first layer is replaced."""

from __future__ import annotations

from torch import nn

from shard.errors import QuantizationError
from shard.quant import QUANT_MODES, Int4Linear, Int8Linear, _check_group_size

def quantize_linears_(module: nn.Module, mode: str, group_size: int = 32) -> None:
    """Replace every `nn.Linear` inside `module` (recursively), in place, by its quantized form.

    `mode` is one of QUANT_MODES ("none" changes nothing); `group_size` is used by int4.
    Everything is validated before the first layer is replaced.
    """
    def quantize(linear: nn.Linear) -> nn.Module:
        if mode == "int8":
            return Int8Linear.from_float(linear.weight, linear.bias)
        return Int4Linear.from_float(linear.weight, linear.bias, group_size)

    _swap_linears(module, mode, group_size, quantize, need_weights=True)


def empty_quantized_linears_(module: nn.Module, mode: str, group_size: int = 32) -> None:
    """Like `quantize_linears_`, but with empty quantized layers for `load_state_dict` to fill.

    The new layers are created on each linear's device (use `load_state_dict(..., assign=True)`
    for a module built on the meta device).
    """
    def empty(linear: nn.Linear) -> nn.Module:
        has_bias, device = linear.bias is not None, linear.weight.device
        if mode == "int8":
            return Int8Linear(linear.in_features, linear.out_features, has_bias, device=device)
        return Int4Linear(
            linear.in_features, linear.out_features, has_bias, group_size, device=device
        )

    _swap_linears(module, mode, group_size, empty, need_weights=False)


def _swap_linears(module: nn.Module, mode: str, group_size: int, make, need_weights: bool):
    if mode not in QUANT_MODES:
        raise QuantizationError(
            f"unknown quantization mode {mode!r}; expected one of {QUANT_MODES}"
        )
    if mode == "none":
        return
    if isinstance(module, nn.Linear):
        raise QuantizationError(
            "cannot replace the nn.Linear passed in itself; pass the module that holds it"
        )
    targets = _linears(module)
    for qualified, _, _, linear in targets:
        _check_swappable(qualified, linear, mode, group_size, need_weights)
    replaced: dict[int, nn.Module] = {}
    for _, parent, name, linear in targets:
        if id(linear) not in replaced:  # a layer shared by two parents stays shared
            replaced[id(linear)] = make(linear)
        setattr(parent, name, replaced[id(linear)])


def _linears(module: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(qualified name, parent, attribute, layer) for every nn.Linear strictly inside `module`."""
    found = []
    for parent_name, parent in module.named_modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                found.append((f"{parent_name}.{name}".lstrip("."), parent, name, child))
    return found


def _check_swappable(
    qualified: str, linear: nn.Linear, mode: str, group_size: int, need_weights: bool
) -> None:
    if mode == "int4":
        try:
            _check_group_size(group_size, linear.in_features)
        except QuantizationError as err:
            raise QuantizationError(f"layer {qualified!r}: {err}") from err
    if need_weights and linear.weight.is_meta:
        raise QuantizationError(
            f"layer {qualified!r} has no weights (meta device); load them first, or use "
            "empty_quantized_linears_ to load an already-quantized span"
        )
