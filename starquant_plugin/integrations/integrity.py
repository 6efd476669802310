"""What files make up a STaR-Quant checkpoint, and a sha256 manifest that proves they are the
ones ``save_starquant`` wrote.

The digests live in their own small JSON file, ``starquant_manifest.json``, beside the
checkpoint, not inside config.json or the shards' safetensors headers: a digest cannot cover
the file that holds it, and the shards are written by transformers' ``save_pretrained``, whose
headers we would have to rewrite. The manifest is written into the same temporary folder as
everything else and renamed into place with it, so the files and their digests appear together
or not at all. It is listed in ``CHECKPOINT_FILES`` so an overwrite replaces it and an upload
publishes it (a downloaded copy can be verified too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MANIFEST_FILE = "starquant_manifest.json"
MANIFEST_VERSION = 1

CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors.index.json", "recipe.yaml",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
    "chat_template.json", "quantization_report.json", "quality.json", MANIFEST_FILE,
)
"""Files a checkpoint folder holds (besides ``*.safetensors``): the model's, the tokenizer's,
the recipe, its manifest, and what ``starquant quantize``/``demo`` put beside them (the run's
report, the quality numbers the Hub card shows). ``overwrite=True`` replaces a folder only when
it holds nothing else."""

DESCRIPTIVE_FILES = ("quantization_report.json", "quality.json", "README.md")
"""Files that describe a checkpoint but are read by no loader: one added after the save (e.g.
``starquant demo`` scores the model and then writes quality.json, the Hub adds README.md) is
listed by ``verify_checkpoint`` but does not fail it."""

_LOADED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".py")
"""Suffixes of files a loader may pick up when they appear in the folder (weights, remote
code): one that is not in the manifest fails the check."""


def is_checkpoint_file(path: Path) -> bool:
    return path.is_file() and (path.name in CHECKPOINT_FILES or path.suffix == ".safetensors")


def _is_loaded(name: str) -> bool:
    return (name in CHECKPOINT_FILES and name not in DESCRIPTIVE_FILES) or name.endswith(
        _LOADED_SUFFIXES)


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _listed_files(folder: Path) -> list[Path]:
    """The files a manifest covers: every file of the folder (links followed: a Hub cache
    snapshot links to its blobs) except itself and hidden ones (``.gitattributes`` of a Hub
    download, editors' swap files)."""
    return sorted(path for path in folder.iterdir() if path.is_file()
                  and path.name != MANIFEST_FILE and not path.name.startswith("."))


def write_manifest(folder: str | os.PathLike) -> Path:
    """Write ``folder/starquant_manifest.json``: ``{"version", "algorithm", "files": {name:
    {"sha256", "bytes"}}}`` for every file in ``folder``; called by ``save_starquant`` on its
    temporary folder, after every file is written and checked, before the rename."""
    folder = Path(folder)
    files = {path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}
             for path in _listed_files(folder)}
    manifest = {"version": MANIFEST_VERSION, "algorithm": "sha256", "files": files}
    path = folder / MANIFEST_FILE
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class IntegrityReport:
    """How a checkpoint folder compares with its manifest. ``changed``: files whose bytes
    differ; ``missing``: listed but absent; ``added``: not listed, and a loader may read them;
    ``extra``: not listed, read by no loader (notes, a Hub README). ``manifest_found`` False:
    nothing could be checked (a folder saved before manifests, or not by ``save_starquant``)."""

    path: Path
    manifest_found: bool
    checked: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.manifest_found and not (self.changed or self.missing or self.added)

    def problems(self) -> str:
        """``changed model.safetensors; missing tokenizer.json`` (empty when ok)."""
        parts = [f"{what} {', '.join(names)}" for what, names in (
            ("changed", self.changed), ("missing", self.missing), ("added", self.added))
            if names]
        return "; ".join(parts)


def _read_manifest(path: Path) -> dict[str, dict]:
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        version, algorithm = manifest["version"], manifest["algorithm"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{manifest_path} is not a starquant manifest ({type(error).__name__}: {error}); "
            "the checkpoint cannot be verified. Re-download it or save it again with "
            "save_starquant."
        ) from error
    if version != MANIFEST_VERSION or algorithm != "sha256" or not isinstance(files, dict):
        raise ValueError(
            f"{manifest_path} has version {version!r} and algorithm {algorithm!r}; this "
            f"starquant reads version {MANIFEST_VERSION} with sha256. Upgrade starquant-plugin "
            "or save the checkpoint again."
        )
    return files


def verify_checkpoint(path: str | os.PathLike) -> IntegrityReport:
    """Compare every file of the checkpoint folder ``path`` with its manifest (size first,
    then sha256). Raises ``NotADirectoryError`` for a path that is not a folder and
    ``ValueError`` for an unreadable manifest; everything else is in the report.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text("{}")
    >>> _ = write_manifest(folder)
    >>> verify_checkpoint(folder).ok
    True
    >>> _ = (folder / "config.json").write_text("{ }")
    >>> verify_checkpoint(folder).problems()
    'changed config.json'
    """
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory; pass the checkpoint folder "
                                 "save_starquant wrote.")
    if not (path / MANIFEST_FILE).is_file():
        return IntegrityReport(path, manifest_found=False)
    listed = _read_manifest(path)
    present = {file.name: file for file in _listed_files(path)}
    changed = []
    for name, entry in sorted(listed.items()):
        file = present.get(name)
        if file is not None and (file.stat().st_size != entry.get("bytes")
                                 or file_sha256(file) != entry.get("sha256")):
            changed.append(name)
    unlisted = sorted(set(present) - set(listed))
    return IntegrityReport(
        path, manifest_found=True, checked=len(listed), changed=changed,
        missing=sorted(set(listed) - set(present)),
        added=[name for name in unlisted if _is_loaded(name)],
        extra=[name for name in unlisted if not _is_loaded(name)])


def _is_starquant_checkpoint(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    quantization_config = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quantization_config, dict) and (
        quantization_config.get("quant_method") == "starquant")


def check_saved_checkpoint(path: str | os.PathLike) -> IntegrityReport | None:
    """The checks a command runs on a local folder before it reads it (``eval``, ``push``,
    ``verify``): an interrupted replace is explained (and raised when it left the folder
    missing), then every file is checked against the manifest. Raises ``ValueError`` naming
    each changed, missing or added file. Returns None for a path that is not a local folder (a
    Hub id, a bundled model's name): there is nothing on disk to check. A STaR-Quant checkpoint
    without a manifest is let through with a warning (saved before manifests existed)."""
    from starquant_plugin.integrations.output_dirs import explain_interrupted_replace

    path = Path(path)
    explain_interrupted_replace(path)
    if not path.is_dir():
        return None
    report = verify_checkpoint(path)
    if not report.manifest_found:
        if _is_starquant_checkpoint(path):
            logger.warning("%s has no %s (saved by an older starquant-plugin), so its files "
                           "could not be verified; save it again to add one.", path,
                           MANIFEST_FILE)
        return report
    if not report.ok:
        raise ValueError(
            f"{path} does not match its {MANIFEST_FILE}: {report.problems()}; these files are "
            "not the ones save_starquant wrote. Download or save the checkpoint again (`starquant "
            f"verify {path}` lists every file)."
        )
    return report
