"""Size, CPU latency and peak memory of STaR-Quant checkpoints vs their bf16 and fp32 originals.

One run measures, as ratios to bf16 *and* fp32 on the same machine in the same process:

* latency of one LLaDA-8B-shaped block (d 4096, MLP 12288; 7 linears built from
  ``StarQuantLinear``s with default-shaped STaR tensors, stored in bf16) and of each bundled
  tiny model, for FP (bf16 and fp32) and each scheme through the dequantize-and-matmul
  reference path and the integer path, at each token count and thread count. Variants are
  timed round-robin (one forward of each per round) so machine-load drift hits them alike;
  the median of ``--repeats`` rounds after one warm-up round is reported, with the load
  average before and after;
* the same for the integer path on the block with ``prepack_weights`` (oneDNN-prepacked int8
  copies of the weights), where the CPU takes them;
* where the integer path's time goes on the block (transform, activation quantization,
  weight decode, GEMM, rescale), for both weight layouts;
* bytes on disk and in memory, and peak RSS after reloading each checkpoint (and the saved
  block) in a fresh process and running forwards on it.

Quantized tiny models are quantized from the bf16 originals (1 epoch, 16 random rows: size and
speed do not depend on the fit), saved with ``save_starquant`` and reloaded with
``from_pretrained`` in bf16 (as the README recommends) and in fp32. Prints tables, writes JSON::

    python benchmarks/runtime.py --out results/runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from starquant_plugin.integrations.format import (
    bytes_by_part,
    checkpoint_tensor_bytes,
    module_tensor_bytes,
)

BF16_BYTES = 2
BLOCK_D, BLOCK_MLP = 4096, 12288
BLOCK_GROUPS = {("q_proj", "k_proj", "v_proj"): (BLOCK_D, BLOCK_D),
                ("o_proj",): (BLOCK_D, BLOCK_D),
                ("gate_proj", "up_proj"): (BLOCK_MLP, BLOCK_D),
                ("down_proj",): (BLOCK_D, BLOCK_MLP)}
"""(linears sharing an input) -> (out, in) of the LLaDA-8B block."""


def _status_mib(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _start_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) so the peak measured next
    covers only what follows, not the imports; returns the RSS now (MiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _rss_report(base_mib: float, after_reload_mib: float) -> dict[str, float]:
    return {"rss_before_reload_mib": base_mib,
            "rss_growth_reload_mib": after_reload_mib - base_mib,
            "peak_rss_mib": _status_mib("VmHWM"),
            "peak_rss_growth_mib": _status_mib("VmHWM") - base_mib}


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def disk_bytes(path: Path, block_pattern: str) -> dict[str, int]:
    """Bytes of the tensors in ``path``'s shards: whole model, block tensors, STaR tensors."""
    return bytes_by_part(checkpoint_tensor_bytes(path), block_pattern)


def memory_bytes(model: torch.nn.Module, block_pattern: str) -> dict[str, int]:
    return bytes_by_part(module_tensor_bytes(model), block_pattern)


def _set_integer_gemm(model: torch.nn.Module, enabled: bool) -> None:
    from starquant_plugin.method import StarQuantLinear

    for module in model.modules():
        if isinstance(module, StarQuantLinear):
            module.integer_gemm = enabled


