"""starquant: STaR-Quant post-training quantization for diffusion LLMs (LLaDA, Dream)."""

from starquant_plugin.integrations import (
    register_llmcompressor,
    register_lm_eval,
    register_transformers,
)
from starquant_plugin.models import register_auto_classes

__version__ = "0.1.0"


def register() -> None:
    """Register everything starquant plugs into; idempotent. llm-compressor and lm-eval are
    not imported here: their registration runs when they are imported."""
    register_auto_classes()
    register_llmcompressor()
    register_lm_eval()
    register_transformers()


register()

__all__ = ["__version__", "register"]
