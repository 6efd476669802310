"""Publish a STaR-Quant checkpoint on the Hugging Face Hub with a model card.

``push_to_hub`` validates the folder ``save_starquant`` wrote, plans the upload
(``plan_upload``: the files the checkpoint format defines, plus files named with ``include``;
everything else in the folder is listed and left out, so a token or notes file sitting beside
the checkpoint is never published), writes a ``README.md`` model card
(``huggingface_hub.ModelCard``) and uploads the planned files in one
``HfApi().create_commit``, reading them in place. ``dry_run_dir=`` writes copies of exactly
those files instead (copies, not links: editing them cannot edit the checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from starquant_plugin.integrations.checkpoint_model import check_checkpoint
from starquant_plugin.integrations.format import read_quantization_config, shard_files
from starquant_plugin.integrations.integrity import check_saved_checkpoint
from starquant_plugin.integrations.saving import CHECKPOINT_FILES
from starquant_plugin.messages import shown
from starquant_plugin.models.loading import read_json_object

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


@dataclass(frozen=True)
class Wording:
    """How the caller's user names what the upload's messages refer to: ``push_to_hub``'s
    arguments by default; ``starquant push`` passes ``CLI_WORDING``, its flags and commands,
    so no message tells a CLI user about a Python argument."""

    include: str = "include"
    dry_run_dir: str = "dry_run_dir"
    writer: str = "save_starquant"
    add_tokenizer: str = "Save with save_starquant(..., tokenizer=tokenizer)."
    add_recipe: str = ("Save with save_starquant(..., recipe=...) or copy the recipe into the "
                       "folder.")


CLI_WORDING = Wording(
    include="--include", dry_run_dir="--dry-run-dir", writer="starquant quantize",
    add_tokenizer="Copy the tokenizer files of the model it was quantized from into it "
    "(starquant quantize writes them).",
    add_recipe="Copy the recipe it was quantized with into it as recipe.yaml (starquant "
    "quantize writes it).")


def validate_folder(path: str | os.PathLike, wording: Wording = Wording()) -> dict[str, Any]:
    """Check ``path`` holds a complete STaR-Quant checkpoint; return its config.json.

    Needs config.json (a JSON object) with a ``starquant`` quantization_config, readable
    shards holding every STaR tensor, a tokenizer and the recipe.yaml it was quantized with.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{shown(path)} is not a directory; pass the folder "
                                f"{wording.writer} wrote.")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{shown(path)} has no config.json; pass the directory "
                                f"{wording.writer} wrote.")
    config = read_json_object(path / "config.json",
                               f"write the checkpoint again with {wording.writer}.")
    check_checkpoint(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{shown(path)} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); users cannot "
            f"run the model without it. {wording.add_tokenizer}"
        )
    if not (path / "recipe.yaml").is_file():
        raise FileNotFoundError(
            f"{shown(path)} has no recipe.yaml; the card must say how the model was "
            f"quantized. {wording.add_recipe}"
        )
    return config


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _quantized_from(path: Path) -> str | None:
    """The MODEL ``starquant quantize`` read, from its report beside the checkpoint."""
    report = path / "quantization_report.json"
    try:
        model = json.loads(report.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) else None


