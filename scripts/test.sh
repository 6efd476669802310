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
ruff check .
python -m pytest -p no:cacheprovider -q "$@"
