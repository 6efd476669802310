"""The quantized models' integer path (``StarQuantLinear`` with ``int_gemm``) against the
dequantize-and-matmul reference path, on both bundled tiny models at every scheme, on
canvases that mix masked and unmasked tokens.

Tolerances: in every layer, on the same input, the activation codes are identical (bit for
bit) and the outputs agree within 1e-5 relative (measured: 2e-7, the reference's float32
summation order). End to end the logits agree within 1e-4 relative as long as every layer's
codes are identical. They need not be: a layer output that differs by float32 rounding can
land on the other side of a later quantizer's rounding tie, and that one code step then moves
the logits by ~1e-3 (the reference computed in float64 moves them as much). So where codes
first differ, the test checks that this is such a tie and nothing else: inputs still equal to
1e-5, codes one step apart at a handful of positions. K/V stay in 16 bit here so the linears
are what is compared (the K/V fake quantizer has rounding ties of its own).
"""

import pytest
import torch

from starquant_plugin.assets import TINY_DREAM, TINY_LLADA
from starquant_plugin.config import StarQuantArgs
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.families import mask_token_id
from starquant_plugin.models.loading import load_dllm
from starquant_plugin.pipeline import quantize_dllm

MODELS = {"llada": TINY_LLADA, "dream": TINY_DREAM}
SCHEMES = ("W4A4", "W4A8", "W8A8")
_CACHE: dict[tuple[str, str], tuple] = {}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def quantized(family: str, scheme: str) -> tuple:
    """(model quantized in float32 with K/V in 16 bit, a mixed-state canvas), built once."""
    if (family, scheme) not in _CACHE:
        model, _ = load_dllm(MODELS[family], dtype=torch.float32)
        mask = mask_token_id(model)
        generator = torch.Generator().manual_seed(0)
        rows = torch.randint(3, 2000, (8, 64), generator=generator)
        rows = rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, mask)
        quantize_dllm(model, rows, StarQuantArgs(scheme=scheme, epochs=0, kv_bits=16),
                      progress=False)
        ids = torch.randint(3, 2000, (4, 96), generator=generator)
        masked_share = torch.tensor([0.0, 0.3, 0.7, 1.0]).unsqueeze(1)  # one row all [MASK]
        ids = ids.masked_fill(torch.rand(ids.shape, generator=generator) < masked_share, mask)
        _CACHE[(family, scheme)] = (model.eval(), ids)
    return _CACHE[(family, scheme)]


def _set_integer(model, enabled: bool) -> list[StarQuantLinear]:
    linears = [m for m in model.modules() if isinstance(m, StarQuantLinear)]
    for linear in linears:
        linear.integer_gemm = enabled
    return linears


def _run(model, ids, integer: bool) -> tuple[torch.Tensor, list[tuple]]:
    """Logits and, per StarQuantLinear call in order: (input, activation codes, output)."""
    calls = []

    def record(module, args, output):
        codes, _ = module.transform.activation_codes(args[0])
        calls.append((args[0].clone(), codes.clone(), output.clone()))

    handles = [m.register_forward_hook(record) for m in _set_integer(model, integer)]
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
        _set_integer(model, True)
    return logits, calls


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_every_layer_gives_the_reference_codes_and_output(family, scheme):
    """Along the integer path's own forward, each linear's codes times scales are its
    reference activations bit for bit, and its output is the reference's within 1e-5."""
    model, ids = quantized(family, scheme)
    checked = []

    def compare(module, args, output):
        x = args[0]
        codes, scale = module.transform.activation_codes(x)
        assert codes.dtype == torch.int8
        assert torch.equal(codes.float() * scale, module.transform(x))
        module.integer_gemm = False
        reference = module.forward(x)  # not module(x): no hooks inside a hook
        module.integer_gemm = True
        checked.append(_relative(output, reference))

    handles = [m.register_forward_hook(compare) for m in _set_integer(model, True)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    assert len(checked) == 4 * 7  # 4 blocks x (q, k, v, o, gate, up, down)
    assert max(checked) < 1e-5, checked


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("family", sorted(MODELS))
def test_logits_match_the_reference_up_to_rounding_ties(family, scheme):
    model, ids = quantized(family, scheme)
    logits_int, calls_int = _run(model, ids, integer=True)
    logits_ref, calls_ref = _run(model, ids, integer=False)
    assert len(calls_int) == len(calls_ref) == 4 * 7
    for (x_int, codes_int, y_int), (x_ref, codes_ref, y_ref) in zip(calls_int, calls_ref,
                                                                    strict=True):
        if not torch.equal(codes_int, codes_ref):
            assert _relative(x_int, x_ref) < 1e-5
            steps = codes_int.int() - codes_ref.int()
            assert steps.abs().max() == 1
            assert (steps != 0).float().mean() < 1e-3
            return  # downstream of a different code both paths are right, and differ
        assert _relative(y_int, y_ref) < 1e-5
    assert _relative(logits_int, logits_ref) < 1e-4
