"""Integer and FP8 grids, on-grid exactness, gradients and GPTQ of the fake quantizers."""

from typing import get_args

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

from starquant_plugin.config import SchemeName
from starquant_plugin.method.quantizers import (
    SCHEMES,
    fake_quantize_activation,
    fake_quantize_kv,
    fake_quantize_weight,
    gptq_quantize_weight,
    quantize_activation,
    scheme_args,
    search_weight_clip,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schemes_are_weight_per_channel_and_dynamic_per_token_activation():
    assert set(SCHEMES) == set(get_args(SchemeName))  # the schema's names are the presets
    for name, (weight_args, act_args) in SCHEMES.items():
        per_group = {"MXFP4": "group", "NVFP4": "tensor_group"}.get(name[-5:])
        assert weight_args.strategy == (per_group or "channel")
        assert act_args.strategy == (per_group or "token")
        assert weight_args.symmetric and act_args.dynamic and act_args.symmetric
        assert (weight_args.type, weight_args.num_bits, act_args.type, act_args.num_bits) == {
            "W4A4": ("int", 4, "int", 4),
            "W4A8": ("int", 4, "int", 8),
            "W8A8": ("int", 8, "int", 8),
            "W8A8-FP8": ("float", 8, "float", 8),
            "W4A8-FP8": ("int", 4, "float", 8),
            "W4A4-MXFP4": ("float", 4, "float", 4),
            "W4A4-NVFP4": ("float", 4, "float", 4),
        }[name]


def test_fp8_weights_are_compressed_tensors_own_quantization_bit_for_bit():
    """Scale, e4m3 codes and dequantized values equal compressed-tensors' ``calculate_qparams``
    + ``quantize`` / ``dequantize`` for the FP8 preset (what its compressor stores and vLLM
    reads), including exact ties between two e4m3 values (round to nearest even)."""
    weight_args, _ = scheme_args("W8A8-FP8")
    weight = torch.randn(32, 64, generator=_gen(3)) * torch.logspace(-4, 1, 32).reshape(32, 1)
    weight[0, :3] = torch.tensor([448.0, 17.0, -19.0])  # scale 1: 17 and -19 are e4m3 ties
    weight[0, 3:] = 0.0
    scale, _ = calculate_qparams(weight.amin(1, keepdim=True), weight.amax(1, keepdim=True),
                                 weight_args)
    ours = fake_quantize_weight(weight, weight_args)
    codes = quantize(weight, scale, None, weight_args, dtype=torch.float8_e4m3fn)
    assert torch.equal(ours, dequantize(codes, scale, None, weight_args))
    assert ours[0, :3].tolist() == [448.0, 16.0, -20.0]  # ties to the even mantissa
    assert torch.equal(fake_quantize_weight(ours, weight_args), ours)  # on-grid stays


def test_fp8_activations_quantize_per_token_with_clip_and_pass_gradients():
    _, act_args = scheme_args("W8A8-FP8")
    x = torch.randn(4, 6, 64, generator=_gen(4), requires_grad=True)
    clip = torch.tensor(0.8, requires_grad=True)
    x_q = fake_quantize_activation(x, act_args, clip)
    scale = x.detach().abs().amax(-1, keepdim=True) * 0.8 / 448
    assert torch.equal(x_q.detach(), (x.detach() / scale).clamp(-448, 448).to(
        torch.float8_e4m3fn).float() * scale)
    assert x_q.detach().abs().amax(-1).sub(448 * scale.squeeze(-1)).abs().max() < 1e-6
    (x_q - torch.randn(4, 6, 64, generator=_gen(5))).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0 and clip.grad.abs() > 0
    with pytest.raises(ValueError, match="integer codes exist for symmetric int"):
        quantize_activation(x.detach(), act_args)


def test_mxfp4_is_compressed_tensors_own_quantization_bit_for_bit():
    """Weights (per 32 input channels) and activations (per 32 channels of a token) equal
    compressed-tensors' ``calculate_qparams`` + ``quantize`` / ``dequantize`` for its MXFP4
    preset: power-of-two scales (rounded up from 1.75 x 2^e), e2m1 codes with halfway cases to
    the even code, saturation at 6, and all-zero groups."""
    weight_args, act_args = scheme_args("W4A4-MXFP4")
    weight = torch.randn(16, 128, generator=_gen(6)) * torch.logspace(-3, 2, 16).reshape(16, 1)
    weight[0, :8] = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # scale 1: ties
    weight[0, 8:32] = 0.0
    weight[1, :32] = 0.0  # an all-zero group
    weight[2, :2] = torch.tensor([7.0, 6.9])  # amax 7 = 1.75 x 4: scale 2, codes 4 and 3
    groups = weight.reshape(16, 4, 32)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), weight_args)
    ours = fake_quantize_weight(weight, weight_args)
    codes = quantize(weight, scale, None, weight_args)
    assert torch.equal(ours, dequantize(codes, scale, None, weight_args))
    assert ours[0, :8].tolist() == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert ours[2, :2].tolist() == [8.0, 6.0] and not ours[1, :32].any()
    x = torch.randn(3, 5, 96, generator=_gen(7)) * 4
    per_group = x.unflatten(-1, (3, 32))
    scale, _ = calculate_qparams(per_group.amin(-1), per_group.amax(-1), act_args)
    expected = dequantize(quantize(per_group, scale.unsqueeze(-1), None, act_args),
                          scale.unsqueeze(-1), None, act_args)
    assert torch.equal(fake_quantize_activation(x, act_args), expected.flatten(-2))
    with pytest.raises(ValueError, match="multiple of 32"):
        fake_quantize_activation(torch.randn(2, 48), act_args)


