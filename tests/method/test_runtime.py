"""Runtime: the mask-state hook, StarQuantInputTransform and StarQuantLinear against the
per-token reference formula, one transform shared by a group of linears (stored once and
computed once per input), and the reference path where the integer GEMM does not apply."""

import copy
import logging
from dataclasses import replace

import pytest
import torch
from torch import nn

from starquant_plugin.method.integer_gemm import prepack_refusal
from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    fake_quantize_weight,
    is_nvfp4,
    scheme_args,
)
from starquant_plugin.method.runtime import (
    MaskState,
    StarQuantInputTransform,
    StarQuantLinear,
    attach_mask_state,
    prepack_weights,
)
from starquant_plugin.method.sgat import SGATResult
from starquant_plugin.method.tac import TACParams, apply_tac
from starquant_plugin.method.transforms import kronecker_apply, kronecker_factors, random_hadamard

D, OUT, K, MASK_ID = 32, 24, 4, 7


def _sgat(seed: int = 0, k: int = K, out: int = OUT) -> SGATResult:
    gen = torch.Generator().manual_seed(seed)
    n1, n2 = kronecker_factors(D)
    exclusive = torch.linalg.qr(torch.randn(D, 2 * k, generator=gen))[0]
    return SGATResult(
        exclusive=exclusive,
        channel_scale=0.5 + torch.rand(D, generator=gen),
        left=random_hadamard(n1, gen) + 0.05 * torch.randn(n1, n1, generator=gen),
        right=random_hadamard(n2, gen) + 0.05 * torch.randn(n2, n2, generator=gen),
        act_clip=torch.tensor([0.9, 0.8]),
        weight_clip=torch.rand(out, generator=gen) * 0.2 + 0.8,
    )


def _state(mask: torch.Tensor | None = None) -> MaskState:
    state = MaskState()
    state.mask_state = mask
    return state


def _layer(
    linear: nn.Linear,
    sgat: SGATResult,
    state: MaskState,
    tac: TACParams | None = None,
    scheme: str = "W4A4",
) -> StarQuantLinear:
    weight_args, act_args = scheme_args(scheme)
    if is_nvfp4(act_args):  # a static activation global scale, as calibration sets it
        sgat = replace(sgat, act_global_scale=torch.tensor([300.0]))
    transform = StarQuantInputTransform(sgat, act_args, state, tac)
    return StarQuantLinear.from_linear(linear, sgat, weight_args, transform)


def _reference(
    x: torch.Tensor,
    mask: torch.Tensor,
    sgat: SGATResult,
    layer: StarQuantLinear,
    tac: TACParams | None,
) -> torch.Tensor:
    """Token by token: TAC, the token's state's transform and clip, quantize, multiply."""
    _, act_args = scheme_args("W4A4")
    out = torch.empty(*x.shape[:-1], OUT)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t : t + 1] if tac is None else apply_tac(x[b, t : t + 1], tac)
            s = int(mask[b, t])
            x_s = sgat.transform_input(token, torch.tensor([s]))
            x_q = fake_quantize_activation(x_s, act_args, sgat.act_clip[s])
            out[b, t] = (x_q @ layer.weight.T + layer.bias)[0]
    return out


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D, OUT)


def test_mixed_states_match_reference_with_all_masked_and_all_unmasked_rows(linear):
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 0, 1, 1, 0, 0], [1] * 6, [0] * 6], dtype=torch.bool)
    tac = TACParams(
        matrices=torch.eye(16) + 0.1 * torch.randn(2, 16, 16, generator=gen),
        bias=0.1 * torch.randn(D, generator=gen),
    )
    sgat = _sgat()
    layer = _layer(linear, sgat, _state(mask), tac)
    x = torch.randn(3, 6, D, generator=gen)
    expected = _reference(x, mask, sgat, layer, tac)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    # The states matter: reading every token as unmasked changes the masked rows.
    unmasked = _reference(x, torch.zeros_like(mask), sgat, layer, tac)
    assert not torch.allclose(expected[1], unmasked[1], atol=1e-3)


