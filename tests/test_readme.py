"""The README's Python and YAML blocks run as written.

Each Python block runs in a fresh interpreter, in README order, in one working directory (a
block preceded by ``<!-- continues -->`` is appended to the one before). That is the user's
flow: load and generate, quantize with ``oneshot`` in bf16 and ``save_pretrained``, then reload
in a new process. The flow runs for both families (the Dream run swaps the model, recipe and
folder names), and the reloaded model's logits must equal the in-memory quantized model's.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from starquant_plugin.integrations.llmcompressor import STaRQuantModifier, load_starquant_recipe

README = Path(__file__).resolve().parents[1] / "README.md"

RECORD = '''
import torch as _torch
from safetensors.torch import save_file as _save_file
from starquant_plugin.models import mask_token_id as _mask_token_id
_ids = _torch.randint(3, 2000, (2, 48), generator=_torch.Generator().manual_seed(0))
_ids[:, 16:] = _ids[:, 16:].masked_fill(_ids[:, 16:] % 3 == 0, _mask_token_id(model))
with _torch.no_grad():
    _save_file({"ids": _ids, "logits": model(_ids).logits.float().contiguous()},
               "expected.safetensors")
'''

COMPARE = '''
import torch as _torch
from safetensors.torch import load_file as _load_file
_expected = _load_file("expected.safetensors")
with _torch.no_grad():
    _logits = model(_expected["ids"]).logits.float()
print("max_abs_logit_diff", (_logits - _expected["logits"]).abs().max().item())
assert _torch.equal(_logits, _expected["logits"])
'''


def readme_scripts() -> list[str]:
    scripts: list[str] = []
    for match in re.finditer(r"(<!-- continues -->\s*)?```python\n(.*?)```", README.read_text(),
                             re.S):
        if match.group(1):
            scripts[-1] += "\n" + match.group(2)
        else:
            scripts.append(match.group(2))
    return scripts


def for_family(script: str, family: str) -> str:
    """The README's flow for ``family``: the model, recipe and output folders swapped."""
    return (script.replace('TINY_MODELS["llada"]', f'TINY_MODELS["{family}"]')
            .replace('bundled_recipe("llada"', f'bundled_recipe("{family}"')
            .replace('"tiny-llada-', f'"tiny-{family}-'))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_readme_python_blocks_run_and_the_reload_gives_the_same_logits(family, tmp_path):
    scripts = readme_scripts()
    saving = [i for i, s in enumerate(scripts) if ".save_pretrained(" in s]
    loading = [i for i, s in enumerate(scripts) if "AutoModelForCausalLM.from_pretrained(" in s]
    assert len(saving) == 1 and len(loading) == 1 and saving[0] < loading[0], (
        "the README must show one quantize-and-save block and a later reload block")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for index, script in enumerate(scripts):
        script = for_family(script, family)
        script += RECORD if index == saving[0] else COMPARE if index == loading[0] else ""
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, f"README block {index}:\n{result.stderr[-3000:]}"
    assert (tmp_path / f"tiny-{family}-starquant-w4a4-hub" / "tokenizer.json").is_file()


def test_readme_yaml_recipes_parse_to_the_modifier():
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        assert any(isinstance(m, STaRQuantModifier)
                   for m in load_starquant_recipe(block).modifiers)
