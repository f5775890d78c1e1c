"""Where a traced step's time goes: a jax.profiler trace summed by kind of XLA operation.

Reads the newest `*.trace.json.gz` under FOLDER (what `--config.profile_steps=N` writes into
`DIR/<stage>/profile/process_<i>/`, or any `jax.profiler.trace` folder) and prints, per traced step and summed
over the threads that ran them, the time of each kind of operation: a fusion's name without its number
(`ynn_fusion` for the convolutions XLA's CPU backend hands to YNNPACK, `transpose_copy_fusion`, `all-reduce`,
...), busiest first.
Runtime bookkeeping events (thunk executor, Python frames, waits for completion) are left out.

  python train.py --config configs/quickstart.py --workdir W --config.stage=ldm \
      --config.train.ldm.steps=8 --config.profile_steps=5
  python benchmarks/trace_summary.py W/ldm/profile/process_0 --steps 5 --top 20
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

_BOOKKEEPING = re.compile(r"^(\$|ThunkExecutor|PjitFunction|CommonPjRt|Wait for|.*Execute)")


def summarise(trace_file: pathlib.Path) -> tuple[dict[str, float], dict[str, int], int]:
  """(microseconds by operation kind, calls by kind, number of threads that ran operations); times and calls
  are summed over threads (a CPU device's operations may run on several of the runtime's threads)."""
  events = json.load(gzip.open(trace_file))["traceEvents"]
  time_by_kind: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  threads = set()
  for e in events:
    if e.get("ph") != "X" or _BOOKKEEPING.match(e["name"]):
      continue
    kind = re.sub(r"\.\d+$", "", e["name"])
    time_by_kind[kind] += e["dur"]
    calls[kind] += 1
    threads.add((e.get("pid"), e.get("tid")))
  return dict(time_by_kind), dict(calls), max(1, len(threads))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("folder", type=pathlib.Path, help="folder holding a jax.profiler trace (searched recursively)")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (config.profile_steps)")
  p.add_argument("--top", type=int, default=25, help="kinds printed")
  args = p.parse_args()
  if args.steps < 1:
    p.error(f"--steps {args.steps}: give the number of traced steps, >= 1")
  files = sorted(args.folder.glob("**/*.trace.json.gz"))
  if not files:
    p.error(f"{args.folder}: no *.trace.json.gz below it; run with --config.profile_steps=N first")
  times, calls, threads = summarise(files[-1])
  per = args.steps
  total = sum(times.values()) / per
  print(f"{files[-1]}: {args.steps} step(s); {total / 1e3:.1f} ms of operations per step, summed over the "
        f"{threads} threads that ran them")
  for kind, us in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {us / per / 1e3:9.2f} ms  {100 * us / per / total:5.1f} %  x{calls[kind] / per:7.1f}  {kind}")


if __name__ == "__main__":
  main()
