"""starquant: STaR-Quant post-training quantization for diffusion LLMs (LLaDA, Dream)."""

from starquant_plugin.integrations import register_llmcompressor, register_transformers
from starquant_plugin.models import register_auto_classes

__version__ = "0.1.0"


def register() -> None:
    """Register everything starquant plugs into; idempotent."""
    register_auto_classes()
    register_llmcompressor()
    register_transformers()


register()

__all__ = ["__version__", "register"]
