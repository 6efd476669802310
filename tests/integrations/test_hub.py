"""push_to_hub up to the network call: validation, the model card, dry run, the upload call."""

import json
from pathlib import Path

import pytest
import torch

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
                     "STaRQuantModifier", "pack-quantized", "MiB"):
        assert expected in card, expected


def test_upload_creates_the_repo_and_uploads_the_staged_folder(checkpoint, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs["private"]))

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload_folder", repo_id, files))
            return "https://huggingface.co/me/x/commit/abc"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    url = hub.push_to_hub(checkpoint, "me/x", private=True, token="t")
    assert url.endswith("abc")
    assert calls[0] == ("init", "t") and calls[1] == ("create_repo", "me/x", True)
    assert calls[2][0] == "upload_folder" and "README.md" in calls[2][2]
    assert "model.safetensors" in calls[2][2]
    assert not (checkpoint / "README.md").exists()  # the checkpoint folder is not modified


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
