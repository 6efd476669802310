"""``starquant eval`` as a user runs it: a table (and JSON) scoring a checkpoint against its
FP model on identical masks, and one clear line for bad input."""

import json
import shutil

import pytest

from starquant_plugin.assets import TINY_LLADA
from tests.cli.run_cli import assert_user_error, starquant

SMALL = ("--rows", 8, "--seq-len", 64, "--elbo-rows", 2, "--mc-num", 4, "--prompts", 2)


def test_eval_prints_a_table_and_writes_json(rtn_checkpoint, tmp_path):
    result = starquant("eval", rtn_checkpoint, "--reference", "tiny-llada", *SMALL,
                       "--mask-draws", 2, "--json", "scores.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    header, rule, reference_row, model_row = result.stdout.splitlines()[:4]
    assert header.startswith("| model | ce@0.15 | ce@0.5 | ce@0.85 | acc@0.15")
    assert header.endswith("| elbo | gen_agreement |")
    assert reference_row.startswith("| tiny-llada (reference) |")
    assert reference_row.endswith("| 1.000 |")  # the reference agrees with itself
    scores = json.loads((tmp_path / "scores.json").read_text())
    fp, rtn = scores["results"]["tiny-llada (reference)"], scores["results"][str(rtn_checkpoint)]
    assert rtn["ce@0.15"] != fp["ce@0.15"] and rtn["elbo"] != fp["elbo"]
    assert 0 <= rtn["gen_agreement"] < 1
    assert scores["setup"]["scored_rows"] == 8 and scores["setup"]["mc_num"] == 4
    assert scores["setup"]["mask_draws"] == 2


@pytest.mark.parametrize(("argv", "phrase"), [
    (["eval", "missing-model"], "MODEL missing-model does not exist"),
    (["eval", "tiny-llada", "--reference", "nowhere/../x"], "--reference nowhere/../x does not"),
    (["eval", "tiny-llada", "--text", "empty.txt"], "--text empty.txt is empty"),
    (["eval", "tiny-llada", "--json", "taken.json"], "taken.json already exists"),
    (["eval", "tiny-llada", "--prompt-len", 200], "--prompt-len 200 must be between"),
    (["eval", "tiny-llada", "--text", "corpus"], "--text corpus is a directory, not a text"),
    (["eval", "no-tokenizer"], "no-tokenizer has no tokenizer"),
    (["eval", "list-config"], "list-config/config.json holds a JSON list, not an object"),
    (["eval", "tiny-llada", "--reference", "tiny-dream"],
     "--reference tiny-dream is a dream model but tiny-llada is a llada model; pass the FP "
     "llada model"),
])
def test_bad_input_is_one_line_naming_the_fix(argv, phrase, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "corpus").mkdir()
    for name in ("no-tokenizer", "list-config"):
        shutil.copytree(TINY_LLADA, tmp_path / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no-tokenizer" / name).unlink()
    (tmp_path / "list-config" / "config.json").write_text("[1, 2]")
    assert_user_error(starquant(*argv, *SMALL, cwd=tmp_path), phrase)
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_counts_must_be_positive(tmp_path):
    result = starquant("eval", "tiny-llada", "--rows", 0, cwd=tmp_path)
    assert_user_error(result, "argument --rows: must be a positive integer, got '0'", code=2)
