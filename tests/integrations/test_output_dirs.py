"""No save destroys a user's data: not the folder the model came from, not another save's
result, not a symlink, not the previous checkpoint when a replace is killed halfway; and a
full disk or a degenerate output path is refused before anything is written."""

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from starquant_plugin.assets import TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations import output_dirs
from starquant_plugin.integrations.integrity import check_saved_checkpoint, verify_checkpoint
from starquant_plugin.integrations.output_dirs import (
    InterruptedReplaceError,
    OutputDirError,
    check_output_dir,
    replace_dir,
)
from starquant_plugin.integrations.output_lock import output_lock
from starquant_plugin.integrations.saving import restore_interrupted_save, save_starquant
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_llada

REPO = Path(__file__).resolve().parents[2]
ARGS = StarQuantArgs(scheme="W4A4", epochs=0)


def calibration_rows() -> torch.Tensor:
    rows = torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(0))
    return rows.masked_fill(rows % 2 == 0, MASK_ID)


@pytest.fixture(scope="module")
def quantized():
    model = tiny_llada()
    quantize_dllm(model, calibration_rows(), ARGS, progress=False)
    return model


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def siblings(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.parent.iterdir() if path.name != folder.name)


def python(code: str, *args: object, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env,
                            text=True, **kwargs)


# the folder the model is read from


def test_overwriting_the_folder_the_fp_model_was_loaded_from_is_refused(tmp_path):
    """Old code: save_starquant(model, M, overwrite=True) replaced the FP model folder M
    (config, weights, tokenizer: all 'checkpoint files') by the quantized checkpoint."""
    source = tmp_path / "tiny-llada"
    shutil.copytree(TINY_LLADA, source)
    before = snapshot(source)
    model, tokenizer = load_dllm(source, dtype=torch.bfloat16)
    quantize_dllm(model, calibration_rows(), ARGS, progress=False)
    for out, relation in ((source, "is"), (source / "w4a4", "is inside"),
                          (tmp_path, "contains")):
        relation = rf"{relation} the folder the model is read from \({re.escape(str(source))}\)"
        with pytest.raises(OutputDirError, match=relation):
            save_starquant(model, out, tokenizer=tokenizer, overwrite=True)
    assert snapshot(source) == before and siblings(source) == []


def test_resaving_a_checkpoint_over_itself_keeps_its_tokenizer_and_recipe(quantized,
                                                                          tmp_path):
    """Old code: save_pretrained(dir, overwrite=True) of a model loaded from dir replaced the
    folder with one lacking the tokenizer and recipe. Refused instead: carrying the old
    folder's tokenizer, recipe and report over would describe another model (and a failed
    save would leave no copy)."""
    _, tokenizer = load_dllm(TINY_LLADA)
    target = tmp_path / "ckpt"
    save_starquant(quantized, target, tokenizer=tokenizer, recipe="stage: {}\n")
    before = snapshot(target)
    assert {"tokenizer.json", "recipe.yaml"} <= set(before)
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    with pytest.raises(OutputDirError, match="the folder the model is read from"):
        reloaded.save_pretrained(target, overwrite=True)
    assert snapshot(target) == before
    reloaded.save_pretrained(tmp_path / "elsewhere")  # a new folder is fine


# one writer per folder


