"""Framework glue: each submodule imports its framework, so ``import starquant_plugin`` works
without the optional extras (``compress``: llm-compressor, ``serve``: vLLM)."""

import importlib.util


def register_llmcompressor() -> None:
    """Make ``STaRQuantModifier`` resolvable in llm-compressor recipes when llm-compressor is
    installed (the ``compress`` extra); otherwise do nothing. Idempotent."""
    if importlib.util.find_spec("llmcompressor") is None:
        return
    from starquant_plugin.integrations.llmcompressor import register_modifier

    register_modifier()


def register_transformers() -> None:
    """Make ``from_pretrained`` load STaR-Quant checkpoints (``quant_method: starquant``)
    through transformers' quantizer registry. Idempotent."""
    from starquant_plugin.integrations.hf_quantizer import register_hf_quantizer

    register_hf_quantizer()
