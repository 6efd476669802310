"""Publish a STaR-Quant checkpoint on the Hugging Face Hub with a model card.

``push_to_hub`` validates the folder ``save_starquant`` wrote, writes a ``README.md`` model card
(``huggingface_hub.ModelCard``), and uploads with ``HfApi().create_repo`` + ``upload_folder``;
``dry_run_dir=`` writes exactly the files that would be uploaded instead.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

from starquant_plugin.integrations.format import check_checkpoint, read_quantization_config

QUALITY_FILE = "quality.json"
"""Optional ``{row: {metric: value}}`` beside the checkpoint, rendered as the quality table."""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
CITATION = """@article{starquant2026,
  title   = {STaR-Quant: State-Time Consistent Post-Training Quantization for Diffusion Large
             Language Models},
  journal = {arXiv preprint arXiv:2606.04945},
  year    = {2026},
  url     = {https://arxiv.org/abs/2606.04945}
}"""


def validate_folder(path: str | os.PathLike) -> dict[str, Any]:
    """Check ``path`` holds a complete STaR-Quant checkpoint; return its config.json.

    Needs config.json with a ``starquant`` quantization_config, readable shards holding every
    STaR tensor, a tokenizer and the recipe.yaml it was quantized with.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; pass the folder save_starquant "
                                "wrote.")
    check_checkpoint(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); users cannot run the "
            "model without it. Save with save_starquant(..., tokenizer=tokenizer)."
        )
    if not (path / "recipe.yaml").is_file():
        raise FileNotFoundError(
            f"{path} has no recipe.yaml; the card must say how the model was quantized. Save "
            "with save_starquant(..., recipe=...) or copy the recipe into the folder."
        )
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def _quality_table(quality: dict[str, dict[str, Any]] | None) -> str:
    if not quality:
        return "_No quality measurements were supplied with this checkpoint._"
    metrics = sorted({metric for row in quality.values() for metric in row})
    lines = ["| model | " + " | ".join(metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for name, row in quality.items():
        cells = [row.get(metric, "") for metric in metrics]
        lines.append(f"| {name} | " + " | ".join(
            f"{c:.4g}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def build_model_card(path: str | os.PathLike, repo_id: str,
                     quality: dict[str, dict[str, Any]] | None = None,
                     base_model: str | None = None) -> ModelCard:
    """The model card of the checkpoint at ``path`` (validated first)."""
    path = Path(path)
    config = validate_folder(path)
    quantization_config = read_quantization_config(path)
    block = quantization_config["starquant"]
    args = block["args"]
    if quality is None and (path / QUALITY_FILE).is_file():
        quality = json.loads((path / QUALITY_FILE).read_text(encoding="utf-8"))
    base_model = base_model or config.get("_name_or_path") or None
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["starquant", "compressed-tensors", "quantized", "diffusion-llm", args["scheme"],
              block["family"]],
    )
    recipe = (path / "recipe.yaml").read_text(encoding="utf-8").strip()
    body = f"""
# {repo_id.split('/')[-1]}

{block['family']} diffusion LM quantized to **{args['scheme']}** with STaR-Quant
(state-gated activation transforms + temporal attention compensation), base model
`{base_model or 'unknown'}`. Weights are stored in compressed-tensors'
`{quantization_config['format']}` layout; the STaR tensors (`sgat_*`, `tac_*`) of each group of
linears that share an input sit under its first linear's `input_transform.` and are described
by the `starquant` block (version {block['version']}) of `config.json`.
K/V cache bits: {block['kv_bits']}.

## Quality

{_quality_table(quality)}

## Size

Checkpoint shards: {_size_mb(path):.1f} MiB.

## How to load

transformers (the plugin registers the `starquant` quantization method on import):

```python
import starquant_plugin  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
```

vLLM: install `starquant-plugin[serve]` (CPU) or `vllm` plus `starquant-plugin` (GPU) in the
serving environment; vLLM loads the plugin through its entry point, and the checkpoint serves
with `LLM("{repo_id}", runner="pooling", enforce_eager=True)` and the plugin's denoising driver
(`starquant_plugin.integrations.vllm.driver.denoise`; call its `shutdown(llm)` when done).

Without the plugin, transformers does not know `model_type` LLaDA/Dream nor `quant_method:
starquant` and stops with an error, so always `import starquant_plugin` first.

## Method and recipe

STaR-Quant arguments: `{json.dumps(args, sort_keys=True)}`

```yaml
{recipe}
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")


def _stage(path: Path, card: ModelCard, stage_dir: Path) -> None:
    """Put the checkpoint's files and README.md into ``stage_dir`` (hard links when possible)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    for file in sorted(path.iterdir()):
        if file.is_file() and not file.name.startswith(".") and file.name != "README.md":
            try:
                os.link(file, stage_dir / file.name)
            except OSError:
                shutil.copy2(file, stage_dir / file.name)
    card.save(stage_dir / "README.md")


def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run_dir: str | os.PathLike | None = None,
    token: str | None = None,
    quality: dict[str, dict[str, Any]] | None = None,
    base_model: str | None = None,
) -> str:
    """Upload the checkpoint at ``path`` to ``repo_id`` with a generated model card.

    ``quality``: ``{row: {metric: value}}``; default ``path/quality.json`` if present.
    With ``dry_run_dir`` nothing is uploaded: the exact upload (checkpoint files + README.md)
    is written there (it must be empty or new) and its path returned. Otherwise returns the
    URL of the upload commit.
    """
    path = Path(path)
    card = build_model_card(path, repo_id, quality=quality, base_model=base_model)
    if dry_run_dir is not None:
        dry_run_dir = Path(dry_run_dir)
        if dry_run_dir.exists() and any(dry_run_dir.iterdir()):
            raise FileExistsError(f"dry_run_dir {dry_run_dir} is not empty; pass an empty or "
                                  "new directory so it shows exactly what would be uploaded.")
        _stage(path, card, dry_run_dir)
        return str(dry_run_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    with tempfile.TemporaryDirectory(prefix="starquant-upload-", dir=path.parent) as stage:
        _stage(path, card, Path(stage))
        commit = api.upload_folder(repo_id=repo_id, folder_path=stage, repo_type="model",
                                   token=token, commit_message="Upload STaR-Quant checkpoint")
    return str(getattr(commit, "commit_url", commit))
