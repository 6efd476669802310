"""Serve one checkpoint with vLLM in this (fresh) process and write what the tests compare.

Run by ``test_engine.py`` with the serving environment's Python::

    python serve_checkpoint.py CHECKPOINT INPUTS.safetensors OUT.safetensors '{"steps": 4}'

INPUTS holds ``canvases: [n, seq]`` and ``prompts: [b, p]``; OUT gets the pooler's
``stats: [n, seq, 2k]`` at every position (asked per request: the driver's own requests get
the masked positions only) and the denoising driver's ``sequences: [b, p + gen_length]``, and
in its metadata (in-process engines only) the GEMM routes the STaR-Quant layers took, how
many attention layers rotate K, and the oneDNN probe's verdict.
Nothing here registers the plugin by hand: vLLM loads it through the entry point (in every
process when ``STARQUANT_TEST_MULTIPROCESSING=1`` starts the engine and worker separately).
``STARQUANT_TEST_TP=2`` serves with tensor parallelism (one worker per core).
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
TENSOR_PARALLEL = int(os.environ.get("STARQUANT_TEST_TP", "1"))
MULTIPROCESSING = os.environ.get("STARQUANT_TEST_MULTIPROCESSING") == "1" or TENSOR_PARALLEL > 1
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if MULTIPROCESSING else "0")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402


def gemm_routes(model: torch.nn.Module) -> list[str]:
    """The GEMM routes the STaR-Quant linears of ``model`` took at load (``linear_method.py``)."""
    return sorted({module.star_gemm for module in model.modules() if hasattr(module, "star_gemm")})


def rotated_attention_layers(model: torch.nn.Module) -> int:
    """How many attention layers of ``model`` rotate Q and K per head (``k_rotation``)."""
    return sum(getattr(module, "k_hadamard", None) is not None for module in model.modules())


def main() -> None:
    checkpoint, inputs_path, out_path, sampler_json = sys.argv[1:5]
    from vllm import LLM, PoolingParams

    from starquant_plugin.integrations.vllm.driver import denoise, shutdown
    from starquant_plugin.integrations.vllm.gemm import cpu_onednn_int8_is_exact
    from starquant_plugin.integrations.vllm.pooler import ALL_POSITIONS

    inputs = load_file(inputs_path)
    start = time.time()
    llm = LLM(checkpoint, runner="pooling", enforce_eager=True, dtype=torch.float32,
              max_model_len=256, max_num_seqs=16, seed=0, skip_tokenizer_init=True,
              tensor_parallel_size=TENSOR_PARALLEL,
              distributed_executor_backend=None if MULTIPROCESSING else "uni")
    load_seconds = time.time() - start
    every_position = PoolingParams(task="token_classify", extra_kwargs={ALL_POSITIONS: True})
    outputs = llm.encode([{"prompt_token_ids": row.tolist()} for row in inputs["canvases"]],
                         every_position, pooling_task="token_classify", use_tqdm=False)
    stats = torch.stack([output.outputs.data for output in outputs]).float()
    generated = denoise(llm, inputs["prompts"], **json.loads(sampler_json))
    metadata = {} if MULTIPROCESSING else {  # the model lives in this process
        "gemm_routes": json.dumps(llm.apply_model(gemm_routes)[0]),
        "k_rotated_layers": json.dumps(llm.apply_model(rotated_attention_layers)[0]),
        "onednn_int8_exact": json.dumps(cpu_onednn_int8_is_exact())}
    save_file({"stats": stats.contiguous(), "sequences": generated.sequences.contiguous(),
               "engine_calls": torch.tensor(generated.engine_calls),
               "load_seconds": torch.tensor(load_seconds)}, out_path, metadata=metadata)
    shutdown(llm)


if __name__ == "__main__":
    main()
