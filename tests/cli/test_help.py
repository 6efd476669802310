"""``starquant --help`` and every subcommand's ``--help`` start without torch: importing the CLI
loads no heavy module (checked by module list, not by time), and options show their
defaults."""

import subprocess
import sys

import pytest

from tests.cli.run_cli import starquant

HEAVY = ("torch", "transformers", "safetensors", "compressed_tensors", "llmcompressor",
         "numpy", "sklearn", "matplotlib", "vllm")


def test_importing_the_cli_loads_no_heavy_module():
    code = ("import sys, starquant_plugin.cli; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


def test_python_m_runs_the_cli():
    """``python -m starquant_plugin.cli`` (what the server tests start) gets the module's code
    through the import hooks registration installs (runpy asks the loader for it)."""
    result = subprocess.run([sys.executable, "-m", "starquant_plugin.cli", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("usage: starquant")


DEFAULTS = {  # command -> defaults its --help must show
    "quantize": ["(default: bfloat16)", "(default: 0)", "(default: 32)"],
    "eval": ["(default: float32)", "(default: 0)", "(default: 64)"],
    "inspect": ["(default: 2)", "(default: 0)"],
    "serve": ["(default: 8000)", "(default: float32)"],
    "demo": ["(default: W4A4)"],
}


@pytest.mark.parametrize("command", ["", "quantize", "eval", "inspect", "verify", "push",
                                     "serve", "demo"])
def test_help_of_every_command_runs_and_shows_the_defaults(tmp_path, command):
    result = starquant(*([command] if command else []), "--help", cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = " ".join(result.stdout.split())
    for default in DEFAULTS.get(command, []):
        assert default in text, (default, text)
