"""vLLM's view of a STaR-Quant checkpoint: ``quant_method: starquant`` -> linear methods.

``StarQuantVllmConfig`` parses ``config.json``'s ``quantization_config`` with the same
validation as the transformers loader (``integrations.format.validate_config``), refuses any
``starquant`` version, args or quantizer this plugin does not implement, and hands every
fused vLLM linear whose constituents form one ``starquant.input_groups`` entry a
``StarQuantLinearMethod``. Registered by ``register_quantization_config("starquant")``.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import (
    QuantizationConfig,
    QuantizeMethodBase,
)

from starquant_plugin.config import QUANT_METHOD
from starquant_plugin.integrations.format import validate_config

IMPLEMENTED_ARGS = frozenset({
    "scheme", "transform", "transform_factors", "state_gating", "exclusive_fraction",
    "epochs", "lr", "lr_clip", "smoothquant_alpha", "weight_quantizer", "tac",
    "tac_group_size", "tac_damping", "tac_shrinkage", "tac_method", "kv_bits", "seed",
    "init_scale", "init_scale_alpha", "init_rotation", "lr_schedule", "kv_rotation",
    "k_smoothing",
})
"""``starquant.args`` keys whose runtime meaning this plugin implements (everything else only
shapes calibration, or, like ``kv_rotation``, acts through a runtime field of its own). A
checkpoint carrying another key may need runtime behaviour we do not have, so it is refused
instead of served with different numbers."""


def _check_args(args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - IMPLEMENTED_ARGS)
    if unknown:
        raise ValueError(
            f"The checkpoint's starquant.args has {unknown}, which this starquant_plugin's "
            f"vLLM integration does not implement (it knows {sorted(IMPLEMENTED_ARGS)}); "
            "serving it would give numbers other than the quantized model's. Upgrade "
            "starquant-plugin in the serving environment."
        )


class StarQuantVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config`` (compressed-tensors keys + ``starquant``).

    ``groups`` maps every quantized linear's vLLM name (after the model's weight mapper,
    unfused, e.g. ``model.layers.0.self_attn.q_proj``) to its ``input_groups`` entry.
    """

    def __init__(self, quantization_config: dict[str, Any]) -> None:
        super().__init__()
        block = quantization_config.get("starquant") or {}
        _check_args(block.get("args") or {})
        parsed, ct_config = validate_config(quantization_config)  # errors name the field
        self.args = parsed.args
        (scheme,) = ct_config.config_groups.values()
        self.weight_args, self.act_args = scheme.weights, scheme.input_activations
        self.kv_bits: int = parsed.kv_bits
        self.k_rotation: bool = parsed.k_rotation is not None  # validated: "hadamard" or None
        self.mask_token_id: int = parsed.mask_token_id
        self.family: str = parsed.family
        self.groups: dict[str, dict[str, Any]] = {
            name: group for group in (g.model_dump() for g in parsed.input_groups)
            for name in group["linears"]}

    def __repr__(self) -> str:
        return (f"StarQuantVllmConfig(scheme={self.args.scheme}, kv_bits={self.kv_bits}, "
                f"groups={len({id(g) for g in self.groups.values()})})")

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the torch fallback runs anywhere; kernels are chosen per layer at load

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StarQuantVllmConfig:
        return cls(config)

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        """Rename the checkpoint's linears (hub names) to the model's vLLM names."""
        renamed = {}
        for name, group in self.groups.items():
            new_name = hf_to_vllm_mapper.map_name(name)
            if new_name is not None:
                renamed[new_name] = group
        self.groups = renamed

    def check_model(self, family: str, mask_token_id: int) -> None:
        """Refuse a checkpoint quantized as another family or with another [MASK] id."""
        if self.family != family:
            raise ValueError(
                f"The checkpoint was quantized as a {self.family!r} model but is being "
                f"served as {family!r}; its config.json is inconsistent."
            )
        if self.mask_token_id != mask_token_id:
            raise ValueError(
                f"starquant.mask_token_id is {self.mask_token_id} but the model config's "
                f"mask_token_id is {mask_token_id}; the gates would read the wrong token "
                "state. Fix one of them so both name the tokenizer's [MASK] id."
            )

    def constituents(self, prefix: str) -> list[str]:
        """``model.layers.0.self_attn.qkv_proj`` -> its unfused names (q/k/v_proj)."""
        parent, _, last = prefix.rpartition(".")
        names = self.packed_modules_mapping.get(last)
        if not names:
            return [prefix]
        return [f"{parent}.{name}" if parent else name for name in names]

    def group_of(self, prefix: str) -> dict[str, Any] | None:
        """The input group a (fused) vLLM linear implements, None if it is not quantized.

        A fused layer must be exactly one group, in the group's order (its first linear
        stores the STaR tensors, which the fused layer loads once)."""
        names = self.constituents(prefix)
        groups = [self.groups.get(name) for name in names]
        if all(group is None for group in groups):
            return None
        group = groups[0]
        if group is None or any(g is not group for g in groups) \
                or len(group["linears"]) != len(names):
            raise ValueError(
                f"vLLM fuses {names} into {prefix}, but the checkpoint's "
                f"starquant.input_groups quantize them as "
                f"{[g['linears'] if g else None for g in groups]}; STaR-Quant needs one "
                "input transform per fused layer. The checkpoint does not fit this model."
            )
        return group

    def get_quant_method(self, layer: torch.nn.Module, prefix: str
                         ) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        group = self.group_of(prefix)
        if group is None:
            return UnquantizedLinearMethod()
        from starquant_plugin.integrations.vllm.linear_method import StarQuantLinearMethod

        return StarQuantLinearMethod(self, group, prefix)
