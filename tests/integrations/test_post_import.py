"""Registration with llm-compressor and lm-eval is lazy: ``import starquant_plugin`` imports
neither, yet a recipe naming ``STaRQuantModifier`` parses and lm-eval resolves ``starquant``
whichever was imported first (each order in a fresh process)."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

from starquant_plugin.integrations.post_import import when_imported

RECIPE = "s_stage:\n  q_modifiers:\n    STaRQuantModifier: {scheme: W4A4}\n"

CHECK = textwrap.dedent(f'''
    from llmcompressor.recipe import Recipe
    from lm_eval.api.registry import get_model, model_registry
    recipe = Recipe.create_instance({RECIPE!r})
    assert [type(m).__name__ for m in recipe.modifiers] == ["STaRQuantModifier"], recipe
    assert get_model("starquant").__name__ == "DiffusionLM"
    assert "hf" in model_registry  # lm-eval's own models are still registered
    print("ok")
''')

ORDERS = {
    "plugin first": textwrap.dedent('''
        import sys
        import starquant_plugin
        assert "llmcompressor" not in sys.modules and "lm_eval" not in sys.modules
        import llmcompressor, lm_eval.api.registry
    '''),
    "frameworks first (the README's order)": textwrap.dedent('''
        from llmcompressor import oneshot
        import lm_eval.api.registry
        import starquant_plugin
    '''),
    "modifier module first": textwrap.dedent('''
        from starquant_plugin.integrations.llmcompressor import STaRQuantModifier
    '''),
}


@pytest.mark.parametrize("order", ORDERS)
def test_registration_whichever_is_imported_first(order):
    result = subprocess.run([sys.executable, "-c", ORDERS[order] + CHECK],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_import_starquant_plugin_logs_nothing():
    result = subprocess.run([sys.executable, "-c", "import starquant_plugin"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == "" and "No accelerator" not in result.stderr


def test_when_imported_runs_after_the_module_and_keeps_its_loader(tmp_path, monkeypatch):
    package = tmp_path / "starquant_fake_framework"
    package.mkdir()
    (package / "__init__.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []

    def callback():
        seen.append(sys.modules["starquant_fake_framework"].VALUE)

    when_imported("starquant_fake_framework", callback)
    when_imported("starquant_fake_framework", callback)  # queued once
    assert seen == []
    module = importlib.import_module("starquant_fake_framework")
    assert seen == [42]
    assert type(module.__loader__).__name__ != "_CallbackLoader"
    assert module.__spec__.loader is module.__loader__
    when_imported("starquant_fake_framework", callback)  # already imported: runs now
    assert seen == [42, 42]
    monkeypatch.delitem(sys.modules, "starquant_fake_framework")


def test_a_blocked_import_runs_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "starquant_blocked_framework", None)  # import blocked
    calls = []
    when_imported("starquant_blocked_framework", lambda: calls.append(1))
    assert calls == []


TRANSFORMERS_CHECK = textwrap.dedent('''
    from transformers import AutoConfig
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from starquant_plugin.assets import TINY_LLADA
    assert type(AutoConfig.from_pretrained(TINY_LLADA)).__name__ == "LLaDAConfig"
    assert AUTO_QUANTIZER_MAPPING["starquant"].__name__ == "StarQuantHfQuantizer"
    print("ok")
''')

TRANSFORMERS_ORDERS = {
    "plugin first": "import sys, starquant_plugin\n"
                    "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n",
    "transformers first": "import transformers\nimport starquant_plugin\n",
    "a module that imports transformers first": "from starquant_plugin.pipeline import "
                                                "quantize_dllm\n",
    "the models package first": "from starquant_plugin.models import LLaDAConfig\n",
    "the quantizer module first": "from starquant_plugin.integrations.hf_quantizer import "
                                  "StarQuantConfig\n",
}


@pytest.mark.parametrize("order", TRANSFORMERS_ORDERS)
def test_transformers_registration_whichever_is_imported_first(order):
    """``import starquant_plugin`` imports neither torch nor transformers (the CLI starts in
    a fraction of a second); the Auto classes and the quantizer are registered as soon as
    transformers is, also when one of the package's own modules is what imports it."""
    result = subprocess.run([sys.executable, "-c", TRANSFORMERS_ORDERS[order]
                             + TRANSFORMERS_CHECK], capture_output=True, text=True, timeout=900,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
