"""Training pipeline: exact resume of the ldm stage, the pure helpers (accumulation, EMA), and the stage-3
refusal to start without stage-2 weights. Tiny shapes; one UNet step compilation shared via the persistent
compilation cache."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import jax.numpy as jnp
from flax import nnx
import numpy as np
import pytest

from ldae_jax.config import default_config, validate
from ldae_jax.data import shards
from ldae_jax.training import ldm_stage, loop, representation_stage
from ldae_jax.training import state as st
from ldae_jax.workdir import LDM, REPRESENTATION, Workdir


def tiny_config():
  """Smallest config the stages accept: latent (4, 4, 4, 3), one-level UNet without attention."""
  c = default_config()
  c.data.image_shape = (8, 8, 8)
  c.encoder.seq_len = 8
  c.autoencoder.channels = (4, 4)
  c.autoencoder.norm_groups = 2
  c.unet.base_channels = 4
  c.unet.channel_mult = (1,)
  c.unet.num_res_blocks = 1
  c.unet.attention_resolutions = ()
  c.unet.norm_groups = 2
  c.encoder.dims = (4, 8)
  c.encoder.depths = (1, 1)
  c.encoder.emb_dim = 8
  c.encoder.num_heads = 2
  t = c.train.ldm
  t.batch_size, t.grad_accum, t.steps, t.log_every, t.checkpoint_every, t.keep_checkpoints = 2, 2, 4, 1, 1, 2
  c.stage = "ldm"
  validate(c)
  return c


def write_shards(workdir: pathlib.Path, n: int = 8, with_images: bool = False, split: str = "train") -> None:
  rng = np.random.default_rng(0 if split == "train" else 1)
  with shards.ShardWriter(Workdir(workdir).shards(split), records_per_shard=4,
                          metadata={"scale_factor": 0.75}) as w:
    for i in range(n):
      rec = dict(mu=rng.normal(size=(4, 4, 4, 3)).astype(np.float32), logvar=np.zeros((4, 4, 4, 3), np.float32),
                 subject=f"s{i}", scan_id=f"s{i}")
      if with_images:
        rec["image"] = rng.uniform(size=(8, 8, 8, 1)).astype(np.float32)
      w.write(rec)


def test_ldm_resume_reproduces_uninterrupted_run(tmp_path):
  c = tiny_config()
  full, cut = tmp_path / "full", tmp_path / "cut"
  write_shards(full)
  write_shards(cut)
  s_full = ldm_stage.run(c, full)
  assert ldm_stage.run(c, cut, stop_at=2) is None  # "preempted" after step 2: no summary
  assert not loop.is_complete(Workdir(cut).stage_dir(LDM))
  s_cut = ldm_stage.run(c, cut)  # resumes from checkpoint 2 (state, RNG key and grain position)
  assert s_cut["steps_this_run"] == 2
  a, b = loop.read_metrics(Workdir(full).stage_dir(LDM)), loop.read_metrics(Workdir(cut).stage_dir(LDM))
  assert [m["step"] for m in b] == [1, 2, 3, 4]
  for ma, mb in zip(a, b):
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"], (ma, mb)
  assert s_full["final_loss"] == s_cut["final_loss"]
  wd = Workdir(cut)  # the stage wrote where the layout says
  summary = json.loads(wd.summary(LDM).read_text())
  for k in ("final_loss", "steps", "samples_per_s", "compile_seconds", "wall_seconds"):
    assert summary[k] is not None, k
  assert summary["scale_factor"] == 0.75
  kept = sorted(int(p.name) for p in wd.checkpoints(LDM).iterdir() if p.name.isdigit())
  assert kept == [3, 4]  # keep_checkpoints = 2
  assert wd.events(LDM).is_dir() and any(wd.events(LDM).iterdir())
  assert wd.metrics(LDM).is_file()
  # The UNet that stage 3 freezes is the EMA stage 2 saved, which moved away from the raw parameters.
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  from ldae_jax.models import build_shift_unet  # pylint: disable=import-outside-toplevel
  from ldae_jax.training.checkpoint import STATE_ITEM, flatten_paths  # pylint: disable=import-outside-toplevel
  shift = build_shift_unet(c, nnx.Rngs(0))
  assert representation_stage.load_frozen_unet(shift, c, cut) == 4
  unet = jax.device_get(nnx.to_pure_dict(nnx.state(shift.unet, nnx.Param)))
  loaded = flatten_paths(unet)
  target = {"ema": unet, "params": unet}  # both saved copies of the UNet, read as numpy
  saved = ocp.PyTreeCheckpointHandler().restore(wd.checkpoints(LDM) / "4" / STATE_ITEM, args=ocp.args.PyTreeRestore(
      item=target, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
      partial_restore=True))
  ema, raw = flatten_paths(saved["ema"]), flatten_paths(saved["params"])
  assert loaded.keys() == ema.keys()
  for k in loaded:
    np.testing.assert_array_equal(loaded[k], ema[k])
  assert any(not np.array_equal(ema[k], raw[k]) for k in ema)


def test_representation_refuses_without_stage2_weights(tmp_path):
  c = tiny_config()
  write_shards(tmp_path, with_images=True)
  with pytest.raises(FileNotFoundError, match=r"ldm/checkpoints.*config.stage=ldm"):
    representation_stage.build(c, tmp_path)


def test_accumulate_grads_equals_full_batch_gradient():
  w = {"w": jnp.arange(3.0)}
  x = jax.random.normal(jax.random.key(0), (8, 3))

  def grad_fn(p, rest, batch, key):
    loss, g = jax.value_and_grad(lambda p: jnp.mean((batch["x"] @ p["w"]) ** 2))(p)
    return g, rest + 1, {"loss": loss}

  g1, r1, m1 = st.accumulate_grads(grad_fn, w, jnp.zeros(()), {"x": x}, jax.random.key(1), 1)
  g4, r4, m4 = st.accumulate_grads(grad_fn, w, jnp.zeros(()), {"x": x}, jax.random.key(1), 4)
  np.testing.assert_allclose(g4["w"], g1["w"], rtol=1e-6)
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
  assert int(r4) == 4 and int(r1) == 1  # rest threaded through every micro-batch


def test_ema_per_step_and_reference_per_microbatch():
  ema, old, new, d = {"p": jnp.float32(0.0)}, {"p": jnp.float32(1.0)}, {"p": jnp.float32(2.0)}, 0.9
  np.testing.assert_allclose(st.ema_step(ema, old, new, d)["p"], 0.1 * 2.0, rtol=1e-6)
  # Reference: 3 updates towards the unchanged weights, then one towards the stepped ones.
  e = 0.0
  for _ in range(3):
    e = d * e + (1 - d) * 1.0
  e = d * e + (1 - d) * 2.0
  np.testing.assert_allclose(st.ema_step(ema, old, new, d, updates=4)["p"], e, rtol=1e-6)


def test_microbatches_split_rows_per_device_block():
  x = jnp.arange(8)
  mb = st.microbatches({"x": x}, 2)["x"]
  assert mb.shape == (2, 4)
  np.testing.assert_array_equal(mb[0], [0, 2, 4, 6])
  np.testing.assert_array_equal(np.sort(np.concatenate(mb)), np.arange(8))


def test_representation_encoder_lr_scale_scales_only_encoder_updates():
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, clip_norm=0.0, encoder_lr_scale=1.0))
  params = {"shift": {"w": jnp.ones((3,))}, "encoder": {"w": jnp.ones((2, 2))}}
  grads = {"shift": {"w": jnp.array([1.0, -2.0, 0.5])}, "encoder": {"w": jnp.array([[1.0, -1.0], [3.0, 0.1]])}}

  def first_update(scale):
    tx = representation_stage.make_optimizer(ml_collections.ConfigDict(dict(cfg, encoder_lr_scale=scale)))
    return tx.update(grads, tx.init(params), params)[0]

  base, slow = first_update(1.0), first_update(0.1)
  np.testing.assert_allclose(slow["encoder"]["w"], 0.1 * base["encoder"]["w"], rtol=1e-6)
  np.testing.assert_array_equal(slow["shift"]["w"], base["shift"]["w"])
  assert float(jnp.abs(base["encoder"]["w"]).min()) > 0
  with pytest.raises(ValueError, match="encoder_lr_scale"):
    representation_stage.make_optimizer(ml_collections.ConfigDict(dict(cfg, encoder_lr_scale=0.0)))


def test_heldout_metrics_are_logged_and_code_norm_statistics_move(tmp_path):
  """Stage 2 logs its EMA UNet's eps error on validation latents by timestep; stage 3 logs the code-swap gap on
  validation scans, its code-norm statistics follow the training batches, and its step-0 state built inside
  jit (as on the mesh) equals the host-built networks with the stage-2 UNet and the template loaded."""
  c = tiny_config()
  write_shards(tmp_path, with_images=True)
  write_shards(tmp_path, n=4, with_images=True, split="val")
  summary = ldm_stage.run(c, tmp_path)
  assert set(summary["heldout"]) == {"eps"} | {f"eps_t{t}" for t in (25, 100, 250, 475, 700, 900)}
  logged = loop.read_metrics(Workdir(tmp_path).stage_dir(LDM))
  assert all("heldout_eps_t475" in m for m in logged)
  assert "plateau" in ldm_stage.plateau_note(logged) or "too few" in ldm_stage.plateau_note(logged)
  c.stage = "representation"
  c.encoder.code_norm = "template"
  c.encoder.stochastic_depth = 0.0
  c.encoder.attn_dropout = 0.0
  r = c.train.representation
  r.batch_size, r.grad_accum, r.steps, r.log_every, r.checkpoint_every = 2, 1, 2, 1, 2
  summary = representation_stage.run(c, tmp_path)
  assert set(summary["heldout"]) == {"code_gap", "g_gain", "code_spread"}
  assert all(np.isfinite(v) for v in summary["heldout"].values())
  from ldae_jax.training.checkpoint import Checkpointer
  spec = representation_stage.build(c, tmp_path)
  ck = Checkpointer(Workdir(tmp_path).checkpoints(REPRESENTATION))
  state = ck.restore(spec.init_state(*spec.init_args))
  ck.close()
  stats = state.rest["encoder"]["code_norm"]
  train_images = shards.read_all(Workdir(tmp_path).shards("train"), ("image",))["image"]
  np.testing.assert_allclose(np.asarray(stats["template"]), train_images.mean(0), rtol=1e-5, atol=1e-6)
  # Two updates (one per step) from the EMA encoder's codes, bias-corrected weight 1 - m^2.
  m = c.encoder.code_norm_momentum
  np.testing.assert_allclose(float(stats["weight"]), 1 - m ** 2, rtol=1e-5)
  assert float(np.abs(np.asarray(stats["mean"])).max()) > 0 and float(np.asarray(stats["var"]).min()) > 0
  # The step-0 state built inside jit (as train_stage builds it on the mesh) is the host-built networks'.
  from ldae_jax.models import build_encoder, build_shift_unet  # pylint: disable=import-outside-toplevel
  init = jax.jit(spec.init_state)(*spec.init_args)
  shift = build_shift_unet(c, nnx.Rngs(params=c.seed + 10, dropout=c.seed + 11))
  representation_stage.load_frozen_unet(shift, c, tmp_path)
  encoder = build_encoder(c, nnx.Rngs(params=c.seed + 12, dropout=c.seed + 13))
  encoder.set_template(jnp.asarray(train_images.mean(0)))
  _, sp, _, s_rest = st.split_model(shift, representation_stage.SHIFT_TRAINABLE)
  _, ep, _, e_rest = st.split_model(encoder)
  host = {"params": {"shift": sp, "encoder": ep}, "rest": {"shift": s_rest, "encoder": e_rest}}
  for part in ("params", "rest"):
    for a, b in zip(jax.tree.leaves(getattr(init, part)), jax.tree.leaves(host[part]), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_ldm_plateau_note():
  falling = [{"step": s, "heldout_eps": 1.0 / s} for s in range(10, 110, 10)]
  flat = [{"step": s, "heldout_eps": 0.5} for s in range(10, 110, 10)]
  assert "NOT at a plateau" in ldm_stage.plateau_note(falling)
  assert "at a plateau" in ldm_stage.plateau_note(flat) and "NOT" not in ldm_stage.plateau_note(flat)
  assert "too few" in ldm_stage.plateau_note(flat[:1])


def test_pretrained_convnext_initialises_the_stage3_backbone(tmp_path, load_fixture):
  """config.encoder.pretrained_convnext (a torchvision state dict) is what the stage-3 encoder starts from."""
  from flax import nnx
  from ldae_jax.models.semantic_encoder import SemanticEncoder
  z = load_fixture("semantic_encoder_tiny")
  tv = {k[len("param/backbone.backbone."):]: v for k, v in z.items() if k.startswith("param/backbone.backbone.")}
  tv["features.0.0.weight"] = np.repeat(tv["features.0.0.weight"], 3, axis=1) / 3.0  # an RGB stem
  np.savez(tmp_path / "convnext.npz", **tv)
  model = SemanticEncoder(dims=(16, 32, 64, 128), depths=(2, 2, 2, 2), emb_dim=128, num_heads=8, seq_len=16,
                          rngs=nnx.Rngs(0))
  before = np.asarray(model.backbone.features[1][0].block_3.kernel[...]).copy()
  representation_stage.init_backbone(model, str(tmp_path / "convnext.npz"))
  after = np.asarray(model.backbone.features[1][0].block_3.kernel[...])
  np.testing.assert_array_equal(after, tv["features.1.0.block.3.weight"].T)
  assert not np.array_equal(before, after)
  np.testing.assert_allclose(np.asarray(model.backbone.features[0][0].kernel[...])[..., 0, :],
                             z["param/backbone.backbone.features.0.0.weight"][:, 0].transpose(1, 2, 0), rtol=1e-5)
  representation_stage.init_backbone(model, "")  # empty: nothing loaded, no error
  with pytest.raises(FileNotFoundError, match="pretrained_convnext"):
    representation_stage.init_backbone(model, str(tmp_path / "missing.pth"))


def test_cosine_lr_schedule_decays_to_zero_over_the_stage():
  cfg = ml_collections.ConfigDict(dict(lr=1e-2, b1=0.9, b2=0.999, eps=1e-8, clip_norm=0.0, steps=10,
                                       lr_schedule="cosine"))
  params = {"w": jnp.ones(())}
  tx = st.make_optimizer(cfg)
  opt = tx.init(params)
  sizes = []
  for _ in range(10):
    upd, opt = tx.update({"w": jnp.ones(())}, opt, params)
    sizes.append(-float(upd["w"]))
  assert sizes[0] == pytest.approx(1e-2, rel=1e-3)  # Adam's first step is lr * sign(g)
  assert all(a > b for a, b in zip(sizes, sizes[1:]))
  assert sizes[-1] < 0.03 * sizes[0]
  const = st.make_optimizer(ml_collections.ConfigDict(dict(cfg, lr_schedule="constant")))
  o = const.init(params)
  for _ in range(3):
    upd, o = const.update({"w": jnp.ones(())}, o, params)
  assert -float(upd["w"]) == pytest.approx(1e-2, rel=1e-3)
  with pytest.raises(ValueError, match="lr_schedule"):
    st.make_optimizer(ml_collections.ConfigDict(dict(cfg, lr_schedule="linear")))


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ldm_objective_follows_the_prediction_target(prediction):
  """The stage-2 loss of a fresh UNet (zero-initialised head: raw output 0) is the mean square of its target:
  the noise for eps (~1), v = sqrt(abar) eps - sqrt(1-abar) z0 for v, which grows with |z0| at high t."""
  from ldae_jax.diffusion.schedule import make_schedule
  from ldae_jax.models import build_unet
  from ldae_jax.training import state as st
  c = tiny_config()
  c.diffusion.prediction = prediction
  c.train.ldm.grad_accum = 1
  graphdef, params, rngs, rest = st.split_model(build_unet(c, nnx.Rngs(params=0, dropout=1)))
  tx = st.make_optimizer(c.train.ldm)
  state = st.create_state(params, rest, tx, seed=5, with_ema=False)
  step = jax.jit(ldm_stage.make_step(graphdef, rngs, tx, make_schedule(c.diffusion), 1.0, c.train.ldm))
  _, m = step(state, {"mu": np.full((64, 4, 4, 4, 3), 4.0, np.float32)})
  loss = float(m["loss"])
  if prediction == "eps":
    assert 0.8 < loss < 1.2
  else:  # E[abar] + 16 E[1 - abar] over t ~ U{0..999}: ~ 0.28 + 16 * 0.72
    assert 8.0 < loss < 14.0
