"""The checkpoint format: integer storage that reproduces the fake quantizer bit for bit,
compressed-tensors' names and formats, atomic saves, and decompression by compressed-tensors
0.17 (set STARQUANT_CT017_PYTHON to a venv's python holding it) as by 0.19."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from safetensors import safe_open
from safetensors.torch import save_file

from starquant_plugin.config import StarQuantArgs
from starquant_plugin.integrations.format import (
    attach_quantization_config,
    read_quantization_config,
    validate_config,
)
from starquant_plugin.integrations.saving import save_starquant
from starquant_plugin.method import (
    StarQuantInputTransform,
    StarQuantLinear,
    fake_quantize_weight,
    scheme_args,
    static_sgat,
)
from starquant_plugin.method.quantizers import is_nvfp4, nvfp4_global_scale
from starquant_plugin.method.runtime import (
    MaskState,
    compressed_weight_layout,
    weight_qparams,
    weight_scheme,
)
from starquant_plugin.pipeline import quantize_dllm
from tests.models.tiny import MASK_ID, tiny_dream, tiny_llada

SCRIPT = Path(__file__).resolve().parents[1] / "compat" / "read_with_ct017.py"

ARGS = {
    "int4 channel": scheme_args("W4A4")[0],
    "int8 channel": scheme_args("W8A8")[0],
    "fp8 channel": scheme_args("W8A8-FP8")[0],
    "mxfp4 group": scheme_args("W4A4-MXFP4")[0],
    "nvfp4 tensor_group": scheme_args("W4A4-NVFP4")[0],
    "int4 asym group": QuantizationArgs(num_bits=4, symmetric=False, strategy="group",
                                        group_size=16),
    "int8 asym channel": QuantizationArgs(num_bits=8, symmetric=False, strategy="channel"),
}


def calibration_rows(seed: int = 0) -> torch.LongTensor:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 60, (8, 32), generator=generator)
    return rows.masked_fill(torch.rand(rows.shape, generator=generator) < 0.5, MASK_ID)


def _identity_transform(weight: torch.Tensor) -> StarQuantInputTransform:
    return StarQuantInputTransform(static_sgat(weight, scheme_args("W4A4")[0]),
                                   scheme_args("W4A4")[1], MaskState())


def _layer(weight: torch.Tensor, args: QuantizationArgs, clip: torch.Tensor) -> StarQuantLinear:
    global_scale = nvfp4_global_scale(weight) if is_nvfp4(args) else None
    scale, zero_point = weight_qparams(weight, args, clip, global_scale)
    return StarQuantLinear(
        fake_quantize_weight(weight, args, clip, global_scale), None,
        _identity_transform(weight), weight_args=args, weight_scale=scale,
        weight_zero_point=zero_point, weight_global_scale=global_scale)


@pytest.mark.parametrize("name", sorted(ARGS))
def test_stored_codes_dequantize_to_exactly_the_fake_quantized_weight(name):
    args = ARGS[name]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator) * torch.rand(48, 1, generator=generator)
    clip = 0.7 + 0.3 * torch.rand(48, generator=generator)
    layer = _layer(weight, args, clip)
    assert torch.equal(layer.dequantized_weight(), fake_quantize_weight(weight, args, clip))
    layout = compressed_weight_layout(48, 64, args, torch.float32)
    stored = layer.compressed_weight()
    assert {n: (tuple(t.shape), t.dtype) for n, t in stored.items()} == layout


def test_4bit_is_packed_by_compressed_tensors_and_8bit_is_int8():
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    packed = _layer(weight, ARGS["int4 channel"], torch.ones(24))
    assert packed.weight_packed.dtype == torch.int32 and packed.weight_packed.shape == (24, 8)
    assert packed.weight.dtype == torch.float32  # 4 bit: .weight reads the dequantized weight
    scheme = weight_scheme(ARGS["int4 channel"])
    reference = BaseCompressor.get_value_from_registry("pack-quantized").compress(
        {"weight": packed.weight, "weight_scale": packed.weight_scale}, scheme)
    assert torch.equal(reference["weight_packed"], packed.weight_packed)
    int8 = _layer(weight, ARGS["int8 channel"], torch.ones(24))
    assert int8.weight.dtype == torch.int8 and int8.weight.abs().max() == 127


def test_bf16_scale_keeps_the_codes_of_the_float32_fake_quantized_weight():
    """Scales are stored in the model's dtype: a bf16 scale re-grids the fake-quantized
    weight to the same integer codes (only the scale is rounded)."""
    weight = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    args = ARGS["int8 channel"]
    scale, _ = weight_qparams(weight, args)
    weight_q = fake_quantize_weight(weight, args)
    layer = StarQuantLinear(weight_q, None, _identity_transform(weight), weight_args=args,
                            weight_scale=scale.bfloat16())
    assert layer.weight_scale.dtype == torch.bfloat16
    assert torch.equal(layer.weight.float(), torch.round(weight_q / scale))


def test_gptq_weights_are_stored_as_packed_codes():
    model = tiny_llada()
    quantize_dllm(model, calibration_rows(), StarQuantArgs(scheme="W4A8", epochs=1,
                                                           weight_quantizer="gptq"),
                  progress=False)
    assert all(m.weight_format == "pack-quantized" for m in model.modules()
               if isinstance(m, StarQuantLinear))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A W4A4 tiny LLaDA, its args and a saved checkpoint with a recipe."""
    model = tiny_llada()
    args = StarQuantArgs(scheme="W4A4", epochs=1)
    quantize_dllm(model, calibration_rows(), args, progress=False)
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save_starquant(model, path, args=args, recipe="stage:\n  mods: {}\n")
    return model, args, path


