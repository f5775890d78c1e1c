"""What a linear probe can read from the scans themselves, beside what it reads from the codes.

The report probes the trained code, the untrained encoder and the flattened autoencoder latent ("AE latent").
This benchmark adds the rows that need no network: the preprocessed image voxels (the run's resolution, as the
autoencoder sees them) and the synthetic cohort's generating volumes (hippocampus, ventricles, grey matter, ICV).
Same split, same probes (`evaluation.probes.run_probes`: subject-grouped CV for C / alpha, test ROC-AUC with a
subject-bootstrap interval). If the voxels already read below the acceptance's AUC, no code of these scans can be
expected to read above it linearly, whatever the networks.

  python benchmarks/probe_ceiling.py --config configs/quickstart.py --workdir runs/quickstart
  python benchmarks/probe_ceiling.py --config configs/quickstart.py --workdir runs/seed1 \
      --config.data.synthetic.seed=1 --config.seed=1

The cohort is generated into WORKDIR/cohort when it is not there (about a minute); nothing else is trained.
When WORKDIR has latents (`train.py --config.stage=autoencoder`, then `latents`), the "AE latent" row is added,
so that an autoencoder variant can be judged by what its latent carries before stages 2 and 3 are trained.
Prints one line per input and writes WORKDIR/probe_ceiling.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/quickstart.py", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (its cohort/ and splits.json are used or created)")
_OUT = flags.DEFINE_string("out", "", "JSON output (default WORKDIR/probe_ceiling.json)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ldae_jax.data import atomic, shards  # pylint: disable=g-import-not-at-top
  from ldae_jax.evaluation import probes  # pylint: disable=g-import-not-at-top
  from ldae_jax.evaluation import known_factors  # pylint: disable=g-import-not-at-top
  from ldae_jax.training import volumes  # pylint: disable=g-import-not-at-top
  from ldae_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top

  config, workdir = _CONFIG.value, pathlib.Path(_WORKDIR.value)
  t0 = time.perf_counter()
  split_records = volumes.splits(config, workdir)
  truth = known_factors.read(config, workdir)
  inputs = {}
  for split in ("train", "test"):
    recs = split_records[split]
    images = np.stack([volumes.load(r, config).reshape(-1) for r in recs])
    base = {"diagnosis": [r.diagnosis for r in recs], "age": [r.age for r in recs],
            "subject": [r.subject for r in recs]}
    inputs.setdefault("image voxels", {})[split] = dict(base, codes=images)
    if truth is not None:
      table = known_factors.table(truth, [r.scan_id for r in recs], split)
      inputs.setdefault("generating volumes", {})[split] = dict(
          base, codes=np.stack([table[k] for k in sorted(table)], axis=1))
  wd = Workdir(workdir)
  if all(wd.shards(split).is_dir() for split in ("train", "test")):  # stage 1 and the latents stage have run
    for split in ("train", "test"):
      recs = shards.read_all(wd.shards(split), ("mu", "diagnosis", "age", "subject"))
      inputs.setdefault("AE latent", {})[split] = {
          "codes": recs["mu"].reshape(len(recs["mu"]), -1), "diagnosis": [str(d) for d in recs["diagnosis"]],
          "age": recs["age"], "subject": [str(x) for x in recs["subject"]]}
  print(f"loaded {sum(len(split_records[s]) for s in ('train', 'test'))} scans at "
        f"{tuple(config.data.image_shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
  results = {}
  for name, by_split in inputs.items():
    t1 = time.perf_counter()
    res, _ = probes.run_probes(by_split["train"], by_split["test"], seed=int(config.seed))
    cls, age = res["ad_vs_cn"], res["age"]
    lo, hi = cls["test"]["roc_auc_ci95"]
    results[name] = {"dims": int(by_split["train"]["codes"].shape[1]), "ad_vs_cn_test_auc": cls["test"]["roc_auc"],
                     "ad_vs_cn_test_auc_ci95": [lo, hi], "ad_vs_cn_cv_auc": cls["cv"]["roc_auc"],
                     "age_test_mae": age["test"]["mae"], "age_cv_mae": age["cv"]["mae"],
                     "n_test_subjects": cls["test"]["n_subjects"]}
    print(f"{name:>18} ({results[name]['dims']} dims): AD-vs-CN test AUC {cls['test']['roc_auc']:.3f} "
          f"[{lo:.3f}, {hi:.3f}], CV {cls['cv']['roc_auc']:.3f}; age MAE test {age['test']['mae']:.2f} y, "
          f"CV {age['cv']['mae']:.2f} y ({time.perf_counter() - t1:.0f} s)", flush=True)
  out = pathlib.Path(_OUT.value) if _OUT.value else workdir / "probe_ceiling.json"
  summary = {"config": config.name, "image_shape": list(config.data.image_shape),
             "cohort_seed": int(config.data.synthetic.seed), "results": results}
  atomic.write_bytes(out, json.dumps(summary, indent=1).encode())
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
