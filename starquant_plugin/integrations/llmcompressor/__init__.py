"""llm-compressor integration: ``STaRQuantModifier``, ``SGATModifier`` and ``TACModifier`` for
``oneshot`` recipes.

Needs the ``compress`` extra. Importing this module registers the modifiers with
llm-compressor's ``ModifierFactory``; ``import starquant_plugin`` arranges for that import to
happen as soon as llm-compressor itself is imported, so a YAML recipe naming them resolves.
"""

from starquant_plugin.integrations.llmcompressor.modifier import (
    DecoderBlockModifier,
    SGATModifier,
    STaRQuantModifier,
    TACModifier,
    check_composition,
)
from starquant_plugin.integrations.llmcompressor.recipe import (
    bundled_recipe,
    load_starquant_recipe,
)
from starquant_plugin.integrations.llmcompressor.targets import resolve_block_groups

MODIFIERS = (STaRQuantModifier, SGATModifier, TACModifier)


def register_modifier() -> None:
    """Make the STaR-Quant modifiers resolvable by name in recipes; idempotent."""
    from llmcompressor.modifiers.factory import ModifierFactory

    for modifier in MODIFIERS:
        ModifierFactory.register(modifier.__name__, modifier)


register_modifier()

__all__ = ["MODIFIERS", "DecoderBlockModifier", "SGATModifier", "STaRQuantModifier",
           "TACModifier", "bundled_recipe", "check_composition", "load_starquant_recipe",
           "register_modifier", "resolve_block_groups"]
