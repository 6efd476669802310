"""Load STaR-Quant checkpoints with ``AutoModelForCausalLM.from_pretrained``.

transformers finds quantizers by ``quant_method``: ``StarQuantConfig`` parses the checkpoint's
``quantization_config`` (compressed-tensors' keys plus the ``starquant`` block) and
``StarQuantHfQuantizer`` swaps the targeted ``nn.Linear``s for empty ``StarQuantLinear``s in
the checkpoint's layout before the weights load, so every tensor loads by name. Registered
by ``import starquant_plugin`` (``register_hf_quantizer``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from starquant_plugin.config import QUANT_METHOD
from starquant_plugin.integrations.checkpoint_model import build_starquant_modules
from starquant_plugin.integrations.checkpoint_tensors import (
    check_headers,
    check_tensor_values,
    checkpoint_float_dtype,
    raise_misfit,
    tensor_specs,
)
from starquant_plugin.integrations.format import StarQuantBlock, validate_config
from starquant_plugin.integrations.saving import bind_save_pretrained
from starquant_plugin.method.runtime import (
    StarQuantInputTransform,
    StarQuantLinear,
)


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

    Before loading: replaces each ``nn.Linear`` matched by the config groups' ``targets``
    minus ``ignore`` with an empty ``StarQuantLinear``, checks every shard's header against
    every tensor the model now expects (``checkpoint_tensors``: present, nothing unexpected,
    shapes and dtypes; transformers checks no shape under a quantizer), attaches the ``[MASK]``
    state hook to the embedding and, when ``kv_bits < 16``, the K/V-quantized attention. After
    loading: refuses any buffer left unloaded, NaN/inf in any tensor and a ``weight_shape``
    that is not its linear's ``[out, in]``.
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
        build_starquant_modules(model, config.block, config.ct_config)
        if checkpoint_files:  # every tensor, from the headers, before any data is read
            folder = Path(checkpoint_files[0]).parent
            check_headers(tensor_specs(model, checkpoint_float_dtype(folder)),
                          checkpoint_files, str(folder))
        return model

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
        check_tensor_values(model, type(model).__name__ + " as loaded")
        _check_weight_shapes(model)
        bind_save_pretrained(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _check_weight_shapes(model) -> None:
    """Refuse a 4-bit linear whose ``weight_shape`` values are not its ``[out, in]``: the
    header check sees only that it is int64 ``[2]``, the integer path ignores it, but
    compressed-tensors' decompression (the reference path) unpacks the codes by it and fails
    at the first forward, and a re-save would publish it."""
    wrong = []
    for name, module in model.named_modules():
        if not isinstance(module, StarQuantLinear) or "weight_shape" not in module._buffers:
            continue
        stored = module._buffers["weight_shape"].tolist()
        expected = [module.weight_scale.shape[0], module.transform.sgat_channel_scale.shape[0]]
        if stored != expected:
            wrong.append(f"{name}.weight_shape is {stored}, expected {expected}")
    raise_misfit(wrong, f"{type(model).__name__} as loaded")


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
