"""``starquant push`` as a user runs it: the dry run stages exactly the upload with a model
card; a folder that is not a complete checkpoint, a bad repo id or no network is one line."""

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
    assert "nothing uploaded" in result.stdout and "(private)" in result.stdout


@pytest.fixture
def without_recipe(rtn_checkpoint, tmp_path):
    folder = tmp_path / "no-recipe"
    shutil.copytree(rtn_checkpoint, folder)
    (folder / "recipe.yaml").unlink()
    return folder


def test_incomplete_checkpoint_is_refused(without_recipe, tmp_path):
    result = starquant("push", without_recipe, "me/x", "--dry-run", cwd=tmp_path)
    assert_user_error(result, "has no recipe.yaml")
    assert not (tmp_path / "x-upload").exists()


def test_bad_repo_id_and_missing_folder(tmp_path):
    assert_user_error(starquant("push", tmp_path, "not a repo", cwd=tmp_path),
                      "REPO_ID 'not a repo' is not a Hub repository id")
    assert_user_error(starquant("push", "missing", "me/x", cwd=tmp_path),
                      "DIR missing is not a directory")


def test_upload_without_network_is_one_line(rtn_checkpoint, tmp_path):
    result = starquant("push", rtn_checkpoint, "me/tiny-llada-rtn", cwd=tmp_path)
    assert_user_error(result, "Upload to me/tiny-llada-rtn failed", "--dry-run")
