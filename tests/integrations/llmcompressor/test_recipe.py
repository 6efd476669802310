"""load_starquant_recipe on bad recipes: each is refused with one sentence naming the fix,
before llm-compressor builds anything, and oversized ones without growing memory."""

import resource

import pytest

from starquant_plugin.integrations.llmcompressor import STaRQuantModifier, load_starquant_recipe
from starquant_plugin.integrations.llmcompressor.recipe import (
    MAX_RECIPE_ALIASES,
    MAX_RECIPE_BYTES,
    MAX_RECIPE_NODES,
    parse_recipe_yaml,
    recipe_that_ran,
)

RECIPE = """starquant_stage:
  quantization_modifiers:
    STaRQuantModifier:
      scheme: {scheme}
"""


def laughs(levels: int, width: int = 9) -> str:
    """A "billion laughs" recipe: ``width ** levels`` strings from ``levels * width`` aliases,
    as the scheme (which pydantic would quote whole in its error)."""
    lines = ['l0: &l0 "lol"']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]"
              for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + RECIPE.format(scheme=f"*l{levels}")


def test_a_plain_recipe_loads():
    (modifier,) = load_starquant_recipe(RECIPE.format(scheme="W4A8")).modifiers
    assert isinstance(modifier, STaRQuantModifier) and modifier.scheme == "W4A8"


def test_billion_laughs_is_refused_before_it_expands(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(levels=9))  # 9 ** 9 = 387 million strings once expanded
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=f"uses more than {MAX_RECIPE_ALIASES} YAML aliases"):
        load_starquant_recipe(path)
    # few aliases, but each level doubles: 2 ** 30 nodes
    with pytest.raises(ValueError, match=f"expands through YAML aliases to more than "
                                         f"{MAX_RECIPE_NODES} nodes"):
        load_starquant_recipe(laughs(levels=14, width=2))
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kb < 50_000


def test_a_few_aliases_are_fine():
    text = "base: &scheme W4A4\n" + RECIPE.format(scheme="*scheme")
    (modifier,) = load_starquant_recipe(text).modifiers
    assert modifier.scheme == "W4A4"


def test_recursive_and_deep_yaml_is_refused():
    with pytest.raises(ValueError, match="refers to itself"):
        parse_recipe_yaml("a: &a [*a]\n")
    with pytest.raises(ValueError, match="nests"):
        parse_recipe_yaml("a: " + "[" * 40 + "]" * 40 + "\n")
    with pytest.raises(ValueError, match="nests too deeply"):
        parse_recipe_yaml("a: " + "[" * 5000 + "]" * 5000 + "\n")


def test_an_oversized_recipe_is_refused_unread(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text(RECIPE.format(scheme="W4A4") + "#" + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(ValueError, match=r"big.yaml is 1.0 MB, over the 1 MB a recipe may be"):
        load_starquant_recipe(path)
    with pytest.raises(ValueError, match="the recipe text is 1.0 MB, over the 1 MB"):
        load_starquant_recipe(path.read_text())


def test_an_unknown_modifier_is_named_with_the_closest_known_one():
    text = RECIPE.format(scheme="W4A4").replace("STaRQuantModifier", "STaRQuantModifer")
    with pytest.raises(ValueError, match="names modifier 'STaRQuantModifer' \\(in "
                                         "'starquant_stage.quantization_modifiers'\\), which "
                                         "llm-compressor does not know; did you mean "
                                         "'STaRQuantModifier'"):
        load_starquant_recipe(text)
    text = RECIPE.format(scheme="W4A4") + "    NoSuchModifier: {}\n"
    with pytest.raises(ValueError, match="'NoSuchModifier' .* does not know; STaR-Quant's"):
        load_starquant_recipe(text)


def test_a_long_unknown_name_is_cut_short_in_the_message():
    text = RECIPE.format(scheme="W4A4") + f"    {'Q' * 1000}: {{}}\n"
    with pytest.raises(ValueError, match="does not know") as error:
        load_starquant_recipe(text)
    assert len(str(error.value)) < 400


def test_two_starquant_stages_are_refused():
    text = RECIPE.format(scheme="W4A4") + RECIPE.format(scheme="W4A8").replace(
        "starquant_stage", "second_stage")
    with pytest.raises(ValueError, match="holds 2 block modifiers \\(STaRQuantModifier in "
                                         "'starquant_stage.quantization_modifiers', "
                                         "STaRQuantModifier in 'second_stage.quantization"
                                         "_modifiers'\\); STaR-Quant quantizes a model once"):
        load_starquant_recipe(text)
    (modifier,) = load_starquant_recipe(text, stage="second").modifiers  # one stage picked
    assert modifier.scheme == "W4A8"


@pytest.mark.parametrize("fields,got", [("", "no fields"), ("W4A4", "a str")])
def test_modifier_fields_that_are_not_a_mapping_are_refused(fields, got):
    text = RECIPE.format(scheme="W4A4").replace("\n      scheme: W4A4", f" {fields}")
    with pytest.raises(ValueError, match=f"gives modifier 'STaRQuantModifier' .* {got} "
                                         "instead of a mapping of its fields"):
        load_starquant_recipe(text)


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "parses to a list, not a mapping"),
    ("missing.yaml", "recipe file missing.yaml does not exist"),
])
def test_not_a_recipe_is_refused(text, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_starquant_recipe(text)


def test_the_saved_recipe_is_the_file_as_written_or_what_ran_with_the_file_as_comments(
        tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("# my notes\n" + RECIPE.format(scheme="W4A4") + "      epochs: 3  # quick\n")
    recipe = load_starquant_recipe(path)
    assert recipe_that_ran(recipe, path) == path.read_text()  # comments and layout kept
    assert recipe_that_ran(recipe, path.read_text()) == path.read_text()
    recipe.modifiers[0].epochs = 0  # what starquant quantize --epochs 0 does
    saved = recipe_that_ran(recipe, path)
    assert load_starquant_recipe(saved).modifiers[0].epochs == 0  # the recipe that ran
    assert "# # my notes\n" in saved and "#       epochs: 3  # quick" in saved
    assert recipe_that_ran(recipe) == recipe.yaml()  # no source: llm-compressor's form


def test_gptq_on_fp8_weights_is_refused_with_the_fix():
    recipe = RECIPE.format(scheme="W8A8-FP8") + "      weight_quantizer: gptq\n"
    with pytest.raises(ValueError, match="use weight_quantizer 'rtn' with W8A8-FP8"):
        load_starquant_recipe(recipe)
    (modifier,) = load_starquant_recipe(RECIPE.format(scheme="W4A8-FP8")
                                        + "      weight_quantizer: gptq\n").modifiers
    assert modifier.weight_quantizer == "gptq"  # int4 weights: GPTQ applies
