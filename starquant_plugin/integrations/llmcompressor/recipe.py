"""Load a recipe and make sure it will actually run STaR-Quant.

llm-compressor accepts a YAML without a ``<name>_stage:`` key (or a misspelled
``<group>_modifiers:`` key) and then runs zero modifiers without a word; this check turns that
into an error before any calibration starts.
"""

from pathlib import Path

from llmcompressor.recipe import Recipe

from starquant_plugin.integrations.llmcompressor.modifier import STaRQuantModifier

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""The recipes shipped with the package (the repository's ``recipes/`` folder)."""

_EXAMPLE = """starquant_stage:
  quantization_modifiers:
    STaRQuantModifier:
      scheme: W4A4"""


def load_starquant_recipe(path_or_yaml: str | Path, stage: str | None = None) -> Recipe:
    """The recipe at ``path_or_yaml`` (a file path or a YAML string), checked to contain a
    ``STaRQuantModifier``; pass the result to ``oneshot(recipe=...)``.

    Field errors (unknown keys, an unknown scheme) raise pydantic's ``ValidationError`` here.
    """
    source = str(path_or_yaml)
    recipe = Recipe.create_instance(source, target_stage=stage)
    if not any(isinstance(modifier, STaRQuantModifier) for modifier in recipe.modifiers):
        found = [type(modifier).__name__ for modifier in recipe.modifiers]
        where = source if Path(source).is_file() else "the recipe string"
        raise ValueError(
            f"{where} resolves to modifiers {found} with no STaRQuantModifier, so oneshot would "
            "not quantize anything. A recipe needs a top-level '<name>_stage:' key with a "
            f"'<group>_modifiers:' key under it, e.g.\n{_EXAMPLE}\n(and `import "
            "starquant_plugin` before parsing it, which registers the modifier)."
        )
    return recipe


def bundled_recipe(family: str, scheme: str = "W4A4") -> str:
    """Path of the shipped recipe for a model family (``llada``/``dream``) and scheme, as a
    string: ``oneshot(recipe=...)`` takes a ``str`` path (a ``Path`` fails inside
    llm-compressor)."""
    path = RECIPES_DIR / f"{family}_{scheme.lower()}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"No bundled recipe for {family} {scheme}; available: {available}.")
    return str(path)
