"""The integer GEMM: exact int32 accumulators from both kernels on int8 and packed int4
weights as compressed-tensors stores them, the rescale, and which kernel runs where."""

import logging

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from starquant_plugin.method import integer_gemm
from starquant_plugin.method.integer_gemm import (
    FLOAT32,
    INT_MM,
    ONEDNN,
    int_gemm,
    int_mm_refusal,
    integer_kernel,
    integer_matmul,
    onednn_refusal,
    prepack_refusal,
    prepack_weight,
    prepacked_gemm,
)

NO_VNNI = {"architecture": "x86_64", "avx2": True, "avx512_vnni": False}
HAS_ONEDNN = (onednn_refusal(torch.device("cpu"), 256, 64, True, 8) or ("",))[0] \
    != "onednn-unavailable"


def _codes(shape: tuple[int, int], bits: int, seed: int) -> torch.Tensor:
    high = 2 ** (bits - 1)
    return torch.randint(-high, high, shape, generator=torch.Generator().manual_seed(seed),
                         dtype=torch.int8)


def _exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (a.double() @ w.double().T).to(torch.int64)  # every value < 2^53: exact


@pytest.fixture
def fresh_log(monkeypatch):
    """Forget which fallbacks were already logged, so a test sees its own first warning."""
    monkeypatch.setattr(integer_gemm, "_logged_reasons", set())


@pytest.mark.parametrize("kernel", [INT_MM, FLOAT32])
@pytest.mark.parametrize("d", [8, 37, 2600])
def test_int8_weights_give_the_exact_accumulators(kernel, d):
    """Worst cases included: rows of +127/-128 codes against rows of -128/127, so float32
    partial sums would pass 2^24 without the d-chunking (d = 2600 > 1024)."""
    a, w = _codes((5, d), 8, 0), _codes((24, d), 8, 1)
    a[0], a[1], w[0], w[1] = 127, -128, -128, 127
    acc = integer_matmul(a, w, kernel)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.long(), _exact(a, w))
    assert abs(acc[1, 0].item()) == 128 * 128 * d