def test_nvfp4_is_compressed_tensors_own_quantization_bit_for_bit():
    """Weights (per 16 input channels) and activations (per 16 channels of a token) equal
    compressed-tensors' ``generate_gparam`` + ``calculate_qparams`` + ``quantize`` /
    ``dequantize`` for its NVFP4 preset: a global scale per tensor, e4m3 block scales, e2m1
    codes, all-zero groups; a given static global scale is used as given; the clip ratio
    gets a gradient through the e4m3 rounding of the block scale."""
    weight_args, act_args = scheme_args("W4A4-NVFP4")
    weight = torch.randn(16, 128, generator=_gen(6)) * torch.logspace(-3, 2, 16).reshape(16, 1)
    weight[1, :16] = 0.0  # an all-zero group
    global_scale = generate_gparam(weight.min(), weight.max())
    groups = weight.reshape(16, 8, 16)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), weight_args,
                                 global_scale=global_scale)
    codes = quantize(weight, scale, None, weight_args, global_scale=global_scale)
    ours = fake_quantize_weight(weight, weight_args)
    assert torch.equal(ours, dequantize(codes, scale, None, weight_args,
                                        global_scale=global_scale))
    assert not ours[1, :16].any()
    x = torch.randn(3, 5, 96, generator=_gen(7)) * 4
    static = generate_gparam(x.min() * 2, x.max() * 2)  # calibrated on larger inputs
    per_group = x.unflatten(-1, (6, 16))
    for given in (None, static):
        g = generate_gparam(x.min(), x.max()) if given is None else given
        scale, _ = calculate_qparams(per_group.amin(-1), per_group.amax(-1), act_args,
                                     global_scale=g)
        scale = scale.unsqueeze(-1)
        expected = dequantize(quantize(per_group, scale, None, act_args, global_scale=g),
                              scale, None, act_args, global_scale=g)
        assert torch.equal(fake_quantize_activation(x, act_args, global_scale=given),
                           expected.flatten(-2))
    clip = torch.tensor(0.9, requires_grad=True)
    fake_quantize_activation(x, act_args, clip).pow(2).sum().backward()
    assert clip.grad.abs() > 0
    with pytest.raises(ValueError, match="multiple of 16"):
        fake_quantize_activation(torch.randn(2, 40), act_args)


