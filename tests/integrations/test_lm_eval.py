"""The lm-eval model through lm-eval's own command line: ``starquant lm-eval --model
starquant`` on the local tasks in ``lm_eval_tasks/`` (a cloze multiple choice and a next-word
likelihood over held-out sentences), FP vs RTN W4A4; bad model arguments are one line."""

import json
from pathlib import Path

import pytest

from tests.cli.run_cli import assert_user_error, starquant

TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def lm_eval_scores(pretrained: Path | str, output: Path) -> dict:
    result = starquant("lm-eval", "--model", "starquant",
                       "--model_args", f"pretrained={pretrained},mc_num=8",
                       "--tasks", "starquant_cloze,starquant_next_word", "--include_path", ".",
                       "--batch_size", 8, "--output_path", output, cwd=TASKS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "starquant_cloze" in result.stdout  # lm-eval's own results table
    (path,) = output.rglob("results_*.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def scores(rtn_checkpoint, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("lm_eval")
    return {"FP": lm_eval_scores("tiny-llada", root / "fp"),
            "RTN": lm_eval_scores(rtn_checkpoint, root / "rtn")}


def test_scores_come_from_our_model_and_differ_between_fp_and_rtn(scores):
    fp, rtn = (scores[name]["results"] for name in ("FP", "RTN"))
    assert 0.25 < fp["starquant_cloze"]["acc,none"] <= 1  # the tiny model beats chance (1/4)
    ppl_fp = fp["starquant_next_word"]["perplexity,none"]
    ppl_rtn = rtn["starquant_next_word"]["perplexity,none"]
    assert ppl_fp != ppl_rtn
    assert ppl_fp < ppl_rtn  # quantization costs likelihood
    assert scores["FP"]["config"]["model"] == "starquant"
    assert scores["RTN"]["config"]["quantization"] == "W4A4"
    assert scores["FP"]["config"]["quantization"] == "FP"


@pytest.mark.parametrize(("model_args", "phrase"), [
    ("pretrained=no-such-model", "no-such-model does not exist"),
    ("pretrained=tiny-llada,mc_num=12", "mc_num=12 is not a multiple of batch_size=8"),
])
def test_bad_model_arguments_are_one_line(model_args, phrase):
    result = starquant("lm-eval", "--model", "starquant", "--model_args", model_args,
                       "--tasks", "starquant_cloze", "--include_path", ".", "--batch_size", 8,
                       cwd=TASKS)
    assert_user_error(result, phrase)
