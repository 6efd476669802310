"""``scripts/device_check.sh`` runs end to end as a user runs it, in its CPU mode.

At the top level beside ``test_readme.py``: the check is a script (``scripts/``) driving
``benchmarks/device_check.py``, neither of them in the package that ``tests/`` mirrors. The
CUDA mode needs a GPU and is not run here; this is the same code at reduced sizes (about a
minute on a 2-core CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.run_cli import OFFLINE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.sh"
KERNELS = {"int_mm", "onednn", "float32", "onednn prepacked"}


@pytest.mark.slow
def test_cpu_mode_quantizes_reloads_and_times_both_schemes(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "STARQUANT_VLLM_PYTHON"}
    env |= OFFLINE | {"STARQUANT_PYTHON": sys.executable}
    out = tmp_path / "check.json"
    result = subprocess.run([str(SCRIPT), "--device", "cpu", "--json", str(out)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CPU mode" in result.stdout and "random" in result.stdout
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu" and report["device"]
    assert report["model"]["n_layers"] == 2 and report["model"]["d_model"] == 256
    assert "STARQUANT_VLLM_PYTHON is not set" in report["vllm"]

    schemes = report["schemes"]
    assert list(schemes) == ["bf16", "W4A4", "W8A8"]
    for name, entry in schemes.items():
        reload = entry["reload"]
        assert reload["logits_finite"], name
        assert reload["step_ms"] > 0 and reload["tokens_per_s"] > 0, name
        assert reload["memory_bytes"]["whole"] > 0 and "vllm" not in entry
        assert f"| {name} |" in report["table"] and f"| {name} |" in result.stdout
        if name == "bf16":
            assert reload["gemm"] == ["dense"] and "quantize" not in entry
            continue
        quantize = entry["quantize"]
        assert quantize["calibration_s_per_block"] > 0 and quantize["peak_memory_mib"] > 0
        assert 0 < quantize["fit_s_per_block"] <= quantize["calibration_s_per_block"]
        assert quantize["calibration_device"] == "cpu"
        assert set(reload["gemm"]) <= KERNELS, reload["gemm"]
        assert reload["step_vs_bf16"] > 0 and reload["tokens_per_s_vs_bf16"] > 0
    for part in ("whole", "blocks"):
        sizes = [schemes[name]["disk_bytes"][part] for name in ("W4A4", "W8A8", "bf16")]
        assert sizes == sorted(sizes) and len(set(sizes)) == 3, (part, sizes)
    assert schemes["W4A4"]["disk_bytes"]["star"] > 0
