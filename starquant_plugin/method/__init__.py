"""Pure-torch STaR-Quant math: quantizers, SGAT, TAC and the runtime linear."""

from starquant_plugin.method.integer_gemm import int_gemm
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
from starquant_plugin.method.runtime import (
    MaskState,
    StarQuantInputTransform,
    StarQuantLinear,
    attach_mask_state,
    prepack_weights,
)
from starquant_plugin.method.sgat import (
    MASKED,
    UNMASKED,
    SGATResult,
    exactness_residual,
    exclusive_subspaces,
    fit_sgat,
    static_sgat,
)
from starquant_plugin.method.tac import (
    TACParams,
    apply_tac,
    choose_tac_shrinkage,
    fit_tac,
    identity_tac,
)
from starquant_plugin.method.transforms import (
    hadamard,
    kronecker_apply,
    kronecker_factors,
    random_hadamard,
    random_orthogonal,
    rotate_value_heads,
    smoothquant_scales,
)

__all__ = [
    "MASKED",
    "SCHEMES",
    "UNMASKED",
    "MaskState",
    "SGATResult",
    "StarQuantInputTransform",
    "StarQuantLinear",
    "TACParams",
    "apply_tac",
    "choose_tac_shrinkage",
    "attach_mask_state",
    "exactness_residual",
    "exclusive_subspaces",
    "fake_quantize_activation",
    "fake_quantize_kv",
    "fake_quantize_weight",
    "fit_sgat",
    "fit_tac",
    "identity_tac",
    "gptq_quantize_weight",
    "hadamard",
    "int_gemm",
    "kronecker_apply",
    "kronecker_factors",
    "prepack_weights",
    "quantize_activation",
    "random_hadamard",
    "random_orthogonal",
    "rotate_value_heads",
    "scheme_args",
    "search_weight_clip",
    "smoothquant_scales",
    "static_sgat",
]