def round_robin(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """Median and min ms per run over ``repeats`` rounds of one call each, after a warm-up
    round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for round_index in range(repeats + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if round_index:
                    times[name].append(1000 * (time.perf_counter() - start))
    return {name: {"ms": statistics.median(t), "min_ms": min(t), "runs": len(t)}
            for name, t in times.items()}


# ---------------------------------------------------------------- the 8B-width block


def build_block(variant: str, mask_state, generator: torch.Generator) -> torch.nn.ModuleDict:
    """``variant``: "bf16" / "fp32" (plain linears) or a scheme: ``StarQuantLinear``s stored in
    bf16 like a checkpoint of a bf16 model, with the default structured transforms (k = d/64,
    Kronecker factors) and TAC on o_proj. Random values: size and speed do not depend on
    them."""
    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.method import (
        SGATResult,
        StarQuantInputTransform,
        StarQuantLinear,
        TACParams,
        scheme_args,
    )
    from starquant_plugin.method.quantizers import fake_quantize_weight
    from starquant_plugin.method.runtime import weight_qparams

    layers = {}
    for names, (out_features, in_features) in BLOCK_GROUPS.items():
        transform = None
        if variant not in ("bf16", "fp32"):
            weight_args, act_args = scheme_args(variant)
            args = StarQuantArgs(scheme=variant)
            k, (n1, n2) = args.exclusive_width(in_features), args.factors(in_features)
            exclusive = torch.linalg.qr(torch.randn(in_features, 2 * k, generator=generator))[0]
            sgat = SGATResult(exclusive=exclusive, channel_scale=torch.ones(in_features),
                              left=torch.eye(n1), right=torch.eye(n2), act_clip=torch.ones(2),
                              weight_clip=torch.ones(out_features))
            g = args.tac_group_size
            tac = TACParams(torch.eye(g).repeat(in_features // g, 1, 1),
                            torch.zeros(in_features)) if names == ("o_proj",) else None
            transform = StarQuantInputTransform(sgat, act_args, mask_state, tac, torch.bfloat16)
        for index, name in enumerate(names):
            weight = torch.randn(out_features, in_features, generator=generator) * 0.02
            if transform is None:
                layer = torch.nn.Linear(in_features, out_features, bias=False)
                layer.weight.data = weight.to(getattr(torch, {"bf16": "bfloat16",
                                                              "fp32": "float32"}[variant]))
            else:
                scale, _ = weight_qparams(weight, weight_args)
                layer = StarQuantLinear(
                    fake_quantize_weight(weight, weight_args), None, transform,
                    owns_transform=index == 0, weight_args=weight_args,
                    weight_scale=scale.bfloat16())
            del weight
            layers[name] = layer
    return torch.nn.ModuleDict(layers)


def _block_inputs(tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(1, tokens, BLOCK_D, generator=generator).to(dtype),
            torch.randn(1, tokens, BLOCK_MLP, generator=generator).to(dtype))


def _block_forward(block: torch.nn.ModuleDict, x: torch.Tensor, h: torch.Tensor) -> None:
    """The 7 linears on the block's two inputs (attention-side x, MLP hidden h), copied first
    as every variant's forward: in a model each forward brings new tensors, so a group's
    transform computes once per forward and never reuses a previous forward's work."""
    x, h = x.clone(), h.clone()
    for name, layer in block.items():
        layer(h if name == "down_proj" else x)


def _mask_state(tokens: int):
    from starquant_plugin.method import MaskState

    state = MaskState()
    state.mask_state = torch.rand(1, tokens, generator=torch.Generator().manual_seed(2)) < 0.5
    return state


def block_latency(schemes: tuple[str, ...], tokens_list: tuple[int, ...], repeats: int) -> dict:
    """Runs in a fresh process at the current thread count: all variants built once, timed
    round-robin per token count; then the integer path's time split (``breakdown``)."""
    from starquant_plugin.method.runtime import prepack_weights

    state = _mask_state(max(tokens_list))
    generator = torch.Generator().manual_seed(0)
    blocks = {variant: build_block(variant, state, generator) for variant in ("bf16", "fp32",
                                                                               *schemes)}
    for scheme in schemes:  # plus the opt-in oneDNN-prepacked copy, where the CPU takes it
        block = build_block(scheme, state, generator)
        if all(layer.prepack_refusal() is None for layer in block.values()):
            prepack_weights(block)
            blocks[f"{scheme} prepacked"] = block
    result = {"threads": torch.get_num_threads(), "tokens": {}}
    for tokens in tokens_list:
        state.mask_state = _mask_state(tokens).mask_state
        bf16, fp32 = _block_inputs(tokens, torch.bfloat16), _block_inputs(tokens, torch.float32)
        runs = {"bf16": lambda inputs=bf16: _block_forward(blocks["bf16"], *inputs),
                "fp32": lambda inputs=fp32: _block_forward(blocks["fp32"], *inputs)}
        for scheme in schemes:
            for path, block, enabled in (("reference", scheme, False),
                                         ("integer", scheme, True),
                                         ("integer prepacked", f"{scheme} prepacked", True)):
                if block not in blocks:
                    continue
                def run(block=blocks[block], enabled=enabled, inputs=bf16):
                    _set_integer_gemm(block, enabled)
                    _block_forward(block, *inputs)
                runs[f"{scheme} {path}"] = run
        load_before = _load()
        timings = round_robin(runs, repeats)
        result["tokens"][tokens] = {"load_before": load_before, "load_after": _load(),
                                    "latency": timings,
                                    "breakdown": {name: breakdown(blocks[name], tokens,
                                                                  repeats)
                                                  for scheme in schemes
                                                  for name in (scheme, f"{scheme} prepacked")
                                                  if name in blocks}}
    return result


def breakdown(block: torch.nn.ModuleDict, tokens: int, repeats: int) -> dict[str, float]:
    """Median ms per integer-path block forward spent in: the transform (TAC + SGAT map +
    per-state clip), activation quantization, the weight decode (float32 kernel: 4-bit unpack
    or int8 -> float32; onednn kernel: unpack + repack), the GEMM (``integer_matmul`` minus
    the decode) and the rescale (scales, bias; prepacked: the per-token scale and the cast to
    bf16). Also which kernel each linear ran."""
    from starquant_plugin.method.input_transform import GEMM_CHUNK_TOKENS
    from starquant_plugin.method.integer_gemm import (
        FLOAT32,
        ONEDNN,
        decoded_row_chunks,
        integer_kernel,
        integer_matmul,
        onednn_repacked_weight,
        prepacked_weight_scaled,
        rescale,
        scale_tokens,
    )
    from starquant_plugin.method.quantizers import quantize_activation

    def per_gemm_chunk(rows: torch.Tensor, compute: Callable[[torch.Tensor], object]) -> None:
        for chunk in rows.split(GEMM_CHUNK_TOKENS):
            compute(chunk)

    x, h = _block_inputs(tokens, torch.bfloat16)
    codes, runs, kernels = {}, {}, {}
    for name, layer in block.items():
        transform = layer.transform
        layer_input = h if name == "down_proj" else x
        if layer.owns_transform:  # as the forward runs them: a chunk of tokens at a time
            mask = transform.mask_state.mask_state
            runs[f"transform {name}"] = lambda t=transform, i=layer_input, m=mask: \
                t._in_token_chunks(i, m, lambda x_s, *_: x_s)
            runs[f"transform+quantize {name}"] = lambda t=transform, i=layer_input, m=mask: \
                t._in_token_chunks(i, m, quantize_activation)
            a, scale = transform._in_token_chunks(layer_input, mask, quantize_activation)
            codes[id(transform)] = (a.reshape(tokens, -1), scale.reshape(tokens, 1))
        a, scale = codes[id(transform)]
        weight = layer._buffers.get("weight_packed", layer._buffers.get("weight"))
        d, int4 = a.shape[1], weight.dtype == torch.int32
        low, high = torch.aminmax(a)
        kernels[name] = integer_kernel(a.device, tokens, d, weight.shape[0], int4,
                                       max(-int(low), int(high)))
        if kernels[name] == FLOAT32:
            runs[f"decode {name}"] = lambda w=weight, d=d: list(decoded_row_chunks(w, d))
        elif kernels[name] == ONEDNN:
            runs[f"decode {name}"] = lambda w=weight, d=d: onednn_repacked_weight(w, tokens, d)
        if layer._prepacked is not None:  # the weight scale is applied inside the GEMM
            kernels[name] = "onednn prepacked"
            runs.pop(f"decode {name}", None)
            # GEMM_CHUNK_TOKENS rows per call, each result freed before the next, as in the
            # forward
            runs[f"matmul {name}"] = lambda a=a, layer=layer: per_gemm_chunk(
                a, lambda rows: prepacked_weight_scaled(rows, layer._prepacked,
                                                        layer.weight_scale))
            y = prepacked_weight_scaled(a, layer._prepacked, layer.weight_scale)
            # in place on one output, by unit scales (the same work; values stay normal),
            # then to the model's dtype
            units = torch.ones(GEMM_CHUNK_TOKENS, 1)
            runs[f"rescale {name}"] = lambda y=y, s=units: per_gemm_chunk(
                y, lambda rows: scale_tokens(rows, s[: rows.shape[0]]).bfloat16())
        else:
            runs[f"matmul {name}"] = lambda a=a, w=weight: integer_matmul(a, w)
            acc = integer_matmul(a, weight)
            runs[f"rescale {name}"] = lambda acc=acc, s=scale, ws=layer.weight_scale: \
                rescale(acc, s, ws)
    timings = {name: t["ms"] for name, t in round_robin(runs, repeats).items()}

    def total(prefix: str) -> float:
        return sum(ms for name, ms in timings.items() if name.startswith(prefix + " "))

    parts = {"transform": total("transform"),
             "quantize": total("transform+quantize") - total("transform"),
             "decode": total("decode")}
    parts["gemm"] = total("matmul") - parts["decode"]
    parts["rescale"] = total("rescale")
    return {"ms": parts, "kernels": kernels}


def save_block(variant: str, path: Path) -> dict:
    """Build the block and save its state dict (what a checkpoint holds)."""
    from safetensors.torch import save_file

    block = build_block(variant, _mask_state(128), torch.Generator().manual_seed(0))
    save_file({name: tensor.contiguous() for name, tensor in block.state_dict().items()},
              str(path))
    params = sum(o * i * len(names) for names, (o, i) in BLOCK_GROUPS.items())
    sizes = memory_bytes(block, block_pattern="")  # every tensor is a block tensor
    return {"memory": sizes, "disk": sizes, "bf16_block_bytes": params * BF16_BYTES,
            "blocks_vs_bf16": sizes["blocks"] / (params * BF16_BYTES)}


def block_reload_memory(variant: str, path: str) -> dict:
    """Runs in a fresh process: empty modules in the saved block's layout (on meta, as the HF
    loader builds them), the saved tensors assigned in, two 128-token forwards; RSS."""
    from safetensors.torch import load_file

    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.method import StarQuantInputTransform, StarQuantLinear, scheme_args

    base_rss = _start_peak_rss()
    state = _mask_state(128)
    layers = {}
    for names, (out_features, in_features) in BLOCK_GROUPS.items():
        if variant in ("bf16", "fp32"):
            dtype = torch.bfloat16 if variant == "bf16" else torch.float32
            layers |= {name: torch.nn.Linear(in_features, out_features, bias=False,
                                             device="meta", dtype=dtype) for name in names}
            continue
        weight_args, act_args = scheme_args(variant)
        args = StarQuantArgs(scheme=variant)
        transform = StarQuantInputTransform.empty(
            in_features, args.exclusive_width(in_features), args.factors(in_features),
            act_args, state, args.tac_group_size if names == ("o_proj",) else None,
            dtype=torch.bfloat16)
        for index, name in enumerate(names):
            layers[name] = StarQuantLinear.empty(out_features, False, weight_args, transform,
                                                 owns_transform=index == 0,
                                                 dtype=torch.bfloat16)
    block = torch.nn.ModuleDict(layers)
    block.load_state_dict(load_file(path), assign=True)
    after_reload = _status_mib("VmRSS")
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    with torch.no_grad():
        for _ in range(2):
            _block_forward(block, *_block_inputs(128, dtype))
    return {"memory": memory_bytes(block, block_pattern=""),
            **_rss_report(base_rss, after_reload)}


# ---------------------------------------------------------------- the tiny models


def _canvas(vocab: int, mask_id: int, tokens: int) -> torch.Tensor:
    """One row, about half [MASK]: a mid-denoising canvas."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, tokens), generator=generator)
    return ids.masked_fill(torch.rand(ids.shape, generator=generator) < 0.5, mask_id)


def tiny_latency(paths: dict[str, str], tokens_list: tuple[int, ...], repeats: int) -> dict:
    """Runs in a fresh process: every checkpoint in ``paths`` ({"FP": original, scheme: dir})
    loaded in bf16 and in fp32, timed round-robin (quantized: reference and integer path)."""
    from transformers import AutoModelForCausalLM

    import starquant_plugin  # noqa: F401  (registers the quantizer)
    from starquant_plugin.models.families import mask_token_id

    models = {(name, dtype): AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
              for name, path in paths.items() for dtype in ("bfloat16", "float32")}
    result = {"threads": torch.get_num_threads(), "tokens": {}}
    for tokens in tokens_list:
        runs = {}
        for (name, dtype), model in models.items():
            ids = _canvas(model.config.vocab_size, mask_token_id(model), tokens)
            label = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
            if name == "FP":
                runs[label] = lambda model=model, ids=ids: model(ids)
                continue
            for path, enabled in (("reference", False), ("integer", True)):
                def run(model=model, ids=ids, enabled=enabled):
                    _set_integer_gemm(model, enabled)
                    model(ids)
                runs[f"{name} {path} ({label})"] = run
        load_before = _load()
        result["tokens"][tokens] = {"load_before": load_before, "latency": round_robin(
            runs, repeats), "load_after": _load()}
    return result


def tiny_reload_memory(path: str, tokens: int = 128) -> dict:
    """Runs in a fresh process: reload ``path`` in bf16, forwards; bytes and peak RSS."""
    from transformers import AutoModelForCausalLM

    import starquant_plugin  # noqa: F401  (registers the quantizer)
    from starquant_plugin.models.families import family_of, mask_token_id

    base_rss = _start_peak_rss()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    after_reload = _status_mib("VmRSS")
    with torch.no_grad():
        for _ in range(2):
            model(_canvas(model.config.vocab_size, mask_token_id(model), tokens))
    return {"memory": memory_bytes(model, family_of(model).block_pattern),
            **_rss_report(base_rss, after_reload)}


# ---------------------------------------------------------------- driver


def _subprocess(*args: str, threads: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run([sys.executable, __file__, *args, "--threads", str(threads)],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode:
        raise RuntimeError(f"measurement {args} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _calibration_rows(vocab: int, mask_id: int, n: int = 16, seq: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (n, seq), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, mask_id)


def _with_ratios(latency: dict) -> dict:
    """Add ``vs_bf16`` / ``vs_fp32`` to every timing of one (tokens, threads) measurement; a
    quantized run is compared with the FP run in its own load dtype and with both."""
    for timing in latency.values():
        timing["vs_bf16"] = timing["ms"] / latency["bf16"]["ms"]
        timing["vs_fp32"] = timing["ms"] / latency["fp32"]["ms"]
    return latency


def run_tiny(results: dict, schemes, tokens_list, threads_list, repeats, work_dir: Path) -> None:
    from transformers import AutoConfig

    from starquant_plugin.assets import TINY_MODELS
    from starquant_plugin.config import StarQuantArgs
    from starquant_plugin.integrations.saving import save_starquant
    from starquant_plugin.models.families import family_of, mask_token_id
    from starquant_plugin.models.loading import load_dllm
    from starquant_plugin.pipeline import quantize_dllm

    for family, original in TINY_MODELS.items():
        if not (original / "config.json").is_file():
            continue
        pattern = family_of(AutoConfig.from_pretrained(original)).block_pattern
        reference = disk_bytes(original, pattern)  # the bundled checkpoints are bf16
        paths = {"FP": str(original)}
        for scheme in schemes:
            model, tokenizer = load_dllm(original, dtype=torch.bfloat16)  # as shipped
            args = StarQuantArgs(scheme=scheme, epochs=1)
            quantize_dllm(model, _calibration_rows(model.config.vocab_size,
                                                   mask_token_id(model)), args, progress=False)
            paths[scheme] = str(save_starquant(model, work_dir / f"{family}-{scheme}",
                                               args=args, tokenizer=tokenizer, overwrite=True))
            del model
        sizes = {}
        for name, path in paths.items():
            row = {"disk": disk_bytes(Path(path), pattern),
                   **_subprocess("--reload-memory", path)}
            for where in ("disk", "memory"):
                row[f"{where}_blocks_vs_bf16"] = row[where]["blocks"] / reference["blocks"]
                row[f"{where}_whole_vs_bf16"] = row[where]["whole"] / reference["whole"]
            sizes[name] = row
        latency = {}
        for threads in threads_list:
            measured = _subprocess("--tiny-latency", json.dumps(paths), "--tokens",
                                   *map(str, tokens_list), "--repeats", str(repeats),
                                   threads=threads)
            for tokens, entry in measured["tokens"].items():
                _with_ratios(entry["latency"])
                latency[f"{tokens} tokens, {threads} thread(s)"] = entry
        results["models"][family] = {"bf16": reference, "sizes": sizes, "latency": latency}


def run_block(results: dict, schemes, tokens_list, threads_list, repeats, work_dir: Path
              ) -> None:
    sizes = {}
    for variant in ("bf16", "fp32", *schemes):
        path = work_dir / f"block-{variant}.safetensors"
        sizes[variant] = {**save_block(variant, path),
                          **_subprocess("--block-reload-memory", variant, str(path))}
        path.unlink()
    latency = {}
    for threads in threads_list:
        measured = _subprocess("--block-latency", ",".join(schemes), "--tokens",
                               *map(str, tokens_list), "--repeats", str(repeats),
                               threads=threads)
        for tokens, entry in measured["tokens"].items():
            _with_ratios(entry["latency"])
            latency[f"{tokens} tokens, {threads} thread(s)"] = entry
    results["block_d4096"] = {"sizes": sizes, "latency": latency}


def print_tables(results: dict) -> None:
    print(f"CPU: {results['cpu']}; torch {results['torch']}; integer kernel: "
          f"{results['kernel']}")
    header = (f"{'model':<13}{'setting':<24}{'variant':<28}{'ms':>10}{'x bf16':>8}{'x fp32':>8}"
              f"{'load':>12}")
    print("\n" + header)
    print("-" * len(header))
    entries = [("block d=4096", results.get("block_d4096", {}).get("latency", {}))]
    entries += [(family, entry["latency"]) for family, entry in results["models"].items()]
    for model, latency in entries:
        for setting, entry in latency.items():
            load = f"{entry['load_before']}->{entry['load_after']}"
            for variant, timing in entry["latency"].items():
                print(f"{model:<13}{setting:<24}{variant:<28}{timing['ms']:>10.1f}"
                      f"{timing['vs_bf16']:>8.2f}{timing['vs_fp32']:>8.2f}{load:>12}")
    block = results.get("block_d4096")
    if block:
        print("\nblock d=4096, integer path: ms per forward by part (median of timed calls)")
        for setting, entry in block["latency"].items():
            for scheme, split in entry["breakdown"].items():
                parts = split["ms"]
                path = "integer prepacked" if scheme.endswith(" prepacked") else "integer"
                measured = entry["latency"][f"{scheme.split()[0]} {path}"]["ms"]
                cells = "  ".join(f"{part} {ms:.0f}" for part, ms in parts.items())
                kernels = ",".join(sorted(set(split["kernels"].values())))
                print(f"  {setting:<24}{scheme:<16}{cells}  sum {sum(parts.values()):.0f}"
                      f"  (block forward {measured:.0f}; kernel {kernels})")
    print(f"\n{'model':<13}{'checkpoint':<12}{'disk blk/bf16':>14}{'mem blk/bf16':>13}"
          f"{'STaR MiB':>9}{'blk MiB':>9}{'+RSS reload':>12}{'+peak RSS':>10}{'peak RSS':>9}")
    rows = [(family, name, row) for family, entry in results["models"].items()
            for name, row in entry["sizes"].items()]
    rows += [("block d=4096", name, row) for name, row in block["sizes"].items()] if block \
        else []
    for model, name, row in rows:
        disk = row.get("disk_blocks_vs_bf16", row.get("blocks_vs_bf16"))
        memory = row.get("memory_blocks_vs_bf16", row.get("blocks_vs_bf16"))
        print(f"{model:<13}{name:<12}{disk:>14.3f}{memory:>13.3f}"
              f"{row['memory']['star'] / 2**20:>9.2f}{row['memory']['blocks'] / 2**20:>9.1f}"
              f"{row['rss_growth_reload_mib']:>12.0f}{row['peak_rss_growth_mib']:>10.0f}"
              f"{row['peak_rss_mib']:>9.0f}")
    print("blk = transformer-block tensors (linears incl. STaR tensors; norms excluded). RSS "
          "in MiB, in a fresh process: growth over the RSS after imports from the reload, and "
          "of the peak over reload + two 128-token forwards; peak RSS including imports.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/runtime.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=["W8A8", "W4A4"])
    parser.add_argument("--skip", nargs="*", default=[], choices=["tiny", "block"])
    parser.add_argument("--reload-memory", help=argparse.SUPPRESS)
    parser.add_argument("--tiny-latency", help=argparse.SUPPRESS)
    parser.add_argument("--block-latency", help=argparse.SUPPRESS)
    parser.add_argument("--block-reload-memory", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    torch.set_num_threads(options.threads[0])
    tokens, repeats = tuple(options.tokens), options.repeats
    if options.reload_memory:
        print(json.dumps(tiny_reload_memory(options.reload_memory)))
    elif options.tiny_latency:
        print(json.dumps(tiny_latency(json.loads(options.tiny_latency), tokens, repeats)))
    elif options.block_latency:
        print(json.dumps(block_latency(tuple(options.block_latency.split(",")), tokens,
                                       repeats)))
    elif options.block_reload_memory:
        print(json.dumps(block_reload_memory(*options.block_reload_memory)))
    else:
        from starquant_plugin.method.integer_gemm import int_mm_refusal

        refusal = int_mm_refusal(torch.device("cpu"), 128, BLOCK_D, BLOCK_D)
        results = {"cpu": os.popen("lscpu | grep 'Model name'").read().split(":")[-1].strip(),
                   "torch": torch.__version__,
                   "kernel": "int_mm" if refusal is None else f"float32 ({refusal[0]})",
                   "tokens": tokens, "threads": options.threads, "repeats": repeats,
                   "models": {}}
        with tempfile.TemporaryDirectory(prefix="starquant-bench-") as work_dir:
            if "tiny" not in options.skip:
                run_tiny(results, tuple(options.schemes), tokens, options.threads, repeats,
                         Path(work_dir))
            if "block" not in options.skip:
                run_block(results, tuple(options.schemes), tokens, options.threads, repeats,
                          Path(work_dir))
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=2))
        print_tables(results)
        print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
