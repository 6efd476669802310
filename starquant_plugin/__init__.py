"""starquant: STaR-Quant post-training quantization for diffusion LLMs (LLaDA, Dream)."""

from starquant_plugin.integrations import (
    register_llmcompressor,
    register_lm_eval,
    register_transformers,
)

__version__ = "0.1.0"


def register() -> None:
    """Register everything starquant plugs into; idempotent. transformers, llm-compressor and
    lm-eval are not imported here (``import starquant_plugin`` stays cheap, so the CLI starts
    fast): each registration runs when its framework is imported."""
    register_transformers()
    register_llmcompressor()
    register_lm_eval()


register()

__all__ = ["__version__", "register"]