def test_fp8_weights_refuse_gptq_and_other_float_formats_are_refused():
    weight_args, _ = scheme_args("W8A8-FP8")
    with pytest.raises(ValueError, match="GPTQ"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(8), weight_args)
    fp4_per_64 = QuantizationArgs(num_bits=4, type="float", symmetric=True,
                                  strategy="group", group_size=64)
    with pytest.raises(ValueError, match="NVFP4 .4-bit float, strategy 'tensor_group'"):
        fake_quantize_activation(torch.randn(4, 64), fp4_per_64)


def test_scheme_args_returns_copies_and_rejects_unknown_names():
    weight_args, _ = scheme_args("W4A4")
    weight_args.num_bits = 3
    assert SCHEMES["W4A4"][0].num_bits == 4
    with pytest.raises(ValueError, match="W4A4"):
        scheme_args("W3A3")


@pytest.mark.parametrize("num_bits, qmin, qmax", [(4, -8, 7), (8, -128, 127)])
def test_symmetric_codes_use_the_kernel_range(num_bits, qmin, qmax):
    args = QuantizationArgs(num_bits=num_bits, symmetric=True, strategy="token", dynamic=True)
    x = torch.randn(32, 64, generator=_gen())
    # Unclipped: scale = max|x| / qmax, so codes reach +-qmax.
    scale = x.abs().amax(dim=-1, keepdim=True) / qmax
    codes = fake_quantize_activation(x, args) / scale
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.round().abs().amax() == qmax
    # Clipped at half range: the negative end saturates at qmin, the positive at qmax.
    clipped_codes = fake_quantize_activation(x, args, 0.5) / (scale * 0.5)
    assert clipped_codes.round().amin() == qmin and clipped_codes.round().amax() == qmax


