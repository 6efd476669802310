"""Fixtures shared across test folders."""

from pathlib import Path

import pytest

from tests.cli.run_cli import starquant

CALIBRATION = ("--samples", 8, "--seq-len", 48)


@pytest.fixture(scope="session")
def rtn_checkpoint(tmp_path_factory) -> Path:
    """The bundled tiny LLaDA at RTN W4A4, made by ``starquant quantize`` (no fit: fast)."""
    root = tmp_path_factory.mktemp("rtn")
    result = starquant("quantize", "tiny-llada", "--scheme", "W4A4", "--method", "rtn",
                       *CALIBRATION, "--out", "tiny-llada-rtn-w4a4", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    (root / "quantize.stdout").write_text(result.stdout)  # read by tests/cli/test_quantize.py
    return root / "tiny-llada-rtn-w4a4"
