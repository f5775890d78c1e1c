"""What a trained autoencoder keeps of a scan, judged before stages 2 and 3 are trained.

For a workdir where `train.py --config.stage=autoencoder` and then `--config.stage=latents` have run, on the
first --max_scans scans of a split (the report's 48 test scans by default):
  * the reconstruction decode(mu) against the image (SSIM, MSE), beside the train split's cohort-mean image, the
    no-information baseline every reconstruction must beat;
  * the posterior noise against the signal: the mean posterior variance sigma^2 per latent element, and the
    between-scan variance of mu per element (averaged over elements). The decoder is trained on
    z = mu + sigma * eps, so where sigma^2 exceeds the between-scan variance of mu it learns to ignore what
    tells scans apart;
  * a PNG of mid slices (image, AE reconstruction, cohort mean) for the first scans, to look for the ventricles.

  python benchmarks/ae_quality.py --config configs/quickstart.py --workdir runs/quickstart

Prints one line per figure and writes WORKDIR/ae_quality.json and WORKDIR/ae_quality.png.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory with the autoencoder and latents stages done")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "val", "test"], "split whose scans are reconstructed")
_MAX_SCANS = flags.DEFINE_integer("max_scans", 48, "scans reconstructed (the first ones in write order)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ldae_jax.data import atomic, shards  # pylint: disable=g-import-not-at-top
  from ldae_jax.evaluation import figures, metrics, reconstruction  # pylint: disable=g-import-not-at-top
  from ldae_jax.training import autoencoder_stage  # pylint: disable=g-import-not-at-top
  from ldae_jax.workdir import Workdir  # pylint: disable=g-import-not-at-top

  config, wd = _CONFIG.value, Workdir(_WORKDIR.value)
  t0 = time.perf_counter()
  ae, step = autoencoder_stage.trained_autoencoder(config, wd)
  data = reconstruction.read_split(wd, _SPLIT.value, _MAX_SCANS.value, fields=("mu", "logvar", "image"))
  mean_image = reconstruction.mean_train_image(wd)
  train_mu = shards.read_all(wd.shards("train"), ("mu",))["mu"]
  ae_def, ae_state = nnx.split(ae)
  kernel = int(config.eval.ssim_kernel)

  def score(state, batch):
    rec = nnx.merge(ae_def, state).decode(batch["mu"])
    out = {f"ae_vs_image/{k}": v for k, v in metrics.volume_metrics(rec, batch["image"], kernel_size=kernel).items()}
    base = metrics.volume_metrics(batch["mean_image"], batch["image"], kernel_size=kernel)
    out.update({f"cohort_mean_vs_image/{k}": v for k, v in base.items()})
    return dict(out, recon=rec)

  arrays = {"mu": data["mu"], "image": data["image"],
            "mean_image": np.broadcast_to(mean_image, data["image"].shape).astype(np.float32)}
  res = reconstruction.map_batched(jax.jit(score), arrays, int(config.eval.batch_size), ae_state, desc="AE recon")
  summary = reconstruction.summarise(res)
  posterior_var = float(np.mean(np.exp(data["logvar"])))
  between_var = float(np.mean(np.var(train_mu, axis=0)))
  result = {
      "workdir": str(wd), "split": _SPLIT.value, "scans": int(len(data["mu"])), "autoencoder_step": int(step),
      "ae_ssim": summary["ae_vs_image/ssim"]["mean"], "cohort_mean_ssim": summary["cohort_mean_vs_image/ssim"]["mean"],
      "ae_mse": summary["ae_vs_image/mse"]["mean"], "cohort_mean_mse": summary["cohort_mean_vs_image/mse"]["mean"],
      "posterior_variance": posterior_var, "between_scan_variance_of_mu": between_var,
      "seconds": time.perf_counter() - t0}
  print(f"{_SPLIT.value}, {result['scans']} scans, autoencoder step {step}: SSIM {result['ae_ssim']:.4f} "
        f"(cohort-mean image {result['cohort_mean_ssim']:.4f}); MSE {result['ae_mse']:.5f} "
        f"(cohort-mean image {result['cohort_mean_mse']:.5f})")
  print(f"posterior variance per element {posterior_var:.4g} vs between-scan variance of mu {between_var:.4g} "
        f"(train split; ratio {posterior_var / between_var:.3g})")
  n_fig = min(3, len(data["mu"]))
  png = figures.volume_grid([[data["image"][i], res["recon"][i], mean_image] for i in range(n_fig)],
                            wd.root / "ae_quality.png", row_labels=[str(s) for s in data["scan_id"][:n_fig]],
                            col_labels=["image", "AE reconstruction", "cohort-mean image"],
                            title=f"autoencoder step {step}, {_SPLIT.value} split")
  atomic.write_bytes(wd.root / "ae_quality.json", json.dumps(result, indent=1).encode())
  print(f"wrote {wd.root / 'ae_quality.json'} and {png}")


if __name__ == "__main__":
  app.run(main)
