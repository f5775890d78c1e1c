"""The step loop shared by the trained stages: data, checkpoints, progress bar, metrics and the summary.

A stage supplies a compiled step `(state, batch) -> (state, metrics)` and an iterator; this module does the
bookkeeping identically for all of them: resume from the newest checkpoint (state and iterator position),
log metrics as JSONL and TensorBoard events, show a tqdm bar with loss and samples/s (on a terminal; a plain
line every `log_every` steps elsewhere), checkpoint every `checkpoint_every` steps and at the end, and write
`summary.json` last, atomically, so that its presence means "stage complete".
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from ldae_jax import progress
from ldae_jax.data import atomic
from ldae_jax import workdir as layout
from ldae_jax.training.checkpoint import Checkpointer

PyTree = Any
SUMMARY = layout.SUMMARY  # the file names inside a stage folder are the layout's (ldae_jax.workdir)


def is_complete(stage_dir: str | os.PathLike) -> bool:
  return (pathlib.Path(stage_dir) / SUMMARY).exists()


class MetricsWriter:
  """Appends `{"step": s, ...}` lines to metrics.jsonl and scalars to TensorBoard (process 0 only).

  On resume, lines with a step beyond the restored checkpoint (logged after it, before the interruption)
  are dropped first, so the file reads as one uninterrupted run.
  """

  def __init__(self, stage_dir: str | os.PathLike, *, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = pathlib.Path(stage_dir) / layout.METRICS
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._truncate(resume_step)
    from tensorboardX import SummaryWriter  # heavy import, only where used
    self._tb = SummaryWriter(str(pathlib.Path(stage_dir) / layout.EVENTS))

  def _truncate(self, resume_step: int) -> None:
    if not self.path.exists():
      return
    keep = []
    for line in self.path.read_text().splitlines():
      try:
        if json.loads(line).get("step", 0) <= resume_step:
          keep.append(line)
      except json.JSONDecodeError:
        pass  # a line cut by a crash
    self.path.write_text("".join(l + "\n" for l in keep))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(stage_dir: str | os.PathLike) -> list[dict[str, float]]:
  path = pathlib.Path(stage_dir) / layout.METRICS
  return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def _progress(total: int, initial: int, desc: str):
  """A tqdm bar on a terminal; disabled elsewhere (a log file would get one carriage-return frame per second),
  where `run_steps` prints a plain line every `log_every` steps instead."""
  return progress.bar(total=total, initial=initial, desc=desc)


class _StepTrace:
  """A jax.profiler trace of steps `first .. last-1`: it starts before step `first` and stops before step `last`
  (or when the loop ends), each time after the previous steps' work has finished, so the trace holds whole steps."""

  def __init__(self, stage_dir: pathlib.Path, first: int, last: int):
    self.dir = stage_dir / layout.PROFILE / f"process_{jax.process_index()}"
    self.first, self.last, self.running = first, last, False

  def before(self, step: int, state: PyTree) -> None:
    if step == self.first and self.first < self.last:
      jax.block_until_ready(state)
      self.dir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.dir))
      self.running = True
    elif step == self.last:
      self.stop(state)

  def stop(self, state: PyTree) -> None:
    if self.running:
      try:
        jax.block_until_ready(state)
      except RuntimeError:  # a step that failed may have donated the state's buffers: stop the trace anyway
        pass
      jax.profiler.stop_trace()
      self.running = False
      print(f"profiler trace of steps {self.first + 1}-{self.last} -> {self.dir}", flush=True)


