"""``StarQuantArgs``: the one schema of a STaR-Quant run.

Read by the core pipeline and the llm-compressor modifier, written into the checkpoint.
Baselines are presets of the same schema (``METHODS``), so every method runs in one harness.
"""

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

QUANT_METHOD = "starquant"

SchemeName = Literal["W4A4", "W4A8", "W8A8", "W8A8-FP8", "W4A8-FP8", "W4A4-MXFP4",
                     "W4A4-NVFP4"]
"""The quantization presets (``method.quantizers.SCHEMES``): int weights and activations, or
the float format the name says (W8A8-FP8: FP8 e4m3 both; W4A8-FP8: int4 weights, FP8
activations; W4A4-MXFP4: MXFP4 both, one power-of-two scale per 32 channels; W4A4-NVFP4:
NVFP4 both, one e4m3 scale per 16 channels under a per-tensor global scale)."""

FLOAT_WEIGHT_SCHEMES = ("W8A8-FP8", "W4A4-MXFP4", "W4A4-NVFP4")
"""The presets whose weights are floats (GPTQ's column updates need integer codes)."""


class SGATArgs(BaseModel):
    """Knobs of SGAT, the quantization of the targeted linears through (state-gated) input
    transforms, and of the K/V quantizer (``SGATModifier``'s fields; the baselines are presets
    of them); defaults are the method's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: SchemeName = "W4A4"
    transform: Literal["identity", "smoothquant", "hadamard", "learned"] = "learned"
    transform_factors: Literal["kronecker", "dense"] = Field(
        "kronecker", description="M = diag(c) (L (x) R); dense = one [d, d] factor (small d)")
    state_gating: bool = True
    exclusive_fraction: float = Field(
        1 / 64, ge=0.0, lt=0.5, description="width of each state's exclusive subspace / d")
    init_scale: Literal["ones", "smoothquant"] = Field(
        "smoothquant", description="initial channel scale c of a learned M: SmoothQuant's "
        "1 / s with s = max|x|^alpha / max|W|^(1 - alpha) (FlatQuant's 'sq_style'), or 1")
    init_scale_alpha: float = Field(0.5, ge=0.0, le=1.0)
    init_rotation: Literal["hadamard", "random"] = Field(
        "hadamard", description="initial Kronecker factors of a learned M: random Hadamard "
        "(QuaRot) or random orthogonal (FlatQuant)")
    epochs: int = Field(15, ge=0)
    lr: float = Field(5e-3, gt=0)
    lr_clip: float = Field(5e-2, gt=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="cosine: anneal both learning rates to 1e-3 x over the fit "
        "(FlatQuant)")
    smoothquant_alpha: float = Field(0.5, ge=0.0, le=1.0)
    weight_quantizer: Literal["rtn", "gptq"] = "rtn"
    kv_bits: Literal[4, 8, 16] | None = Field(
        None, description="K/V cache bits; None = 4 at W4A4, 16 otherwise"
    )
    kv_rotation: bool = Field(
        True, description="rotate K and V per head by a Hadamard before the K/V quantizer "
        "(QuaRot): V's folded into v_proj rows and output-projection columns, K's applied to "
        "Q and K after RoPE at run time; only with kv_bits < 16 (needs a power-of-two "
        "head_dim)")
    k_smoothing: float = Field(
        0.5, ge=0.0, le=1.0, description="alpha of key smoothing before the K/V quantizer "
        "(SmoothAttention): per K channel s = (absmax / median absmax)^alpha from the "
        "calibration rows, K rows / s and the query rows that read them * s, folded into the "
        "weights; 0 = off; only with kv_bits < 16")
    seed: int = 0

    @model_validator(mode="after")
    def _gptq_needs_int_weights(self) -> "SGATArgs":
        if self.weight_quantizer == "gptq" and self.scheme in FLOAT_WEIGHT_SCHEMES:
            raise ValueError(
                f"weight_quantizer 'gptq' rounds onto integer codes, but scheme {self.scheme} "
                f"stores float weights; use weight_quantizer 'rtn' with {self.scheme}, or an "
                "int-weight scheme (W4A8-FP8 keeps FP8 activations with int4 weights) for "
                "GPTQ.")
        return self

    @property
    def resolved_kv_bits(self) -> int:
        if self.kv_bits is not None:
            return self.kv_bits
        return 4 if self.scheme == "W4A4" else 16

    @property
    def resolved_kv_rotation(self) -> bool:
        """Whether K and V are rotated: ``kv_rotation`` with K/V quantized below 16 bit."""
        return self.kv_rotation and self.resolved_kv_bits < 16

    @property
    def resolved_k_smoothing(self) -> float:
        """``k_smoothing`` with K/V quantized below 16 bit, else 0 (nothing to smooth for)."""
        return self.k_smoothing if self.resolved_kv_bits < 16 else 0.0

    def exclusive_width(self, d: int) -> int:
        """``k``, the width of each state's exclusive subspace for a linear input of dim ``d``
        (0 without learned state gating)."""
        if self.transform != "learned" or not self.state_gating:
            return 0
        return int(d * self.exclusive_fraction)

    def factors(self, d: int) -> tuple[int, int]:
        """``(n1, n2)`` of the Kronecker factors of ``M`` for a linear input of dim ``d``."""
        from starquant_plugin.method.transforms import kronecker_factors  # torch: lazily

        return kronecker_factors(d) if self.transform_factors == "kronecker" else (1, d)


class TACArgs(BaseModel):
    """Knobs of TAC, the closed-form affine correction of the attention output
    (``TACModifier``'s fields); defaults are the method's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tac_group_size: int = Field(16, ge=1)
    tac_damping: float = Field(1e-2, ge=0.0)
    tac_shrinkage: Annotated[float, Field(ge=0.0, le=1.0)] | Literal["auto"] = Field(
        "auto", description="shrinkage rho of TAC's map toward the identity; auto: chosen per "
        "layer among 0.1-1.0 or no TAC, on every fourth calibration row held out from the fit "
        "(by the error at the output projection's output), then refitted on all rows")
    tac_method: Literal["ot", "whiten", "lstsq"] = "ot"


class StarQuantArgs(TACArgs, SGATArgs):
    """Knobs of STaR-Quant (see ``docs/method.md``): SGAT's and TAC's, and whether TAC runs;
    the one schema the core path, the modifiers, the checkpoint and the loaders read."""

    tac: bool = True

    def sgat_args(self) -> SGATArgs:
        return SGATArgs(**self.model_dump(include=set(SGATArgs.model_fields)))

    def tac_args(self) -> TACArgs:
        return TACArgs(**self.model_dump(include=set(TACArgs.model_fields)))


_FLATQUANT = {"init_rotation": "random", "init_scale": "smoothquant", "init_scale_alpha": 0.3,
              "lr_schedule": "cosine", "kv_rotation": True, "k_smoothing": 0.0}
"""FlatQuant's own initialisation and schedule (its ``--diag_init sq_style --diag_alpha 0.3``,
random orthogonal factors, cosine annealing); its learned per-head K/V transforms are
approximated by the fixed Hadamard of ``kv_rotation``."""

METHODS: dict[str, dict] = {
    "rtn": {"transform": "identity", "state_gating": False, "tac": False,
            "kv_rotation": False, "k_smoothing": 0.0},
    "smoothquant": {"transform": "smoothquant", "state_gating": False, "tac": False,
                    "kv_rotation": False, "k_smoothing": 0.0},
    "quarot": {"transform": "hadamard", "state_gating": False, "tac": False,
               "kv_rotation": True, "k_smoothing": 0.0},
    "quarot_gptq": {"transform": "hadamard", "state_gating": False, "tac": False,
                    "kv_rotation": True, "k_smoothing": 0.0, "weight_quantizer": "gptq"},
    "flatquant": {"transform": "learned", "state_gating": False, "tac": False, **_FLATQUANT},
    "sgat": {"transform": "learned", "state_gating": True, "tac": False},
    "tac": {"transform": "identity", "state_gating": False, "tac": True,
            "kv_rotation": False, "k_smoothing": 0.0},
    "starquant": {"transform": "learned", "state_gating": True, "tac": True},
}


def method_args(method: str, **overrides) -> StarQuantArgs:
    """The preset for a method name (a baseline or STaR-Quant), with overrides."""
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(METHODS)}.")
    return StarQuantArgs(**(METHODS[method] | overrides))
