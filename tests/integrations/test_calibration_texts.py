"""Calibration text sources: a file, a local dataset file with a chosen column; each bad
source names the fix."""

import json

import pytest

from starquant_plugin.integrations.calibration_texts import (
    DatasetSource,
    load_dataset_texts,
    read_text_file,
)


def test_text_file_is_one_document_and_bad_files_are_named(tmp_path):
    (tmp_path / "a.txt").write_text("Some prose.\n")
    assert read_text_file(tmp_path / "a.txt") == ["Some prose.\n"]
    (tmp_path / "empty.txt").write_text(" \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        read_text_file(tmp_path / "empty.txt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text_file(tmp_path / "binary.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text_file(tmp_path / "missing.txt")


def test_local_dataset_file_column_and_character_budget(tmp_path):
    path = tmp_path / "wino.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"Sentence number {i}.", "label": i})
                            + "\n" for i in range(50)))
    texts = load_dataset_texts(DatasetSource(str(path), column="sentence"), max_chars=60)
    assert 3 <= len(texts) <= 4 and all(t.startswith("Sentence number") for t in texts)
    assert texts != load_dataset_texts(DatasetSource(str(path), column="sentence"), 60, seed=1)
    with pytest.raises(ValueError, match=r"no 'text'; pass --calib-column"):
        load_dataset_texts(DatasetSource(str(path)), max_chars=60)
    (tmp_path / "data.xml").write_text("<a/>")
    with pytest.raises(ValueError, match="suffix '.xml'"):
        load_dataset_texts(DatasetSource(str(tmp_path / "data.xml")), max_chars=60)