def test_config_has_explicit_format_groups_ignore_and_versioned_block(saved):
    model, args, path = saved
    config = read_quantization_config(path)
    assert config["quant_method"] == "starquant" and config["format"] == "pack-quantized"
    assert config["ignore"] == ["model.transformer.ff_out"]
    ct = QuantizationConfig.model_validate({k: v for k, v in config.items()
                                            if k not in ("quant_method", "starquant")})
    assert ct.config_groups["group_0"].weights.num_bits == 4
    block = config["starquant"]
    assert block["version"] == 2 and StarQuantArgs(**block["args"]) == args
    assert block["mask_token_id"] == MASK_ID and block["kv_bits"] == 4
    prefix = "model.transformer.blocks.0."
    groups = {tuple(g["linears"]): g for g in block["input_groups"]}
    assert len(groups) == 8  # 2 blocks x (q/k/v, attn_out, ff_proj/up_proj, ff_out)
    qkv = groups[tuple(prefix + n for n in ("q_proj", "k_proj", "v_proj"))]
    d = model.config.d_model
    assert qkv["in_features"] == d and qkv["exclusive_width"] == args.exclusive_width(d)
    assert qkv["factors"] == list(args.factors(d)) and qkv["tac_group_size"] is None
    assert groups[(prefix + "attn_out",)]["tac_group_size"] == args.tac_group_size
    assert set(block["tensors"]) >= {"sgat_exclusive", "sgat_left", "sgat_right",
                                     "sgat_channel_scale", "sgat_act_clip", "tac_matrices",
                                     "tac_bias"}
    assert validate_config(config)[0].args == args
    assert block["k_rotation"] == "hadamard"  # the default at W4A4
    del block["k_rotation"], block["args"]["kv_rotation"]  # written before kv_rotation existed
    assert validate_config(config)[0].k_rotation is None  # loads as no rotation
    block["k_rotation"] = "givens"
    with pytest.raises(ValueError, match="k_rotation"):
        validate_config(config)
    assert (path / "recipe.yaml").read_text().startswith("stage:")
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert {prefix + "q_proj.weight_packed", prefix + "q_proj.weight_shape",
            prefix + "q_proj.weight_scale", prefix + "q_proj.input_transform.sgat_left",
            prefix + "q_proj.input_transform.sgat_exclusive",
            prefix + "attn_out.input_transform.tac_matrices"} <= keys
    assert prefix + "q_proj.weight" not in keys
    assert not any(k.startswith(prefix + "k_proj.input_transform") for k in keys)  # stored once


def test_checkpoint_files_get_the_modes_open_gives_under_the_umask(saved):
    """safetensors writes 0600; the saved folder follows the umask like every other file."""
    _, _, path = saved
    assert {oct(f.stat().st_mode & 0o777) for f in path.iterdir()} == {
        oct(0o666 & ~_umask())}
    assert path.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_existing_model_dir_is_refused_and_left_untouched(saved, tmp_path):
    model, args, path = saved
    before = {f.name: f.read_bytes() for f in path.iterdir()}
    with pytest.raises(FileExistsError, match="already holds a model.*overwrite=True"):
        save_starquant(model, path, args=args)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_the_old_checkpoint_and_no_temp_dir(saved, monkeypatch):
    model, args, path = saved
    before = {f.name: f.read_bytes() for f in path.iterdir()}

    def broken_tokenizer_save(directory):
        raise OSError("disk full")

    tokenizer = type("Tokenizer", (), {"save_pretrained": staticmethod(broken_tokenizer_save)})
    with pytest.raises(OSError, match="disk full"):
        save_starquant(model, path, args=args, tokenizer=tokenizer, overwrite=True)
    assert {f.name: f.read_bytes() for f in path.iterdir()} == before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_and_plain_save_pretrained_writes_the_same_config(saved, tmp_path):
    model, args, path = saved
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    save_starquant(model, target, args=args, overwrite=True)
    assert read_quantization_config(target) == read_quantization_config(path)
    attach_quantization_config(model, args)
    model.save_pretrained(tmp_path / "plain")
    assert read_quantization_config(tmp_path / "plain") == read_quantization_config(path)