def test_from_linear_stores_the_quantized_transformed_weight(linear):
    weight_args, _ = scheme_args("W4A4")
    sgat = _sgat()
    layer = _layer(linear, sgat, MaskState())
    expected = fake_quantize_weight(
        sgat.transformed_weight(linear.weight.detach()), weight_args, sgat.weight_clip
    )
    assert not torch.allclose(expected, linear.weight.detach(), atol=1e-2)
    torch.testing.assert_close(layer.weight, expected)


def test_flipped_position_is_regated_on_the_next_forward(linear):
    mask = torch.ones(1, 4, dtype=torch.bool)
    state = _state(mask)
    sgat = _sgat()
    layer = _layer(linear, sgat, state)
    x = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(2))
    before = layer(x)
    state.mask_state = torch.tensor([[True, False, True, True]])  # position 1 got decoded
    after = layer(x)
    torch.testing.assert_close(after, _reference(x, state.mask_state, sgat, layer, None))
    assert not torch.allclose(before[0, 1], after[0, 1])
    torch.testing.assert_close(before[0, [0, 2, 3]], after[0, [0, 2, 3]])


def test_without_gating_reduces_to_a_plain_kronecker_transformed_linear(linear):
    weight_args, act_args = scheme_args("W4A8")
    sgat = _sgat(k=0)
    sgat.act_clip = torch.tensor([0.9, 0.9])
    assert sgat.exclusive.shape == (D, 0)
    weight_q = fake_quantize_weight(sgat.transformed_weight(linear.weight.detach()), weight_args)
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    transform = StarQuantInputTransform(sgat, act_args, _state(mask))
    assert transform.sgat_exclusive is None
    layer = StarQuantLinear(weight_q, linear.bias, transform)
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(3))
    x_t = kronecker_apply(x * sgat.channel_scale, sgat.left, sgat.right)
    plain = fake_quantize_activation(x_t, act_args, 0.9) @ weight_q.T
    torch.testing.assert_close(layer(x), plain + linear.bias, atol=1e-5, rtol=1e-5)


def test_mask_state_hook_follows_input_ids_until_detached(linear):
    embedding = nn.Embedding(16, D)
    state = attach_mask_state(embedding, MASK_ID)
    layer = _layer(linear, _sgat(), state)
    input_ids = torch.tensor([[1, MASK_ID, 3], [MASK_ID, MASK_ID, MASK_ID]])
    out = layer(embedding(input_ids))
    assert torch.equal(state.mask_state, input_ids == MASK_ID)
    assert out.shape == (2, 3, OUT)
    embedding(input=torch.tensor([[MASK_ID, 2]]))  # keyword call is seen too
    assert state.mask_state.tolist() == [[True, False]]
    state.detach()
    embedding(torch.tensor([[2, 2]]))
    assert state.mask_state.tolist() == [[True, False]]


