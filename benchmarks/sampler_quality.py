"""Where do semantic-only decodes land? Unconditional and code-conditioned DDIM samples by step count and clamp.

The code-use criterion asks a semantic-only decode (x_T ~ N(0, I), the scan's own code) to land closer to the
scan's latent than with another subject's code, and less than twice as far as the cohort-mean latent (where an
ideal unconditional sample lands). This script separates the stages: the stage-2 UNet alone (no code) and,
when stage 3 is there, the ShiftUNet with the own / another subject's code, for several DDIM step counts and
x0 clamps, all against the cohort-mean baseline of the same test latents.

  python benchmarks/sampler_quality.py --config configs/quickstart.py --workdir runs/quickstart \
      [--steps 10,25,50,100] [--clamps 1,0,none] [--n 32]

Prints one line per (model, steps, clamp) and writes benchmarks/results/sampler_quality_<device>_<time>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from ldae_jax.config import load_config  # noqa: E402
from ldae_jax.data import latents, shards  # noqa: E402
from ldae_jax.diffusion import code_use as cu, ddim as ddim_lib, schedule as schedule_lib  # noqa: E402
from ldae_jax.evaluation import reconstruction as rec  # noqa: E402
from ldae_jax.models import build_unet  # noqa: E402
from ldae_jax.training import checkpoint, state as st  # noqa: E402
from ldae_jax.workdir import LDM, REPRESENTATION, Workdir  # noqa: E402


def _per_scan_mse(a, b):
  return np.mean(np.square(np.asarray(a) - np.asarray(b)).reshape(len(a), -1), axis=1)


def _clamp_kwargs(spec: str, data_range: float) -> dict:
  if spec == "none":
    return {"clamp": False, "clamp_range": 1.0}
  r = float(spec)
  return {"clamp": True, "clamp_range": data_range if r == 0 else r}


def run(config, workdir: str, steps_list, clamps, n: int, seed: int = 0) -> dict:
  sched = schedule_lib.make_schedule(config.diffusion)
  sdir = Workdir(workdir).shards("train")
  scale = latents.scale_factor(config, shards.read_metadata(sdir), str(sdir))
  train_mu = shards.read_all(sdir, ("mu",))["mu"].astype(np.float32) * scale
  data = rec.read_split(workdir, "test", n, fields=("mu", "image"))
  z0 = data["mu"].astype(np.float32) * scale
  mean = train_mu.mean(0)
  data_range = float(np.abs(train_mu).max())
  base = {"cohort_mean_mse": float(_per_scan_mse(np.broadcast_to(mean, z0.shape), z0).mean()),
          "n_scans": int(len(z0)), "data_range": data_range}
  print(f"{len(z0)} test scans; cohort-mean latent MSE {base['cohort_mean_mse']:.4f} (ideal unconditional "
        f"sample: {2 * base['cohort_mean_mse']:.4f}); data range |z| <= {data_range:.3f}", flush=True)
  noise = np.asarray(jax.random.normal(jax.random.key(seed + 1), z0.shape, jnp.float32))

  u_def, u_params, u_rngs, u_rest = st.abstract_model(lambda: build_unet(config, nnx.Rngs(0)))
  w = checkpoint.restore_ema_weights(Workdir(workdir).checkpoints(LDM), u_params, what="stage-2 UNet weights",
                                     missing_fix="train stage 2 first", mismatch_fix="use the run's config")
  u_graph, u_state = nnx.split(st.merge_model(u_def, w.params, u_rngs, u_rest))

  models = None
  if Workdir(workdir).checkpoints(REPRESENTATION).is_dir():
    models = rec.load_ldae(config, workdir)
    y = rec.semantic_codes(models.enc_def, models.enc_state, data["image"], int(config.eval.batch_size),
                           desc="codes")
    perm = cu.other_subject_pairing(data["subject"], seed=seed)
    other_mse = _per_scan_mse(z0[perm], z0).mean()
    base["other_subject_latent_mse"] = float(other_mse)
    print(f"another subject's latent MSE {other_mse:.4f}", flush=True)

  rows = []
  for steps in steps_list:
    ds = schedule_lib.ddim_schedule(sched, steps)
    for spec in clamps:
      kw = _clamp_kwargs(spec, data_range)

      @jax.jit
      def plain(state, x):
        net = nnx.merge(u_graph, state)
        return ddim_lib.sample(lambda a, t: net(a, t), x, ds, **kw)

      t0 = time.perf_counter()
      x = np.asarray(plain(u_state, noise))
      r = {"steps": steps, "clamp": spec, "unet_sample_vs_scan": float(_per_scan_mse(x, z0).mean()),
           "unet_sample_vs_mean": float(_per_scan_mse(x, np.broadcast_to(mean, x.shape)).mean()),
           "unet_sample_std": float(x.std())}
      if models is not None:
        s_graph, s_state = models.shift_def, models.shift_state

        @jax.jit
        def shifted(state, x, y):
          net = nnx.merge(s_graph, state)
          return ddim_lib.sample(lambda a, t: net(a, t, y), x, ds, shifted=True, **kw)

        own = np.asarray(shifted(s_state, noise, y))
        oth = np.asarray(shifted(s_state, noise, y[perm]))
        r.update(semantic_own_mse=float(_per_scan_mse(own, z0).mean()),
                 semantic_other_mse=float(_per_scan_mse(oth, z0).mean()),
                 semantic_vs_mean=float(_per_scan_mse(own, np.broadcast_to(mean, own.shape)).mean()))
        r["own_vs_other"] = r["semantic_own_mse"] / r["semantic_other_mse"]
        r["own_vs_cohort_mean"] = r["semantic_own_mse"] / base["cohort_mean_mse"]
      r["seconds"] = time.perf_counter() - t0
      rows.append(r)
      print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
  return {**base, "rows": rows, "device": str(jax.devices()[0]), "config": config.name, "workdir": workdir}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", required=True, help="config file (file.py[:variant]) the run was trained with")
  p.add_argument("--workdir", required=True, help="a trained run's workdir (stage 2 at least)")
  p.add_argument("--steps", default="10,25,50,100", help="comma-separated DDIM step counts")
  p.add_argument("--clamps", default="1,0,none", help="x0 clamps: a range, 0 = the data's max |z|, none = off")
  p.add_argument("--n", type=int, default=32, help="test scans")
  p.add_argument("--out_dir", default="benchmarks/results", help="where the JSON goes")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override as train.py's --config.FIELD=VALUE (e.g. diffusion.prediction=v)")
  a = p.parse_args()
  config = load_config(a.config)
  for item in a.set:
    field, value = item.split("=", 1)
    *parents, leaf = field.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = type(node[leaf])(value)
  r = run(config, a.workdir, [int(s) for s in a.steps.split(",")], a.clamps.split(","), a.n)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  out = pathlib.Path(a.out_dir) / f"sampler_quality_{jax.devices()[0].platform}_{stamp}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(r, indent=1))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
