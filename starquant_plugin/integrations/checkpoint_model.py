"""The model a STaR-Quant checkpoint describes, built empty: the loader's modules, the spec of
every tensor the checkpoint must hold, and the check of a saved folder as a whole.

``build_starquant_modules`` is what the transformers loader (``hf_quantizer``) does before the
weights load; ``checkpoint_specs`` builds the same on the meta device for loaders that do not
(vLLM) and for ``check_checkpoint``, so "what a checkpoint holds" has one definition: the
state dict of the model built here.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils import match_named_modules
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from starquant_plugin.integrations.checkpoint_tensors import (
    CheckpointTensorError,
    TensorChecker,
    TensorSpec,
    tensor_specs,
)
from starquant_plugin.integrations.format import (
    K_ROTATION,
    InputGroup,
    StarQuantBlock,
    read_quantization_config,
    shard_files,
    validate_config,
)
from starquant_plugin.method.runtime import (
    StarQuantInputTransform,
    StarQuantLinear,
    attach_mask_state,
)
from starquant_plugin.models.attention import use_kv_quantized_attention
from starquant_plugin.models.families import family_of, mask_token_id


def build_starquant_modules(model: nn.Module, block: StarQuantBlock,
                            ct_config: QuantizationConfig) -> None:
    """Give ``model`` (FP, e.g. on the meta device) the empty STaR-Quant modules of a checkpoint
    in place: each linear the config groups target minus ``ignore`` becomes an empty
    ``StarQuantLinear`` (one shared transform per input group), the embedding sets the
    ``[MASK]`` state, and with ``kv_bits < 16`` attention quantizes (and maybe rotates) K/V.
    Refuses a checkpoint of another family, [MASK] id or set of linears."""
    family = family_of(model)
    if block.family != family.name:
        raise ValueError(
            f"The checkpoint was quantized as a {block.family!r} model but config.json "
            f"describes a {family.name!r} one; the checkpoint is inconsistent."
        )
    mask_id = mask_token_id(model)
    if block.mask_token_id != mask_id:
        raise ValueError(
            f"starquant.mask_token_id is {block.mask_token_id} but the model config's "
            f"mask_token_id is {mask_id}; the gates would read the wrong token state. Fix "
            "one of them so both name the tokenizer's [MASK] id."
        )
    mask_state = attach_mask_state(model.get_input_embeddings(), mask_id)
    model._starquant_mask_state = mask_state
    targeted = {name for scheme in ct_config.config_groups.values()
                for name, module in match_named_modules(model, scheme.targets,
                                                        ct_config.ignore or [])
                if isinstance(module, nn.Linear)}
    listed = [name for group in block.input_groups for name in group.linears]
    if not listed or set(listed) != targeted:
        raise ValueError(
            f"The checkpoint's config_groups/ignore select {len(targeted)} linears of "
            f"{type(model).__name__} but starquant.input_groups lists {len(listed)} "
            f"(differing: {sorted(set(listed) ^ targeted)[:5]}); the quantization_config "
            "does not fit this architecture."
        )
    (scheme,) = ct_config.config_groups.values()  # validate_config: exactly one group
    for group in block.input_groups:
        _replace_group(model, group, scheme.weights, scheme.input_activations, mask_state)
    if block.kv_bits < 16:
        for block_name, decoder_block in model.named_modules():
            if type(decoder_block).__name__ == family.block_class and any(
                    name.startswith(f"{block_name}.") for name in listed):
                attention = decoder_block.get_submodule(family.attention_module)
                attention.kv_bits = block.kv_bits
                attention.k_rotation = block.k_rotation == K_ROTATION  # validated
        use_kv_quantized_attention(model)


def _replace_group(model: nn.Module, group: InputGroup, weight_args, act_args,
                   mask_state) -> None:
    """Swap a group's linears for empty ``StarQuantLinear``s sharing one empty transform,
    with float tensors in the dtype the model is being loaded in."""
    linears = {name: model.get_submodule(name) for name in group.linears}
    d = group.in_features
    wrong = [name for name, linear in linears.items() if linear.in_features != d]
    if wrong:
        raise ValueError(
            f"starquant.input_groups says {wrong} read {d} features but the model's "
            "linears differ; the checkpoint does not fit this architecture."
        )
    first = next(iter(linears.values())).weight
    device, dtype = first.device, first.dtype
    transform = StarQuantInputTransform.empty(
        d, group.exclusive_width, group.factors, act_args, mask_state,
        group.tac_group_size, dtype=dtype, device=device)
    for index, (name, linear) in enumerate(linears.items()):
        model.set_submodule(name, StarQuantLinear.empty(
            linear.out_features, linear.bias is not None, weight_args, transform,
            owns_transform=index == 0, dtype=dtype, device=device))


def checkpoint_specs(config: PretrainedConfig) -> dict[str, TensorSpec]:
    """Name -> spec of every tensor a STaR-Quant checkpoint with this ``config`` (carrying its
    ``quantization_config``) holds, from the model built on the meta device; float tensors in
    the config's ``dtype``. For loaders that do not build the transformers model (vLLM)."""
    quantization_config = config.quantization_config
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    block, ct_config = validate_config(quantization_config)
    plain = copy.deepcopy(config)
    del plain.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain)
    build_starquant_modules(model, block, ct_config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return tensor_specs(model, dtype if isinstance(dtype, torch.dtype) else None)


def check_checkpoint(path: str | Path) -> None:
    """Check a saved STaR-Quant checkpoint folder as a whole: its ``quantization_config``
    (``validate_config``), then every tensor of every shard against ``checkpoint_specs``
    (present, expected, shape, dtype, finite)."""
    path = Path(path)
    read_quantization_config(path)  # config.json an object with a consistent config
    config = AutoConfig.from_pretrained(path)
    checker = TensorChecker(checkpoint_specs(config), str(path))
    for file in shard_files(path):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for _ in checker.stream((name, handle.get_tensor(name))
                                        for name in handle.keys()):
                    pass
        except CheckpointTensorError:
            raise
        except Exception as error:  # safetensors raises its own SafetensorError
            raise CheckpointTensorError(
                f"Cannot read {file}: {error}. The shard is truncated or corrupt; download or "
                "copy the checkpoint again (or re-save it with save_starquant)."
            ) from error
    checker.finish()
