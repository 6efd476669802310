"""Where calibration text comes from: a text file, a ``datasets`` dataset, or the paper's
WinoGrande recipe. Returns plain strings for ``dllm_calibration_dataset``.

Each source fails with one line naming the fix: an empty or missing file, a directory, a
dataset that is neither cached nor downloadable (offline runs read only the local Hugging Face
cache), a column that does not exist. Each reads only as much text as the rows need
(``calibration_char_budget``): a 10 MB one-line file is not tokenized whole for 32 rows.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from starquant_plugin.messages import shown

CHARS_PER_TOKEN = 8
"""Generous characters per token when deciding how much dataset text to read: enough for the
requested rows on any BPE vocabulary without tokenizing a whole dataset."""


_LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                   ".txt": "text"}


@dataclass(frozen=True)
class DatasetSource:
    """A ``datasets.load_dataset(path, name, split=split)`` call and its text column. ``path``
    may also be a local .json/.jsonl/.csv/.parquet/.txt file (``text`` column for .txt)."""

    path: str
    name: str | None = None
    split: str = "train"
    column: str = "text"

    def describe(self) -> str:
        config = f", config {self.name}" if self.name else ""
        return f"{self.path}{config}, split {self.split}, column {self.column!r}"


WINOGRANDE = DatasetSource("allenai/winogrande", "winogrande_xl", "train", "sentence")
"""The paper's calibration set: WinoGrande-XL training sentences."""


def read_text_file(path: str | os.PathLike, max_chars: int | None = None,
                   what: str = "Calibration text file") -> list[str]:
    """The file's text as one document, at most ``max_chars`` characters of it (read that far
    and no further; leading whitespace does not count); refuses a missing file, a directory,
    non-UTF-8 or empty text. ``what`` names the file in messages."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {shown(path)} is a directory, not a text file; pass a "
                         "UTF-8 text file.")
    if not path.exists():  # not is_file(): a pipe (--calib-text <(zcat corpus.gz)) is read
        raise FileNotFoundError(f"{what} {shown(path)} does not exist; pass a UTF-8 text "
                                "file.")
    try:
        with path.open(encoding="utf-8") as handle:
            text = handle.read(max_chars if max_chars is not None else -1)
            while max_chars is not None and text and not text.strip():
                text = handle.read(max_chars)  # whitespace before the prose: skip it
    except UnicodeDecodeError as error:
        raise ValueError(f"{what} {shown(path)} is not UTF-8 text ({error.reason}); pass a "
                         "plain UTF-8 text file.") from None
    if not text.strip():
        raise ValueError(f"{what} {shown(path)} is empty; put text in it (rows are cut from "
                         "its tokens: the more, the better).")
    return [text]


def _offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_dataset_texts(source: DatasetSource, max_chars: int, seed: int = 0) -> list[str]:
    """Texts of ``source.column``, shuffled with ``seed``, until ``max_chars`` characters (a
    single text longer than that is cut to it)."""
    import datasets

    local = Path(source.path)
    try:
        if local.is_file():
            builder = _LOCAL_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise ValueError(f"{shown(local)} has suffix {shown(local.suffix)!r}; a "
                                 "local calibration dataset must be one of "
                                 f"{sorted(_LOCAL_BUILDERS)}.")
            dataset = datasets.load_dataset(builder, data_files=str(local), split="train")
        else:
            dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    except (ConnectionError, OSError) as error:
        where = ("the Hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)" if _offline()
                 else "it could not be downloaded")
        raise FileNotFoundError(
            f"Calibration dataset {shown(source.describe())} is not in the local Hugging Face "
            f"cache and {where}; run once with network access to cache it, or pass "
            f"--calib-text FILE. ({' '.join(str(error).split())[:200]})"
        ) from error
    if source.column not in dataset.column_names:
        raise ValueError(f"Calibration dataset {shown(source.describe())} has columns "
                         f"{shown(dataset.column_names)}, no {shown(source.column)!r}; pass "
                         "--calib-column.")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    texts, total = [], 0
    for index in order:
        text = dataset[index][source.column]
        if isinstance(text, str) and text.strip():
            texts.append(text[:max_chars])  # one huge row is cut, not tokenized whole
            total += len(texts[-1])
            if total >= max_chars:
                break
    if not texts:
        raise ValueError(f"Calibration dataset {shown(source.describe())} holds no text; "
                         "pick another column or dataset.")
    return texts


def calibration_char_budget(num_samples: int, seq_len: int) -> int:
    """Characters to read for ``num_samples`` rows of ``seq_len`` tokens (with margin)."""
    return num_samples * seq_len * CHARS_PER_TOKEN
