"""config.validate(): every count, rate and size out of range is refused with the field and the fix."""

from __future__ import annotations

import pathlib

import pytest

from ldae_jax.config import default_config, latent_shape, load_config, validate

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_valid():
  validate(default_config())


@pytest.mark.parametrize("field,value,allowed", [
    ("train.autoencoder.steps", -5, ">= 1"),
    ("profile_steps", -1, ">= 0"),
    ("train.autoencoder.steps", 0, "config.stage"),  # 0 does not skip a stage: it says how to
    ("train.ldm.batch_size", 0, ">= 1"),
    ("train.representation.grad_accum", 0, ">= 1"),
    ("train.ldm.lr", 0.0, "> 0"),
    ("train.autoencoder.lr_disc", -1e-4, "> 0"),
    ("train.ldm.ema_decay", 1.0, "[0, 1)"),
    ("train.representation.ema_decay", -0.1, "[0, 1)"),
    ("train.ldm.b2", 1.0, "[0, 1)"),
    ("train.ldm.log_every", 0, ">= 1"),
    ("train.autoencoder.checkpoint_every", 0, ">= 1"),
    ("train.ldm.keep_checkpoints", 0, ">= 1"),
    ("train.ldm.clip_norm", -1.0, ">= 0"),
    ("train.latents_batch_size", 0, ">= 1"),
    ("data.val_fraction", 1.0, "[0, 1)"),
    ("data.test_fraction", -0.1, "[0, 1)"),
    ("data.synthetic.subjects", 0, ">= 1"),
    ("data.synthetic.workers", -1, ">= 0"),
    ("data.num_workers", -1, ">= 0"),
    ("data.spacing_mm", 0.0, "> 0"),
    ("diffusion.timesteps", 0, ">= 1"),
    ("eval.batch_size", 0, ">= 1"),
    ("eval.ddim_steps", (10, 2000), "[1, config.diffusion.timesteps=1000]"),
    ("diffusion.clamp_range", -1.0, ">= 0"),
    ("encoder.code_norm", "batch", "'template'"),
    ("encoder.code_norm_momentum", 1.0, "[0, 1)"),
])
def test_out_of_range_values_name_field_and_fix(field, value, allowed):
  c = default_config()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError) as e:
    validate(c)
  msg = str(e.value)
  assert f"config.{field}={value!r}" in msg and allowed in msg and f"--config.{field}=" in msg


def test_fractions_must_leave_a_training_split():
  c = default_config()
  c.data.val_fraction, c.data.test_fraction = 0.5, 0.5
  with pytest.raises(ValueError, match="leave no subjects to train on"):
    validate(c)


def test_no_dead_options():
  # The LPIPS term is not implemented, so no field pretends to configure it.
  c = default_config()
  assert "perceptual_weight" not in c.train.autoencoder and "perceptual_weights" not in c.train.autoencoder


def test_gpu_config_is_the_quickstart_method_at_3mm_in_bf16_and_tiny_shrinks_it():
  gpu, quick = load_config(str(CONFIGS / "gpu.py")), load_config(str(CONFIGS / "quickstart.py"))
  assert gpu.data.image_shape == (64, 80, 64) and gpu.data.spacing_mm == 3.0 and gpu.encoder.seq_len == 64
  assert latent_shape(gpu) == latent_shape(default_config())  # the paper's 16x20x16x3 latent
  assert gpu.compute_dtype == "bfloat16" and gpu.data.synthetic.subjects > quick.data.synthetic.subjects
  for field in ("code_norm", "stochastic_depth", "attn_dropout"):  # quickstart's choices, kept
    assert gpu.encoder[field] == quick.encoder[field]
  assert gpu.train.autoencoder.adv_weight == 0.0
  for stage in ("autoencoder", "ldm", "representation"):  # more samples seen by every stage
    g, q = gpu.train[stage], quick.train[stage]
    assert g.steps * g.batch_size * g.grad_accum > q.steps * q.batch_size * q.grad_accum
  tiny = load_config(str(CONFIGS / "gpu.py") + ":tiny")
  assert tiny.compute_dtype == "float32" and tiny.data.image_shape == (32, 40, 32)
  assert tiny.data.synthetic.subjects == 16 and max(tiny.train[s].steps for s in ("ldm", "representation")) < 20
  with pytest.raises(ValueError, match="unknown variant"):
    load_config(str(CONFIGS / "gpu.py") + ":huge")


@pytest.mark.parametrize("variant", ["", "small", "bf16", "small_bf16"])
def test_image_space_dae_configs_validate_against_the_image(variant):
  from ldae_jax.config import unet_input_shape
  c = load_config(str(CONFIGS / "dae_image_space.py") + (f":{variant}" if variant else ""))
  assert unet_input_shape(c) == (*c.data.image_shape, 1)
  c.unet.channel_mult = (1, 2, 2, 2, 2, 2, 2)  # 2**6 divides neither 160 nor 40 (Y)
  with pytest.raises(ValueError, match="input_space='image'"):
    validate(c)


def test_latent_unet_input_is_the_latent():
  from ldae_jax.config import unet_input_shape
  c = load_config(str(CONFIGS / "quickstart.py"))
  assert unet_input_shape(c) == latent_shape(c) == (8, 10, 8, 3)
  # The UNet's channels follow the latent's: a wider latent needs no second flag that could disagree with it.
  from ldae_jax.models.unet import unet_kwargs
  c.autoencoder.latent_channels = 8
  assert unet_kwargs(c)["in_channels"] == 8 and "in_channels" not in c.unet
  c.unet.input_space = "image"
  assert unet_kwargs(c)["in_channels"] == c.autoencoder.in_channels == 1
  c.unet.input_space = "pixels"
  with pytest.raises(ValueError, match="input_space"):
    validate(c)


def test_quickstart_predicts_v_and_its_eps_variant_is_the_reference_stage2():
  c, ref = load_config(str(CONFIGS / "quickstart.py")), load_config(str(CONFIGS / "quickstart.py") + ":eps")
  assert (c.diffusion.prediction, c.diffusion.clamp_range) == ("v", 0.0)
  assert (ref.diffusion.prediction, ref.diffusion.clamp_range) == ("eps", 1.0) == (
      default_config().diffusion.prediction, default_config().diffusion.clamp_range)
  assert load_config(str(CONFIGS / "paper.py")).diffusion.prediction == "eps"  # reference checkpoints are eps
