"""``starquant quantize`` as a user runs it: a checkpoint with its recipe and report, and one
clear line (exit 1, no traceback) for each bad input, before anything slow runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open

from starquant_plugin.assets import TINY_LLADA, calibration_text
from starquant_plugin.integrations.integrity import verify_checkpoint
from starquant_plugin.integrations.llmcompressor import STaRQuantModifier, load_starquant_recipe
from tests.cli.run_cli import OFFLINE, assert_user_error, starquant, starquant_command
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


def test_two_runs_with_one_seed_write_the_same_checkpoint(tmp_path):
    """Each run a fresh process: the fitted transforms and codes do not depend on the
    process (llm-compressor would shuffle the rows by the global RNG; the CLI keeps them)."""
    tensors = []
    for run in ("a", "b"):
        result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", "--epochs", "0",
                           *CALIBRATION, "--out", run, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        with safe_open(str(tmp_path / run / "model.safetensors"), framework="pt") as handle:
            tensors.append({key: handle.get_tensor(key) for key in handle.keys()})
    assert tensors[0].keys() == tensors[1].keys()
    assert all(tensors[0][key].equal(tensors[1][key]) for key in tensors[0])


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
                                      "scheme: Input should be 'W4A4', 'W4A8', 'W8A8', "
                                      "'W8A8-FP8', 'W4A8-FP8', 'W4A4-MXFP4' or "
                                      "'W4A4-NVFP4'"),
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
    assert_user_error(result, "out already holds files", "Pass --overwrite to replace it")
    assert "overwrite=True" not in result.stderr  # the CLI's flag, not the Python argument
    assert "loading" not in result.stderr  # refused before the model was even loaded
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


# outputs that would destroy data, or cannot be written: refused before the model is loaded


def tiny_llada_copy(root: Path) -> Path:
    """A user's own FP model folder (a copy of the bundled tiny LLaDA)."""
    return Path(shutil.copytree(TINY_LLADA, root / "models" / "tiny-llada"))


@pytest.mark.parametrize(("out", "phrase"), [
    ("models/tiny-llada", "models/tiny-llada is the folder the model is read from "
                          "(models/tiny-llada)"),
    ("models/tiny-llada/w4a4", "w4a4 is inside the folder the model is read from"),
    ("models", "models contains the folder the model is read from (models/tiny-llada)"),
])
def test_output_at_inside_or_above_the_model_folder_is_refused(tmp_path, out, phrase):
    """Old code: `quantize M --overwrite --out M` passed the checks (M holds only checkpoint
    files), quantized, and replaced the FP model M by the checkpoint."""
    model = tiny_llada_copy(tmp_path)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    result = starquant("quantize", "models/tiny-llada", "--scheme", "W4A4", *CALIBRATION,
                       "--overwrite", "--out", out, cwd=tmp_path)
    assert_user_error(result, phrase, "nothing was written", "e.g.")
    assert "loading" not in result.stderr
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["models", "tiny-llada",
                                                                  *before])


@pytest.mark.parametrize(("out", "phrase"), [
    (".", ". is the current directory"),
    ("..", ".. is a parent of the current directory"),
    ("/", "/ is the filesystem root"),
    ("notes.txt/ckpt", "notes.txt is a file, so notes.txt/ckpt cannot be created"),
])
def test_degenerate_output_is_one_line(tmp_path, out, phrase):
    """Old code: `--out .` in an empty folder calibrated, then failed with a traceback from
    the final rename; the others said the folder 'already holds files'."""
    work = tmp_path / "work"
    work.mkdir()
    if out.startswith("notes.txt"):
        (work / "notes.txt").write_text("mine")
    result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", *CALIBRATION,
                       "--out", out, cwd=work)
    assert_user_error(result, phrase)
    assert "loading" not in result.stderr


HOLD_LOCK = """
import sys, time
from starquant_plugin.integrations.output_lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_run_to_the_same_output_is_refused_at_start(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path / "out")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", *CALIBRATION,
                           "--out", "out", cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, f"out is being written by another save (pid {holder.pid}",
                      "Wait for it to finish, or choose another output directory")
    assert "loading" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_two_runs_racing_to_one_new_output_do_not_both_succeed(tmp_path):
    """Old code: both checked an absent --out at start, both saved, both reported success;
    the first checkpoint was silently replaced by the second."""
    command = [*starquant_command(), "quantize", "tiny-llada", "--scheme", "W4A4", "--method",
               "rtn", *map(str, CALIBRATION), "--out", "out"]
    env = {**os.environ, **OFFLINE}
    runs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 1], results
    (refusal,) = [stderr for code, stderr in results if code == 1]
    assert ("being written by another save" in refusal
            or "already holds a model" in refusal), refusal
    assert verify_checkpoint(tmp_path / "out").ok


FULL_DISK = """
import sys
from starquant_plugin.integrations import output_dirs
output_dirs.free_bytes = lambda path: 3 * 2**20  # a disk with 3 MiB left
from starquant_plugin.cli import main
main(sys.argv[1:])
"""


def test_a_full_disk_is_found_before_calibrating(tmp_path):
    """Old code: found only when the save failed, after the whole calibration."""
    result = subprocess.run([sys.executable, "-c", FULL_DISK, "quantize", "tiny-llada",
                             "--scheme", "W4A4", *map(str, CALIBRATION), "--out", "out"],
                            cwd=tmp_path, env={**os.environ, **OFFLINE}, capture_output=True,
                            text=True, timeout=600)
    line = assert_user_error(result, f"Not enough free space in {tmp_path} for the 4-bit "
                             "checkpoint of tiny-llada: it needs about",
                             "3,145,728 bytes (0.00 GiB) are available")
    assert "loading tiny-llada" in result.stderr and "building" not in result.stderr, line
    assert not (tmp_path / "out").exists()


def test_an_output_left_missing_by_an_interrupted_overwrite_is_explained(tmp_path,
                                                                        rtn_checkpoint):
    """A kill between the two renames of an overwrite leaves --out missing and its previous
    checkpoint under .out.old-<pid>-<id>. Old code: a new run wrote --out afresh and the
    previous checkpoint stayed hidden."""
    finished = subprocess.Popen(["true"])  # a pid that has exited: the killed save's
    finished.wait()
    old = tmp_path / f".out.old-{finished.pid}-0a1b2c3d"
    shutil.copytree(rtn_checkpoint, old)
    result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", *CALIBRATION,
                       "--overwrite", "--out", "out", cwd=tmp_path)
    assert_user_error(result, "out is missing: a save that was replacing it was interrupted",
                      f"restore it with `mv {old} {tmp_path / 'out'}`",
                      "restore_interrupted_save('out')")
    assert "loading" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [old.name]
