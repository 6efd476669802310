"""transformers-5 implementations of the supported diffusion LMs and their tooling."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from starquant_plugin.models.dream import DreamConfig, DreamModel
from starquant_plugin.models.families import FAMILIES, family_of, mask_token_id, token_logits
from starquant_plugin.models.llada import LLaDAConfig, LLaDAModelLM


def register_auto_classes() -> None:
    """Register both families with the Auto classes; safe to call any number of times."""
    for config_class, model_class in ((LLaDAConfig, LLaDAModelLM), (DreamConfig, DreamModel)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


__all__ = [
    "FAMILIES",
    "DreamConfig",
    "DreamModel",
    "LLaDAConfig",
    "LLaDAModelLM",
    "family_of",
    "mask_token_id",
    "register_auto_classes",
    "token_logits",
]
