"""Load a recipe and make sure it will actually run STaR-Quant, once, on bounded input.

llm-compressor accepts a YAML without a ``<name>_stage:`` key (or a misspelled
``<group>_modifiers:`` key) and then runs zero modifiers without a word; this check turns that
into an error before any calibration starts. It also refuses what llm-compressor would only
fail on with a traceback (an unknown modifier name, modifier fields that are not a mapping, two
block modifiers, modifiers that do not stack) and recipes too big to be one: a file over
``MAX_RECIPE_BYTES``, or YAML aliases that expand past ``MAX_RECIPE_NODES`` nodes ("billion
laughs"). Those are checked on
the composed YAML graph, where an alias is one shared node, so the check itself stays small.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from llmcompressor.recipe import Recipe

from starquant_plugin.integrations.llmcompressor.modifier import (
    DecoderBlockModifier,
    SGATModifier,
    STaRQuantModifier,
    check_composition,
)
from starquant_plugin.messages import shown

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
"""The recipes shipped with the package (the repository's ``recipes/`` folder)."""

MAX_RECIPE_BYTES = 1_000_000
"""A recipe is a few dozen lines; a larger file or text is refused before it is parsed."""
MAX_RECIPE_ALIASES = 32
"""YAML aliases (``*name``) a recipe may use."""
MAX_RECIPE_NODES = 10_000
"""YAML nodes a recipe may hold once every alias is expanded (the bundled ones hold < 30)."""
MAX_RECIPE_DEPTH = 32
"""Nesting depth of a recipe's YAML (stage > group > modifier > field is 4)."""

_EXAMPLE = """starquant_stage:
  quantization_modifiers:
    STaRQuantModifier:
      scheme: W4A4"""


def read_recipe_text(path: str | os.PathLike) -> str:
    """The text of the recipe file at ``path``; a missing, oversized or non-UTF-8 file is
    refused before it is read whole."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"recipe {shown(path)} is a directory; pass a recipe "
                         "YAML file (e.g. one from recipes/).")
    if not path.is_file():
        raise FileNotFoundError(f"recipe file {shown(path)} does not exist; pass "
                                "a recipe YAML file (e.g. one from recipes/).")
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise ValueError(f"recipe file {shown(path)} is {size / 1e6:.1f} MB, over "
                         f"the {MAX_RECIPE_BYTES / 1e6:.0f} MB a recipe may be; pass the "
                         "recipe YAML itself (a few dozen lines).")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"recipe file {shown(path)} is not UTF-8 text "
                         f"({error.reason}); pass a recipe YAML file.") from None


def _check_graph(root: yaml.Node, where: str) -> None:
    """Refuse a composed YAML graph that nests deeper than ``MAX_RECIPE_DEPTH``, uses more
    than ``MAX_RECIPE_ALIASES`` aliases, refers to itself, or expands past
    ``MAX_RECIPE_NODES`` nodes. Linear in the graph: shared (aliased) nodes are sized once."""
    expanded: dict[int, int] = {}
    open_nodes: set[int] = set()
    aliases = 0

    def size(node: yaml.Node, depth: int) -> int:
        nonlocal aliases
        if id(node) in open_nodes:
            raise ValueError(f"{where} holds a YAML alias that refers to itself; write the "
                             "recipe without recursive aliases.")
        if id(node) in expanded:
            aliases += 1
            if aliases > MAX_RECIPE_ALIASES:
                raise ValueError(f"{where} uses more than {MAX_RECIPE_ALIASES} YAML aliases; "
                                 "write the values out instead of aliasing them.")
            return expanded[id(node)]
        if depth > MAX_RECIPE_DEPTH:
            raise ValueError(f"{where} nests deeper than {MAX_RECIPE_DEPTH} levels; a recipe "
                             f"is stages of modifiers of fields, e.g.\n{_EXAMPLE}")
        open_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        total = 1 + sum(size(child, depth + 1) for child in children)
        open_nodes.discard(id(node))
        expanded[id(node)] = total
        return total

    if size(root, 0) > MAX_RECIPE_NODES:
        raise ValueError(f"{where} expands through YAML aliases to more than "
                         f"{MAX_RECIPE_NODES} nodes; a recipe is a few dozen keys: write it "
                         "without nested aliases.")


def parse_recipe_yaml(text: str, where: str = "the recipe text") -> Any:
    """``yaml.safe_load(text)``, bounded: text over ``MAX_RECIPE_BYTES``, and aliases, nesting
    or an expansion past the limits above, are refused before anything is built from it.
    ``where`` names the recipe in messages. A syntax error raises ``yaml.YAMLError``."""
    if len(text) > MAX_RECIPE_BYTES:
        raise ValueError(f"{where} is {len(text) / 1e6:.1f} MB, over the "
                         f"{MAX_RECIPE_BYTES / 1e6:.0f} MB a recipe may be; pass the recipe "
                         "YAML itself (a few dozen lines).")
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise ValueError(f"{where} nests too deeply to parse; a recipe is stages of "
                             f"modifiers of fields, e.g.\n{_EXAMPLE}") from None
        if root is None:
            return None
        _check_graph(root, where)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _known_modifiers() -> set[str] | None:
    """Modifier names llm-compressor's factory resolves, or None if its registries moved."""
    from llmcompressor.modifiers.factory import ModifierFactory

    if not ModifierFactory._loaded:
        ModifierFactory.refresh()
    names = ("_main_registry", "_registered_registry", "_experimental_registry", "_errors")
    registries = [getattr(ModifierFactory, name, None) for name in names]
    if not all(isinstance(registry, dict) for registry in registries):
        return None
    return set().union(*registries)


_BLOCK_MODIFIERS = (STaRQuantModifier.__name__, SGATModifier.__name__)


def _block_modifier_entries(recipe: dict[str, Any], where: str) -> list[str]:
    """``stage.group`` of each STaRQuantModifier/SGATModifier entry, after checking every
    modifier entry the way ``Recipe.from_dict`` reads it: a known name with a mapping of
    fields."""
    known = _known_modifiers()
    found = []
    for stage, groups in recipe.items():
        if not (isinstance(stage, str) and stage.endswith("_stage") and isinstance(groups,
                                                                                  dict)):
            continue
        for group, modifiers in groups.items():
            if not (isinstance(group, str) and group.endswith("_modifiers")
                    and isinstance(modifiers, dict)):
                continue
            for name, fields in modifiers.items():
                at = f"modifier {shown(name)!r} (in {shown(f'{stage}.{group}')!r})"
                if known is not None and name not in known:
                    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.8)
                    hint = f"did you mean {close[0]!r}? " if close else ""
                    raise ValueError(
                        f"{where} names {at}, which llm-compressor does not know; {hint}"
                        "STaR-Quant's are STaRQuantModifier, SGATModifier and TACModifier "
                        "(`import starquant_plugin` before parsing registers them)."
                    )
                if not isinstance(fields, dict):
                    got = "no fields" if fields is None else f"a {type(fields).__name__}"
                    raise ValueError(
                        f"{where} gives {at} {got} instead of a mapping of its fields; write "
                        "them as keys under it, e.g. 'STaRQuantModifier: {scheme: W4A4}'."
                    )
                if name in _BLOCK_MODIFIERS:
                    found.append(f"{name} in {shown(f'{stage}.{group}')!r}")
    return found


