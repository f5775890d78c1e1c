"""Stage dispatch: one stage, or `all` of them in order in one workdir, skipping completed ones.

A stage is complete when `DIR/<stage>/summary.json` exists (written last, atomically). The synthetic
cohort is generated into `DIR/cohort` on first use when `config.data.manifest` is empty. Before a stage that
reads the NIfTI files runs, every file of a user's manifest is read once, so that a bad one stops the run
before anything trains. Every run writes its resolved config to `DIR/config.json`; the first stage that
splits the cohort records the split in `DIR/splits.json`, which later stages check (`volumes.splits`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import ml_collections

from ldae_jax import workdir as layout
from ldae_jax.data import atomic
from ldae_jax.training import common
from ldae_jax.training import loop
from ldae_jax.training import volumes

ORDER = layout.STAGES
# The stages that read the manifest's NIfTI files (the later ones read the latent shards).
READS_SCANS = (layout.AUTOENCODER, layout.LATENTS)


def _module(stage: str):
  from ldae_jax.training import (autoencoder_stage, latents_stage, ldm_stage,  # pylint: disable=g-import-not-at-top
                                 representation_stage)
  return {layout.AUTOENCODER: autoencoder_stage, layout.LATENTS: latents_stage, layout.LDM: ldm_stage,
          layout.REPRESENTATION: representation_stage}[stage]


def run_stage(config: ml_collections.ConfigDict, workdir: str | os.PathLike, stage: str, **kw: Any):
  if stage not in ORDER:
    raise ValueError(f"config.stage={stage!r}: one of {ORDER + ('all',)}.")
  return _module(stage).run(config, workdir, **kw)


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs `config.stage` (or all stages) in `workdir`; returns {stage: summary}."""
  workdir = pathlib.Path(workdir)
  wd = layout.Workdir(workdir)
  todo = [config.stage] if config.stage != "all" else [s for s in ORDER if not loop.is_complete(wd.stage_dir(s))]
  if any(s in READS_SCANS for s in todo):
    volumes.check_scans(config, workdir)  # a bad file stops the run here, not after a stage trained
  existed = workdir.is_dir()
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    write_config(config, workdir)
    return _run_stages(config, workdir)
  except BaseException:
    common.remove_empty_dirs(workdir, keep_root=existed)  # folders are made eagerly; leave none empty behind
    if not existed and workdir.is_dir() and list(workdir.iterdir()) == [wd.config_json]:
      wd.config_json.unlink()  # nothing ran: no workdir that holds only a config
      workdir.rmdir()
    raise


def write_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """`DIR/config.json`: the resolved config of the latest run in the workdir (file + command-line overrides)."""
  if jax.process_index() == 0:
    atomic.write_bytes(layout.Workdir(workdir).config_json,
                       config.to_json_best_effort(indent=2, sort_keys=True).encode())


def _run_stages(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  if config.stage != "all":
    return {config.stage: run_stage(config, workdir, config.stage)}
  out = {}
  for stage in ORDER:
    sdir = layout.Workdir(workdir).stage_dir(stage)
    if loop.is_complete(sdir):
      print(f"[{stage}] already complete ({sdir / loop.SUMMARY}); skipping", flush=True)
      out[stage] = loop.read_summary(sdir)
      continue
    out[stage] = run_stage(config, workdir, stage)
  print(f"all stages complete; outputs in {workdir.absolute()} "
        f"({', '.join(f'{s}/' for s in ORDER)}, cohort/ when generated)", flush=True)
  return out