def test_mismatched_or_missing_mask_state_raises(linear):
    state = MaskState()
    layer = _layer(linear, _sgat(), state)
    with pytest.raises(RuntimeError, match="attach_mask_state"):
        layer(torch.randn(1, 3, D))
    state.mask_state = torch.zeros(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask state"):
        layer(torch.randn(1, 3, D))


def test_from_linear_checks_weight_clip_rows(linear):
    weight_args, act_args = scheme_args("W4A4")
    sgat = _sgat(out=OUT + 8)  # fitted on a concatenated [q; k] weight
    transform = StarQuantInputTransform(sgat, act_args, MaskState())
    with pytest.raises(ValueError, match="weight_clip_rows"):
        StarQuantLinear.from_linear(linear, sgat, weight_args, transform)
    layer = StarQuantLinear.from_linear(
        linear, sgat, weight_args, transform, weight_clip_rows=slice(8, 8 + OUT)
    )
    assert layer.weight.shape == (OUT, D)
    expected = fake_quantize_weight(
        sgat.transformed_weight(linear.weight.detach()), weight_args, sgat.weight_clip[8:]
    )
    torch.testing.assert_close(layer.weight, expected)


def test_shared_transform_is_stored_once_and_follows_dtype_casts():
    torch.manual_seed(0)
    q_linear, k_linear = nn.Linear(D, OUT), nn.Linear(D, OUT)
    weight_args, act_args = scheme_args("W4A4")
    mask = torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    sgat = _sgat(out=2 * OUT)
    transform = StarQuantInputTransform(sgat, act_args, _state(mask))
    q = StarQuantLinear.from_linear(
        q_linear, sgat, weight_args, transform, weight_clip_rows=slice(0, OUT)
    )
    k = StarQuantLinear.from_linear(
        k_linear,
        sgat,
        weight_args,
        transform,
        owns_transform=False,
        weight_clip_rows=slice(OUT, 2 * OUT),
    )
    group = nn.ModuleDict({"q": q, "k": k})
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(4))
    y_fp32 = {name: layer(x) for name, layer in group.items()}
    assert q.owns_transform and not k.owns_transform
    assert q.transform is transform and k.transform is transform
    keys = list(group.state_dict())
    transform_keys = [key for key in keys if "sgat_" in key or "tac_" in key]
    expected = [f"q.input_transform.{name}" for name in transform.state_dict()]
    assert sorted(transform_keys) == sorted(expected)
    assert "q.input_transform.sgat_left" in keys
    assert not any(key.startswith("k.input_transform") for key in keys)

    group.to(torch.bfloat16)
    assert k.transform is transform
    assert k.transform.sgat_left.dtype == torch.bfloat16
    assert k.transform.sgat_exclusive.dtype == torch.bfloat16
    for name, layer in group.items():
        y = layer(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16 and y.shape == (2, 3, OUT)
        # bf16 buffers shift a few W4A4 codes (~5% here), but it is still the same layer.
        error = (y.float() - y_fp32[name]).norm() / y_fp32[name].norm()
        assert error < 0.2, (name, error)


def _count_transforms(transform: StarQuantInputTransform) -> list[int]:
    """Count how often the group's transform really computes (TAC + SGAT + clip)."""
    calls = [0]
    compute = transform._transformed

    def counted(*args):
        calls[0] += 1
        return compute(*args)

    transform._transformed = counted
    return calls


def test_a_group_transforms_each_input_once_and_recomputes_after_any_change():
    torch.manual_seed(0)
    sgat = _sgat(out=2 * OUT)
    weight_args, act_args = scheme_args("W4A4")
    state = _state(torch.tensor([[1, 0, 1], [0, 0, 1]], dtype=torch.bool))
    transform = StarQuantInputTransform(sgat, act_args, state)
    q = StarQuantLinear.from_linear(nn.Linear(D, OUT), sgat, weight_args, transform,
                                    weight_clip_rows=slice(0, OUT))
    k = StarQuantLinear.from_linear(nn.Linear(D, OUT), sgat, weight_args, transform,
                                    owns_transform=False, weight_clip_rows=slice(OUT, 2 * OUT))
    calls = _count_transforms(transform)
    x = torch.randn(2, 3, D, generator=torch.Generator().manual_seed(5))
    y_q, y_k = q(x), k(x)
    assert calls[0] == 1  # k reused q's codes
    k.integer_gemm = False
    torch.testing.assert_close(k(x), y_k, rtol=1e-5, atol=1e-5)  # reference: fake-quantized
    assert calls[0] == 2
    q.integer_gemm = False
    q(x)
    assert calls[0] == 2

    x.mul_(2.0)  # in place: same tensor, new values
    torch.testing.assert_close(q(x), 2 * (y_q - q.bias) + q.bias, rtol=1e-5, atol=1e-5)
    state.mask_state = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    q(x)
    transform.load_state_dict(transform.state_dict())  # buffers copied in place
    q(x)
    assert calls[0] == 5

    with torch.inference_mode():  # inference tensors have no version counter
        x_inference = torch.randn(2, 3, D)
        q(x_inference), k(x_inference)
    assert calls[0] == 6
    del x, x_inference  # freeing the input drops what was made of it
    assert transform._last_input.results == {}
    copy.deepcopy(q)(torch.randn(2, 3, D))


def test_asymmetric_weights_run_the_reference_path_and_say_so_once(linear, caplog,
                                                                   monkeypatch):
    from starquant_plugin.method import integer_gemm
    from starquant_plugin.method.runtime import weight_qparams

    monkeypatch.setattr(integer_gemm, "_logged_reasons", set())
    weight_args, act_args = scheme_args("W4A4")
    weight_args.symmetric = False
    mask = torch.tensor([[1, 0, 1]], dtype=torch.bool)
    sgat = _sgat()
    transform = StarQuantInputTransform(sgat, act_args, _state(mask))
    weight_t = sgat.transformed_weight(linear.weight.detach())
    scale, zero_point = weight_qparams(weight_t, weight_args)
    layer = StarQuantLinear(fake_quantize_weight(weight_t, weight_args), linear.bias, transform,
                            weight_args=weight_args, weight_scale=scale,
                            weight_zero_point=zero_point)
    assert "zero-point" in layer.integer_path_refusal()
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(6))
    with caplog.at_level(logging.WARNING):
        y, again = layer(x), layer(x)
    assert torch.equal(y, again)
    layer.integer_gemm = False
    assert torch.equal(layer(x), y)  # it is the reference path
    assert [r.getMessage() for r in caplog.records] == [
        "STaR-Quant linears with asymmetric weights (the integer GEMM has no zero-point term) "
        "run the dequantize-and-matmul reference path instead (same result, slower)."]
    with pytest.raises(ValueError, match="Cannot prepack the weights: the layer runs the "
                       "reference path \\(asymmetric weights"):
        prepack_weights(layer)


