"""Evaluation glue: the jitted reconstruction batch function, padding, interpolation triplets, figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from configs import quickstart
from ldae_jax.evaluation import figures, interpolation, known_factors, metrics, report
from ldae_jax.evaluation import reconstruction as rec


def micro_config():
  """Quickstart volume (32x40x32; the encoder's ConvNeXt needs >= 32 per slice axis) with the narrowest nets."""
  c = quickstart.get_config()
  c.autoencoder.channels = (4, 8, 8)
  c.autoencoder.norm_groups = 4
  c.unet.base_channels = 8
  c.unet.norm_groups = 4
  c.unet.attention_resolutions = ()
  c.encoder.dims = (8, 8, 8, 16)  # last = emb_dim
  c.encoder.emb_dim = 16
  c.encoder.num_heads = 2
  c.eval.ddim_steps = (2,)
  c.eval.batch_size = 2
  return c


@pytest.fixture(scope="module")
def tiny():
  from ldae_jax import models
  c = micro_config()
  ae = models.build_autoencoder(c, nnx.Rngs(0))
  shift = models.build_shift_unet(c, nnx.Rngs(1))
  enc = models.build_encoder(c, nnx.Rngs(2))
  m = rec.LDAEModels(*nnx.split(ae), *nnx.split(shift), *nnx.split(enc), 0.9, {})
  rng = np.random.default_rng(0)
  data = {"image": rng.uniform(0, 1, (3, 32, 40, 32, 1)).astype(np.float32),
          "mu": rng.normal(size=(3, 8, 10, 8, 3)).astype(np.float32)}
  return c, m, data


def test_reconstruction_batches_padding_and_ae_bound(tiny):
  c, m, data = tiny
  mean_image = data["image"].mean(0)
  res = rec.evaluate_reconstruction(m, c, data, mean_image=mean_image, keep_volumes=3)
  s = res["by_steps"][2]
  floor = metrics.ssim(np.broadcast_to(mean_image, data["image"].shape), data["image"], kernel_size=c.eval.ssim_kernel)
  assert s["cohort_mean_vs_image/ssim"]["mean"] == pytest.approx(float(np.mean(floor)), abs=1e-5)
  assert s["encoded_vs_image/ssim"]["n"] == 3  # the padded 4th row is dropped
  # The AE bound from the jitted batch function equals the metric of a direct decode (two paths agree).
  ae = nnx.merge(m.ae_def, m.ae_state)
  direct = ae.decode(data["mu"])
  want = np.asarray(metrics.ssim(direct, data["image"], kernel_size=c.eval.ssim_kernel))
  assert s["ae_vs_image/ssim"]["mean"] == pytest.approx(float(want.mean()), abs=1e-5)
  v = res["volumes"][2]
  np.testing.assert_allclose(v["ae_recon"], np.asarray(direct), atol=3e-5)  # batch 2 vs 3: float32 rounding
  got = metrics.mse(v["recon"], v["ae_recon"])
  assert s["encoded_vs_ae/mse"]["mean"] == pytest.approx(float(np.mean(got)), rel=1e-5)
  assert v["x_T"].shape == (3, 8, 10, 8, 3) and np.all(np.isfinite(v["recon"]))


def test_code_batches_match_unbatched(tiny):
  c, m, data = tiny
  codes = rec.semantic_codes(m.enc_def, m.enc_state, data["image"], 2)
  one = nnx.merge(m.enc_def, m.enc_state)(data["image"][2:3], deterministic=True)
  assert codes.shape == (3, 16)
  np.testing.assert_allclose(codes[2], np.asarray(one)[0], atol=1e-5)


def test_interpolation_triplets():
  subj = np.array(["a", "a", "a", "a", "b", "b", "c", "c", "c"])
  months = np.array([12, 0, 6, 24, 0, 6, 0, 12, 36])
  rows = interpolation.triplets(subj, months)
  # a: sessions 0,6,12,24 -> (0,6,12),(0,6,24),(0,12,24),(6,12,24); b: none; c: (0,12,36).
  assert len(rows) == 5 and {r["subject"] for r in rows} == {"a", "c"}
  r = [x for x in rows if x["subject"] == "c"][0]
  assert r["alpha"] == pytest.approx(1 / 3) and r["time_gap"] == 36 and r["prediction_gap"] == 12
  for x in rows:
    assert months[x["i"]] < months[x["k"]] < months[x["j"]] and subj[x["i"]] == subj[x["k"]] == subj[x["j"]]
  with pytest.raises(ValueError, match="distinct"):
    interpolation.triplets(np.array(["a", "a", "a"]), np.array([0, 6, 6]))


def test_figures_and_json(tmp_path):
  vol = np.zeros((8, 10, 6, 1), np.float32)
  vol[4, 5, 3] = 1.0
  sag, cor, axi = figures.mid_slices(vol)
  assert sag.shape == (6, 10) and cor.shape == (6, 8) and axi.shape == (10, 8)
  assert sag.max() == cor.max() == axi.max() == 1.0  # each mid-slice passes through the centre voxel
  p = figures.volume_grid([[vol, vol]], tmp_path / "g.png", row_labels=["r"], col_labels=["a", "b"])
  assert (tmp_path / "g.png").stat().st_size > 1000 and p.endswith("g.png")
  report._write_json(tmp_path / "x.json", {"a": np.float32(1.5), "big": np.zeros(100), "l": np.arange(3)})
  assert json.loads((tmp_path / "x.json").read_text()) == {"a": 1.5, "l": [0, 1, 2]}


def test_probe_report_pieces(tmp_path):
  from ldae_jax.evaluation import probes
  rng = np.random.default_rng(0)

  def split(n, offset):
    subj = np.array([f"s{offset + i // 2}" for i in range(n)])
    diag = np.where(np.arange(n) // 2 % 2 == 0, "AD", "CN")
    codes = rng.normal(size=(n, 4)) + (diag == "AD")[:, None]
    return {"codes": codes, "diagnosis": diag, "age": rng.uniform(60, 80, n), "subject": subj,
            "scan_id": np.array([f"{s}_{i}" for i, s in enumerate(subj)])}

  train, test = split(40, 0), split(20, 100)
  res = {}
  for name in ("trained", "untrained"):
    res[name] = probes.run_probes(train, test, n_folds=4)[0]
    res[name]["code_spread"] = probes.relative_spread(train["codes"])
  md = report.probe_markdown(res)
  assert md.count("| trained |") == 2 and "Code spread" in md and "known factor" not in md
  assert "collapsed" in md and "collapsed" not in report.probe_markdown(res, "template")
  assert "code-use section" in report.probe_markdown(res, "template")
  truth = {s: {k: 1.0 for k in known_factors.SYNTHETIC} for s in train["scan_id"]}
  for name in res:
    res[name]["known_factors"] = probes.factor_recovery(
        train["codes"], known_factors.table(truth, train["scan_id"], "train"), train["subject"], test["codes"],
        {k: rng.normal(size=20) for k in known_factors.SYNTHETIC}, test["subject"], n_folds=4)
  assert "| hippocampus_ml |" in report.probe_markdown(res)
  latents = {"train": rng.normal(size=(40, 2, 3, 2, 1)), "test": rng.normal(size=(20, 2, 3, 2, 1))}
  lat = report.latent_probe_inputs({"train": train, "test": test}, latents)
  assert lat["train"]["codes"].shape == (40, 12) and lat["test"]["subject"] is test["subject"]
  np.testing.assert_array_equal(lat["test"]["codes"][3], latents["test"][3].ravel())
  res[report.LATENT_ROW] = probes.run_probes(lat["train"], lat["test"], n_folds=4)[0]
  md = report.probe_markdown(res, "template")
  assert md.count(f"| {report.LATENT_ROW} |") == 2 and "at best through this autoencoder" in md
  with pytest.raises(ValueError, match="latent shards changed"):
    report.latent_probe_inputs({"test": test}, {"test": latents["train"]})
  with pytest.raises(ValueError, match="ground_truth.csv"):
    known_factors.table(truth, test["scan_id"], "test")
  report._save_codes(tmp_path / "codes.npz", {"trained": {"train": train}})
  with np.load(tmp_path / "codes.npz") as z:
    np.testing.assert_array_equal(z["trained/train/codes"], train["codes"])
    assert list(z["trained/train/scan_id"]) == list(train["scan_id"])


def test_edit_magnitude_measures_change_from_alpha_zero():
  from ldae_jax.evaluation import manipulation
  base = np.random.default_rng(0).normal(size=(3, 1, 4, 4, 4, 1))
  vols = np.concatenate([base, base + 0.5, base - 2.0], axis=1)  # (N=3, A=3, ...)
  np.testing.assert_allclose(manipulation.edit_magnitude(vols), [0.0, 0.5, 2.0], atol=1e-12)


def test_code_use_evaluation_scores_every_code_on_the_same_noise(tiny):
  from ldae_jax.evaluation import code_use
  c, m, data = tiny
  d = dict(data, subject=np.array(["a", "b", "c"]))
  mean_latent = data["mu"].mean(0)
  r = code_use.evaluate_code_use(m, c, d, mean_latent, steps=2, timesteps=(100, 600))
  lo, de = r["loss"], r["decode"]
  assert [row["t"] for row in lo["by_t"]] == [100, 600]
  assert all(np.isfinite(row[k]) for row in lo["by_t"] for k in ("off", "own", "other", "mean", "eps_mse"))
  want = np.mean(np.square((mean_latent - data["mu"]) * m.scale).reshape(3, -1), axis=1).mean()
  assert de["cohort_mean_mse"] == pytest.approx(float(want), rel=1e-5)
  assert de["subject_rms"] > 0 and np.isfinite(de["swap_decode_rms"])
  assert "gap other" in code_use.markdown(r)


def test_interpolation_scores_model_free_baselines_the_same_way(tiny):
  c, m, data = tiny
  d = dict(data, subject=np.array(["a", "a", "a"]), session_months=np.array([0, 6, 24]))
  r = interpolation.evaluate_interpolation(m, c, d, steps=2)
  assert r["n"] == 1
  o = r["overall"]
  k = c.eval.ssim_kernel
  nearest = metrics.ssim(data["image"][:1], data["image"][1:2], kernel_size=k)  # alpha 0.25: session 0
  average = metrics.ssim(0.75 * data["image"][:1] + 0.25 * data["image"][2:3], data["image"][1:2], kernel_size=k)
  assert o["nearest_ssim_vs_image"] == pytest.approx(float(nearest[0]), abs=1e-5)
  assert o["average_ssim_vs_image"] == pytest.approx(float(average[0]), abs=1e-5)
  assert {"ssim_vs_ae", "nearest_ssim_vs_ae", "average_mse_vs_ae"} <= set(o)


def test_load_ldae_restores_the_ema_weights_of_stages_1_and_3(tmp_path):
  """The evaluation's networks carry the EMA weights the checkpoints hold, never the raw parameters, and stage 3's
  `rest` (its frozen UNet, the encoder's statistics) as saved."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from test_training import tiny_config, write_shards  # pylint: disable=import-outside-toplevel
  from ldae_jax import models  # pylint: disable=import-outside-toplevel
  from ldae_jax.training import representation_stage as rs, state as st  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import Checkpointer, flatten_paths  # pylint: disable=import-outside-toplevel
  from ldae_jax.workdir import AUTOENCODER, REPRESENTATION, Workdir  # pylint: disable=import-outside-toplevel
  c = tiny_config()
  wd = Workdir(tmp_path)
  write_shards(tmp_path, with_images=True)

  def save(name, params, rest, tx):
    state = st.create_state(params, rest, tx, seed=0, with_ema=True)
    state = state.replace(ema=jax.tree.map(lambda x: x + 1.0, state.ema))  # an EMA unlike the parameters
    ck = Checkpointer(wd.checkpoints(name))
    ck.save(3, state)
    ck.close()
    return state

  rng = np.random.default_rng(0)

  def random_split(build, trainable=nnx.Param):  # (params, rest) of the network's shapes, random values
    _, params, _, rest = st.abstract_model(lambda: build(c, nnx.Rngs(0)), trainable)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), (params, rest))

  gp, g_rest = random_split(models.build_autoencoder)
  dp, d_rest = random_split(models.build_discriminator)
  ae_tx = st.make_optimizer(c.train.autoencoder)
  ae = save(AUTOENCODER, {"g": gp, "d": dp}, {"g": g_rest, "d": d_rest}, {"g": ae_tx, "d": ae_tx})
  sp, s_rest = random_split(models.build_shift_unet, rs.SHIFT_TRAINABLE)
  ep, e_rest = random_split(models.build_encoder)
  r = save(REPRESENTATION, {"shift": sp, "encoder": ep}, {"shift": s_rest, "encoder": e_rest},
           rs.make_optimizer(c.train.representation))

  m = rec.load_ldae(c, tmp_path)
  assert m.steps == {AUTOENCODER: 3, REPRESENTATION: 3}

  def assert_same(got, want):
    got, want = flatten_paths(jax.device_get(got)), flatten_paths(jax.device_get(want))
    assert got.keys() == want.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))

  for (graphdef, state), trainable, ema, rest in (
      ((m.ae_def, m.ae_state), nnx.Param, ae.ema["g"], ae.rest["g"]),
      ((m.shift_def, m.shift_state), rs.SHIFT_TRAINABLE, r.ema["shift"], r.rest["shift"]),
      ((m.enc_def, m.enc_state), nnx.Param, r.ema["encoder"], r.rest["encoder"])):
    _, params, _, rest_got = st.split_model(nnx.merge(graphdef, state), trainable)
    assert_same(params, ema)
    assert_same(rest_got, rest)