HOLD_LOCK = """
import sys, time
from starquant_plugin.integrations.output_lock import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_cleared(quantized, tmp_path,
                                                                       caplog):
    """Old code: two saves to one new folder both succeeded, the second silently replacing
    the first."""
    target = tmp_path / "ckpt"
    holder = python(HOLD_LOCK, target, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirError, match=rf"being written by another save \(pid "
                                                 rf"{holder.pid}, `-c .*ckpt`"):
            save_starquant(quantized, target)
        assert not target.exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: its lock file stays behind
        holder.wait()
    assert (tmp_path / ".ckpt.lock").exists()
    with caplog.at_level(logging.WARNING):
        save_starquant(quantized, target)
    assert f"left by pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert verify_checkpoint(target).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # lock file removed


def test_the_lock_is_reentrant_in_a_thread_and_refuses_other_threads(tmp_path):
    import threading

    errors = []
    with output_lock(tmp_path / "ckpt"), output_lock(tmp_path / "ckpt"):
        thread = threading.Thread(target=lambda: errors.append(
            pytest.raises(OutputDirError, output_lock(tmp_path / "ckpt").__enter__)))
        thread.start()
        thread.join()
    assert "another thread" in str(errors[0].value)
    with output_lock(tmp_path / "ckpt"):  # released
        pass


def test_a_rename_without_overwrite_never_replaces_a_filled_folder(tmp_path):
    new, target = tmp_path / ".t.tmp-1-ab", tmp_path / "t"
    new.mkdir()
    target.mkdir()
    (target / "theirs.txt").write_text("x")
    with pytest.raises(FileExistsError, match="filled by another program"):
        replace_dir(new, target, overwrite=False)
    assert (target / "theirs.txt").read_text() == "x"


# symlinks and degenerate paths


def test_a_symlinked_output_is_written_through(quantized, tmp_path):
    """Old code: the link was renamed away and replaced by a real folder."""
    real, link = tmp_path / "disk" / "ckpt", tmp_path / "ckpt"
    real.mkdir(parents=True)
    link.symlink_to(real)
    save_starquant(quantized, link)
    assert link.is_symlink() and (real / "config.json").is_file()
    save_starquant(quantized, link, overwrite=True)
    assert link.is_symlink() and verify_checkpoint(real).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "disk"]
    assert sorted(p.name for p in real.parent.iterdir()) == ["ckpt"]


@pytest.mark.parametrize(("out", "phrase"), [
    (".", "is the current directory"), ("", "is the current directory"),
    ("..", "is a parent of the current directory"), ("/", "is the filesystem root"),
    ("notes.txt/ckpt", "is a file, so"),
])
def test_degenerate_outputs_are_refused_with_one_clear_message(quantized, tmp_path,
                                                              monkeypatch, out, phrase):
    """Old code: `.` saved into a temporary folder inside itself and failed with a
    traceback from os.replace; a path under a file failed in mkdir."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises((OutputDirError, NotADirectoryError), match=phrase):
        save_starquant(quantized, out)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["notes.txt", "work"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_parent_is_refused_before_writing(quantized, tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    with pytest.raises(OutputDirError, match="not writable"):
        check_output_dir(locked / "ckpt")


# free space


def test_a_full_disk_is_refused_before_writing(quantized, tmp_path, monkeypatch):
    monkeypatch.setattr(output_dirs, "free_bytes", lambda path: 1000)
    with pytest.raises(OutputDirError, match=rf"Not enough free space in {tmp_path} for the "
                                             r"checkpoint: it needs about [\d,]+ bytes .* 1,000 "
                                             "bytes"):
        save_starquant(quantized, tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


# a replace killed between its two renames


KILLED_SAVE = """
import os, signal, sys
from pathlib import Path
import starquant_plugin  # noqa: F401
from transformers import AutoModelForCausalLM

source, target, when = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(source)
rename = os.replace

def replace(src, dst, **kwargs):
    into_place = Path(src).name.startswith(".ckpt.tmp-") and Path(dst).name == "ckpt"
    if (when == "before-new" and into_place) or (when == "before-delete" and ".ckpt.del-"
                                                 in str(dst)):
        os.kill(os.getpid(), signal.SIGKILL)
    rename(src, dst, **kwargs)

os.replace = replace
model.save_pretrained(target, overwrite=True)
"""


def interrupted_overwrite(quantized, root: Path, when: str) -> tuple[Path, dict[str, bytes]]:
    """``root/ckpt`` after ``save_pretrained(ckpt, overwrite=True)`` was SIGKILLed ``when``;
    returns it and the files it held before."""
    source, target = root / "source", root / "ckpt"
    save_starquant(quantized, source)
    save_starquant(quantized, target, recipe="stage: {}\n")  # differs from the new one
    before = snapshot(target)
    killed = python(KILLED_SAVE, source, target, when)
    assert killed.wait() == -signal.SIGKILL
    return target, before


def test_a_replace_killed_before_the_new_folder_is_in_place_is_explained_and_restored(
        quantized, tmp_path):
    """Old code: the folder was simply missing, the old copy under a hidden name, and the next
    command said nothing about it."""
    target, before = interrupted_overwrite(quantized, tmp_path, "before-new")
    assert not target.exists()
    (old,) = tmp_path.glob(".ckpt.old-*")
    for touch in (lambda: save_starquant(quantized, target),
                  lambda: save_starquant(quantized, target, overwrite=True),
                  lambda: check_saved_checkpoint(target)):
        with pytest.raises(InterruptedReplaceError,
                           match=rf"ckpt is missing: a save that was replacing it was "
                                 rf"interrupted .* restore it with `mv {re.escape(str(old))} "
                                 rf"{re.escape(str(target))}` or "
                                 r"starquant_plugin\.integrations\.saving\."
                                 r"restore_interrupted_save\("):
            touch()
    restore_interrupted_save(target)
    assert snapshot(target) == before and verify_checkpoint(target).ok
    save_starquant(quantized, target, overwrite=True)  # the dead save's tmp folder is cleaned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "source"]


def test_a_replace_killed_after_the_new_folder_is_in_place_is_explained(quantized, tmp_path,
                                                                       caplog):
    target, before = interrupted_overwrite(quantized, tmp_path, "before-delete")
    (old,) = tmp_path.glob(".ckpt.old-*")
    assert snapshot(old) == before and verify_checkpoint(target).ok
    with caplog.at_level(logging.WARNING):
        check_saved_checkpoint(target)
    assert f"{old} holds the previous checkpoint of {target}" in caplog.text
    assert f"rm -r {old}" in caplog.text
    with pytest.raises(FileExistsError, match="move it away first"):
        restore_interrupted_save(target)
    target.rename(tmp_path / "ckpt.new")
    restore_interrupted_save(target)
    assert snapshot(target) == before
