"""The docs describe what the code does: every recipe knob with its default, every command
option, every lm-eval model argument, and links that resolve."""

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from starquant_plugin.cli import build_parser
from starquant_plugin.config import StarQuantArgs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def yaml_value(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def test_recipes_page_lists_every_knob_with_its_default():
    page = (DOCS / "recipes.md").read_text()
    for name, field in StarQuantArgs.model_fields.items():
        row = f"| `{name}` | `{yaml_value(field.default)}` |"
        assert row in page, f"docs/recipes.md lacks the row {row}"
    assert "| `targets` |" in page and "| `ignore` |" in page


def command_parsers():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {name: sub for name, sub in commands.choices.items() if name != "lm-eval"}


@pytest.mark.parametrize("command", command_parsers())
def test_cli_page_documents_every_option(command):
    page = (DOCS / "cli.md").read_text()
    section = page.split(f"## `starquant {command}`")[1].split("\n## ")[0]
    for action in command_parsers()[command]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert f"`{option}" in section, f"docs/cli.md ({command}) lacks {option}"


def test_evaluation_page_documents_every_lm_eval_model_argument():
    from starquant_plugin.integrations.lm_eval import DiffusionLM

    page = (DOCS / "evaluation.md").read_text()
    internal = {"self", "batch_size", "device", "max_batch_size"}  # lm-eval's own options
    for name in inspect.signature(DiffusionLM.__init__).parameters:
        if name not in internal:
            assert f"`{name}`" in page, f"docs/evaluation.md lacks {name}"


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_relative_links_resolve(page):
    text = (DOCS / page).read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (DOCS / target).exists(), f"{page} links to missing {target}"


def test_results_pages_are_generated_from_the_benchmark_json():
    report = DOCS.parent / "benchmarks" / "report.py"
    result = subprocess.run([sys.executable, str(report), "--check"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
