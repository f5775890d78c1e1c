#!/usr/bin/env bash
# The main job end to end on the embedded default: generate a synthetic cohort, train every LDAE stage,
# then evaluate (probes, reconstructions, interpolation, manipulation) and write the report.
# Usage: bash scripts/quickstart.sh [WORKDIR]   (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-runs/quickstart}"
python3 -m pip install -q -r requirements.txt
python3 train.py --config configs/quickstart.py --workdir "$WORKDIR"
python3 evaluate.py --config configs/quickstart.py --workdir "$WORKDIR" --mode report
echo "Outputs: $WORKDIR (report: $WORKDIR/report/report.md)"
