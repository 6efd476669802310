"""Every way a user saves a STaR-Quant model writes a checkpoint that reloads to the same model
in a fresh process, or refuses loudly; nothing is overwritten or lost without being asked."""

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from starquant_plugin.assets import TINY_MODELS
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.checkpoint_model import check_checkpoint
from starquant_plugin.integrations.llmcompressor import load_starquant_recipe
from starquant_plugin.integrations.saving import (
    mark_unusable,
    save_starquant,
    write_text_atomic,
)
from starquant_plugin.pipeline import quantize_dllm
from tests.integrations.reload_in_fresh_process import record_expected, reload_in_fresh_process
from tests.integrations.tiny_oneshot import calibration_dataset, run_oneshot, tiny_model
from tests.models.tiny import MASK_ID, tiny_llada

RECIPE = """
starquant_stage:
  quantization_modifiers:
    STaRQuantModifier: {scheme: W4A4, epochs: 0}
"""


@pytest.fixture(scope="module")
def oneshot_saves(tmp_path_factory) -> dict[str, dict]:
    """After oneshot on both bundled models, loaded with load_dllm in bf16 or with
    AutoModelForCausalLM in fp32, each save path a user has: save_pretrained(dir),
    save_pretrained(dir, save_compressed=False), oneshot(output_dir=dir)."""
    root = tmp_path_factory.mktemp("saves")
    saves, entries = {}, []
    for family in ("llada", "dream"):
        for loader in ("load_dllm bf16", "AutoModel fp32"):
            if loader == "load_dllm bf16":
                model, tokenizer = tiny_model(family, torch.bfloat16)
            else:
                model = AutoModelForCausalLM.from_pretrained(TINY_MODELS[family],
                                                             dtype=torch.float32)
                _, tokenizer = tiny_model(family)
            dataset = calibration_dataset(model, tokenizer, rows=4)
            out = root / f"{family}-{loader.split()[0]}"
            if loader == "load_dllm bf16":
                run_oneshot(model, dataset, RECIPE)
                model.save_pretrained(out / "save_pretrained")
                model.save_pretrained(out / "save_compressed=False", save_compressed=False)
                paths = [out / "save_pretrained", out / "save_compressed=False"]
            else:
                run_oneshot(model, dataset, RECIPE, output_dir=str(out / "output_dir"))
                paths = [out / "output_dir"]
            for path in paths:
                key = f"{family}, {loader}, {path.name}"
                saves[key] = {"path": path}
                entries.append({"checkpoint": str(path),
                                **record_expected(model, root / f"{len(entries)}.safetensors")})
    outcomes = reload_in_fresh_process(entries, root)
    for save, outcome in zip(saves.values(), outcomes, strict=True):
        save.update(outcome)
    return saves


SAVE_PATHS = [f"{family}, {loader}, {name}" for family in ("llada", "dream")
              for loader, names in (
                  ("load_dllm bf16", ("save_pretrained", "save_compressed=False")),
                  ("AutoModel fp32", ("output_dir",)))
              for name in names]


