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

With `--hlo FILE`, the compiled step's optimised HLO text (run train.py with `XLA_FLAGS="--xla_dump_to=D
--xla_dump_hlo_as_text"` and the compilation cache off, then pass D's `*jit_step*after_optimizations.txt`), the
YNNPACK fusions are split by what they compute: forward, input-gradient and weight-gradient convolutions (a
weight gradient's window spans the feature map and its output is the kernel), and dots.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

_BOOKKEEPING = re.compile(r"^(\$|ThunkExecutor|PjitFunction|CommonPjRt|Wait for|.*Execute)")


def summarise(trace_file: pathlib.Path, roles: dict[str, str] | None = None
              ) -> tuple[dict[str, float], dict[str, int], int]:
  """(microseconds by operation kind, calls by kind, number of threads that ran operations); times and calls
  are summed over threads (a CPU device's operations may run on several of the runtime's threads). `roles`
  (from `ynn_roles`) names the kind of the operations it lists."""
  events = json.load(gzip.open(trace_file))["traceEvents"]
  time_by_kind: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  threads = set()
  for e in events:
    if e.get("ph") != "X" or _BOOKKEEPING.match(e["name"]):
      continue
    kind = (roles or {}).get(e["name"]) or re.sub(r"\.\d+$", "", e["name"])
    time_by_kind[kind] += e["dur"]
    calls[kind] += 1
    threads.add((e.get("pid"), e.get("tid")))
  return dict(time_by_kind), dict(calls), max(1, len(threads))


_FUSION = re.compile(r"^\s*(?:ROOT )?%(ynn_fusion[.\d]*) = [^\n]*?calls=%([\w.\-]+)([^\n]*)$", re.M)


def ynn_roles(hlo_text: str) -> dict[str, str]:
  """YNNPACK fusion name -> 'ynn: forward conv' | 'ynn: input-gradient conv' | 'ynn: weight-gradient conv' |
  'ynn: dot' | 'ynn: other', from the optimised HLO of the traced program."""
  roles = {}
  for name, comp, rest in _FUSION.findall(hlo_text):
    body = re.search(r"^%" + re.escape(comp) + r" .*?^}", hlo_text, re.M | re.S)
    body = body.group(0) if body else ""
    conv = re.search(r"= \w+\[([\d,]*)\][^\n]*convolution\([^\n]*window=\{size=([\dx]+)", body)
    if conv:
      out_spatial = [int(d) for d in conv.group(1).split(",")[1:-1]]
      window = [int(d) for d in conv.group(2).split("x")]
      if window > out_spatial:  # the window spans the feature map: the kernel's gradient
        roles[name] = "ynn: weight-gradient conv"
      else:
        roles[name] = "ynn: input-gradient conv" if "transpose(" in rest + body else "ynn: forward conv"
    else:
      roles[name] = "ynn: dot" if " dot(" in body else "ynn: other"
  return roles


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("folder", type=pathlib.Path, help="folder holding a jax.profiler trace (searched recursively)")
  p.add_argument("--steps", type=int, default=1, help="steps in the trace (config.profile_steps)")
  p.add_argument("--top", type=int, default=25, help="kinds printed")
  p.add_argument("--hlo", type=pathlib.Path, default=None,
                 help="optimised HLO text of the traced step: splits the YNNPACK fusions by what they compute")
  args = p.parse_args()
  if args.steps < 1:
    p.error(f"--steps {args.steps}: give the number of traced steps, >= 1")
  files = sorted(args.folder.glob("**/*.trace.json.gz"))
  if not files:
    p.error(f"{args.folder}: no *.trace.json.gz below it; run with --config.profile_steps=N first")
  if args.hlo is not None and not args.hlo.is_file():
    p.error(f"--hlo {args.hlo}: no such file; give the *after_optimizations.txt of the traced step")
  times, calls, threads = summarise(files[-1], ynn_roles(args.hlo.read_text()) if args.hlo else None)
  per = args.steps
  total = sum(times.values()) / per
  print(f"{files[-1]}: {args.steps} step(s); {total / 1e3:.1f} ms of operations per step, summed over the "
        f"{threads} threads that ran them")
  for kind, us in sorted(times.items(), key=lambda kv: -kv[1])[:args.top]:
    print(f"  {us / per / 1e3:9.2f} ms  {100 * us / per / total:5.1f} %  x{calls[kind] / per:7.1f}  {kind}")


if __name__ == "__main__":
  main()