def test_inputs_longer_than_a_chunk_match_the_token_by_token_reference(linear):
    """More tokens than ``_CHUNK_TOKENS``: transformed and quantized a chunk at a time."""
    generator = torch.Generator().manual_seed(12)
    mask = torch.rand(2, 150, generator=generator) < 0.5
    sgat = _sgat()
    layer = _layer(linear, sgat, _state(mask))
    x = torch.randn(2, 150, D, generator=generator)
    torch.testing.assert_close(layer(x), _reference(x, mask, sgat, layer, None),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["W4A4", "W4A8", "W8A8"])
def test_prepacked_weights_give_the_same_numbers_and_are_not_saved(linear, scheme):
    refusal = prepack_refusal(torch.device("cpu"), int4=scheme.startswith("W4"))
    if refusal is not None:  # tests/method/test_integer_gemm.py checks the refusal
        pytest.skip(refusal[1])
    generator = torch.Generator().manual_seed(13)
    mask = torch.rand(2, 150, generator=generator) < 0.5
    model = nn.Sequential(_layer(linear, _sgat(), _state(mask), scheme=scheme))
    x = torch.randn(2, 150, D, generator=generator)
    stored, keys = model(x), set(model.state_dict())
    assert prepack_weights(model) == OUT * D
    assert torch.equal(model(x), stored)
    assert set(model.state_dict()) == keys  # the copy is not part of the checkpoint
    duplicate = copy.deepcopy(model)  # runs on the stored layout
    assert duplicate[0]._prepacked is None and torch.equal(duplicate(x), stored)
    model.to(torch.float64)
    assert model[0]._prepacked is None


