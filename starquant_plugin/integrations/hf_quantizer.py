"""Load STaR-Quant checkpoints with ``AutoModelForCausalLM.from_pretrained``.

transformers finds quantizers by ``quant_method``: ``StarQuantConfig`` parses the checkpoint's
``quantization_config`` (compressed-tensors' keys plus the ``starquant`` block) and
``StarQuantHfQuantizer`` swaps the targeted ``nn.Linear``s for empty ``StarQuantLinear``s in
the checkpoint's layout before the weights load, so every tensor loads by name. Registered
by ``import starquant_plugin`` (``register_hf_quantizer``).
"""

from __future__ import annotations

import copy
from typing import Any

from compressed_tensors.utils import match_named_modules
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from starquant_plugin.config import QUANT_METHOD
from starquant_plugin.integrations.format import (
    K_ROTATION,
    InputGroup,
    StarQuantBlock,
    check_finite,
    check_missing,
    checkpoint_keys,
    expected_tensors,
    quantized_buffers,
    validate_config,
)
from starquant_plugin.integrations.saving import bind_save_pretrained
from starquant_plugin.method.runtime import (
    StarQuantInputTransform,
    StarQuantLinear,
    attach_mask_state,
)
from starquant_plugin.models.attention import use_kv_quantized_attention
from starquant_plugin.models.families import family_of, mask_token_id


class StarQuantConfig(QuantizationConfigMixin):
    """transformers' view of a STaR-Quant ``quantization_config`` (see ``integrations.format``).

    Holds the dict as saved (``to_dict`` returns it, so a reloaded model saves the same
    config); ``block`` (``StarQuantBlock``, with ``block.args``) and ``ct_config``
    (compressed-tensors' ``QuantizationConfig``) are parsed from it, and an unknown
    ``starquant.version`` or a missing field raises.
    """

    def __init__(self, quant_method: str = QUANT_METHOD, **config: Any) -> None:
        self._config = {"quant_method": quant_method, **config}
        self.quant_method = quant_method
        self.block, self.ct_config = validate_config(self._config)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def starquant(self) -> StarQuantBlock:
        return self.block


class StarQuantHfQuantizer(HfQuantizer):
    """Builds the STaR-Quant modules of a pre-quantized checkpoint before its weights load.

    Before loading: checks every shard is readable and holds every tensor the quantized
    linears need (clear error otherwise), replaces each ``nn.Linear`` matched by the config
    groups' ``targets`` minus ``ignore`` with an empty ``StarQuantLinear``, attaches the
    ``[MASK]`` state hook to the embedding and, when ``kv_bits < 16``, the K/V-quantized
    attention. After loading: refuses any buffer left unloaded.
    """

    requires_calibration = True
    quantization_config: StarQuantConfig

    def __init__(self, quantization_config: StarQuantConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError(
                "StarQuantConfig only loads checkpoints quantized by starquant; to quantize a "
                "model run quantize_dllm or llm-compressor's oneshot with STaRQuantModifier."
            )

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None,
                                             **kwargs):
        config = self.quantization_config
        block = config.block
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
        ct_config = config.ct_config
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
        weight_args, act_args = scheme.weights, scheme.input_activations
        for group in block.input_groups:
            self._replace_group(model, group, weight_args, act_args, mask_state)
        if checkpoint_files:
            check_missing(expected_tensors(block.input_groups, ct_config.format),
                          checkpoint_keys(checkpoint_files), str(checkpoint_files[0]))
        kv_bits = block.kv_bits
        k_rotation = block.k_rotation == K_ROTATION  # validated: "hadamard" or None
        if kv_bits < 16:
            for block_name, decoder_block in model.named_modules():
                if type(decoder_block).__name__ == family.block_class and any(
                        name.startswith(f"{block_name}.") for name in listed):
                    attention = decoder_block.get_submodule(family.attention_module)
                    attention.kv_bits = kv_bits
                    attention.k_rotation = k_rotation
            use_kv_quantized_attention(model)
        return model

    @staticmethod
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

    def _process_model_after_weight_loading(self, model, **kwargs):
        unloaded = [f"{name}.{buffer}" for name, module in model.named_modules()
                    if isinstance(module, (StarQuantLinear, StarQuantInputTransform))
                    for buffer, tensor in module.named_buffers(recurse=False)
                    if tensor.device.type == "meta"]
        if unloaded:
            raise ValueError(
                f"{len(unloaded)} STaR-Quant tensor(s) were not in the checkpoint: "
                f"{unloaded[:5]}; the checkpoint is incomplete. Re-save it with save_starquant."
            )
        check_finite(quantized_buffers(model), type(model).__name__ + " as loaded")
        bind_save_pretrained(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_hf_quantizer() -> None:
    """Register ``starquant`` with transformers' quantizer registry; idempotent.

    transformers raises on a duplicate name, so an existing registration is kept when it is
    ours (same class name and module, e.g. after a module reload) and refused otherwise.
    """
    for mapping, cls, register in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, StarQuantConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, StarQuantHfQuantizer, register_quantizer),
    ):
        existing = mapping.get(QUANT_METHOD)
        if existing is None:
            register(QUANT_METHOD)(cls)
        elif (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise RuntimeError(
                f"transformers already has {existing.__module__}.{existing.__qualname__} "
                f"registered for quant_method {QUANT_METHOD!r}; two plugins claim the name. "
                "Uninstall the other one."
            )