def test_asymmetric_codes_lie_in_zero_to_two_pow_bits_minus_one():
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="token", dynamic=True)
    x = torch.randn(16, 32, generator=_gen()) + 0.5
    x_min, x_max = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    scale = (x_max - x_min) / 15
    zero = torch.round(-x_min / scale)
    codes = (fake_quantize_activation(x, args) / scale + zero).round()
    assert codes.amin() >= 0 and codes.amax() <= 15


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("strategy, group_size", [("channel", None), ("group", 8)])
def test_on_grid_weights_are_exact(symmetric, strategy, group_size):
    args = QuantizationArgs(
        num_bits=4, symmetric=symmetric, strategy=strategy, group_size=group_size
    )
    out_features, in_features = 6, 32
    width = group_size or in_features
    scale = torch.rand(out_features, in_features // width, 1, generator=_gen()) + 0.1
    if symmetric:
        codes = torch.randint(-7, 8, (out_features, in_features // width, width), generator=_gen())
        codes[..., 0] = 7  # max|x| = 7 * scale
    else:
        codes = torch.randint(0, 16, (out_features, in_features // width, width), generator=_gen())
        codes[..., 0], codes[..., 1], zero = 0, 15, 5  # range [-5, 10] * scale contains 0
        codes = codes - zero
    weight = (codes * scale).reshape(out_features, in_features)
    torch.testing.assert_close(fake_quantize_weight(weight, args), weight, atol=1e-6, rtol=0)


def test_on_grid_activations_are_exact():
    _, act_args = scheme_args("W8A8")
    codes = torch.randint(-127, 128, (10, 16), generator=_gen()).float()
    codes[:, 0] = -127
    x = codes * 0.03
    torch.testing.assert_close(fake_quantize_activation(x, act_args), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme", ["W4A4", "W8A8"])
def test_activation_codes_times_scale_are_the_fake_quantized_activations_bit_for_bit(scheme):
    """The integer path's codes are the fake quantizer's: same scale (clip, floor), same
    rounding, including ties (x / scale = n + 0.5), all-zero rows (the scale floor) and
    clipped rows whose codes saturate at -2^(b-1)."""
    _, args = scheme_args(scheme)
    qmax = 2 ** (args.num_bits - 1) - 1
    x = torch.randn(6, 5, 64, generator=_gen(7)) * torch.logspace(-3, 2, 5).reshape(5, 1)
    x[0, 0] = 0.0
    x[1, 1, :4] = torch.tensor([qmax, -qmax, 0.5, -2.5])  # scale 1: ties at 0.5 and -2.5
    x[1, 1, 4:] = 0.0
    clip = torch.rand(6, 5, 1, generator=_gen(8)) * 0.5 + 0.5
    clip[1, 1] = 1.0
    codes, scale = quantize_activation(x, args, clip)
    assert codes.dtype == torch.int8 and scale.shape == (6, 5, 1)
    assert torch.equal(codes.float() * scale, fake_quantize_activation(x, args, clip))
    assert codes[1, 1, :4].tolist() == [qmax, -qmax, 0, -2]  # round half to even
    assert codes.min() == -(qmax + 1)  # clipped negative outliers saturate at the grid's end
    assert not codes[0, 0].any()


def test_activation_codes_refuse_what_an_int8_gemm_cannot_take():
    asymmetric = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="token",
                                  dynamic=True)
    with pytest.raises(ValueError, match="symmetric int of at most 8 bits"):
        quantize_activation(torch.randn(2, 8), asymmetric)


def test_activation_quantizer_passes_gradients_to_input_and_clip():
    _, act_args = scheme_args("W4A4")
    x = torch.randn(8, 16, generator=_gen(), requires_grad=True)
    clip = torch.tensor(0.9, requires_grad=True)
    target = torch.randn(8, 16, generator=_gen(1))
    (fake_quantize_activation(x, act_args, clip) - target).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert clip.grad is not None and clip.grad.abs() > 0


def test_search_weight_clip_never_loses_to_no_clipping():
    weight_args, _ = scheme_args("W4A4")
    weight = torch.randn(16, 64, generator=_gen())
    weight[:, 0] *= 10  # an outlier column makes clipping worthwhile for some rows
    ratio = search_weight_clip(weight, weight_args)
    assert ratio.shape == (16,) and ((ratio >= 0.5) & (ratio <= 1.0)).all()
    err = (fake_quantize_weight(weight, weight_args, ratio) - weight).pow(2).sum(1)
    err_plain = (fake_quantize_weight(weight, weight_args) - weight).pow(2).sum(1)
    assert (err <= err_plain + 1e-6).all()


@pytest.mark.parametrize("strategy, group_size", [("channel", None), ("group", 16)])
def test_gptq_beats_rtn_on_the_layer_output(strategy, group_size):
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy=strategy, group_size=group_size)
    mixing = torch.randn(64, 64, generator=_gen(1))
    x = torch.randn(512, 64, generator=_gen()) @ mixing  # correlated inputs, as in a real layer
    weight = torch.randn(32, 64, generator=_gen(2))
    q_gptq = gptq_quantize_weight(weight, x.T @ x, args, block_size=32)
    q_rtn = fake_quantize_weight(weight, args)
    err_gptq = (x @ (weight - q_gptq).T).norm()
    err_rtn = (x @ (weight - q_rtn).T).norm()
    assert err_gptq < 0.9 * err_rtn
    # Every row (or group) stays on a 4-bit grid: at most 16 distinct values.
    width = group_size or 64
    groups = q_gptq.reshape(32, -1, width)
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, width)) <= 16


def test_gptq_rejects_a_mismatched_hessian():
    weight_args, _ = scheme_args("W4A4")
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize_weight(torch.randn(4, 8), torch.eye(6), weight_args)


def test_group_size_must_divide_the_input_dim():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=24)
    with pytest.raises(ValueError, match="group_size"):
        fake_quantize_weight(torch.randn(4, 64), args)


def test_kv_quantization_is_asymmetric_per_token_and_head():
    x = torch.randn(2, 3, 5, 16, generator=_gen()) + 2.0
    xq = fake_quantize_kv(x, num_bits=4)
    assert xq.shape == x.shape
    distinct = [len(torch.unique(row)) for row in xq.reshape(-1, 16)]
    assert max(distinct) <= 16
    # Asymmetric with the range widened to 0: error at most half a step of (max - min0) / 15.
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True).clamp_max(0)) / 15
    assert ((xq - x).abs() <= step / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="head_dim"):
        fake_quantize_kv(torch.randn(3, 5, 16))
