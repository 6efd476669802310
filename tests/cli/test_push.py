"""``starquant push`` as a user runs it: the dry run stages exactly the upload with a model
card and lists what stays behind; a folder that is not a complete checkpoint, a link out of it,
a bad repo id or no network is one line."""

import shutil

import pytest

from tests.cli.run_cli import assert_user_error, starquant


def test_dry_run_stages_the_checkpoint_and_a_card(rtn_checkpoint, tmp_path):
    result = starquant("push", rtn_checkpoint, "me/tiny-llada-rtn", "--dry-run", "--private",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    staged = tmp_path / "tiny-llada-rtn-upload"
    assert {p.name for p in staged.iterdir()} == {p.name for p in rtn_checkpoint.iterdir()} | {
        "README.md"}
    card = (staged / "README.md").read_text()
    assert "# tiny-llada-rtn" in card and "W4A4" in card and "STaRQuantModifier" in card
    assert "nothing uploaded" in result.stdout
    assert "https://huggingface.co/me/tiny-llada-rtn (private repository)" in result.stdout


@pytest.fixture
def cluttered(rtn_checkpoint, tmp_path):
    """The checkpoint with a token, notes and a link to a private file beside it."""
    folder = tmp_path / "cluttered"
    shutil.copytree(rtn_checkpoint, folder)
    (folder / "token").write_text("hf_secret")
    (folder / "notes.md").write_text("notes")
    (tmp_path / "private.txt").write_text("private")
    (folder / "private.txt").symlink_to(tmp_path / "private.txt")
    return folder


def test_dry_run_leaves_out_and_lists_what_is_not_the_checkpoint(rtn_checkpoint, cluttered,
                                                                  tmp_path):
    result = starquant("push", cluttered, "me/x", "--dry-run", "--include", "notes.md",
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    staged = tmp_path / "x-upload"
    assert {p.name for p in staged.iterdir()} == {p.name for p in rtn_checkpoint.iterdir()} | {
        "README.md", "notes.md"}
    lines = result.stdout.splitlines()
    assert any(line.split() == ["left", "out", "token", "(not", "part", "of", "the",
                                "checkpoint)"] for line in lines), result.stdout
    assert any("left out  private.txt (a link to a path outside the folder)" in line
               for line in lines), result.stdout
    assert any(line.endswith("MiB  notes.md") for line in lines), result.stdout
    assert "https://huggingface.co/me/x (public repository)" in result.stdout
    for name in ("model.safetensors", "config.json"):  # copies: editing them edits nothing
        assert (staged / name).stat().st_ino != (cluttered / name).stat().st_ino


@pytest.fixture
def without_recipe(rtn_checkpoint, tmp_path):
    folder = tmp_path / "no-recipe"
    shutil.copytree(rtn_checkpoint, folder)
    (folder / "recipe.yaml").unlink()
    return folder


def test_incomplete_checkpoint_is_refused(without_recipe, tmp_path):
    result = starquant("push", without_recipe, "me/x", "--dry-run", cwd=tmp_path)
    line = assert_user_error(result, "has no recipe.yaml", "starquant quantize writes it")
    assert "save_starquant" not in line and "recipe=" not in line  # the CLI's own words
    assert not (tmp_path / "x-upload").exists()


def test_errors_name_the_flags_and_commands_not_python_arguments(rtn_checkpoint, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(rtn_checkpoint, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    line = assert_user_error(starquant("push", folder, "me/x", "--dry-run", cwd=tmp_path),
                             "has no tokenizer", "starquant quantize writes them")
    assert "tokenizer=" not in line
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    assert_user_error(starquant("push", rtn_checkpoint, "me/x", "--dry-run", "--dry-run-dir",
                                "full", cwd=tmp_path), "--dry-run-dir full is not an empty")
    assert_user_error(starquant("push", rtn_checkpoint, "me/x", "--dry-run", "--include",
                                "missing.txt", cwd=tmp_path), "--include missing.txt: ")
    (tmp_path / "empty").mkdir()
    line = assert_user_error(starquant("push", "empty", "me/x", "--dry-run", cwd=tmp_path),
                             "has no config.json", "starquant quantize wrote")
    assert "save_starquant" not in line


def test_bad_repo_id_and_missing_folder(tmp_path):
    assert_user_error(starquant("push", tmp_path, "not a repo", cwd=tmp_path),
                      "REPO_ID 'not a repo' is not a Hub repository id")
    assert_user_error(starquant("push", "missing", "me/x", cwd=tmp_path),
                      "DIR missing is not a directory")
    line = assert_user_error(starquant("push", tmp_path, "x" * 20_000, cwd=tmp_path),
                             "is not a Hub repository id")
    assert len(line) < 400  # what the user typed is quoted, cut short


def test_links_out_of_the_folder_and_bad_includes_are_one_line(cluttered, tmp_path):
    (tmp_path / "secret.json").write_text("{}")
    (cluttered / "tokenizer_config.json").unlink()
    (cluttered / "tokenizer_config.json").symlink_to(tmp_path / "secret.json")
    result = starquant("push", cluttered, "me/x", "--dry-run", cwd=tmp_path)
    assert_user_error(result, "tokenizer_config.json is a symlink to", "outside the folder")
    assert not (tmp_path / "x-upload").exists()
    result = starquant("push", cluttered, "me/x", "--dry-run", "--include", "../secret.json",
                       cwd=tmp_path)
    assert_user_error(result, "--include ../secret.json is not inside")


def test_upload_without_network_is_one_line(rtn_checkpoint, tmp_path):
    result = starquant("push", rtn_checkpoint, "me/tiny-llada-rtn", cwd=tmp_path)
    assert_user_error(result, "Upload to me/tiny-llada-rtn failed", "--dry-run")


def test_a_checkpoint_edited_after_its_save_is_not_pushed(rtn_checkpoint, tmp_path):
    """Its manifest (written by the save) names the file that changed; eval refuses it too."""
    folder = tmp_path / "edited"
    shutil.copytree(rtn_checkpoint, folder)
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe.read_text() + "# edited\n")
    for command in (("push", folder, "me/x", "--dry-run"), ("eval", folder)):
        assert_user_error(starquant(*command, cwd=tmp_path),
                          "does not match its starquant_manifest.json: changed recipe.yaml")
    assert not (tmp_path / "x-upload").exists()
