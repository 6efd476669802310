"""Bad input is refused with a message that names the fix."""

import json

import pytest
from transformers import AutoConfig

from starquant_plugin.models import LLaDAConfig, family_of, mask_token_id
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
