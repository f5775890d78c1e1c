#!/usr/bin/env bash
# The whole method in one device call (issue 14): generate the synthetic cohort on every CPU core, train every
# stage, evaluate (--mode report), and keep only the small outputs, with each stage's wall time.
#
# Usage: bash scripts/gpu_run.sh [CONFIG_SPEC] [WORKDIR] [--config.a.b=v ...]
#   CONFIG_SPEC  default configs/gpu.py; configs/gpu.py:tiny is the CPU dry run
#   WORKDIR      default /tmp/ldae_gpu (checkpoints, shards and the cohort stay there)
#   overrides    passed to train.py and evaluate.py alike (e.g. --config.train.ldm.steps=800)
# Outputs: $OUT (the device tool's folder) or WORKDIR/out when OUT is unset: run.log, timings.json and
# outputs.tar.gz (report.md/json, code_use.json, probes.json, the PNG figures, every stage's metrics.jsonl and
# summary.json, config.json, splits.json, cohort.json; never checkpoints): 3 files, within the device's 8.
# Python packages missing from the machine's image are installed from ./wheels (carried with the call; see
# benchmarks/RESULTS.md, "GPU end-to-end run"); nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
SPEC="${1:-configs/gpu.py}"
WORK="${2:-/tmp/ldae_gpu}"
OVERRIDES=("${@:3}")
DEST="${OUT:-$WORK/out}"
mkdir -p "$WORK" "$DEST"
export PYTHONUNBUFFERED=1

main() {
# Every import the pipeline makes that the CUDA image may lack (the image's list: .library/device/KINDS.md).
NEEDED="grain, array_record, nibabel, ml_collections, portpicker, nilearn, tensorboardX"
if ! python3 -c "import $NEEDED" 2>/dev/null; then
  if ! compgen -G "wheels/*.whl" >/dev/null; then
    echo "error: python3 lacks one of: $NEEDED, and there is no wheels/*.whl to install them from" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ldae_site \
    wheels/*.whl
  export PYTHONPATH="/tmp/ldae_site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import $NEEDED"
fi
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
nproc

TIMES="$WORK/stage_times.tsv"
: > "$TIMES"
timed() {  # timed NAME CMD...: runs CMD, appends "NAME<TAB>seconds" to $TIMES
  local name="$1" t0 ns sec
  shift
  echo "=== $name: $*"
  t0=$(date +%s%N)
  "$@"
  ns=$(( $(date +%s%N) - t0 ))
  sec=$(printf '%d.%03d' $(( ns / 1000000000 )) $(( ns / 1000000 % 1000 )))
  printf '%s\t%s\n' "$name" "$sec" >> "$TIMES"
  echo "=== $name done in $sec s"
}

# The cohort alone first, so that its time is its own; train.py then finds it in WORKDIR/cohort (and checks
# that it matches the config).
timed cohort python3 -c "
import sys
from ldae_jax.config import load_config
from ldae_jax.training import volumes
print(volumes.manifest_path(load_config(sys.argv[1]), sys.argv[2]))" "$SPEC" "$WORK"
timed train python3 train.py --config "$SPEC" --workdir "$WORK" "${OVERRIDES[@]}"
timed evaluate python3 evaluate.py --config "$SPEC" --workdir "$WORK" --mode report "${OVERRIDES[@]}"

python3 - "$WORK" "$DEST" <<'EOF'
import json, pathlib, sys, tarfile
from ldae_jax import workdir as layout
work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wd = layout.Workdir(work)
walls = dict(line.split("\t") for line in (work / "stage_times.tsv").read_text().splitlines())
out = {"script_wall_seconds": {k: float(v) for k, v in walls.items()}, "stages": {}}
for stage in layout.STAGES:
  s = json.loads(wd.summary(stage).read_text())
  out["stages"][stage] = {k: s.get(k) for k in ("steps", "wall_seconds", "compile_seconds", "samples_per_s",
                                                 "final_loss", "heldout", "scale_factor")}
(dest / "timings.json").write_text(json.dumps(out, indent=1))
files = [p for p in [wd.config_json, wd.splits_json, wd.cohort_json] if p.is_file()]
files += [p for st in layout.STAGES for p in (wd.summary(st), wd.metrics(st)) if p.is_file()]
rep = wd.report
files += [rep / n for n in ("report.md", "report.json", "code_use.json", "probes.json") if (rep / n).is_file()]
files += sorted(rep.glob("*.png"))
with tarfile.open(dest / "outputs.tar.gz", "w:gz") as tar:
  for p in files:
    tar.add(p, arcname=str(p.relative_to(work)))
size = (dest / "outputs.tar.gz").stat().st_size
print(f"outputs.tar.gz: {len(files)} files, {size / 2**20:.2f} MiB")
if size >= 16 * 2**20:
  sys.exit("outputs.tar.gz is over the device's 16 MiB per file")
print(json.dumps(out, indent=1))
EOF
echo "report: $WORK/report/report.md; small outputs: $DEST"
}

# A pipeline (not `exec > >(tee)`) so that tee has written the whole log before the script exits; the log is
# in $DEST as it goes, so it comes back even if the call is cut short.
main 2>&1 | tee -a "$DEST/run.log"
