"""A quantization run never leaves a silently wrong model: bad arguments fail before anything
changes, non-finite activations stop the block that sees them with its name, and a run that
fails midway leaves the model FP (nothing quantized yet) or unusable (refuses to run or save)."""

import logging

import pytest
import torch

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations import saving
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.pipeline import CalibrationError, quantize_dllm
from tests.integrations.tiny_oneshot import calibration_dataset, run_oneshot, tiny_model
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada

ARGS = StarQuantArgs(scheme="W4A4", epochs=0)
POISON = 7  # token whose embedding is made NaN


def rows(seed: int = 0, poison: bool = False) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(8, 60, (4, 16), generator=generator)
    ids = ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.5, MASK_ID)
    if poison:
        ids[1, 3] = POISON
    return ids


def quantized_linears(model) -> int:
    return sum(isinstance(m, StarQuantLinear) for m in model.modules())


def assert_untouched(model, reference) -> None:
    """Still the FP model: no quantized linear, no hook, same attention, same logits."""
    assert quantized_linears(model) == 0
    assert not model.get_input_embeddings()._forward_pre_hooks
    assert model.config._attn_implementation == reference.config._attn_implementation
    ids = rows(5)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    # not bound to the STaR-Quant saver (oneshot may have wrapped it its own way)
    assert getattr(model.save_pretrained, "__func__", None) is not saving.save_pretrained


@pytest.mark.parametrize("tac", [False, True])
@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_nan_calibration_stops_before_the_model_changes(make, tac):
    model, reference = make(), make()
    with torch.no_grad():
        model.get_input_embeddings().weight[POISON] = float("nan")
        reference.get_input_embeddings().weight[POISON] = float("nan")
    with pytest.raises(CalibrationError, match=r"decoder block 0, linear group .*q_proj.*NaN"):
        quantize_dllm(model, rows(poison=True), ARGS.model_copy(update={"tac": tac}),
                      progress=False)
    assert_untouched(model, reference)


def test_nan_in_a_later_block_marks_the_half_quantized_model_unusable(tmp_path):
    model = tiny_llada()
    with torch.no_grad():
        model.model.transformer.blocks[1].ff_norm.weight[0] = float("nan")
    with pytest.raises(CalibrationError, match=r"decoder block 1, linear group ff_proj/up_proj"):
        quantize_dllm(model, rows(), ARGS, progress=False)
    blocks = model.model.transformer.blocks
    assert isinstance(blocks[0].ff_proj, StarQuantLinear)
    assert not isinstance(blocks[1].q_proj, StarQuantLinear)  # the failing block is restored
    with pytest.raises(RuntimeError, match="half-quantized.*blocks \\[0\\]"):
        model(rows(1))
    with pytest.raises(RuntimeError, match="half-quantized"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_fit_that_diverges_is_named():
    model = tiny_llada()
    with torch.no_grad():
        model.model.transformer.blocks[0].v_proj.weight[2, 5] = float("inf")
    with pytest.raises(CalibrationError, match=r"block 0, linear group q_proj/k_proj/v_proj"):
        quantize_dllm(model, rows(), ARGS, progress=False)
    assert quantized_linears(model) == 0


def test_arguments_that_cannot_fit_the_model_fail_before_anything_changes():
    model, reference = tiny_llada(), tiny_llada()
    with pytest.raises(ValueError, match="tac_group_size=48 does not divide the attention width"):
        quantize_dllm(model, rows(), ARGS.model_copy(update={"tac_group_size": 48}),
                      progress=False)
    with pytest.raises(ValueError, match=r"ids in \[\d+, 64\].*vocabulary has 64"):
        quantize_dllm(model, torch.cat([rows(), torch.full((1, 16), 64)]), ARGS,
                      progress=False)
    assert_untouched(model, reference)
    quantize_dllm(model, rows(), ARGS, progress=False)
    with pytest.raises(ValueError, match="already holds STaR-Quant linears"):
        quantize_dllm(model, rows(), ARGS, progress=False)


def test_calibration_without_one_of_the_two_states_warns(caplog):
    all_masked = torch.full((2, 16), MASK_ID)
    with caplog.at_level(logging.WARNING):
        quantize_dllm(tiny_llada(), all_masked, ARGS, progress=False)
    assert "Every calibration token is [MASK]" in caplog.text


# the same rules through oneshot


def test_oneshot_refuses_bad_arguments_before_calibrating():
    model, tokenizer = tiny_model("llada")
    reference, _ = tiny_model("llada")
    recipe = ("starquant_stage:\n  quantization_modifiers:\n    STaRQuantModifier:\n"
              "      {scheme: W4A4, epochs: 0, tac_group_size: 24}\n")
    with pytest.raises(ValueError, match="tac_group_size=24 does not divide"):
        run_oneshot(model, calibration_dataset(model, tokenizer, rows=4), recipe)
    assert_untouched(model, reference)


@pytest.mark.parametrize("where", ["embedding", "block 2"])
def test_oneshot_with_nan_calibration_leaves_fp_or_unusable(where, tmp_path):
    model, tokenizer = tiny_model("llada")
    reference, _ = tiny_model("llada")
    dataset = calibration_dataset(model, tokenizer, rows=4)
    with torch.no_grad():
        for m in (model, reference):
            if where == "embedding":
                m.get_input_embeddings().weight[:] = float("nan")
            else:
                m.model.transformer.blocks[2].attn_norm.weight[0] = float("nan")
    recipe = ("starquant_stage:\n  quantization_modifiers:\n    STaRQuantModifier:\n"
              "      {scheme: W4A4, epochs: 0}\n")
    block = 0 if where == "embedding" else 2
    with pytest.raises(CalibrationError, match=f"decoder block {block}, linear group q_proj"):
        run_oneshot(model, dataset, recipe)
    if where == "embedding":
        assert quantized_linears(model) == 0
        assert model.config._attn_implementation == reference.config._attn_implementation
    else:
        with pytest.raises(RuntimeError, match=r"half-quantized.*blocks \[0, 1\]"):
            model.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [tiny_llada, tiny_dream])
def test_a_failed_block_undoes_the_value_rotation(make, monkeypatch):
    """kv_rotation folds a Hadamard into v_proj / the output projection in place before the
    groups are fitted; a failure later in the block must restore those weights too."""
    from starquant_plugin import pipeline
    from starquant_plugin.models.families import family_of

    model, reference = make(), make()
    family = family_of(model)
    fitted = []
    real = pipeline.quantize_linear_group

    def fail_on_the_mlp(linears, *args, **kwargs):
        if len(fitted) == 2:  # q/k/v and the output projection are already replaced
            raise CalibrationError("injected failure in the MLP input group")
        fitted.append(linears)
        return real(linears, *args, **kwargs)

    monkeypatch.setattr(pipeline, "quantize_linear_group", fail_on_the_mlp)
    with pytest.raises(CalibrationError, match="injected"):
        quantize_dllm(model, rows(), ARGS.model_copy(update={"kv_rotation": True}),
                      progress=False)
    block = pipeline.decoder_blocks(model, family)[0]
    fp_block = pipeline.decoder_blocks(reference, family)[0]
    for name in (family.scale_pairs[1][0], family.attention_output):
        assert torch.equal(block.get_submodule(name).weight, fp_block.get_submodule(name).weight)
    assert "k_rotation" not in block.get_submodule(family.attention_module).__dict__
    assert_untouched(model, reference)
