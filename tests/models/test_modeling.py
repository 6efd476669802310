"""Both architectures: published 8B layouts, hub-layout loading, bit-exact round trips."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers the Auto classes)
from starquant_plugin.models import DreamModel, LLaDAModelLM, family_of, token_logits
from tests.models.hub_configs import DREAM_7B, LLADA_8B, dream_7b_layout, llada_8b_layout

TINY_OVERRIDES = {
    "llada": {"d_model": 128, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2,
              "mlp_hidden_size": 256, "vocab_size": 300, "embedding_size": 300,
              "mask_token_id": 299, "eos_token_id": 298, "pad_token_id": 298, "bos_token_id": 297},
    "Dream": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 300,
              "mask_token_id": 299, "max_window_layers": 2, "eos_token_id": 298,
              "pad_token_id": 298,
              "bos_token_id": 297},
}


def hub_config(base: dict) -> dict:
    return base | TINY_OVERRIDES[base["model_type"]]


@pytest.mark.parametrize(
    ("hub", "layout", "model_class"),
    [(LLADA_8B, llada_8b_layout, LLaDAModelLM), (DREAM_7B, dream_7b_layout, DreamModel)],
)
def test_8b_parameter_names_and_shapes_match_published_layout(hub, layout, model_class):
    config = AutoConfig.for_model(**{k: v for k, v in hub.items() if k != "auto_map"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, model_class)
    got = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert got == layout()


@pytest.mark.parametrize("hub", [LLADA_8B, DREAM_7B])
def test_hub_layout_directory_loads_without_remote_code(tmp_path, hub):
    """config.json as published (auto_map pointing at remote code, hub keys), safetensors
    shard with hub names: loads through both Auto classes, trust_remote_code unset."""
    config = hub_config(hub)
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    for auto_class in (AutoModelForCausalLM, AutoModel):
        loaded = auto_class.from_pretrained(tmp_path)
        assert type(loaded) is type(reference)
        for name, tensor in reference.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.config.mask_token_id == 299


@pytest.mark.parametrize("hub", [LLADA_8B, DREAM_7B])
def test_save_and_reload_is_bit_exact(tmp_path, hub):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hub_config(hub))).eval()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 299, (2, 16))
    assert set(model.state_dict()) == set(reloaded.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert torch.equal(model(ids).logits, reloaded(ids).logits)


@pytest.mark.parametrize("hub", [LLADA_8B, DREAM_7B])
def test_attention_is_bidirectional(hub):
    """Changing the last token changes the output at the first position."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hub_config(hub))).eval()
    ids = torch.randint(0, 299, (1, 12))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % 299
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])


def test_dream_logits_are_realigned_in_one_place():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hub_config(DREAM_7B)))
    ids = torch.randint(0, 299, (1, 8))
    raw, aligned = model(ids).logits, token_logits(model, ids)
    assert family_of(model).shifted_logits
    assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])


def test_padding_mask_hides_padded_keys():
    """A 2-D keep-mask (the Dream SDPA trap) is accepted and masks padded keys."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hub_config(DREAM_7B)))
    ids = torch.randint(0, 299, (1, 8))
    keep = torch.ones(1, 8, dtype=torch.long)
    keep[0, -2:] = 0
    padded_other = ids.clone()
    padded_other[0, -2:] = 5
    a = model(ids, attention_mask=keep).logits[0, :6]
    b = model(padded_other, attention_mask=keep).logits[0, :6]
    torch.testing.assert_close(a, b)