def _read_quality(path: Path) -> dict[str, dict[str, Any]] | None:
    file = path / QUALITY_FILE
    if not file.is_file():
        return None
    fix = "it must be {row: {metric: value}}; fix or delete it."
    quality = read_json_object(file, fix)
    if not all(isinstance(row, dict) for row in quality.values()):
        raise ValueError(f"{shown(file)} has a row that is not an object; {fix}")
    return quality


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
                     base_model: str | None = None, wording: Wording = Wording()
                     ) -> ModelCard:
    """The model card of the checkpoint at ``path`` (validated first)."""
    path = Path(path)
    config = validate_folder(path, wording)
    quantization_config = read_quantization_config(path)
    block = quantization_config["starquant"]
    args = block["args"]
    if quality is None:
        quality = _read_quality(path)
    source = base_model or config.get("_name_or_path") or _quantized_from(path)
    base_model = source if source and _HUB_ID.match(source) else None  # the card's metadata
    card_data = ModelCardData(
        base_model=base_model, library_name="transformers", license="apache-2.0",
        pipeline_tag="text-generation",
        tags=["starquant", "compressed-tensors", "quantized", "diffusion-llm", args["scheme"],
              block["family"]],
    )
    recipe = (path / "recipe.yaml").read_text(encoding="utf-8").strip()
    source_text = f"`{source}`" + ("" if base_model else " (a local model)") if source \
        else "unknown"
    kv_source = ("" if args.get("kv_bits") is not None
                 else f" (the {args['scheme']} default: `kv_bits` is null in the arguments)")
    body = f"""
# {repo_id.split('/')[-1]}

{block['family']} diffusion LM quantized to **{args['scheme']}** with STaR-Quant
(state-gated activation transforms + temporal attention compensation), base model
{source_text}. Weights are stored in compressed-tensors'
`{quantization_config['format']}` layout; the STaR tensors (`sgat_*`, `tac_*`) of each group of
linears that share an input sit under its first linear's `input_transform.` and are described
by the `starquant` block (version {block['version']}) of `config.json`.
K/V cache bits: {block['kv_bits']}{kv_source}.

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


# what is uploaded


README = "README.md"
"""The generated model card; a README.md in the folder is left out (the card replaces it)."""

Includes = Sequence[str | os.PathLike]
"""Extra files to upload: paths inside the checkpoint folder, relative to it."""


@dataclass(frozen=True)
class UploadPlan:
    """What ``push_to_hub`` uploads from a checkpoint ``folder`` and what it leaves there.

    files: paths relative to ``folder`` (POSIX), uploaded under the same path; the generated
        README.md card comes on top.
    left_out: ``(name, why)`` for every other entry of ``folder``, so the user sees it.
    """

    folder: Path
    files: tuple[str, ...]
    left_out: tuple[tuple[str, str], ...]

    def sizes(self) -> dict[str, int]:
        """``{file: bytes}`` of the planned files."""
        return {name: (self.folder / name).stat().st_size for name in self.files}


def _outside(folder: Path, name: str) -> str | None:
    """Why ``folder/name`` is not a file inside ``folder`` once links are followed, with the
    fix; None when it is inside."""
    file = folder / name
    real = file.resolve()
    if real.is_relative_to(folder.resolve()):
        return None
    if file.is_symlink():
        return (f"is a symlink to {shown(os.readlink(file))}, outside the folder, and push "
                "uploads only files inside it; remove the link, or push a copy of the folder "
                "with links resolved (cp -rL)")
    return (f"resolves to {shown(real)}, outside the folder, and push uploads only files "
            "inside it; a shard index must name shards beside it")


def _included_name(folder: Path, name: str | os.PathLike, option: str) -> str:
    """``name`` (relative to ``folder``, or a path inside it) as a path relative to
    ``folder``; refuses one outside it, a missing file, a folder and the card's name."""
    lexical = Path(os.path.normpath(folder.absolute() / name))
    if not lexical.is_relative_to(folder.absolute()) or lexical == folder.absolute():
        raise ValueError(f"{option} {shown(name)} is not inside {shown(folder)}; name a file "
                         "inside the checkpoint folder, relative to it (e.g. notes.md).")
    relative = lexical.relative_to(folder.absolute()).as_posix()
    if relative == README:
        raise ValueError(f"{option} {README} would replace the generated model card; drop it "
                         "(edit the card on the Hub after pushing if you need to).")
    if not lexical.exists() and not lexical.is_symlink():
        raise FileNotFoundError(f"{option} {shown(name)}: {shown(lexical)} does not exist; "
                                "name a file inside the checkpoint folder.")
    if lexical.is_dir():
        raise ValueError(f"{option} {shown(name)} is a directory; name the files in it one "
                         "by one.")
    return relative


