"""Where the per-token ``[MASK]`` state lives during one vLLM forward pass.

vLLM's linear layers do not receive ``input_ids``, so the model's forward computes
``mask_state = input_ids == mask_token_id`` over vLLM's flattened tokens (``[num_tokens]``,
every request of the batch back to back) and stores it on vLLM's per-forward
``ForwardContext``, where each STaR-Quant linear method reads it. A fresh context is created
for every forward, so a stale state can never leak into the next step. Eager mode only:
a compiled graph would freeze the attribute read (the model refuses compilation for
STaR-Quant checkpoints, see ``models.py``).
"""

from __future__ import annotations

import torch

_ATTRIBUTE = "starquant_mask_state"


def set_mask_state(input_ids: torch.Tensor, mask_token_id: int) -> None:
    """Record ``input_ids == mask_token_id`` (``input_ids: [num_tokens]``) for this forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if is_forward_context_available():
        setattr(get_forward_context(), _ATTRIBUTE, input_ids == mask_token_id)


def current_mask_state(num_tokens: int) -> torch.Tensor:
    """The ``[num_tokens]`` bool mask state recorded by this forward's model.

    Raises when no state was recorded or its length differs from the layer input's, which
    would gate tokens with another canvas' states.
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    state = (getattr(get_forward_context(), _ATTRIBUTE, None)
             if is_forward_context_available() else None)
    if state is None:
        raise RuntimeError(
            "A STaR-Quant layer ran without a [MASK] state for this forward; the model "
            "class must call set_mask_state(input_ids, mask_token_id) first. Serve the "
            "checkpoint with the architectures registered by starquant_plugin "
            "(LLaDAModelLM / DreamModel) in eager mode (enforce_eager=True)."
        )
    if state.shape[0] != num_tokens:
        raise RuntimeError(
            f"The [MASK] state covers {state.shape[0]} tokens but the layer input has "
            f"{num_tokens}; expected one state per token of this forward."
        )
    return state
