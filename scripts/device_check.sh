#!/usr/bin/env bash
# One device check (issue 25): an LLaDA-8B-shaped model (random weights) through
# `starquant quantize` (W4A4, W8A8), reload and, where STARQUANT_VLLM_PYTHON names a vLLM
# environment, vLLM; one table of calibration s/block, peak memory, bytes, step time, tokens/s
# against bf16 and the GEMM kernel per scheme. On a CUDA GPU at the 8B widths; without CUDA the
# CPU mode at reduced sizes (about a minute). Options: benchmarks/device_check.py --help.
#   scripts/device_check.sh --json device-check.json
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${STARQUANT_PYTHON:-$root/.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" "$root/benchmarks/device_check.py" "$@"