def _expected_weights(model, path: Path) -> Path:
    expected = {name: m.dequantized_weight().contiguous() for name, m in model.named_modules()
                if isinstance(m, StarQuantLinear)}
    file = path.parent / f"{path.name}-expected.safetensors"
    save_file(expected, file)
    return file


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, saved):
    """(checkpoint, expected weights) for pack-quantized (W4A4 LLaDA), int-quantized
    (W8A8 Dream), float-quantized (W8A8-FP8 LLaDA), mxfp4-pack-quantized (Dream) and
    nvfp4-pack-quantized (LLaDA)."""
    model, _, path = saved
    found = [(path, _expected_weights(model, path))]
    for make, scheme in ((tiny_dream, "W8A8"), (tiny_llada, "W8A8-FP8"),
                         (tiny_dream, "W4A4-MXFP4"), (tiny_llada, "W4A4-NVFP4")):
        other = make()
        args = StarQuantArgs(scheme=scheme, epochs=1)
        quantize_dllm(other, calibration_rows(), args, progress=False)
        other_path = save_starquant(other, tmp_path_factory.mktemp(scheme) / "ckpt", args=args)
        found.append((other_path, _expected_weights(other, other_path)))
    return found


def _run_script(python: str, checkpoint: Path, expected: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([python, str(SCRIPT), str(checkpoint), str(expected)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_compat_script_passes_with_the_current_compressed_tensors(checkpoints, tmp_path):
    for checkpoint, expected in checkpoints:
        result = _run_script(sys.executable, checkpoint, expected)
        assert result.returncode == 0, result.stderr
    wrong = {name: tensor + 1 for name, tensor in
             safe_open_dict(checkpoints[0][1]).items()}
    save_file(wrong, tmp_path / "wrong.safetensors")
    result = _run_script(sys.executable, checkpoints[0][0], tmp_path / "wrong.safetensors")
    assert result.returncode == 1 and "differs" in result.stderr


def safe_open_dict(file: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(file), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.skipif(not os.environ.get("STARQUANT_CT017_PYTHON"),
                    reason="set STARQUANT_CT017_PYTHON to a python with compressed-tensors 0.17")
def test_compressed_tensors_017_decompresses_the_same_weights(checkpoints):
    python = os.environ["STARQUANT_CT017_PYTHON"]
    version = subprocess.run([python, "-c", "import compressed_tensors as c; print(c.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("0.17"), f"{python} has compressed-tensors {version}, not 0.17"
    for checkpoint, expected in checkpoints:
        result = _run_script(python, checkpoint, expected)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "compressed-tensors 0.17" in result.stdout
        assert json.loads((checkpoint / "config.json").read_text())["quantization_config"]


def test_llmcompressor_wrapped_save_pretrained_writes_a_loadable_checkpoint(tmp_path):
    """What users run after oneshot: llm-compressor's save_pretrained(save_compressed=True)
    finds no compressed-tensors scheme and keeps the attached starquant config."""
    pytest.importorskip("llmcompressor")
    from llmcompressor.transformers.compression.compressed_tensors_utils import (
        modify_save_pretrained,
    )
    from transformers import AutoModelForCausalLM

    model = tiny_dream()
    args = StarQuantArgs(scheme="W4A8", epochs=1)
    quantize_dllm(model, calibration_rows(), args, progress=False)
    ids = calibration_rows(5)
    expected = model(ids).logits
    attach_quantization_config(model, args)
    modify_save_pretrained(model)
    model.save_pretrained(tmp_path / "lc", save_compressed=True)
    assert read_quantization_config(tmp_path / "lc")["format"] == "pack-quantized"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lc", dtype=torch.float32)
    assert torch.equal(loaded(ids).logits, expected)
