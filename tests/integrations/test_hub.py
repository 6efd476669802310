"""push_to_hub up to the network call: validation, the model card, what is uploaded (the
checkpoint, never the rest of the folder), dry run, the upload call."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations import hub
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_llada

RECIPE = "starquant_stage:\n  quantization_modifiers:\n    STaRQuantModifier:\n      scheme: W4A4\n"


class _Tokenizer:
    def save_pretrained(self, directory):
        Path(directory, "tokenizer.json").write_text("{}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = tiny_llada()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 60, (8, 32), generator=generator)
    rows = rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, MASK_ID)
    args = StarQuantArgs(scheme="W4A4", epochs=1)
    quantize_dllm(model, rows, args, progress=False)
    path = tmp_path_factory.mktemp("hub") / "ckpt"
    save_starquant(model, path, args=args, tokenizer=_Tokenizer(), recipe=RECIPE)
    (path / hub.QUALITY_FILE).write_text(json.dumps({"bf16": {"ppl": 10.0},
                                                     "W4A4 starquant": {"ppl": 11.5}}))
    return path


def test_dry_run_writes_exactly_the_upload_with_a_card(checkpoint, tmp_path):
    out = hub.push_to_hub(checkpoint, "me/tiny-llada-w4a4", dry_run_dir=tmp_path / "dry",
                          base_model="me/tiny-llada")
    staged = {p.name for p in Path(out).iterdir()}
    assert staged == {p.name for p in checkpoint.iterdir()} | {"README.md"}
    card = (Path(out) / "README.md").read_text()
    for expected in ("base_model: me/tiny-llada", "2606.04945", "STaR-Quant: State-Time",
                     "| W4A4 starquant | 11.5 |", "import starquant_plugin", "runner=\"pooling\"",
                     "STaRQuantModifier", "pack-quantized", "MiB",
                     "K/V cache bits: 4 (the W4A4 default: `kv_bits` is null"):
        assert expected in card, expected


def test_the_card_names_the_model_quantize_read(checkpoint, tmp_path):
    """Without --base-model, the card takes the MODEL of ``starquant quantize``'s report: a
    Hub id becomes the card's base_model, a local name is said to be one."""
    for model, metadata, text in (("GSAI-ML/LLaDA-8B-Instruct",
                                   "base_model: GSAI-ML/LLaDA-8B-Instruct",
                                   "base model\n`GSAI-ML/LLaDA-8B-Instruct`."),
                                  ("tiny-llada", None, "`tiny-llada` (a local model)")):
        (checkpoint / "quantization_report.json").write_text(json.dumps({"model": model}))
        try:
            card = str(hub.build_model_card(checkpoint, "me/x"))
        finally:
            (checkpoint / "quantization_report.json").unlink()
        assert text in card
        assert (metadata in card) if metadata else "base_model:" not in card


class FakeApi:
    """HfApi without the network: records the calls and the uploaded paths and bytes."""

    calls: list = []

    def __init__(self, token=None):
        FakeApi.calls = [("init", token)]

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs["private"]))

    def create_commit(self, *, repo_id, operations, **kwargs):
        uploaded = {}
        for operation in operations:
            with operation.as_file() as file:
                uploaded[operation.path_in_repo] = file.read()
        FakeApi.calls.append(("create_commit", repo_id, uploaded))
        return "https://huggingface.co/me/x/commit/abc"