@pytest.mark.parametrize("kernel", [INT_MM, ONEDNN, FLOAT32])
@pytest.mark.parametrize("d", [8, 37, 64])
def test_packed_int4_weights_are_read_in_place_exactly(kernel, d):
    """``weight_packed`` straight from compressed-tensors' packer (odd d too: the last byte's
    high nibble is padding) gives the accumulators of the unpacked codes, extremes included
    (8-bit activations -128/127 against 4-bit weights -8/7: the onednn kernel's int16 pair
    sums must not saturate)."""
    if kernel == ONEDNN and not HAS_ONEDNN:
        pytest.skip("no oneDNN int8 GEMM on this platform")
    a, w = _codes((19, d), 8, 2), _codes((16, d), 4, 3)
    a[0], a[1], w[0], w[1] = 127, -128, -8, 7
    packed = pack_to_int32(w, num_bits=4)
    assert packed.shape == (16, (d + 7) // 8)
    assert torch.equal(integer_matmul(a, packed, kernel).long(), _exact(a, w))


def test_rescale_is_per_token_times_per_channel_plus_bias():
    a, w = _codes((7, 40), 4, 4), _codes((12, 40), 4, 5)
    a_scale = torch.rand(7, 1, generator=torch.Generator().manual_seed(6)) + 0.1
    w_scale = torch.rand(12, 1, generator=torch.Generator().manual_seed(7)) + 0.1
    bias = torch.randn(12, generator=torch.Generator().manual_seed(8))
    y = int_gemm(a, a_scale, pack_to_int32(w, num_bits=4), w_scale.bfloat16(), bias)
    expected = (a.double() * a_scale.double()) @ (w.double() * w_scale.bfloat16().double()).T
    torch.testing.assert_close(y, (expected + bias.double()).float(), rtol=1e-6, atol=1e-6)
    assert y.dtype == torch.float32


def test_bad_operands_are_refused_with_the_expected_layout():
    a = _codes((3, 16), 8, 0)
    with pytest.raises(ValueError, match=r"int32 \[out, 2\]"):
        int_gemm(a, torch.ones(3, 1), torch.zeros(4, 3, dtype=torch.int32), torch.ones(4, 1))
    with pytest.raises(ValueError, match="int8 \\[tokens, d\\]"):
        int_gemm(a.float(), torch.ones(3, 1), a, torch.ones(3, 1))
    with pytest.raises(ValueError, match="per-channel"):
        int_gemm(a, torch.ones(3, 1), a, torch.ones(1, 3))


def test_int_mm_rules_per_platform(monkeypatch):
    cuda = torch.device("cuda")
    assert int_mm_refusal(cuda, 17, 64, 32) is None
    for shape in ((16, 64, 32), (32, 60, 32), (32, 64, 36)):
        reason, message = int_mm_refusal(cuda, *shape)
        assert reason == "int_mm-cuda-shape" and "more than 16 rows" in message
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_vnni": True})
    assert int_mm_refusal(cpu, 1, 3, 5) is None  # any shape on a VNNI CPU
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert int_mm_refusal(cpu, 1, 3, 5)[0] == "int_mm-cpu-onednn"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    reason, message = int_mm_refusal(cpu, 128, 4096, 4096)
    assert reason == "int_mm-cpu-vnni" and "scalar loop" in message
    assert int_mm_refusal(torch.device("meta"), 32, 64, 64)[0] == "int_mm-device"


def test_a_shape_int_mm_refuses_falls_back_and_says_so_once(fresh_log, caplog):
    """On CUDA, 16 tokens or fewer is a shape ``_int_mm`` refuses: the float32 kernel takes
    it, one warning for the reason whatever the shapes that follow."""
    with caplog.at_level(logging.WARNING, logger=integer_gemm.__name__):
        assert integer_kernel(torch.device("cuda"), 16, 4096, 4096) == FLOAT32
        assert integer_kernel(torch.device("cuda"), 3, 4096, 12288) == FLOAT32
        assert integer_kernel(torch.device("cuda"), 64, 4096, 4096) == INT_MM
    assert [r.getMessage() for r in caplog.records] == [
        "torch._int_mm on CUDA needs more than 16 rows and k, n multiples of 8, got "
        "[16, 4096] x [4096, 4096]; such products run on the float32 kernel (exact)."]


def test_cpu_without_vnni_picks_onednn_for_4bit_weights_where_exact_and_worth_it(
        fresh_log, caplog, monkeypatch):
    """Each refusal on the way is logged once, whatever the number of calls."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_VNNI)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=integer_gemm.__name__):
        for _ in range(2):
            assert integer_kernel(cpu, 256, 4096, 4096, int4=True, max_abs_code=8) == (
                ONEDNN if HAS_ONEDNN else FLOAT32)
            assert integer_kernel(cpu, 255, 4096, 4096, int4=True, max_abs_code=8) == FLOAT32
            assert integer_kernel(cpu, 1024, 4096, 4096, int4=False) == FLOAT32
            assert integer_kernel(cpu, 1024, 12288, 4096, int4=True, max_abs_code=128) \
                == FLOAT32  # 12288 * 128 * 15 > 2^24: float32 output would round
    reasons = [r.getMessage().split(";")[0].split(":")[0] for r in caplog.records]
    assert len(reasons) == len(set(reasons)) == (4 if HAS_ONEDNN else 2)
    assert "This CPU has no AVX512-VNNI, so torch._int_mm would run PyTorch's scalar loop" \
        in reasons


def test_cpu_without_vnni_computes_exactly_whatever_the_kernel(fresh_log, monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_VNNI)
    for tokens, weight_bits in ((300, 4), (9, 4), (300, 8)):
        a, w = _codes((tokens, 48), 8, 9), _codes((8, 48), weight_bits, 10)
        weight = pack_to_int32(w, num_bits=4) if weight_bits == 4 else w
        y = int_gemm(a, torch.ones(tokens, 1), weight, torch.ones(8, 1))
        assert torch.equal(y.double(), _exact(a, w).double())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_a_prepacked_weight_gives_int_gemm_bit_for_bit(bits, tokens):
    """Extremes included: accumulators of 128 * 128 * d pass 2^24, where the float32
    conversion rounds; the prepacked path rounds them exactly as the rescale does."""
    refusal = prepack_refusal(torch.device("cpu"), int4=bits == 4)
    if refusal is not None:  # the refusal itself is tested below, on any CPU
        pytest.skip(refusal[1])
    d = 1100
    a, w = _codes((tokens, d), 8, 9), _codes((24, d), bits, 10)
    a[0], w[0], w[1] = -128, w.min(), w.max()
    stored = pack_to_int32(w, num_bits=4) if bits == 4 else w
    a_scale = torch.rand(tokens, 1, generator=torch.Generator().manual_seed(11)) + 0.1
    w_scale, bias = torch.rand(24, 1) + 0.1, torch.randn(24)
    y = prepacked_gemm(a, a_scale, prepack_weight(stored, d), w_scale, bias)
    assert torch.equal(y, int_gemm(a, a_scale, stored, w_scale, bias))


def test_prepacking_8bit_weights_needs_vnni(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: NO_VNNI)
    cpu = torch.device("cpu")
    if HAS_ONEDNN:
        assert prepack_refusal(cpu, int4=True) is None
        reason, message = prepack_refusal(cpu, int4=False)
        assert reason == "prepack-int8-weights" and "AVX512-VNNI" in message
    assert prepack_refusal(torch.device("meta"), int4=True)[0] == "prepack-unavailable"
