"""STaRQuantModifier on a model bigger than the device: loaded the way llm-compressor users
load one (compressed-tensors' ``load_offloaded_model`` with ``device_map="auto_offload"``), so
the sequential pipeline onloads one decoder block at a time. Here no weight fits the memory
budget, so every weight lives on disk; the result must be the same model, tensor for tensor,
as the run without offloading, and its checkpoint must reload to the same logits."""

import hashlib
from pathlib import Path

import pytest
import torch
from compressed_tensors.offload import load_offloaded_model
from compressed_tensors.offload.cache import DiskCache
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from starquant_plugin.assets import TINY_MODELS
from starquant_plugin.method import StarQuantLinear
from starquant_plugin.models.families import decoder_blocks, family_of
from tests.integrations.reload_in_fresh_process import record_expected, reload_in_fresh_process
from tests.integrations.test_llmcompressor import RECIPE
from tests.integrations.tiny_oneshot import calibration_dataset, run_oneshot, tiny_model

FAMILIES = ("llada", "dream")
ROWS = 4  # one calibration batch: the offloaded run reads every block from disk anyway
MEMORY_BUDGET = {"cpu": "1MB"}  # less than the embedding: accelerate puts every weight on disk
# Dream keeps its attention output projection in 16 bit: the V rotation folded into it must
# reach the disk copy (it is not replaced by a quantized linear built from the onloaded one).
RECIPES = {"llada": RECIPE,
           "dream": RECIPE + "      ignore: ['re:.*o_proj$', 'lm_head']\n"}


def load_disk_offloaded(family: str, offload_dir: Path):
    """What a user with a model bigger than the device writes (a real one omits max_memory:
    ``auto_offload`` fills the CPU RAM and sends the rest to ``offload_folder``)."""
    with load_offloaded_model():
        return AutoModelForCausalLM.from_pretrained(
            TINY_MODELS[family], dtype=torch.float32, device_map="auto_offload",
            max_memory=MEMORY_BUDGET, offload_folder=str(offload_dir))


def checkpoint_digest(family: str) -> str:
    """Hash of the bundled weights, which the disk cache symlinks to and must never write."""
    digest = hashlib.sha256()
    for file in sorted(Path(TINY_MODELS[family]).glob("*.safetensors")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def block_linears(model) -> list[torch.nn.Module]:
    family = family_of(model)
    return [block.get_submodule(name) for block in decoder_blocks(model, family)
            for group in family.linear_groups for name in group]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Per family: oneshot on the disk-offloaded model and on the plain one (same recipe, rows
    and seed), both saved with save_pretrained; then one fresh process reloads the offloaded
    run's checkpoint and compares it with the plain model's logits and generation."""
    root = tmp_path_factory.mktemp("offloaded")
    runs, entries = {}, []
    for family in FAMILIES:
        digest = checkpoint_digest(family)
        offloaded = load_disk_offloaded(family, root / f"{family}-offload")
        before = block_linears(offloaded)
        assert all(isinstance(m._parameters, DiskCache) for m in before), "not on disk"
        reads = [0]
        original_onload = DiskCache.onload

        def counting_onload(self, offloaded_tensor, _reads=reads, _onload=original_onload):
            _reads[0] += 1
            return _onload(self, offloaded_tensor)

        plain, tokenizer = tiny_model(family)
        dataset = calibration_dataset(plain, tokenizer, rows=ROWS)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DiskCache, "onload", counting_onload)
            run_oneshot(offloaded, dataset, RECIPES[family])
        run_oneshot(plain, dataset, RECIPES[family])
        for model, name in ((offloaded, "offloaded"), (plain, "plain")):
            model.save_pretrained(root / f"{family}-{name}")
        entries.append({"checkpoint": str(root / f"{family}-offloaded"),
                        **record_expected(plain, root / f"{family}-expected.safetensors")})
        runs[family] = {"offloaded": offloaded, "plain": plain, "disk_reads": reads[0],
                        "root": root, "bundled_unchanged": checkpoint_digest(family) == digest,
                        "before": len(before), "quantized": sum(
                            isinstance(m, StarQuantLinear) for m in offloaded.modules())}
    for family, outcome in zip(FAMILIES, reload_in_fresh_process(entries, root), strict=True):
        runs[family]["reload"] = outcome
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_oneshot_on_a_disk_offloaded_model_gives_the_same_model(runs, family):
    run = runs[family]
    offloaded, plain = run["offloaded"], run["plain"]
    assert run["disk_reads"] >= run["before"]  # the blocks were read from disk while fitted
    quantized = [m for m in block_linears(offloaded) if isinstance(m, StarQuantLinear)]
    assert len(quantized) == run["before"] - (4 if family == "dream" else 0)
    # The quantized linears went back to disk like the linears they replaced.
    assert all(isinstance(m._buffers, DiskCache) for m in quantized)
    assert run["bundled_unchanged"]
    got, expected = offloaded.state_dict(), plain.state_dict()
    assert list(got) == list(expected)
    unequal = [name for name in expected if not torch.equal(got[name], expected[name])]
    assert not unequal, f"tensors differ from the run without offloading: {unequal[:5]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_the_offloaded_run_saves_the_same_checkpoint_and_reloads(runs, family):
    run = runs[family]
    saved = load_file(run["root"] / f"{family}-offloaded" / "model.safetensors")
    reference = load_file(run["root"] / f"{family}-plain" / "model.safetensors")
    assert sorted(saved) == sorted(reference)
    assert all(torch.equal(saved[name], reference[name]) for name in reference)
    reload = run["reload"]
    assert reload["quantized_linears"] == run["quantized"]
    assert reload["max_abs_logit_diff"] == 0.0 and reload["same_generation"]
