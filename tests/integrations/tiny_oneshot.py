"""oneshot on the bundled tiny models, small enough for tests (shared by the llm-compressor,
saving and safeguard tests)."""

import torch
from llmcompressor import oneshot

from starquant_plugin.assets import TINY_MODELS, calibration_text
from starquant_plugin.integrations.calibration_dataset import dllm_calibration_dataset
from starquant_plugin.models.calibration import StateMix
from starquant_plugin.models.loading import load_dllm

ROWS, SEQ_LEN, BATCH = 8, 32, 4


def tiny_model(family: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the bundled trained tiny model of ``family``."""
    return load_dllm(TINY_MODELS[family], dtype=dtype)


def calibration_dataset(model, tokenizer, rows: int = ROWS):
    return dllm_calibration_dataset(model, tokenizer, [calibration_text()], num_samples=rows,
                                    seq_len=SEQ_LEN, mix=StateMix(trajectory=0.0), seed=0)


def run_oneshot(model, dataset, recipe, **kwargs):
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
            batch_size=BATCH, shuffle_calibration_samples=False, **kwargs)
