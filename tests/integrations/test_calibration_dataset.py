"""dllm_calibration_dataset refuses inputs that would silently give garbage rows."""

import pytest

from starquant_plugin.assets import calibration_text
from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
from tests.integrations.tiny_oneshot import tiny_model


@pytest.fixture(scope="module")
def llada():
    return tiny_model("llada")


def test_a_plain_string_is_not_taken_as_a_list_of_characters(llada):
    model, tokenizer = llada
    with pytest.raises(TypeError, match=r"single string.*\[text\]"):
        dllm_calibration_dataset(model, tokenizer, calibration_text(), num_samples=2)


@pytest.mark.parametrize("seq_len", [0, 16])
def test_rows_must_be_longer_than_the_clean_prompt(llada, seq_len):
    model, tokenizer = llada
    with pytest.raises(ValueError, match=f"seq_len={seq_len} leaves no position to mask"):
        dllm_calibration_dataset(model, tokenizer, [calibration_text()], num_samples=2,
                                 seq_len=seq_len)


def test_mask_token_must_match_the_tokenizer(llada):
    model, tokenizer = llada
    model.config.mask_token_id = 5
    try:
        with pytest.raises(ValueError, match="mask_token_id is 5 but the tokenizer"):
            dllm_calibration_dataset(model, tokenizer, [calibration_text()], num_samples=2)
    finally:
        model.config.mask_token_id = tokenizer.mask_token_id
