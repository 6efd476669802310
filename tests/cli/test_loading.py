"""The MODEL argument every command resolves: a folder an interrupted overwrite left missing
is explained with how to restore it, not reported as a typo."""

import shutil
import subprocess

from tests.cli.run_cli import assert_user_error, starquant


def test_eval_of_a_folder_left_missing_by_an_interrupted_overwrite(rtn_checkpoint, tmp_path):
    """Old code: `MODEL ckpt does not exist`, with the checkpoint hidden beside it."""
    finished = subprocess.Popen(["true"])  # the pid of the killed save
    finished.wait()
    old = shutil.copytree(rtn_checkpoint, tmp_path / f".ckpt.old-{finished.pid}-0a1b2c3d")
    result = starquant("eval", "ckpt", "--reference", "tiny-llada", cwd=tmp_path)
    assert_user_error(result, "ckpt is missing: a save that was replacing it was interrupted",
                      f"restore it with `mv {old} {tmp_path / 'ckpt'}` or "
                      "starquant_plugin.integrations.saving.restore_interrupted_save('ckpt')")
    assert "loading" not in result.stderr
