#!/usr/bin/env bash
# Installs the requirements (if missing) and runs the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
export JAX_PLATFORMS=cpu
python3 -m pytest -q "$@"
