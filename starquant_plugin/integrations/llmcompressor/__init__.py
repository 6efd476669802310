"""llm-compressor integration: ``STaRQuantModifier`` for ``oneshot`` recipes.

Needs the ``compress`` extra. ``starquant_plugin.register()`` calls ``register_modifier`` when
llm-compressor is installed, so a YAML recipe naming ``STaRQuantModifier`` resolves.
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


__all__ = ["STaRQuantModifier", "bundled_recipe", "load_starquant_recipe", "register_modifier",
           "resolve_block_groups"]
