"""``starquant verify DIR`` names every file of a checkpoint that is not the one its save
wrote (exit 1), and passes an intact one (exit 0)."""

import json
import shutil
import subprocess

from tests.cli.run_cli import assert_user_error, starquant


def test_an_intact_checkpoint_verifies(rtn_checkpoint):
    result = starquant("verify", rtn_checkpoint.name, cwd=rtn_checkpoint.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    files = len(list(rtn_checkpoint.iterdir())) - 1  # all but the manifest
    assert result.stdout.strip() == (f"ok: the {files} files of {rtn_checkpoint.name} match "
                                     "starquant_manifest.json (sha256)")


def test_each_changed_missing_or_added_file_is_named(rtn_checkpoint, tmp_path):
    copy = shutil.copytree(rtn_checkpoint, tmp_path / "ckpt")
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["starquant"]["args"]["epochs"] = 99
    (copy / "config.json").write_text(json.dumps(config))
    with (copy / "model.safetensors").open("r+b") as shard:  # a truncated copy
        shard.truncate(shard.seek(0, 2) - 1000)
    (copy / "tokenizer.json").unlink()
    (copy / "pytorch_model.bin").write_bytes(b"weights from elsewhere")
    (copy / "notes.txt").write_text("mine")
    result = starquant("verify", "ckpt", cwd=tmp_path)
    assert_user_error(result, "ckpt does not match its starquant_manifest.json: changed "
                      "config.json, model.safetensors; missing tokenizer.json; added "
                      "pytorch_model.bin.", "save the checkpoint again")
    assert result.stdout.splitlines() == [
        "changed  config.json", "changed  model.safetensors", "missing  tokenizer.json",
        "added    pytorch_model.bin",
        "extra    notes.txt (not in the manifest; no loader reads it)"]


def test_folders_that_cannot_be_verified_are_one_line(rtn_checkpoint, tmp_path):
    copy = shutil.copytree(rtn_checkpoint, tmp_path / "ckpt")
    (copy / "starquant_manifest.json").unlink()
    assert_user_error(starquant("verify", "ckpt", cwd=tmp_path),
                      "ckpt has no starquant_manifest.json, so there is nothing to verify")
    (copy / "starquant_manifest.json").write_text("[]")
    assert_user_error(starquant("verify", "ckpt", cwd=tmp_path),
                      "is not a starquant manifest")
    assert_user_error(starquant("verify", "nothing-here", cwd=tmp_path),
                      "DIR nothing-here is not a directory")


def test_an_interrupted_overwrite_is_explained(rtn_checkpoint, tmp_path):
    finished = subprocess.Popen(["true"])  # the pid of the killed save
    finished.wait()
    old = shutil.copytree(rtn_checkpoint, tmp_path / f".ckpt.old-{finished.pid}-0a1b2c3d")
    assert_user_error(starquant("verify", "ckpt", cwd=tmp_path),
                      "ckpt is missing: a save that was replacing it was interrupted",
                      f"`mv {old} {tmp_path / 'ckpt'}`")
    shutil.copytree(rtn_checkpoint, tmp_path / "ckpt")  # the new one made it into place
    result = starquant("verify", "ckpt", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok:"), result.stderr
    assert f"{old} holds the previous checkpoint of ckpt" in result.stderr
    assert f"rm -r {old}" in result.stderr