def test_upload_creates_the_repo_and_uploads_the_checkpoint_and_card(checkpoint, monkeypatch):
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    url = hub.push_to_hub(checkpoint, "me/x", private=True, token="t")
    assert url.endswith("abc")
    calls = FakeApi.calls
    assert calls[0] == ("init", "t") and calls[1] == ("create_repo", "me/x", True)
    assert calls[2][0] == "create_commit" and b"# x" in calls[2][2]["README.md"]
    assert calls[2][2]["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    assert set(calls[2][2]) == {p.name for p in checkpoint.iterdir()} | {"README.md"}
    assert not (checkpoint / "README.md").exists()  # the checkpoint folder is not modified


@pytest.fixture
def cluttered(checkpoint, tmp_path) -> Path:
    """The checkpoint with what users keep beside one: a token, notes, their own README, a
    folder of logs and a link to a private file outside the folder."""
    folder = tmp_path / "cluttered"
    shutil.copytree(checkpoint, folder)
    (folder / ".hf_token").write_text("hf_secret")
    (folder / "notes.txt").write_text("private notes")
    (folder / "README.md").write_text("# my own readme")
    (folder / "logs").mkdir()
    (folder / "logs" / "run.log").write_text("log")
    (tmp_path / "id_rsa").write_text("private key")
    (folder / "key.txt").symlink_to(tmp_path / "id_rsa")
    return folder


def test_only_the_checkpoint_files_are_uploaded_the_rest_is_listed(checkpoint, cluttered,
                                                                   monkeypatch):
    plan = hub.plan_upload(cluttered)
    assert set(plan.files) == {p.name for p in checkpoint.iterdir()}
    assert dict(plan.left_out) == {
        ".hf_token": "not part of the checkpoint", "notes.txt": "not part of the checkpoint",
        "README.md": "replaced by the generated model card",
        "logs/": "a folder, not part of the checkpoint",
        "key.txt": "a link to a path outside the folder"}
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    hub.push_to_hub(cluttered, "me/x")
    uploaded = FakeApi.calls[2][2]
    assert set(uploaded) == set(plan.files) | {"README.md"}
    assert b"# my own readme" not in uploaded["README.md"]


def test_include_uploads_named_files_inside_the_folder_only(cluttered, tmp_path, monkeypatch):
    plan = hub.plan_upload(cluttered, include=["notes.txt", "logs/run.log",
                                               cluttered / "notes.txt"])
    assert {"notes.txt", "logs/run.log"} <= set(plan.files)
    assert "notes.txt" not in dict(plan.left_out) and "logs/" not in dict(plan.left_out)
    out = Path(hub.push_to_hub(cluttered, "me/x", dry_run_dir=tmp_path / "dry",
                               include=["logs/run.log"]))
    assert (out / "logs" / "run.log").read_text() == "log"
    (tmp_path / "outside.txt").write_text("outside")
    for name, error, message in [
            ("../outside.txt", ValueError, "is not inside"),
            (tmp_path / "outside.txt", ValueError, "is not inside"),
            ("logs", ValueError, "is a directory"),
            ("missing.txt", FileNotFoundError, "does not exist"),
            ("README.md", ValueError, "would replace the generated model card"),
            ("key.txt", ValueError, "is a symlink to .*id_rsa, outside the folder")]:
        with pytest.raises(error, match=message):
            hub.plan_upload(cluttered, include=[name])


def test_a_checkpoint_file_linking_outside_the_folder_is_refused(checkpoint, tmp_path,
                                                                 monkeypatch):
    folder = tmp_path / "linked"
    shutil.copytree(checkpoint, folder)
    (tmp_path / "secret.json").write_text("{}")
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(tmp_path / "secret.json")
    monkeypatch.setattr(hub, "HfApi", None)  # any upload attempt would fail loudly
    with pytest.raises(ValueError, match="tokenizer.json is a symlink to .*secret.json, "
                                         "outside the folder.*cp -rL"):
        hub.push_to_hub(folder, "me/x", dry_run_dir=tmp_path / "dry")
    assert not (tmp_path / "dry").exists()
    with pytest.raises(ValueError, match="outside the folder"):
        hub.push_to_hub(folder, "me/x")


def test_a_shard_index_naming_a_file_outside_the_folder_is_refused(checkpoint, tmp_path):
    folder = tmp_path / "indexed"
    shutil.copytree(checkpoint, folder)
    os.replace(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")
    with safe_open(str(tmp_path / "elsewhere.safetensors"), framework="pt") as handle:
        weight_map = dict.fromkeys(handle.keys(), "../elsewhere.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ValueError, match="elsewhere.safetensors, outside the folder"):
        hub.plan_upload(folder)


def test_staged_files_are_copies_not_links(checkpoint, tmp_path):
    out = Path(hub.push_to_hub(checkpoint, "me/x", dry_run_dir=tmp_path / "dry"))
    for name in ("model.safetensors", "config.json"):
        assert (out / name).stat().st_ino != (checkpoint / name).stat().st_ino
        assert (checkpoint / name).stat().st_nlink == 1
    before = (checkpoint / "config.json").read_bytes()
    (out / "config.json").write_text("{}")  # editing the staged copy
    assert (checkpoint / "config.json").read_bytes() == before


def test_dry_run_dir_must_be_empty_and_outside_the_checkpoint(checkpoint, cluttered, tmp_path):
    with pytest.raises(ValueError, match="is inside the checkpoint folder"):
        hub.push_to_hub(cluttered, "me/x", dry_run_dir=cluttered / "stage")
    assert not (cluttered / "stage").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an empty directory"):
        hub.push_to_hub(checkpoint, "me/x", dry_run_dir=tmp_path / "full")


@pytest.mark.parametrize("name,text,message", [
    ("config.json", "[1, 2]", "config.json holds a JSON list, not an object"),
    ("config.json", "{not json", "config.json is not valid JSON"),
    (hub.QUALITY_FILE, '["bf16"]', "quality.json holds a JSON list, not an object"),
    (hub.QUALITY_FILE, '{"bf16": 1.0}', "has a row that is not an object"),
])
def test_malformed_json_files_are_refused_naming_the_file(checkpoint, tmp_path, name, text,
                                                          message):
    folder = tmp_path / "folder"
    shutil.copytree(checkpoint, folder)
    (folder / name).write_text(text)
    with pytest.raises(ValueError, match=message):
        hub.push_to_hub(folder, "me/x", dry_run_dir=tmp_path / "dry")


def test_a_file_changed_since_the_save_is_refused_by_push_to_hub(checkpoint, tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(checkpoint, folder)
    (folder / "recipe.yaml").write_text("edited: true\n")
    with pytest.raises(ValueError, match="does not match its starquant_manifest.json: changed "
                                         "recipe.yaml"):
        hub.push_to_hub(folder, "me/x", dry_run_dir=tmp_path / "dry")


@pytest.mark.parametrize("remove,message", [
    ("recipe.yaml", "no recipe.yaml"),
    ("tokenizer.json", "no tokenizer"),
    ("model.safetensors", "no \\*.safetensors shard"),
    ("config.json", "no config.json"),
])
def test_incomplete_folder_is_refused_before_any_upload(checkpoint, tmp_path, remove, message,
                                                        monkeypatch):
    folder = tmp_path / "folder"
    folder.mkdir()
    for file in checkpoint.iterdir():
        if file.name != remove:
            (folder / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(hub, "HfApi", None)  # any network attempt would fail loudly
    with pytest.raises(FileNotFoundError, match=message):
        hub.push_to_hub(folder, "me/x", dry_run_dir=tmp_path / "dry")