def test_a_bf16_model_transforms_in_bf16_and_moves_codes_by_its_rounding():
    """``star_transform`` computes in the STaR tensors' dtype: in a bf16 model every
    intermediate is rounded to bf16 (8 significant bits), which moves some activation codes of
    random Gaussian inputs with outlier channels by one or two steps against the float32
    transform: few of the 4-bit ones, about one in eight of the 8-bit ones (measured 0.7 % and
    13 %; the quality this costs: ``benchmarks/transform_dtype.py``, docs/results.md)."""
    d, k, tokens = 1024, 16, 256
    generator = torch.Generator().manual_seed(3)
    n1, n2 = kronecker_factors(d)
    sgat = SGATResult(
        exclusive=torch.linalg.qr(torch.randn(d, 2 * k, generator=generator))[0],
        channel_scale=0.5 + torch.rand(d, generator=generator),
        left=random_hadamard(n1, generator), right=random_hadamard(n2, generator),
        act_clip=torch.tensor([1.0, 1.0]), weight_clip=torch.ones(8),
    ).rounded_to(torch.bfloat16)
    mask = torch.rand(1, tokens, generator=generator) < 0.5
    x = torch.randn(1, tokens, d, generator=generator)
    x[..., :4] *= 30  # outlier channels, as 7-8B models have
    x = x.bfloat16()
    for scheme, most_moved, largest_step in (("W4A4", 0.02, 1), ("W8A8", 0.2, 2)):
        _, act_args = scheme_args(scheme)
        codes = {dtype: StarQuantInputTransform(sgat, act_args, _state(mask), dtype=dtype)
                 .activation_codes(x)[0].int() for dtype in (torch.float32, torch.bfloat16)}
        moved = codes[torch.float32] != codes[torch.bfloat16]
        assert 0 < moved.float().mean() < most_moved, scheme
        assert (codes[torch.float32] - codes[torch.bfloat16]).abs().max() == largest_step


@pytest.mark.parametrize("scheme", ["W4A4", "W8A8"])
def test_gemm_kernel_names_the_path_a_forward_takes(linear, scheme):
    from starquant_plugin.method.integer_gemm import KERNELS, integer_kernel

    layer = _layer(linear, _sgat(), _state(torch.zeros(1, 3, dtype=torch.bool)), scheme=scheme)
    int4 = scheme.startswith("W4")
    expected = integer_kernel(torch.device("cpu"), 300, D, OUT, int4, 8 if int4 else 128)
    assert layer.gemm_kernel(300) == expected and expected in KERNELS
    layer.integer_gemm = False
    assert layer.gemm_kernel(300) == "reference"
    layer.integer_gemm = True
    if layer.prepack_refusal() is None:
        layer.prepack()
        assert layer.gemm_kernel(300) == "onednn prepacked"


@pytest.mark.parametrize("scheme", ["W8A8-FP8", "W4A4-MXFP4", "W4A4-NVFP4"])
def test_float_schemes_keep_their_codes_through_dtype_casts_and_run_the_reference(scheme):
    """``model.to(dtype)`` casts every float tensor: FP8 codes and NVFP4's e4m3 block scales
    come back as FP8, bit for bit (MXFP4's are uint8 and untouched); the forward is the
    fake-quantized reference."""
    torch.manual_seed(0)
    layer = _layer(nn.Linear(D, OUT), _sgat(), _state(torch.rand(2, 5) < 0.5), scheme=scheme)
    stored = {name: tensor.clone() for name, tensor in layer.compressed_weight().items()}
    x = torch.randn(2, 5, D)
    expected = layer(x)
    assert layer.gemm_kernel(10) == "reference"
    layer.double().float()  # exact for the float32 scales and STaR tensors
    for name, tensor in layer.compressed_weight().items():
        assert tensor.dtype == stored[name].dtype, name
        assert torch.equal(tensor.view(torch.uint8), stored[name].view(torch.uint8)), name
    assert torch.equal(layer(x), expected)
