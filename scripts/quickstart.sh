#!/usr/bin/env bash
# The main job end to end on the embedded default: generate a synthetic cohort, train every LDAE stage,
# then evaluate (probes, reconstructions, interpolation, manipulation) and write the report.
# Usage: bash scripts/quickstart.sh [WORKDIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/quickstart}"
python3 -m pip install -q -r requirements.txt
# A run killed by a signal (an XLA:CPU abort, an out-of-memory kill) resumes once from its newest checkpoint,
# data position included; a user error (exit status 2) does not.
status=0
python3 train.py --config configs/quickstart.py --workdir "$WORKDIR" || status=$?
if [[ $status -ge 128 ]]; then
  echo "train.py was killed (exit status $status); resuming it once from its newest checkpoint" >&2
  python3 train.py --config configs/quickstart.py --workdir "$WORKDIR"
elif [[ $status -ne 0 ]]; then
  exit "$status"
fi
python3 evaluate.py --config configs/quickstart.py --workdir "$WORKDIR" --mode report
echo "Outputs: $WORKDIR (report: $WORKDIR/report/report.md)"
