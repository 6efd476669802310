"""``starquant inspect`` as a user runs it on the bundled LLaDA with a checkpoint: readable
PNGs, a report that embeds them, the numbers behind them; bad input is one line."""

import json
import math

from tests.cli.run_cli import assert_user_error, starquant

SMALL = ("--epochs", 0, "--samples", 8, "--seq-len", 48, "--rows", 4, "--prompts", 2,
         "--steps", 16, "--gen-length", 16, "--block-length", 8)
FIGURES = ("activation_by_state.png", "state_disparity.png", "denoising_error.png",
           "linear_group_error.png")


def test_inspect_writes_figures_report_and_numbers(rtn_checkpoint, tmp_path):
    result = starquant("inspect", "tiny-llada", "--quantized", rtn_checkpoint, *SMALL,
                       "--out", "report", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for bar in ("RTN blocks", "SGAT, no TAC blocks", "STaR-Quant blocks",
                "denoising run (forwards)", "per-layer errors (forwards)"):
        assert bar in result.stderr, bar  # a progress bar per phase, no silent stretch
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {*FIGURES, "report.md", "inspect.json"}
    for figure in FIGURES:
        data = (out / figure).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000, figure
    report = (out / "report.md").read_text()
    assert all(f"]({figure})" in report for figure in FIGURES)
    numbers = json.loads((out / "inspect.json").read_text())
    profiles = numbers["activation_profiles"]
    assert len(profiles) == 16 and len(profiles["0:q_proj/k_proj/v_proj"]["masked_rms"]) == 256
    errors = numbers["denoising_errors"]
    assert set(errors) == {"RTN", "SGAT, no TAC", "STaR-Quant",
                           "checkpoint tiny-llada-rtn-w4a4"}
    assert all(len(e["teacher_forced"]) == 16 and all(map(math.isfinite, e["free_running"]))
               for e in errors.values())

    def mean(values):
        return sum(values) / len(values)

    # What the figures are for: the learned transforms cut the error RTN leaves.
    assert mean(errors["STaR-Quant"]["teacher_forced"]) < mean(errors["RTN"]["teacher_forced"])
    groups = numbers["linear_group_errors"]
    assert mean(groups["STaR-Quant"].values()) < mean(groups["RTN"].values())


def test_bad_input_is_one_line(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "report.md").write_text("mine")
    assert_user_error(starquant("inspect", "tiny-llada", "--out", "taken", cwd=tmp_path),
                      "--out taken already exists")
    assert_user_error(starquant("inspect", "tiny-llada", "--layers", "0,9", *SMALL,
                                "--out", "new", cwd=tmp_path), "--layers 0,9 must name blocks")
    assert not (tmp_path / "new").exists()