def plan_upload(path: str | os.PathLike, include: Includes = (),
                wording: Wording = Wording()) -> UploadPlan:
    """The upload of the checkpoint at ``path``: the files the format defines (the shards
    and their index, ``CHECKPOINT_FILES`` that exist) plus ``include`` (files inside
    ``path``). A planned file that leaves the folder (a symlink to, or a shard index
    naming, a file outside it) is refused: it could publish anything the user can read.
    """
    folder = Path(path)
    defined = [name for name in CHECKPOINT_FILES
               if (folder / name).is_file() or (folder / name).is_symlink()]
    defined += [os.path.relpath(file, folder) for file in shard_files(folder)]
    planned = dict.fromkeys(Path(name).as_posix() for name in defined)
    planned.update(dict.fromkeys(_included_name(folder, name, wording.include)
                                 for name in include))
    for name in planned:
        why = _outside(folder, name)
        if why is not None:
            raise ValueError(f"{shown(folder / name)} {why}.")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{shown(folder / name)} is not a file; the checkpoint "
                                    f"is incomplete. Write it again with {wording.writer}.")
    top_level = {name.split("/")[0] for name in planned}
    left_out = []
    for entry in sorted(folder.iterdir()):
        if entry.name in top_level:
            continue
        if entry.name == README:
            why = "replaced by the generated model card"
        elif _outside(folder, entry.name) is not None:
            why = "a link to a path outside the folder"
        elif entry.is_dir():
            why = "a folder, not part of the checkpoint"
        else:
            why = "not part of the checkpoint"
        left_out.append((entry.name + ("/" if entry.is_dir() else ""), why))
    return UploadPlan(folder, tuple(sorted(planned)), tuple(left_out))


def _check_dry_run_dir(dry_run_dir: Path, folder: Path, option: str) -> None:
    if dry_run_dir.resolve().is_relative_to(folder.resolve()):
        raise ValueError(f"{option} {shown(dry_run_dir)} is inside the checkpoint folder "
                         f"{shown(folder)}, which must not change; pass a directory outside "
                         "it.")
    if dry_run_dir.exists() and (not dry_run_dir.is_dir() or any(dry_run_dir.iterdir())):
        raise FileExistsError(f"{option} {shown(dry_run_dir)} is not an empty directory; "
                              "pass an empty or new directory so it shows exactly what would "
                              "be uploaded.")


def prepare_upload(
    path: str | os.PathLike,
    repo_id: str,
    *,
    quality: dict[str, dict[str, Any]] | None = None,
    base_model: str | None = None,
    include: Includes = (),
    wording: Wording = Wording(),
) -> tuple[UploadPlan, ModelCard]:
    """Validate the checkpoint at ``path`` (``validate_folder``, the plan's links, then every
    file against its manifest: ``integrity.check_saved_checkpoint``), write its card and plan
    the upload; nothing is written or sent. ``quality``: ``{row: {metric: value}}``; default
    ``path/quality.json``; ``wording``: how the messages name the arguments."""
    card = build_model_card(path, repo_id, quality=quality, base_model=base_model,
                            wording=wording)
    plan = plan_upload(path, include, wording)
    check_saved_checkpoint(path)
    return plan, card


def stage_upload(plan: UploadPlan, card: ModelCard, stage_dir: str | os.PathLike,
                 wording: Wording = Wording()) -> Path:
    """Copy the planned files and write README.md into ``stage_dir`` (empty or new, outside
    the checkpoint): copies, never links, so editing them cannot edit the checkpoint."""
    stage_dir = Path(stage_dir)
    _check_dry_run_dir(stage_dir, plan.folder, wording.dry_run_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    for name in plan.files:
        (stage_dir / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.folder / name, stage_dir / name)
    card.save(stage_dir / README)
    return stage_dir


def upload(plan: UploadPlan, card: ModelCard, repo_id: str, *, private: bool = False,
           token: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload the planned files (read in place) and the card
    in one commit; returns the commit URL."""
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.folder / name))
                  for name in plan.files]
    operations.append(CommitOperationAdd(path_in_repo=README,
                                         path_or_fileobj=str(card).encode("utf-8")))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model",
                               token=token, commit_message="Upload STaR-Quant checkpoint")
    return str(getattr(commit, "commit_url", commit))


def push_to_hub(
    path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run_dir: str | os.PathLike | None = None,
    token: str | None = None,
    quality: dict[str, dict[str, Any]] | None = None,
    base_model: str | None = None,
    include: Includes = (),
) -> str:
    """Upload the checkpoint at ``path`` to ``repo_id`` with a generated model card.

    Uploads ``plan_upload(path, include)`` plus README.md in one commit. ``quality``:
    ``{row: {metric: value}}``; default ``path/quality.json`` if present. With
    ``dry_run_dir`` nothing is uploaded: copies of exactly the upload are written there (it
    must be empty or new, outside ``path``) and its path returned. Otherwise returns the URL
    of the upload commit.
    """
    plan, card = prepare_upload(path, repo_id, quality=quality, base_model=base_model,
                                include=include)
    if dry_run_dir is not None:
        return str(stage_upload(plan, card, dry_run_dir))
    return upload(plan, card, repo_id, private=private, token=token)
