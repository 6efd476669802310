"""Serve LLaDA / Dream checkpoints, FP and STaR-Quant, with vLLM (``docs/serving.md``).

``register`` is this package's ``vllm.general_plugins`` entry point: vLLM calls it in every
process it starts (front end, engine core, each worker), possibly several times. It
registers the ``starquant`` quantization method and the ``LLaDAModelLM`` / ``DreamModel``
architectures, and the project's transformers classes (so vLLM can read the configs).
Nothing here is imported by ``import starquant_plugin``: vLLM stays optional.
"""

from __future__ import annotations

_registered = False


def register() -> None:
    """Register the quantization method and the architectures with vLLM; idempotent (a
    repeated call in the same process does nothing, and vLLM's registries overwrite an
    equal entry without side effects)."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry
    from vllm.model_executor.layers.quantization import register_quantization_config

    import starquant_plugin  # noqa: F401  (AutoConfig for llada / Dream)
    from starquant_plugin.config import QUANT_METHOD
    from starquant_plugin.integrations.vllm.models import ARCHITECTURES
    from starquant_plugin.integrations.vllm.quant_config import StarQuantVllmConfig

    register_quantization_config(QUANT_METHOD)(StarQuantVllmConfig)
    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    _registered = True


__all__ = ["register"]
