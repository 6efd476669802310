"""LLaDA and Dream as vLLM pooling models: bidirectional Llama blocks, a per-position pooler.

vLLM has neither architecture, so both are built from vLLM's own Llama layers
(``LlamaModel`` / ``LlamaDecoderLayer`` / ``LlamaAttention`` with encoder-only attention,
fused ``qkv_proj`` and ``gate_up_proj``), with the hub's parameter names mapped onto them by
a ``WeightsMapper``. What is written here by hand and why:

* a decoder config view (``decoder_config``): LLaDA's config names its sizes differently
  (``d_model``, ``mlp_hidden_size``, ``include_bias``), Dream's q/k/v have a bias and its
  o_proj none; ``LlamaDecoderLayer`` reads exactly these attributes;
* ``KVQuantLlamaAttention``: K and V fake-quantized per (token, head) after RoPE when the
  checkpoint's ``kv_bits < 16``, queries and keys first rotated per head by a Hadamard when
  it records ``k_rotation`` (what ``models/attention.py`` does in transformers), since
  vLLM's CPU attention has no 4-bit K/V path;
* the ``[MASK]`` state (``token_state.set_mask_state``) recorded before the blocks run;
* a replicated LM head (``ReplicatedLinear``): vLLM calls the pooler on TP rank 0 only, so
  the head must not need a collective there.

Serve with ``runner="pooling"``; ``LLM.encode(..., pooling_task="token_classify")`` returns the
``pooler.py`` statistics per masked position. Each forward recomputes the whole canvas (no KV
reuse).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix

from starquant_plugin.integrations.checkpoint_model import checkpoint_specs
from starquant_plugin.integrations.checkpoint_tensors import TensorChecker
from starquant_plugin.integrations.vllm.pooler import (
    DEFAULT_TOP_K,
    TOP_K_ATTRIBUTE,
    diffusion_pooler,
)
from starquant_plugin.integrations.vllm.token_state import set_mask_state
from starquant_plugin.method.quantizers import fake_quantize_kv
from starquant_plugin.method.transforms import hadamard
from starquant_plugin.models.families import FAMILIES, DLLMFamily, mask_token_id

STAR_TENSOR_RENAME = {".input_transform.": "."}
"""STaR tensors sit under ``<linear>.input_transform.`` in the checkpoint and directly on the
(fused) vLLM linear layer, as parameters the STaR-Quant linear method creates."""


class KVQuantLlamaAttention(LlamaAttention):
    """``LlamaAttention`` with K and V fake-quantized (``kv_bits`` < 16) before attention.

    ``k, v: [num_tokens, kv_heads * head_dim]`` (this rank's heads); asymmetric, one scale and
    zero point per (token, head), keys after RoPE: ``models/attention.py``'s quantizer. With
    ``k_hadamard: [head_dim, head_dim]`` set (the checkpoint's ``k_rotation``), every query
    and key head is first multiplied by it in float32 (``(q H)(k H)^T = q k^T``), as there.
    """

    kv_bits: int = 16
    k_hadamard: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.kv_bits < 16:
            if self.k_hadamard is not None:
                q, k = self._rotate_heads(q), self._rotate_heads(k)
            k, v = self._fake_quantize_kv(k), self._fake_quantize_kv(v)
        attn_output = self.attn(q, k, v)
        output, _ = self.o_proj(attn_output)
        return output

    def _rotate_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [tokens, heads * head_dim]`` with every head multiplied by ``k_hadamard``."""
        if self.k_hadamard.device != x.device:  # once, on the first forward
            self.k_hadamard = self.k_hadamard.to(x.device)
        heads = x.float().unflatten(-1, (-1, self.head_dim)) @ self.k_hadamard
        return heads.flatten(-2).to(x.dtype)

    def _fake_quantize_kv(self, x: torch.Tensor) -> torch.Tensor:
        # fake_quantize_kv quantizes each slice of its last dim: viewing [tokens, heads * hd]
        # as [1, tokens, heads, hd] gives one scale per (token, head), as in transformers.
        heads_view = x.view(1, x.shape[0], self.num_kv_heads, self.head_dim)
        return fake_quantize_kv(heads_view, self.kv_bits).view_as(x)


class DiffusionDecoderLayer(LlamaDecoderLayer):
    """``LlamaDecoderLayer`` built from a family's decoder config view, bidirectional, with
    K/V fake quantization when ``kv_bits < 16`` (K rotated first with ``k_rotation``)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", *,
                 decoder_config: SimpleNamespace, kv_bits: int = 16,
                 k_rotation: bool = False) -> None:
        super().__init__(vllm_config, prefix, config=decoder_config,
                         attn_layer_type=KVQuantLlamaAttention)
        self.self_attn.kv_bits = kv_bits
        if k_rotation:
            self.self_attn.k_hadamard = hadamard(self.self_attn.head_dim)


def _llada_decoder_config(config: Any) -> SimpleNamespace:
    unsupported = {
        "block_type": (config.block_type, "llama"), "alibi": (config.alibi, False),
        "rope": (config.rope, True), "layer_norm_type": (config.layer_norm_type, "rms"),
        "scale_logits": (config.scale_logits, False),
        "input_emb_norm": (config.input_emb_norm, False),
        "attention_layer_norm": (config.attention_layer_norm, False),
        "weight_tying": (config.weight_tying, False),
        "activation_type": (config.activation_type, "silu"),
    }
    wrong = {key: got for key, (got, expected) in unsupported.items() if got != expected}
    vocab = config.embedding_size or config.vocab_size
    if vocab != config.vocab_size:
        wrong["embedding_size"] = vocab
    if wrong:
        raise ValueError(
            f"This LLaDA config sets {wrong}; the vLLM LLaDA model implements the hub's "
            "LLaDA-8B layout (llama blocks, RoPE, RMSNorm, SiLU, untied head, "
            "embedding_size == vocab_size). Serve it with transformers instead."
        )
    return SimpleNamespace(
        hidden_size=config.d_model, num_attention_heads=config.n_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim,
        intermediate_size=config.mlp_hidden_size or config.mlp_ratio * config.d_model,
        hidden_act="silu", rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_sequence_length,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.include_bias,
        qkv_bias=config.include_bias or config.include_qkv_bias,
        mlp_bias=config.include_bias, is_causal=False)


def _dream_decoder_config(config: Any) -> SimpleNamespace:
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads)
    return SimpleNamespace(
        hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={"rope_type": "default",
                         "rope_theta": config.rope_parameters["rope_theta"]},
        attention_bias=False, qkv_bias=True, mlp_bias=False, is_causal=False)


def _check_eager(vllm_config: VllmConfig) -> None:
    """STaR-Quant layers read the token state from the forward context: eager only."""
    from vllm.config import CompilationMode

    mode = vllm_config.compilation_config.mode
    if mode not in (None, CompilationMode.NONE):
        raise ValueError(
            f"STaR-Quant checkpoints are served in eager mode, got compilation mode {mode}; "
            "pass enforce_eager=True (compiled graphs would freeze the [MASK] state)."
        )


class MaskedDiffusionLM(nn.Module, SupportsQuant):
    """A masked-diffusion LM as a vLLM pooling model (family-specific subclasses below).

    ``forward(input_ids: [num_tokens], positions: [num_tokens]) -> hidden [num_tokens, d]``;
    the pooler turns each request's hidden states into per-position sampler statistics.
    """

    is_pooling_model: ClassVar[bool] = True
    attn_type: ClassVar[str] = "encoder_only"
    default_tok_pooling_type: ClassVar[str] = "ALL"
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    family: ClassVar[DLLMFamily]

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        from starquant_plugin.integrations.vllm.quant_config import StarQuantVllmConfig

        config = vllm_config.model_config.hf_config
        self.config = config
        self.mask_token_id = mask_token_id(config)
        quant_config = vllm_config.quant_config
        kv_bits, k_rotation = 16, False
        self.checkpoint_specs = None
        if isinstance(quant_config, StarQuantVllmConfig):
            _check_eager(vllm_config)
            quant_config.check_model(self.family.name, self.mask_token_id)
            kv_bits, k_rotation = quant_config.kv_bits, quant_config.k_rotation
            self.checkpoint_specs = checkpoint_specs(config)
            self.checkpoint_name = str(vllm_config.model_config.model)
        decoder_config = self.decoder_config(config)
        layer_type = functools.partial(DiffusionDecoderLayer, decoder_config=decoder_config,
                                       kv_bits=kv_bits, k_rotation=k_rotation)
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"),
                                layer_type=layer_type)
        self.lm_head = ReplicatedLinear(decoder_config.hidden_size, config.vocab_size,
                                        bias=False, quant_config=None,
                                        prefix=maybe_prefix(prefix, "lm_head"))
        top_k = getattr(config, TOP_K_ATTRIBUTE, DEFAULT_TOP_K)
        self.pooler = diffusion_pooler(self.compute_logits, top_k,
                                       self.family.shifted_logits, self.mask_token_id)

    @staticmethod
    def decoder_config(config: Any) -> SimpleNamespace:
        raise NotImplementedError

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids is None:
            raise ValueError(
                "Masked-diffusion models need input_ids (the [MASK] state gates STaR-Quant "
                "layers); got only inputs_embeds. Pass token ids as prompts."
            )
        set_mask_state(input_ids, self.mask_token_id)
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[tokens, hidden] -> [tokens, vocab]`` in float32 (no collective: see module)."""
        logits, _ = self.lm_head(hidden_states)
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the hub-named ``weights``; a STaR-Quant checkpoint's tensors are each checked
        as they stream by (name, shape, dtype, values in range), and any that never came is
        named, with the transformers loader's specs (``hf_quantizer.checkpoint_specs``)."""
        loader = AutoWeightsLoader(self)
        if self.checkpoint_specs is None:
            return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
        checker = TensorChecker(self.checkpoint_specs, self.checkpoint_name)
        loaded = loader.load_weights(checker.stream(weights), mapper=self.hf_to_vllm_mapper)
        checker.finish()
        return loaded


class LLaDAForMaskedDiffusion(MaskedDiffusionLM):
    """LLaDA (``LLaDAModelLM``, hub names ``model.transformer.blocks.N.*``)."""

    family = FAMILIES["llada"]
    _block, _end = r"^model\.transformer\.blocks\.(\d+)\.", r"(?=\.|$)"  # names or prefixes
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_regex={
            re.compile(_block + r"(q_proj|k_proj|v_proj)" + _end): r"model.layers.\1.self_attn.\2",
            re.compile(_block + "attn_out" + _end): r"model.layers.\1.self_attn.o_proj",
            re.compile(_block + "attn_norm" + _end): r"model.layers.\1.input_layernorm",
            re.compile(_block + "ff_norm" + _end): r"model.layers.\1.post_attention_layernorm",
            re.compile(_block + "ff_proj" + _end): r"model.layers.\1.mlp.gate_proj",
            re.compile(_block + "up_proj" + _end): r"model.layers.\1.mlp.up_proj",
            re.compile(_block + "ff_out" + _end): r"model.layers.\1.mlp.down_proj",
            re.compile(r"^model\.transformer\.wte" + _end): "model.embed_tokens",
            re.compile(r"^model\.transformer\.ln_f" + _end): "model.norm",
            re.compile(r"^model\.transformer\.ff_out" + _end): "lm_head",
        },
        orig_to_new_substr=STAR_TENSOR_RENAME,
    )
    decoder_config = staticmethod(_llada_decoder_config)


class DreamForMaskedDiffusion(MaskedDiffusionLM):
    """Dream (``DreamModel``: Qwen2 names, GQA, q/k/v bias, shifted logits)."""

    family = FAMILIES["Dream"]
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_substr=STAR_TENSOR_RENAME)
    decoder_config = staticmethod(_dream_decoder_config)


ARCHITECTURES: dict[str, str] = {
    "LLaDAModelLM": f"{__name__}:LLaDAForMaskedDiffusion",
    "DreamModel": f"{__name__}:DreamForMaskedDiffusion",
}
"""config.json ``architectures`` -> the vLLM class serving it (lazy ``module:class``)."""
