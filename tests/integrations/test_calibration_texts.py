"""Calibration text sources: a file, a local dataset file with a chosen column; each bad
source names the fix; each reads only as much text as the rows need."""

import json
import os

import pytest

from starquant_plugin.integrations.calibration_texts import (
    DatasetSource,
    calibration_char_budget,
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
    (tmp_path / "corpus").mkdir()
    with pytest.raises(ValueError, match="corpus is a directory, not a text file"):
        read_text_file(tmp_path / "corpus")


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd")
def test_a_pipe_or_a_device_is_read_not_called_missing():
    """``--calib-text <(zcat corpus.gz)`` passes /dev/fd/N, a pipe: it exists and is read."""
    with pytest.raises(ValueError, match="is empty"):
        read_text_file(os.devnull)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"Prose through a pipe.\n")
    os.close(write_fd)
    try:
        assert read_text_file(f"/dev/fd/{read_fd}") == ["Prose through a pipe.\n"]
    finally:
        os.close(read_fd)


def test_text_file_is_read_only_as_far_as_the_rows_need(tmp_path):
    # one 10 MB line ending in bytes that are not UTF-8: reading past the budget would fail
    path = tmp_path / "one-line.txt"
    path.write_bytes(b"word " * 2_000_000 + b"\xff\xfe")
    budget = calibration_char_budget(num_samples=4, seq_len=32)
    (text,) = read_text_file(path, max_chars=budget)
    assert len(text) == budget and text.startswith("word word")
    (tmp_path / "padded.txt").write_text(" \n" * 5000 + "prose after blank lines")
    (text,) = read_text_file(tmp_path / "padded.txt", max_chars=100)
    assert "prose" in text and len(text) <= 100


def test_long_paths_are_cut_short_in_messages(tmp_path):
    path = tmp_path.joinpath(*["deep" * 20] * 40, "calib.txt")
    with pytest.raises(FileNotFoundError) as error:
        read_text_file(path)
    assert len(str(error.value)) < 250 and str(error.value).endswith(
        "does not exist; pass a UTF-8 text file.")


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


def test_one_huge_dataset_row_is_cut_to_the_budget(tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "word " * 200_000}) + "\n")
    (text,) = load_dataset_texts(DatasetSource(str(path)), max_chars=500)
    assert len(text) == 500
