#!/usr/bin/env bash
# Installs the requirements (if missing) and runs the whole test suite on CPU.
# The suite is mostly XLA compilation, which runs on about one core per process: pytest-xdist runs one worker
# per core (at most 8; LDAE_TEST_WORKERS overrides, 0 = serial), each test file whole on one worker so that its
# module fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements.txt
export JAX_PLATFORMS=cpu
workers="${LDAE_TEST_WORKERS:-$(python3 -c 'import os; n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(); print(min(n or 1, 8))')}"
if [[ "$workers" -gt 1 ]]; then
  python3 -m pytest -q -n "$workers" --dist loadfile "$@"
else
  python3 -m pytest -q "$@"
fi
