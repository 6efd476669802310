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
python -m pip install --quiet -e ".[compress,dev]"
ruff check .
python -m pytest -p no:cacheprovider -q "$@"
