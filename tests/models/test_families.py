"""Bad input is refused with a message that names the fix."""

import json
import shutil

import pytest
from transformers import AutoConfig

from starquant_plugin.assets import TINY_LLADA
from starquant_plugin.models import DreamConfig, LLaDAConfig, family_of, mask_token_id
from starquant_plugin.models.loading import load_dllm
from tests.models.hub_configs import LLADA_8B


def test_model_without_mask_token_is_refused():
    with pytest.raises(ValueError, match="no mask_token_id.*Set 'mask_token_id'"):
        mask_token_id(LLaDAConfig(mask_token_id=None))


def test_unknown_model_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Unsupported model_type 'llama'"):
        family_of(AutoConfig.for_model("llama"))
    config = LLADA_8B | {"model_type": "llama", "hidden_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Unsupported model_type 'llama'.*LLaDA or Dream"):
        load_dllm(tmp_path)


def test_loading_checks_mask_token_before_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLADA_8B | {"mask_token_id": None}))
    with pytest.raises(ValueError, match="no mask_token_id"):
        load_dllm(tmp_path)  # no weights in the folder: the config check comes first


def test_configs_have_no_default_mask_token():
    """A config.json without mask_token_id must not inherit the 8B models' id."""
    for config in (LLaDAConfig(), DreamConfig()):
        with pytest.raises(ValueError, match="no mask_token_id"):
            mask_token_id(config)


def test_mask_token_outside_the_vocabulary_is_refused():
    config = LLaDAConfig(vocab_size=2048, embedding_size=2048, mask_token_id=126336)
    with pytest.raises(ValueError, match="126336, outside the model's vocabulary of 2048"):
        mask_token_id(config)


def _bundled_copy(tmp_path, **config_changes):
    folder = tmp_path / "model"
    shutil.copytree(TINY_LLADA, folder)
    config = json.loads((folder / "config.json").read_text()) | config_changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_mask_token_must_agree_with_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer's mask token '<\\|mdm_mask\\|>' has id 2"):
        load_dllm(_bundled_copy(tmp_path, mask_token_id=5))


def test_model_type_typo_names_the_supported_type_not_remote_code(tmp_path):
    """The bundled config carries the hub's auto_map; with a typo transformers would ask for
    trust_remote_code. load_dllm says what is wrong instead."""
    with pytest.raises(ValueError, match="Unsupported model_type 'lada'.*Did you mean 'llada'"):
        load_dllm(_bundled_copy(tmp_path, model_type="lada"))


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "config.json holds a JSON list, not an object"),
    ('"llada"', "config.json holds a JSON str, not an object"),
    ("{not json", "config.json is not valid JSON"),
])
def test_config_json_that_is_not_an_object_is_refused(tmp_path, text, message):
    folder = _bundled_copy(tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=f"{message}.*restore it from the original model"):
        load_dllm(folder)


def test_folder_without_a_tokenizer_is_refused(tmp_path):
    folder = _bundled_copy(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError, match="model has no tokenizer.*tokenizer.save_pre"):
        load_dllm(folder)


def test_tokenizer_files_that_do_not_load_are_refused(tmp_path):
    folder = _bundled_copy(tmp_path)
    (folder / "tokenizer.json").unlink()  # the config names a fast tokenizer it cannot build
    with pytest.raises(ValueError, match="The tokenizer files in .*model do not load"):
        load_dllm(folder)
