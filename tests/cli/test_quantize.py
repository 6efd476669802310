"""``starquant quantize`` as a user runs it: a checkpoint with its recipe and report, and one
clear line (exit 1, no traceback) for each bad input, before anything slow runs."""

import json

import pytest
import yaml
from safetensors import safe_open

from starquant_plugin.assets import calibration_text
from starquant_plugin.integrations.llmcompressor import STaRQuantModifier, load_starquant_recipe
from tests.cli.run_cli import assert_user_error, starquant
from tests.conftest import CALIBRATION


def test_scheme_and_method_write_checkpoint_recipe_and_report(rtn_checkpoint):
    files = {p.name for p in rtn_checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json",
            "quantization_report.json"} <= files
    (modifier,) = load_starquant_recipe(rtn_checkpoint / "recipe.yaml").modifiers
    assert isinstance(modifier, STaRQuantModifier)
    assert (modifier.scheme, modifier.transform, modifier.tac) == ("W4A4", "identity", False)
    report = json.loads((rtn_checkpoint / "quantization_report.json").read_text())
    assert report["family"] == "llada" and report["args"]["transform"] == "identity"
    assert report["calibration"] == {"source": "bundled held-out prose "
                                     "(assets.calibration_text)", "samples": 8, "seq_len": 48,
                                     "seed": 0}
    assert len(report["fit"]) == 16  # 4 blocks x 4 linear groups
    assert all(v["final_loss"] is None for v in report["fit"].values())  # RTN fits nothing
    assert set(report["timings"]) == {"load_s", "calibration_rows_s", "oneshot_s"}
    with safe_open(rtn_checkpoint / "model.safetensors", "pt") as shard:
        assert any(key.endswith("weight_packed") for key in shard.keys())
    stdout = (rtn_checkpoint.parent / "quantize.stdout").read_text()
    assert "| 0.q_proj+k_proj+v_proj |" in stdout and "wrote tiny-llada-rtn-w4a4" in stdout
    assert "INFO" not in stdout and "No accelerator" not in stdout  # logs go to stderr


def test_recipe_file_with_text_calibration_on_dream(tmp_path):
    (tmp_path / "corpus.txt").write_text(calibration_text()[:20000])
    (tmp_path / "recipe.yaml").write_text(
        "my_stage:\n  my_modifiers:\n    STaRQuantModifier: {scheme: W8A8, epochs: 3}\n")
    result = starquant("quantize", "tiny-dream", "--recipe", "recipe.yaml", "--epochs", 0,
                       "--calib-text", "corpus.txt", "--samples", 4, "--seq-len", 48,
                       "--out", "dream-w8a8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "dream-w8a8"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    fields = recipe["my_stage"]["my_modifiers"]["STaRQuantModifier"]
    assert fields["scheme"] == "W8A8" and fields["epochs"] == 0  # --epochs overrides the file
    report = json.loads((out / "quantization_report.json").read_text())
    assert report["family"] == "dream" and report["calibration"]["source"].endswith("corpus.txt")
    assert all(v["final_loss"] is not None for v in report["fit"].values())  # SGAT ran


BAD_INPUTS = {
    "missing model path": (["quantize", "no/such/../folder", "--scheme", "W4A4"],
                           "does not exist"),
    "model folder without config.json": (["quantize", ".", "--scheme", "W4A4"],
                                         "has no config.json"),
    "recipe that does not parse": (["quantize", "tiny-llada", "--recipe", "broken.yaml"],
                                   "not valid YAML"),
    "recipe with an unknown scheme": (["quantize", "tiny-llada", "--recipe", "w3.yaml"],
                                      "scheme: Input should be 'W4A4', 'W4A8' or 'W8A8'"),
    "recipe without a stage": (["quantize", "tiny-llada", "--recipe", "flat.yaml"],
                               "no STaRQuantModifier"),
    "missing recipe file": (["quantize", "tiny-llada", "--recipe", "nope.yaml"],
                            "--recipe nope.yaml does not exist"),
    "empty calibration file": (["quantize", "tiny-llada", "--scheme", "W4A4",
                                "--calib-text", "empty.txt"], "empty.txt is empty"),
    "WinoGrande offline": (["quantize", "tiny-llada", "--scheme", "W4A4", "--calib",
                            "winogrande"], "not in the local Hugging Face cache"),
    "dataset options without a dataset": (["quantize", "tiny-llada", "--scheme", "W4A4",
                                           "--calib-column", "sentence"],
                                          "only apply with --calib-dataset"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_fix(case, tmp_path):
    (tmp_path / "broken.yaml").write_text("starquant_stage:\n  q: [unclosed\n")
    (tmp_path / "w3.yaml").write_text(
        "s_stage:\n  q_modifiers:\n    STaRQuantModifier: {scheme: W3A3}\n")
    (tmp_path / "flat.yaml").write_text("STaRQuantModifier: {scheme: W4A4}\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    argv, phrase = BAD_INPUTS[case]
    result = starquant(*argv, "--out", "out", cwd=tmp_path)
    assert_user_error(result, phrase)
    assert not (tmp_path / "out").exists()


def test_unknown_scheme_is_refused_by_the_parser(tmp_path):
    result = starquant("quantize", "tiny-llada", "--scheme", "W3A3", "--out", "o", cwd=tmp_path)
    assert_user_error(result, "invalid choice: 'W3A3'", code=2)


def test_occupied_output_is_refused_before_calibrating(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", *CALIBRATION,
                       "--out", "out", cwd=tmp_path)
    assert_user_error(result, "out already holds files", "overwrite")
    assert "loading" not in result.stderr  # refused before the model was even loaded
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
