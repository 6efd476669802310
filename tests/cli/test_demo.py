"""``starquant demo --out DIR`` keeps its checkpoints (ready for eval and push), and its
stdout holds the tables, not llm-compressor's log lines."""

from tests.cli.run_cli import assert_user_error, starquant


def test_demo_keeps_checkpoints_and_prints_readable_tables(tmp_path):
    result = starquant("demo", "--out", "demo", "--samples", 8, "--rows", 8, "--epochs", 0,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("tiny LLaDA (") and "W4A4" in lines[0]
    assert lines[2].startswith("| model | ce@0.15 |")
    assert [line.split(" |")[0] for line in lines[4:7]] == ["| FP", "| RTN", "| STaR-Quant"]
    assert not any(" | INFO" in line or "WARNING" in line or "get_main_device" in line
                   for line in lines)
    for name in ("rtn", "starquant"):
        files = {p.name for p in (tmp_path / "demo" / name).iterdir()}
        assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json",
                "quality.json"} <= files
    assert "checkpoints kept" in result.stdout


def test_occupied_out_is_refused_before_any_work(tmp_path):
    (tmp_path / "demo" / "rtn").mkdir(parents=True)
    (tmp_path / "demo" / "rtn" / "config.json").write_text("{}")
    result = starquant("demo", "--out", "demo", cwd=tmp_path)
    line = assert_user_error(result, "already holds", "Choose an empty or new directory")
    assert "overwrite" not in line  # demo has no such option
    assert "quantizing" not in result.stderr