def _is_path(source: str | os.PathLike) -> bool:
    """Whether a recipe argument names a file rather than holding YAML text."""
    return isinstance(source, os.PathLike) or (
        "\n" not in source and (os.path.isfile(source) or ":" not in source
                                or Path(source).suffix in (".yaml", ".yml", ".json")))


def _recipe_source(source: str | os.PathLike) -> tuple[str, str, bool]:
    """(YAML text, how messages name it, whether it came from a file) of a recipe argument."""
    if _is_path(source):
        return read_recipe_text(source), f"recipe {shown(source)}", True
    return str(source), "the recipe text", False


def recipe_that_ran(recipe: Recipe, source: str | os.PathLike | None = None) -> str:
    """The ``recipe.yaml`` text of a checkpoint, one kind whichever way it is saved.

    ``recipe``: the Recipe oneshot ran; ``source``: the file path or YAML text it was parsed
    from, if known. When ``source`` parses to the recipe that ran, its own text is kept (the
    user's comments and layout); when the run changed its values (e.g. ``starquant quantize
    --epochs``), the recipe that ran is written as llm-compressor writes it, with a source
    file's lines kept below as comments.
    """
    ran = recipe.yaml()
    if source is None:
        return ran
    text, _, is_file = _recipe_source(source)
    if load_starquant_recipe(text).yaml() == ran:
        return text
    if not is_file:
        return ran
    original = "".join(f"# {line}" if line.strip() else "#\n"
                       for line in text.splitlines(keepends=True))
    return (f"# the recipe that ran: {Path(source).name} with values changed for the run; "
            "the file as written follows, commented out\n"
            f"{ran}\n# --- {Path(source).name}:\n{original.rstrip()}\n")


def load_starquant_recipe(path_or_yaml: str | os.PathLike, stage: str | None = None) -> Recipe:
    """The recipe at ``path_or_yaml`` (a file path or a YAML string), checked to contain
    exactly one ``STaRQuantModifier`` or ``SGATModifier`` and to stack as
    ``check_composition`` allows; pass the result to ``oneshot(recipe=...)``.

    ``stage``: keep only the top-level keys starting with it (llm-compressor's
    ``target_stage``). Field errors (unknown keys, an unknown scheme) raise pydantic's
    ``ValidationError`` here; an oversized recipe, an unknown modifier, a second block
    modifier or a stack that does not compose raise ``ValueError``.
    """
    text, where, _ = _recipe_source(path_or_yaml)
    parsed = parse_recipe_yaml(text, where)
    if not isinstance(parsed, dict):
        raise ValueError(f"{where} parses to a {type(parsed).__name__}, not a mapping; a "
                         f"recipe has a top-level '<name>_stage:' key, e.g.\n{_EXAMPLE}")
    if stage:
        parsed = {key: value for key, value in parsed.items() if str(key).startswith(stage)}
    entries = _block_modifier_entries(parsed, where)
    if len(entries) > 1:
        raise ValueError(
            f"{where} holds {len(entries)} block modifiers ({', '.join(entries)}); "
            "STaR-Quant quantizes a model once, and a second one would re-quantize quantized "
            "linears. Keep one STaRQuantModifier or SGATModifier in one stage."
        )
    recipe = Recipe.from_dict(parsed)
    try:
        check_composition(recipe.modifiers)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    if not any(isinstance(modifier, DecoderBlockModifier) for modifier in recipe.modifiers):
        found = [type(modifier).__name__ for modifier in recipe.modifiers]
        raise ValueError(
            f"{where} resolves to modifiers {found} with no STaRQuantModifier or SGATModifier, "
            "so oneshot would not quantize anything. A recipe needs a top-level "
            f"'<name>_stage:' key with a '<group>_modifiers:' key under it, e.g.\n{_EXAMPLE}\n"
            "(and `import starquant_plugin` before parsing it, which registers the modifiers)."
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
