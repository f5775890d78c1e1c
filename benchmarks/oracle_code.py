"""The oracle-code ceiling: how much can a code lower the stage-3 loss on this run's latents?

The shift branch G is trained alone (PDAE loss, the stage-2 EMA UNet frozen, the run's stage-3 optimizer
settings) on a code that carries the scan's latent: a fixed random projection of the scaled latent, each
dimension standardised over the train split. The code-swap gap (another subject's code - own) / own on the
test latents is then what a perfect semantic encoder could reach with this G architecture, this UNet and this
many steps: the trained encoder's gap (`evaluate.py --mode code_use`) reads against it.

  python benchmarks/oracle_code.py --config configs/quickstart.py --workdir runs/quickstart [--steps 350]

Prints the gap by timestep and writes benchmarks/results/oracle_code_<device>_<time>.json.
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
from ldae_jax.diffusion import code_use, losses  # noqa: E402
from ldae_jax.diffusion.schedule import make_schedule  # noqa: E402
from ldae_jax.models import build_shift_unet  # noqa: E402
from ldae_jax.training import representation_stage as rs, state as st  # noqa: E402
from ldae_jax.workdir import Workdir  # noqa: E402


def oracle_projection(train_mu: np.ndarray, dim: int, scale: float, seed: int = 0):
  """(P, mean, std): code = ((scale * flat(mu)) @ P - mean) / std, standardised on the train latents."""
  flat = train_mu.reshape(len(train_mu), -1) * scale
  p = np.random.default_rng(seed).normal(size=(flat.shape[1], dim)).astype(np.float32) / np.sqrt(flat.shape[1])
  codes = flat @ p
  return p, codes.mean(0).astype(np.float32), codes.std(0).astype(np.float32) + 1e-8


def run(config, workdir: str, steps: int, seed: int = 0, n_test: int = 64) -> dict:
  cfg = config.train.representation
  sdir = Workdir(workdir).shards("train")
  scale = latents.scale_factor(config, shards.read_metadata(sdir), str(sdir))
  train = shards.read_all(sdir, ("mu",))["mu"].astype(np.float32)
  test = shards.read_all(Workdir(workdir).shards("test"), ("mu", "subject"))
  proj, mean, std = oracle_projection(train, int(config.encoder.emb_dim), scale, seed)
  code_of = lambda mu: ((mu.reshape(mu.shape[0], -1) * scale) @ proj - mean) / std

  shift_unet = build_shift_unet(config, nnx.Rngs(params=config.seed + 10, dropout=config.seed + 11))
  rs.load_frozen_unet(shift_unet, config, workdir)
  s_def, sp, s_rngs, s_rest = st.split_model(shift_unet, rs.SHIFT_TRAINABLE)
  sched = make_schedule(config.diffusion)
  tx = st.make_optimizer(cfg)

  def loss_fn(params, rest, batch, key):
    shift = st.merge_model(s_def, params["shift"], s_rngs, rest["shift"])
    z0 = batch["mu"] * scale
    k_t, k_n, k_s = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (z0.shape[0],), 0, int(sched.num_timesteps))
    noise = jax.random.normal(k_n, z0.shape, jnp.float32)
    eps, g = shift(losses.q_sample(sched, z0, t, noise), t, code_of(batch["mu"]), deterministic=False,
                   rngs=nnx.Rngs(dropout=k_s))
    return losses.pdae_loss(eps, g, noise, t, sched)

  step = jax.jit(st.make_train_step(loss_fn, tx, accum=1, ema_decay=float(cfg.ema_decay)), donate_argnums=0)
  state = st.create_state({"shift": sp}, {"shift": s_rest}, tx, seed=seed, with_ema=cfg.ema_decay > 0)
  rng = np.random.default_rng(seed)
  bs = int(cfg.batch_size) * int(cfg.grad_accum)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, {"mu": jnp.asarray(train[rng.integers(0, len(train), bs)])})
  jax.block_until_ready(state)
  train_s = time.perf_counter() - t0

  params = state.ema if state.ema is not None else state.params
  shift = st.merge_model(s_def, params["shift"], s_rngs, state.rest["shift"])
  mu = test["mu"][:n_test].astype(np.float32)
  perm = code_use.other_subject_pairing(test["subject"][:n_test], seed=seed)
  y = code_of(mu)
  frozen, shift_fn = shift.frozen_and_shift_fns()
  out = jax.jit(lambda z, a, b: code_use.swap_losses_by_t(
      frozen, shift_fn, z, a, b, jax.random.key(seed), code_use.DEFAULT_TIMESTEPS, sched))(jnp.asarray(mu) * scale, jnp.asarray(y), jnp.asarray(y[perm]))
  summary = code_use.summarise(jax.device_get(out), code_use.DEFAULT_TIMESTEPS, seed=seed)
  return {"device": str(jax.devices()[0]), "config": config.name, "workdir": workdir, "steps": steps,
          "batch": bs, "lr": float(cfg.lr), "train_seconds": train_s, "final_train_loss": float(metrics["loss"]),
          "oracle": summary}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", required=True, help="config file the run was trained with")
  ap.add_argument("--workdir", required=True, help="run directory holding latents/ and ldm/")
  ap.add_argument("--steps", type=int, default=350, help="G training steps (the quickstart's stage 3 has 350)")
  ap.add_argument("--seed", type=int, default=0, help="projection, data order and noise seed")
  ap.add_argument("--out", default="benchmarks/results", help="folder of the JSON result")
  args = ap.parse_args()
  if args.steps < 1:
    ap.error("--steps must be >= 1")
  r = run(load_config(args.config), args.workdir, args.steps, args.seed)
  o = r["oracle"]
  print(f"oracle code on {r['device']} ({r['config']}, {args.steps} steps of G, {r['train_seconds']:.0f} s): gap "
        f"{100 * o['gap_other']:+.2f} % [{100 * o['gap_other_ci95'][0]:+.2f}, {100 * o['gap_other_ci95'][1]:+.2f}], "
        f"G gain {100 * o['g_gain']:.1f} %")
  for row in o["by_t"]:
    print(f"  t={row['t']:4d}  own {row['own']:.4g}  other {row['other']:.4g}  gap {100 * row['gap_other']:+.2f} %")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  path = pathlib.Path(args.out) / f"oracle_code_{jax.devices()[0].platform}_{stamp}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(r, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
