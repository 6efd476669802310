"""The base class both families share: ``from_pretrained`` that refuses a checkpoint whose
quantized tensors it would silently drop.

transformers loads a folder whose safetensors hold quantized linears (``weight_packed``,
``weight_scale``, STaR-Quant's ``input_transform`` tensors) but whose config.json has no
quantization config it can act on by reporting them as unexpected, leaving those linears at
random init, and returning a model that generates garbage. That happens when a save path drops
``quantization_config`` or names a ``quant_method`` nobody registered; here it raises instead.
"""

import re

from transformers import PreTrainedModel

QUANTIZED_TENSOR = re.compile(
    r"\.(weight_packed|weight_shape|weight_scale|weight_zero_point)$|\.input_transform\.")
"""Names of the tensors a compressed-tensors / STaR-Quant checkpoint stores instead of
``weight`` (``integrations/format.py`` describes the layout)."""


def refuse_dropped_quantized_tensors(path: object, unexpected_keys: set[str] | list[str]
                                     ) -> None:
    """Raise when loading ``path`` left quantized tensors unused (see the module docstring)."""
    dropped = sorted(key for key in unexpected_keys if QUANTIZED_TENSOR.search(key))
    if dropped:
        raise ValueError(
            f"{path} holds {len(dropped)} quantized tensor(s) (e.g. {dropped[0]!r}) that this "
            "load would ignore, leaving those linears at random init: its config.json has no "
            "quantization_config with quant_method 'starquant' that transformers can act on. "
            "Import starquant_plugin before loading (it registers the 'starquant' loader), and "
            "check config.json: a save path that dropped quantization_config needs a re-save "
            "from the quantized model with model.save_pretrained(dir) or save_starquant(model, "
            "dir) (starquant_plugin.integrations.saving)."
        )


class DLLMPreTrainedModel(PreTrainedModel):
    """``PreTrainedModel`` whose ``from_pretrained`` refuses dropped quantized tensors."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args,
                                              output_loading_info=True, **kwargs)
        refuse_dropped_quantized_tensors(pretrained_model_name_or_path, info["unexpected_keys"])
        return (model, info) if want_info else model