def run_steps(*, name: str, stage_dir: str | os.PathLike, step_fn: Callable[[PyTree, PyTree], tuple[PyTree, dict]],
              state: PyTree, iterator: Iterator, to_device: Callable[[Any], PyTree], ckpt: Checkpointer,
              total_steps: int, log_every: int, checkpoint_every: int, samples_per_step: int,
              compile_seconds: float, start_step: int, stop_at: int | None = None,
              extra_summary: dict[str, Any] | None = None,
              heldout_fn: Callable[[PyTree], dict] | None = None,
              profile_steps: int = 0) -> tuple[PyTree, dict[str, Any] | None]:
  """Runs steps `start_step .. total_steps-1`; returns (state, summary) (summary None when stopped early).

  Args:
    step_fn: compiled step; its metrics dict holds scalars (the first key named `loss` is the headline).
    iterator: a grain iterator of host batches; its position is saved with every checkpoint.
    to_device: host batch -> global jax.Arrays on the batch sharding.
    stop_at: stop after this step (checkpointing it) without writing the summary, as a preemption would;
      used by the resume tests.
    heldout_fn: `state -> {name: scalar}` on a fixed held-out batch, run at every log step; its values are
      logged as `heldout_<name>` and the last ones go into the summary.
    profile_steps: trace this many steps with jax.profiler into `stage_dir/profile/process_<i>`, starting
      after the first step of this run (its compile and warm-up stay out of the trace); 0 = no trace.
  """
  stage_dir = pathlib.Path(stage_dir)
  writer = MetricsWriter(stage_dir, resume_step=start_step)
  end = total_steps if stop_at is None else min(stop_at, total_steps)
  bar = _progress(total_steps, start_step, name)
  t_start = time.perf_counter()
  t_window, n_window = t_start, 0
  last: dict[str, float] = {}
  samples_per_s = float("nan")
  step = start_step
  trace = _StepTrace(stage_dir, start_step + 1, min(start_step + 1 + profile_steps, end)) if profile_steps else None
  try:
    for step in range(start_step, end):
      if trace is not None:
        trace.before(step, state)
      batch = to_device(next(iterator))
      state, metrics = step_fn(state, batch)
      n_window += 1
      done = step + 1
      if done % log_every == 0 or done == end:
        last = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        samples_per_s = n_window * samples_per_step / max(now - t_window, 1e-9)
        if heldout_fn is not None:  # after the throughput window: its cost is not training time
          last.update({f"heldout_{k}": float(v) for k, v in jax.device_get(heldout_fn(state)).items()})
        t_window, n_window = time.perf_counter(), 0
        if not all(math.isfinite(v) for v in last.values()):
          raise FloatingPointError(f"{name}: non-finite metrics at step {done}: {last}; lower "
                                   f"config.train.{name}.lr or check the data.")
        writer.write(done, {**last, "samples_per_s": samples_per_s})
        heldout = {k[len("heldout_"):]: v for k, v in last.items()
                   if k.startswith("heldout_") and "_t" not in k[len("heldout_"):]}
        bar.set_postfix(loss=f"{last.get('loss', float('nan')):.4g}", sps=f"{samples_per_s:.1f}",
                        **{k: f"{v:.3g}" for k, v in heldout.items()})
        if bar.disable and jax.process_index() == 0:
          extra = "".join(f", held-out {k} {v:.4g}" for k, v in heldout.items())
          print(f"[{name}] step {done}/{total_steps}: loss {last.get('loss', float('nan')):.4g}, "
                f"{samples_per_s:.1f} samples/s{extra}", flush=True)
      bar.update(1)
      if done % checkpoint_every == 0 or done == end:
        ckpt.save(done, state, iterator)
  finally:
    if trace is not None:
      trace.stop(state)
    bar.close()
    writer.close()
  wall = time.perf_counter() - t_start
  if stop_at is not None and end < total_steps:
    return state, None
  steps_run = end - start_step
  summary = {
      "stage": name,
      "steps": int(total_steps),
      "steps_this_run": int(steps_run),
      "final_loss": last.get("loss"),
      "final_metrics": last,
      "heldout": {k[len("heldout_"):]: v for k, v in last.items() if k.startswith("heldout_")},
      "samples_per_s": (steps_run * samples_per_step / wall) if steps_run else None,
      "compile_seconds": float(compile_seconds),
      "wall_seconds": float(wall),
      **(extra_summary or {}),
  }
  return state, summary


def finish_stage(stage_dir: str | os.PathLike, summary: dict[str, Any]) -> None:
  """Writes summary.json (last, atomically) and prints the one-line summary."""
  if jax.process_index() == 0:
    atomic.write_bytes(pathlib.Path(stage_dir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
  loss = summary.get("final_loss")
  sps = summary.get("samples_per_s")
  line = (f"[{summary['stage']}] done: {summary.get('steps')} steps, final loss "
          f"{'n/a' if loss is None else f'{loss:.5g}'}, "
          f"{'n/a' if sps is None else f'{sps:.2f}'} samples/s, compile {summary.get('compile_seconds', 0):.1f} s, "
          f"wall {summary.get('wall_seconds', 0):.1f} s -> {stage_dir}")
  print(line, flush=True)


def read_summary(stage_dir: str | os.PathLike) -> dict[str, Any]:
  return json.loads((pathlib.Path(stage_dir) / SUMMARY).read_text())