@pytest.mark.parametrize("key", SAVE_PATHS)
def test_every_save_path_after_oneshot_reloads_the_same_model(oneshot_saves, key):
    save = oneshot_saves[key]
    config = json.loads((save["path"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "starquant"
    assert "auto_map" not in config  # the hub's remote code cannot load it
    assert save["quantized_linears"] == 4 * 7
    assert save["max_abs_logit_diff"] == 0.0 and save["same_generation"]
    recipe = load_starquant_recipe(save["path"] / "recipe.yaml")
    assert recipe.modifiers[0].starquant_args().epochs == 0


def test_loading_without_the_plugin_does_not_end_at_the_remote_code_prompt(oneshot_saves):
    """Without `import starquant_plugin` transformers does not know model_type llada; the
    saved config has no auto_map, so it says so instead of asking for trust_remote_code."""
    path = oneshot_saves[SAVE_PATHS[0]]["path"]
    code = ("from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(path)!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode != 0
    assert "llada" in result.stderr and "trust_remote_code" not in result.stderr


def test_every_save_path_writes_the_recipe_file_that_ran_with_its_comments(tmp_path):
    """oneshot from a commented recipe file: save_pretrained, save_starquant with the file and
    save_starquant without one all write the same recipe.yaml, the file as the user wrote it."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("# W4A4 for the tiny model, no fit\n" + RECIPE.lstrip() + "# end\n")
    model, tokenizer = tiny_model("llada")
    run_oneshot(model, calibration_dataset(model, tokenizer, rows=4), str(recipe))
    model.save_pretrained(tmp_path / "save_pretrained")
    save_starquant(model, tmp_path / "with_recipe", recipe=recipe)
    save_starquant(model, tmp_path / "without_recipe")
    for name in ("save_pretrained", "with_recipe", "without_recipe"):
        assert (tmp_path / name / "recipe.yaml").read_text() == recipe.read_text(), name


# the bound save_pretrained


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llada()
    rows = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID),
                  StarQuantArgs(scheme="W4A4", epochs=0), progress=False)
    return model


def test_save_compressed_false_says_the_compressed_checkpoint_is_written(quantized, tmp_path,
                                                                        caplog):
    with caplog.at_level(logging.WARNING):
        quantized.save_pretrained(tmp_path / "out", save_compressed=False)
    assert "save_compressed=False" in caplog.text
    check_checkpoint(tmp_path / "out")


def test_save_pretrained_refuses_arguments_it_cannot_honour(quantized, tmp_path):
    with pytest.raises(ValueError, match="stored as 'pack-quantized'"):
        quantized.save_pretrained(tmp_path / "a", quantization_format="int-quantized")
    with pytest.raises(TypeError, match="push_to_hub"):
        quantized.save_pretrained(tmp_path / "b", push_to_hub=True)
    assert not any(tmp_path.iterdir())


def test_a_deep_copy_saves_itself(quantized, tmp_path):
    twin = copy.deepcopy(quantized)
    with torch.no_grad():
        twin.model.transformer.ln_f.weight.mul_(2)
    twin.save_pretrained(tmp_path / "twin")
    saved = load_file(tmp_path / "twin" / "model.safetensors")["model.transformer.ln_f.weight"]
    assert torch.equal(saved, twin.model.transformer.ln_f.weight)
    assert not torch.equal(saved, quantized.model.transformer.ln_f.weight)


# bad output directories and recipes: refused before anything is written


def test_a_file_as_output_directory_is_refused(quantized, tmp_path):
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is a file"):
        quantized.save_pretrained(target)
    assert target.read_text() == "keep me"


def test_a_taken_folder_is_refused_in_the_callers_words(quantized, tmp_path):
    """The CLI saves with overwrite_option="--overwrite": its users are told the flag."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="Pass overwrite=True to replace it"):
        save_starquant(quantized, tmp_path / "taken")
    with pytest.raises(FileExistsError, match="Pass --overwrite to replace it"):
        save_starquant(quantized, tmp_path / "taken", overwrite_option="--overwrite")


def test_overwrite_does_not_delete_files_that_are_not_part_of_a_checkpoint(quantized,
                                                                          tmp_path):
    target = tmp_path / "ckpt"
    quantized.save_pretrained(target)
    (target / "notes.txt").write_text("mine")
    before = {f.name: f.read_bytes() for f in target.iterdir()}
    with pytest.raises(FileExistsError, match=r"notes\.txt.*not part of a checkpoint"):
        quantized.save_pretrained(target, overwrite=True)
    assert {f.name: f.read_bytes() for f in target.iterdir()} == before
    (target / "notes.txt").unlink()
    quantized.save_pretrained(target, overwrite=True)  # a checkpoint folder is replaced


def test_missing_recipe_file_is_refused_before_writing(quantized, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file"):
        save_starquant(quantized, tmp_path / "out", recipe="path/that/does/not/exist.yml")
    with pytest.raises(ValueError, match="not a YAML mapping"):
        save_starquant(quantized, tmp_path / "out", recipe="- just\n- a list\n")
    assert not any(tmp_path.iterdir())


def test_extra_files_are_written_with_the_checkpoint_and_count_as_part_of_it(quantized,
                                                                            tmp_path):
    target = tmp_path / "ckpt"
    save_starquant(quantized, target, extra_files={"quantization_report.json": "{}\n"})
    assert (target / "quantization_report.json").read_text() == "{}\n"
    save_starquant(quantized, target, overwrite=True)  # replaced: report and quality are ours
    assert not (target / "quantization_report.json").exists()
    for bad in ("config.json", "notes.txt", "../escape.json"):
        with pytest.raises(ValueError, match="extra_files"):
            save_starquant(quantized, tmp_path / "other", extra_files={bad: "x"})
    assert not (tmp_path / "other").exists()


def test_write_text_atomic_leaves_no_temporary_file(tmp_path):
    path = write_text_atomic(tmp_path / "sub" / "results.json", "{}\n")
    write_text_atomic(path, "[]\n")
    assert path.read_text() == "[]\n"
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_leftovers_of_interrupted_saves_are_cleaned_or_reported(quantized, tmp_path, caplog):
    """Temporary folders of dead saves are deleted; a previous checkpoint (``.old``) never is
    (tests/integrations/test_output_dirs.py: it is explained, and refused over)."""
    finished = subprocess.Popen(["true"])  # a pid that has exited
    finished.wait()
    stale = tmp_path / f".ckpt.tmp-{finished.pid}-0000"
    deleting = tmp_path / f".ckpt.del-{finished.pid}-3333"
    running = tmp_path / f".ckpt.tmp-{os.getpid()}-1111"
    quantized.save_pretrained(tmp_path / "ckpt")
    backup = tmp_path / f".ckpt.old-{finished.pid}-2222"
    for folder in (stale, deleting, running, backup):
        folder.mkdir()
    with caplog.at_level(logging.WARNING):
        quantized.save_pretrained(tmp_path / "ckpt", overwrite=True)
    assert not stale.exists() and not deleting.exists()
    assert running.exists() and backup.exists()
    assert "Removed" in caplog.text and "in progress" in caplog.text
    assert "previous checkpoint" in caplog.text


def test_the_size_estimate_before_calibration_covers_the_checkpoint(rtn_checkpoint):
    """``starquant quantize`` checks free space with it before calibrating; it must not be
    below what the save writes, nor near the FP size."""
    from starquant_plugin.integrations.saving import SAVE_MARGIN_BYTES, estimate_checkpoint_bytes
    from starquant_plugin.models.loading import load_dllm

    fp_model, _ = load_dllm(TINY_MODELS["llada"], dtype=torch.bfloat16)  # as quantize loads it
    written = sum(path.stat().st_size for path in rtn_checkpoint.iterdir())
    tensors = estimate_checkpoint_bytes(fp_model, weight_bits=4) - SAVE_MARGIN_BYTES
    fp_bytes = sum(p.numel() * p.element_size() for p in fp_model.parameters())
    assert written <= tensors < fp_bytes


# nothing non-finite or half-done is saved or loaded


def test_non_finite_tensors_are_refused_at_save_and_at_load(quantized, tmp_path):
    path = tmp_path / "ckpt"
    quantized.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    name = "model.transformer.blocks.1.ff_proj.input_transform.sgat_channel_scale"
    tensors[name][3] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ff_proj.input_transform.sgat_channel_scale holds NaN"):
        check_checkpoint(path)
    with pytest.raises(ValueError, match="ff_proj.input_transform.sgat_channel_scale holds NaN"):
        AutoModelForCausalLM.from_pretrained(path)
    broken = copy.deepcopy(quantized)
    broken.model.transformer.blocks[0].attn_out.weight_scale[0] = float("inf")
    with pytest.raises(ValueError, match="attn_out.weight_scale holds NaN or inf"):
        broken.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


def test_a_model_marked_unusable_refuses_to_run_or_be_saved(quantized, tmp_path):
    broken = copy.deepcopy(quantized)
    mark_unusable(broken, "stopped at block 1")
    with pytest.raises(RuntimeError, match="half-quantized.*stopped at block 1"):
        broken(torch.tensor([[1, 2, MASK_ID]]))
    for save in (lambda: broken.save_pretrained(tmp_path / "a"),
                 lambda: save_starquant(broken, tmp_path / "b")):
        with pytest.raises(RuntimeError, match="half-quantized"):
            save()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(("edit", "field"), [
    (lambda block: block.pop("input_groups"), "input_groups"),
    (lambda block: block["input_groups"][0].pop("factors"), "input_groups.0.factors"),
    (lambda block: block["args"].update(scheme="W3A3"), "args.scheme"),
])
def test_a_partly_removed_starquant_block_names_the_field(quantized, tmp_path, edit, field):
    path = tmp_path / "ckpt"
    quantized.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"]["starquant"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"starquant is incomplete or invalid \({field}"):
        AutoModelForCausalLM.from_pretrained(path)
