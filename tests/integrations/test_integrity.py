"""Every save records each file's sha256; a checkpoint whose files changed, went missing or
gained a file a loader would read is found, with the file named."""

import json
import logging
import shutil

import pytest
import torch

from starquant_plugin.assets import TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.integrity import (
    MANIFEST_FILE,
    check_saved_checkpoint,
    file_sha256,
    verify_checkpoint,
)
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_llada


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny checkpoint with tokenizer, recipe and report; tests copy it."""
    model = tiny_llada()
    rows = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID),
                  StarQuantArgs(scheme="W4A4", epochs=0), progress=False)
    _, tokenizer = load_dllm(TINY_LLADA)
    path = tmp_path_factory.mktemp("integrity") / "ckpt"
    save_starquant(model, path, tokenizer=tokenizer, recipe="stage: {}\n",
                   extra_files={"quantization_report.json": "{}\n"})
    return path


@pytest.fixture
def copy(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "ckpt")


def test_the_manifest_lists_every_file_with_its_sha256(checkpoint):
    manifest = json.loads((checkpoint / MANIFEST_FILE).read_text())
    files = {p.name for p in checkpoint.iterdir()} - {MANIFEST_FILE}
    assert set(manifest["files"]) == files
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml",
            "quantization_report.json"} <= files
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": file_sha256(checkpoint / name),
                         "bytes": (checkpoint / name).stat().st_size}
    report = verify_checkpoint(checkpoint)
    assert report.ok and report.checked == len(files)


def test_changed_missing_and_added_files_are_each_named(copy):
    shard = copy / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size
    shard.write_bytes(bytes(data))
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["starquant"]["args"]["scheme"] = "W8A8"
    (copy / "config.json").write_text(json.dumps(config))
    (copy / "tokenizer.json").unlink()
    (copy / "model-00002-of-00002.safetensors").write_bytes(b"x")
    (copy / "notes.txt").write_text("mine")
    report = verify_checkpoint(copy)
    assert not report.ok
    assert report.changed == ["config.json", "model.safetensors"]
    assert report.missing == ["tokenizer.json"]
    assert report.added == ["model-00002-of-00002.safetensors"]
    assert report.extra == ["notes.txt"]
    assert report.problems() == ("changed config.json, model.safetensors; missing "
                                 "tokenizer.json; added model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"does not match its starquant_manifest\.json: "
                                         r"changed config\.json, model\.safetensors; missing"):
        check_saved_checkpoint(copy)


def test_files_no_loader_reads_may_be_added(copy):
    (copy / "quality.json").write_text("{}")  # starquant demo scores after saving
    (copy / "README.md").write_text("# card")  # a Hub download
    (copy / ".gitattributes").write_text("")
    report = verify_checkpoint(copy)
    assert report.ok and report.extra == ["README.md", "quality.json"]
    assert check_saved_checkpoint(copy) == report


def test_a_checkpoint_without_or_with_a_broken_manifest(copy, caplog):
    (copy / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not a starquant manifest"):
        verify_checkpoint(copy)
    (copy / MANIFEST_FILE).unlink()
    assert not verify_checkpoint(copy).manifest_found
    with caplog.at_level(logging.WARNING):
        check_saved_checkpoint(copy)  # an older checkpoint is let through, with a warning
    assert "could not be verified" in caplog.text
    caplog.clear()
    check_saved_checkpoint(TINY_LLADA)  # an FP model folder: nothing to say
    assert check_saved_checkpoint("GSAI-ML/LLaDA-8B-Base") is None
    assert caplog.text == ""


def test_an_overwrite_rewrites_the_manifest(checkpoint, copy):
    model = tiny_llada(seed=1)
    rows = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(1))
    quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID),
                  StarQuantArgs(scheme="W4A4", epochs=0), progress=False)
    save_starquant(model, copy, overwrite=True)
    assert verify_checkpoint(copy).ok
    assert (copy / MANIFEST_FILE).read_text() != (checkpoint / MANIFEST_FILE).read_text()
