"""The block modifiers under compressed-tensors offloading (a model bigger than the device):
an FP copy of an offloaded block, and quantized linears offloaded where the linears they
replace were."""

import copy

from compressed_tensors.offload import (
    disable_onloading,
    get_cache_init_kwargs,
    offload_module,
    remove_dispatch,
)
from compressed_tensors.offload.cache import OffloadCache
from torch import nn


def fp_copy(block: nn.Module) -> nn.Module:
    """An unmodified, not offloaded copy of ``block`` for the FP chain, its tensors on the
    block's execution device.

    ``copy.deepcopy`` of a block under compressed-tensors offloading copies the caches'
    handles, which the copy cannot onload (a disk cache finds a tensor's file by the original
    handle, so the copy fails with a KeyError). So copy the structure without onloading, drop
    the copy's offloading, and give it copies of the block's onloaded tensors (copies: the
    K/V folds change the block's weights in place)."""
    with disable_onloading():
        twin = copy.deepcopy(block)
    remove_dispatch(twin)
    for original, copied in zip(block.modules(), twin.modules(), strict=True):
        if isinstance(original._parameters, OffloadCache):
            for name, tensor in original._parameters.items():
                copied._parameters[name] = copy.deepcopy(tensor)
            for name, tensor in original._buffers.items():
                copied._buffers[name] = copy.deepcopy(tensor)
    return twin


def offloading_of(block: nn.Module, groups: tuple[tuple[str, ...], ...]
                  ) -> dict[str, dict]:
    """The compressed-tensors offload settings (``offload_module`` kwargs) of the offloaded
    linears in ``groups``, read before ``quantize_block`` replaces them."""
    linears = {name: block.get_submodule(name) for group in groups for name in group}
    return {name: get_cache_init_kwargs(linear) for name, linear in linears.items()
            if isinstance(linear._parameters, OffloadCache)}


def offload_like(block: nn.Module, offloading: dict[str, dict]) -> None:
    """Offload each ``StarQuantLinear`` (with its input transform) the way the linear it
    replaced was (``offloading_of``).

    The replacements are built from onloaded weights, so they sit on the onload device; left
    there, a model bigger than the device would collect every quantized block on it."""
    for name, kwargs in offloading.items():
        for module in block.get_submodule(name).modules():
            if not isinstance(module._parameters, OffloadCache):
                offload_module(module, **kwargs)
