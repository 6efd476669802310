"""A checkpoint that does not fit its config is refused at load, whole: every tensor (not only
the quantized ones) present, expected, of the right shape, dtype, finite and in range, and a
config whose parts contradict each other refused with the field that is wrong."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import starquant_plugin  # noqa: F401  (registers the loader)
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.checkpoint_model import check_checkpoint, checkpoint_specs
from starquant_plugin.integrations.checkpoint_tensors import (
    CheckpointTensorError,
    TensorChecker,
    TensorSpec,
)
from starquant_plugin.integrations.format import validate_config
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada

BLOCK = "model.transformer.blocks.0."


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A W4A4 tiny LLaDA checkpoint (float32, K/V rotated: the defaults)."""
    model = tiny_llada()
    rows = torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(0))
    args = StarQuantArgs(scheme="W4A4", epochs=0)
    quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID), args, progress=False)
    return save_starquant(model, tmp_path_factory.mktemp("saved") / "ckpt", args=args)


def _edited_tensors(saved: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited"
    shutil.copytree(saved, path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _scaled(name: str, change):
    return lambda tensors: tensors.__setitem__(name, change(tensors[name]))


def _nan_at_0(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    tensor.view(-1)[0] = float("nan")
    return tensor


TENSOR_EDITS = {
    "LM head cut to half its rows": (
        _scaled("model.transformer.ff_out.weight", lambda t: t[: len(t) // 2].clone()),
        "ff_out.weight has shape [32, 64], expected [64, 64]"),
    "embedding missing": (lambda t: t.pop("model.transformer.wte.weight"),
                          "wte.weight is missing"),
    "NaN in the final norm": (_scaled("model.transformer.ln_f.weight", _nan_at_0), "ln_f"),
    "NaN in a block norm": (_scaled(BLOCK + "attn_norm.weight", _nan_at_0), "attn_norm"),
    "inf in an embedding row": (
        _scaled("model.transformer.wte.weight", lambda t: t.index_fill(0, torch.tensor([5]),
                                                                       float("inf"))), "wte"),
    "an unexpected tensor": (lambda t: t.__setitem__("model.transformer.extra", torch.ones(3)),
                             "model.transformer.extra is not a tensor of this model"),
    "a STaR tensor of the wrong shape": (
        _scaled(BLOCK + "q_proj.input_transform.sgat_left", lambda t: torch.eye(4)),
        "sgat_left has shape [4, 4], expected [8, 8]"),
    "weight codes of the wrong shape": (
        _scaled(BLOCK + "q_proj.weight_packed", lambda t: t[:32].clone()),
        "q_proj.weight_packed has shape [32, 8]"),
    "a float64 scale": (_scaled(BLOCK + "q_proj.weight_scale", lambda t: t.double()),
                        "weight_scale has dtype float64, expected float32"),
    "an int8 transform": (
        _scaled(BLOCK + "q_proj.input_transform.sgat_left", lambda t: t.to(torch.int8)),
        "sgat_left has dtype int8, expected float32"),
    "float weight codes": (_scaled(BLOCK + "k_proj.weight_packed", lambda t: t.float()),
                           "weight_packed has dtype float32, expected int32"),
    "a zeroed weight scale": (_scaled(BLOCK + "q_proj.weight_scale", torch.zeros_like),
                              "q_proj.weight_scale holds values in [0, 0], outside the (0, inf]"),
    "a zeroed activation clip": (
        _scaled(BLOCK + "q_proj.input_transform.sgat_act_clip", torch.zeros_like),
        "sgat_act_clip holds values in [0, 0], outside the (0, 1]"),
    "an activation clip above 1": (
        _scaled(BLOCK + "ff_proj.input_transform.sgat_act_clip", lambda t: t * 0 + 1.5),
        "sgat_act_clip holds values in [1.5, 1.5]"),
    "a negative channel scale": (
        _scaled(BLOCK + "q_proj.input_transform.sgat_channel_scale", lambda t: -t),
        "sgat_channel_scale holds values in [-"),
}


@pytest.mark.parametrize("edit", TENSOR_EDITS, ids=list(TENSOR_EDITS))
def test_a_checkpoint_with_a_wrong_tensor_is_refused_by_load_and_check(saved, tmp_path, edit):
    change, message = TENSOR_EDITS[edit]
    path = _edited_tensors(saved, tmp_path, change)
    with pytest.raises(CheckpointTensorError,
                       match="does not fit|NaN or inf|no quantized model holds") as loading:
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointTensorError) as checking:
        check_checkpoint(path)
    for error in (loading, checking):
        if "NaN" not in edit and "inf" not in edit:
            assert message in str(error.value)
        assert "download or copy it again" in str(error.value) or "re-quantize" in str(
            error.value)


def test_the_checkpoint_as_saved_passes_and_reloads(saved):
    check_checkpoint(saved)
    assert AutoModelForCausalLM.from_pretrained(saved) is not None


def _config_edit(saved: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "edited"
    shutil.copytree(saved, path)
    config = json.loads((path / "config.json").read_text())
    edit(config["quantization_config"])
    (path / "config.json").write_text(json.dumps(config))
    return path


def _group(index: int, **change):
    return lambda q: q["starquant"]["input_groups"][index].update(change)


CONFIG_EDITS = {
    "kv_bits 0": (lambda q: q["starquant"].update(kv_bits=0), "kv_bits is 0"),
    "kv_bits -1": (lambda q: q["starquant"].update(kv_bits=-1), "kv_bits is -1"),
    "8-bit activations on W4A4": (
        lambda q: q["config_groups"]["group_0"]["input_activations"].update(num_bits=8),
        "input_activations are 8-bit int symmetric per token dynamic but args.scheme W4A4"),
    "asymmetric weights on W4A4": (
        lambda q: q["config_groups"]["group_0"]["weights"].update(symmetric=False),
        "weights are 4-bit int asymmetric per channel"),
    "args say W8A8": (lambda q: q["starquant"]["args"].update(scheme="W8A8"),
                      "args (scheme W8A8, kv_bits None) mean 16"),
    "K rotation dropped": (lambda q: q["starquant"].update(k_rotation=None),
                           "k_rotation is None but args"),
    "exclusive width edited": (_group(0, exclusive_width=3), "exclusive_width 3"),
    "factors edited": (_group(0, factors=[4, 16]), "factors [4, 16]"),
    "TAC on q/k/v": (_group(0, tac_group_size=16), "TAC sits on the attention output"),
    "TAC dropped from the output projection": (_group(1, tac_group_size=None),
                                               "tac_group_size None"),
    "another family": (lambda q: q["starquant"].update(family="dream"),
                       "family is 'dream' but input_groups list"),
    "a linear in two groups": (
        lambda q: q["starquant"]["input_groups"][1]["linears"].append(BLOCK + "q_proj"),
        "a linear is listed in two input_groups"),
    "top-level format of 8-bit codes on 4-bit weights": (
        lambda q: q.update(format="int-quantized"),
        "format is 'int-quantized' but the config group's 4-bit weights are stored as "
        "'pack-quantized'"),
    "a config group without targets": (
        lambda q: q["config_groups"]["group_0"].pop("targets"),
        "compressed-tensors part is invalid (config_groups.group_0"),
}


@pytest.mark.parametrize("edit", CONFIG_EDITS, ids=list(CONFIG_EDITS))
def test_a_config_that_contradicts_itself_is_refused_naming_the_field(saved, tmp_path, edit):
    change, message = CONFIG_EDITS[edit]
    config = copy.deepcopy(json.loads((saved / "config.json").read_text()))
    change(config["quantization_config"])
    with pytest.raises(ValueError, match="config.json was edited") as parsing:
        validate_config(config["quantization_config"])
    assert message in str(parsing.value)
    with pytest.raises(ValueError, match="edited"):
        AutoModelForCausalLM.from_pretrained(_config_edit(saved, tmp_path, change))


def test_a_checkpoint_written_before_kv_rotation_loads_unrotated(saved):
    """Older checkpoints record neither args.kv_rotation nor k_rotation: they did not rotate."""
    config = json.loads((saved / "config.json").read_text())["quantization_config"]
    block = config["starquant"]
    del block["k_rotation"], block["args"]["kv_rotation"], block["args"]["tac_shrinkage"]
    parsed, _ = validate_config(config)
    assert parsed.k_rotation is None and not parsed.args.kv_rotation
    assert parsed.args.tac_shrinkage == 0.2


def test_specs_cover_every_tensor_of_both_families(tmp_path):
    for make in (tiny_llada, tiny_dream):
        model = make()
        rows = torch.randint(3, 60, (4, 32), generator=torch.Generator().manual_seed(0))
        args = StarQuantArgs(scheme="W8A8", epochs=0)
        quantize_dllm(model, rows.masked_fill(rows % 2 == 0, MASK_ID), args, progress=False)
        path = save_starquant(model, tmp_path / make.__name__, args=args)
        specs = checkpoint_specs(AutoModelForCausalLM.from_pretrained(path).config)
        on_disk = load_file(path / "model.safetensors")
        assert set(specs) == set(on_disk)
        assert all(specs[name] == TensorSpec(tuple(t.shape), t.dtype)
                   for name, t in on_disk.items())


def test_the_streaming_checker_names_what_never_came():
    checker = TensorChecker({"a": TensorSpec((2,), torch.float32),
                             "b": TensorSpec((1,), torch.int32)}, "stream")
    assert [name for name, _ in checker.stream([("a", torch.zeros(2))])] == ["a"]
    with pytest.raises(CheckpointTensorError, match="b is missing"):
        checker.finish()
    with pytest.raises(CheckpointTensorError, match="a holds NaN"):
        list(TensorChecker({"a": TensorSpec((1,), None)}, "s").stream(
            [("a", torch.tensor([float("nan")]))]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_value_anywhere_is_refused_in_every_float_dtype(dtype, value):
    """The scan reads extremes (``aminmax``, which propagates NaN), not every element's flag."""
    specs = {"t": TensorSpec((3, 5), None), "codes": TensorSpec((2,), torch.int32),
             "empty": TensorSpec((0,), None)}
    good = [("codes", torch.tensor([-7, 7], dtype=torch.int32)), ("empty", torch.zeros(0))]
    assert len(list(TensorChecker(specs, "s").stream(good))) == 2
    for index in (0, 7, 14):
        tensor = torch.randn(3, 5).to(dtype)
        tensor.view(-1)[index] = value
        with pytest.raises(CheckpointTensorError, match="t holds NaN or inf"):
            list(TensorChecker(specs, "s").stream([("t", tensor.t().contiguous().t())]))


@pytest.mark.parametrize(("file", "text", "message"), [
    ("config.json", "[1, 2]", "holds a JSON list, not an object"),
    ("config.json", "{not json", "is not valid JSON"),
    ("model.safetensors.index.json", '{"metadata": {}}', "has no weight_map"),
])
def test_a_malformed_json_file_is_one_sentence(saved, tmp_path, file, text, message):
    path = tmp_path / "edited"
    shutil.copytree(saved, path)
    (path / file).write_text(text)
    with pytest.raises(ValueError, match=message):
        check_checkpoint(path)
