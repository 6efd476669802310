"""Framework glue: each submodule imports its framework, so ``import starquant_plugin`` works
without the optional extras (``compress``: llm-compressor, ``eval``: lm-eval, ``serve``: vLLM)
and without paying for their imports.

llm-compressor and lm-eval are registered with lazily: ``when_imported`` runs the
registration as soon as the framework is imported (or at once if it already is), so recipes
naming ``STaRQuantModifier``, ``SGATModifier`` or ``TACModifier`` and ``lm_eval --model
starquant`` lookups resolve in whichever order the user imports.
"""

import importlib
import sys

from starquant_plugin.integrations.post_import import (
    half_imported,
    retry_after_imports,
    when_imported,
)

_LLMCOMPRESSOR_GLUE = "starquant_plugin.integrations.llmcompressor"
LM_EVAL_MODEL_NAME = "starquant"
"""The name ``lm_eval --model`` takes for LLaDA/Dream (FP or STaR-Quant) models."""
LM_EVAL_MODEL_PATH = "starquant_plugin.integrations.lm_eval:DiffusionLM"


def _register_modifier() -> None:
    # Importing the glue registers the modifiers at its end; if it is already imported (or
    # being imported, e.g. it is what triggered llm-compressor's import) that happened or
    # will happen there.
    if _LLMCOMPRESSOR_GLUE not in sys.modules:
        importlib.import_module(_LLMCOMPRESSOR_GLUE)


def register_llmcompressor() -> None:
    """Make the STaR-Quant modifiers resolvable in llm-compressor recipes once llm-compressor is
    imported (the ``compress`` extra), without importing it. Idempotent."""
    when_imported("llmcompressor", _register_modifier)


def _register_lm_eval_model() -> None:
    import lm_eval.models  # noqa: F401  lm-eval's own models: it skips them once any is registered
    from lm_eval.api.registry import model_registry

    if LM_EVAL_MODEL_NAME not in model_registry:
        model_registry.register(LM_EVAL_MODEL_NAME, target=LM_EVAL_MODEL_PATH)


def register_lm_eval() -> None:
    """Make ``simple_evaluate(model="starquant")`` resolve once lm-eval's registry is imported
    (a lazy ``module:Class`` entry: the adapter is imported only when a run uses it)."""
    when_imported("lm_eval.api.registry", _register_lm_eval_model)


def _register_with_transformers() -> bool:
    """Register now if transformers is imported and the modules this needs are not halfway
    through an import; True once done."""
    if sys.modules.get("transformers") is None:
        return False
    try:
        from starquant_plugin.integrations.hf_quantizer import register_hf_quantizer
        from starquant_plugin.models import register_auto_classes
    except (ImportError, AttributeError) as error:
        if half_imported(error):  # e.g. transformers was imported by one of those modules
            return False
        raise
    register_auto_classes()
    register_hf_quantizer()
    return True


def register_transformers() -> None:
    """Register LLaDA / Dream with transformers' Auto classes and ``starquant`` with its
    quantizer registry (so ``from_pretrained`` loads STaR-Quant checkpoints) as soon as
    transformers is imported, without importing it: at once if it is, else right after the
    import (of whatever module) that brought it in has finished. Idempotent."""
    retry_after_imports(_register_with_transformers)
