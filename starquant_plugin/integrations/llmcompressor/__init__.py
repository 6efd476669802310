"""llm-compressor integration: ``STaRQuantModifier`` for ``oneshot`` recipes.

Needs the ``compress`` extra. Importing this module registers the modifier with llm-compressor's
``ModifierFactory``; ``import starquant_plugin`` arranges for that import to happen as soon as
llm-compressor itself is imported, so a YAML recipe naming ``STaRQuantModifier`` resolves.
"""

from starquant_plugin.integrations.llmcompressor.modifier import (
    STaRQuantModifier,
    resolve_block_groups,
)
from starquant_plugin.integrations.llmcompressor.recipe import (
    bundled_recipe,
    load_starquant_recipe,
)


def register_modifier() -> None:
    """Make ``STaRQuantModifier`` resolvable by name in recipes; idempotent."""
    from llmcompressor.modifiers.factory import ModifierFactory

    ModifierFactory.register(STaRQuantModifier.__name__, STaRQuantModifier)


register_modifier()

__all__ = ["STaRQuantModifier", "bundled_recipe", "load_starquant_recipe", "register_modifier",
           "resolve_block_groups"]
