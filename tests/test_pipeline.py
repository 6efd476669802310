"""The core STaR-Quant path on tiny random models: it runs for every method, is deterministic,
and its forward is the runtime modules' formula."""

import copy

import pytest
import torch

from starquant_plugin.config import METHODS, StarQuantArgs, method_args
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.method.quantizers import nvfp4_global_scale
from starquant_plugin.pipeline import quantize_dllm
from tests.devices import DevicelessTensors
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada


def calibration_rows(seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 60, (8, 32), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, MASK_ID)


@pytest.mark.parametrize("make_model", [tiny_llada, tiny_dream])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_replaces_every_block_linear(make_model, method):
    model = make_model()
    rows = calibration_rows(), calibration_rows(1)
    with DevicelessTensors() as deviceless:  # calibration and the quantized forward
        report = quantize_dllm(model, rows[0], method_args(method, epochs=1), progress=False)
        logits = model(rows[1]).logits
    assert not deviceless.found, "tensors created off the block's device (fails on a GPU)"
    replaced = [m for m in model.modules() if isinstance(m, StarQuantLinear)]
    assert len(replaced) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    assert len(report.groups) == 2 * 4
    assert torch.isfinite(logits).all()
    owners = [m for m in replaced if m.owns_transform]
    assert len(owners) == 2 * 4  # one input transform per group of linears sharing an input
    has_tac = [m.transform.tac_matrices is not None for m in owners]
    assert sum(has_tac) == (2 if METHODS[method]["tac"] else 0)


def test_same_seed_gives_the_same_quantized_model():
    args = StarQuantArgs(epochs=2, seed=7)
    a, b = tiny_llada(), tiny_llada()
    quantize_dllm(a, calibration_rows(), args, progress=False)
    quantize_dllm(b, calibration_rows(), args, progress=False)
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name, tensor in state_a.items():
        assert torch.equal(tensor, state_b[name]), name


def test_quantized_model_tracks_token_state_per_forward():
    """A position that flips from [MASK] to a token is re-gated: the output of the quantized
    model at other positions changes exactly as the FP model's inputs do (no stale state)."""
    model = tiny_llada()
    quantize_dllm(model, calibration_rows(), StarQuantArgs(epochs=1), progress=False)
    ids = calibration_rows(2)
    first = model(ids).logits
    again = model(ids).logits
    assert torch.equal(first, again)
    flipped = ids.clone()
    flipped[0, ids[0] == MASK_ID] = 5
    assert not torch.equal(model(flipped).logits[0], first[0])
    assert torch.equal(model(flipped).logits[1:], first[1:])


def test_w8a8_stays_closer_to_fp_than_w4a4():
    ids = calibration_rows(3)
    fp = tiny_dream()(ids).logits
    errors = {}
    for scheme in ("W8A8", "W4A4"):
        model = tiny_dream()
        quantize_dllm(model, calibration_rows(), method_args("rtn", scheme=scheme),
                      progress=False)
        errors[scheme] = (model(ids).logits - fp).pow(2).mean().item()
    assert errors["W8A8"] < errors["W4A4"] / 10


@pytest.mark.parametrize("make_model", [tiny_llada, tiny_dream])
def test_value_rotation_keeps_the_fp_block_output(make_model):
    from starquant_plugin.kv_folding import rotate_value_heads_
    from starquant_plugin.models.families import family_of
    from starquant_plugin.models.rotary import RotaryEmbedding
    from starquant_plugin.pipeline import decoder_blocks

    model = make_model()
    family = family_of(model)
    block = decoder_blocks(model, family)[0]
    rotated = copy.deepcopy(block)
    rotate_value_heads_(rotated, family)
    head_dim = block.get_submodule(family.attention_module).head_dim
    hidden = torch.randn(2, 16, model.config.hidden_size)
    position = RotaryEmbedding(head_dim, 10000.0)(hidden)
    with torch.no_grad():
        if family.name == "llada":
            before, after = block(hidden, position), rotated(hidden, position)
        else:
            before = block(hidden, position_embeddings=position)
            after = rotated(hidden, position_embeddings=position)
    assert torch.allclose(after, before, atol=1e-5)
    assert not torch.allclose(rotated.get_submodule(family.attention_output).weight,
                              block.get_submodule(family.attention_output).weight)


def test_kv_rotation_cuts_the_kv4_error_of_a_value_outlier():
    """A v_proj row written 32x larger (and read 32x smaller): 4-bit V per head loses the rest
    of the head unless V is rotated first. W8A8 linears isolate the K/V quantizer."""
    from starquant_plugin.models.families import family_of
    from starquant_plugin.models.outliers import rescale_channel_
    from starquant_plugin.pipeline import decoder_blocks

    ids = calibration_rows(3)
    base = tiny_llada()
    family = family_of(base)
    for block in decoder_blocks(base, family):
        rescale_channel_(block, "v_proj", ("attn_out",), channel=5, log2_factor=5, head_dim=64)
    fp = base(ids).logits
    errors = {}
    for rotate in (False, True):
        model = copy.deepcopy(base)
        quantize_dllm(model, calibration_rows(), method_args(
            "rtn", scheme="W8A8", kv_bits=4, kv_rotation=rotate), progress=False)
        attention = decoder_blocks(model, family)[0]
        assert getattr(attention, "k_rotation", False) == rotate
        errors[rotate] = (model(ids).logits - fp).pow(2).mean().item()
    assert errors[True] < errors[False] / 2


def test_nvfp4_global_scales_are_shared_by_fused_linears_and_calibrated_on_both_states():
    """W4A4-NVFP4: q/k/v (and gate/up) carry one weight global scale, as vLLM loads fused
    layers; the activations' static global scale is ``448 * 6 / max|x_s|`` over the group's
    transformed calibration inputs, both token states."""
    model = tiny_llada()
    rows = calibration_rows()
    quantize_dllm(model, rows, StarQuantArgs(scheme="W4A4-NVFP4", epochs=1), progress=False)
    block = model.model.transformer.blocks[0]
    for group in (("q_proj", "k_proj", "v_proj"), ("ff_proj", "up_proj")):
        scales = [getattr(block, name).weight_global_scale for name in group]
        assert all(torch.equal(scale, scales[0]) for scale in scales), group
    captured = []
    handle = block.q_proj.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    model(rows)
    handle.remove()
    transform = block.q_proj.transform
    x_s = transform._transformed(captured[0], transform.mask_state.mask_state)[0]
    assert torch.equal(transform.sgat_act_global_scale, nvfp4_global_scale(x_s))
