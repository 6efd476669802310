"""``starquant quantize`` on inputs that used to end in a traceback, a wrong message or
unbounded memory: each is now one line naming the fix, exit 1, nothing written. (Beside
test_quantize.py's BAD_INPUTS, which can absorb these.)"""

import shutil

import pytest

from starquant_plugin.assets import TINY_LLADA
from tests.cli.run_cli import assert_user_error, starquant

STAGE = """{name}_stage:
  quantization_modifiers:
    {modifier}:
      scheme: {scheme}
"""


def _laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 "lol"'] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]"
                                 for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n" + STAGE.format(name="starquant", modifier="STaRQuantModifier",
                                                  scheme=f"*l{levels}")


def _write_inputs(root) -> None:
    (root / "unknown.yaml").write_text(STAGE.format(name="starquant", modifier="NoSuchModifier",
                                                    scheme="W4A4"))
    (root / "two.yaml").write_text(
        STAGE.format(name="first", modifier="STaRQuantModifier", scheme="W4A4")
        + STAGE.format(name="second", modifier="STaRQuantModifier", scheme="W4A8"))
    (root / "laughs.yaml").write_text(_laughs())
    (root / "big.yaml").write_text(STAGE.format(name="starquant", modifier="STaRQuantModifier",
                                                scheme="W4A4") + "#" + "x" * 2_000_000 + "\n")
    (root / "corpus").mkdir()
    (root / "short.txt").write_text("a text shorter than one row")
    for name in ("no-tokenizer", "list-config", "no-weights"):
        shutil.copytree(TINY_LLADA, root / name)
    (root / "no-weights" / "model.safetensors").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "no-tokenizer" / name).unlink()
    (root / "list-config" / "config.json").write_text("[1, 2]")


BAD_INPUTS = {
    "recipe naming an unknown modifier": (
        ["tiny-llada", "--recipe", "unknown.yaml"],
        "names modifier 'NoSuchModifier' (in 'starquant_stage.quantization_modifiers'), which "
        "llm-compressor does not know"),
    "recipe with two STaR-Quant stages": (
        ["tiny-llada", "--recipe", "two.yaml"],
        "holds 2 block modifiers (STaRQuantModifier in 'first_stage.quantization_modifiers', "
        "STaRQuantModifier in 'second_stage.quantization_modifiers'); STaR-Quant quantizes a "
        "model once"),
    "recipe with exponential YAML aliases": (
        ["tiny-llada", "--recipe", "laughs.yaml"], "uses more than 32 YAML aliases"),
    "recipe over 1 MB": (["tiny-llada", "--recipe", "big.yaml"],
                         "is 2.0 MB, over the 1 MB a recipe may be"),
    "calibration text that is a directory": (
        ["tiny-llada", "--scheme", "W4A4", "--calib-text", "corpus"],
        "Calibration text file corpus is a directory, not a text file"),
    "model folder without a tokenizer": (["no-tokenizer", "--scheme", "W4A4"],
                                         "no-tokenizer has no tokenizer"),
    "config.json that is a list": (["list-config", "--scheme", "W4A4"],
                                   "config.json holds a JSON list, not an object"),
    "calibration text shorter than one row": (
        ["tiny-llada", "--scheme", "W4A4", "--calib-text", "short.txt"],
        "fewer than one row of 48 tokens; pass more text or shorter rows"),
    "model folder without weights": (["no-weights", "--scheme", "W4A4"],
                                     "as starquant quantize writes it"),  # no Python advice
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_fix(case, tmp_path):
    _write_inputs(tmp_path)
    argv, phrase = BAD_INPUTS[case]
    result = starquant("quantize", *argv, "--epochs", 0, "--samples", 4, "--seq-len", 48,
                       "--out", "out", cwd=tmp_path)
    line = assert_user_error(result, phrase)
    assert len(line) < 500
    assert not (tmp_path / "out").exists()


def test_an_already_quantized_model_is_one_line_before_calibration(rtn_checkpoint, tmp_path):
    result = starquant("quantize", rtn_checkpoint, "--scheme", "W4A4", "--method", "rtn",
                       "--samples", 4, "--seq-len", 48, "--out", "out", cwd=tmp_path)
    assert_user_error(result, "is already quantized (quant_method 'starquant')",
                      "pass the FP model it was made from")
    assert "building" not in result.stderr  # refused before the calibration rows
    assert not (tmp_path / "out").exists()
