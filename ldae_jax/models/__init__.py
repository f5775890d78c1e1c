"""Flax NNX networks of LDAE, NDHWC layout. Builders take the project config (ldae_jax.config).

Import the builders from here; each lives in its own module:
  build_autoencoder(config, rngs)    -> autoencoder.AutoencoderKL
  build_discriminator(config, rngs)  -> discriminator.PatchDiscriminator
  build_unet(config, rngs)           -> unet.UNet
  build_shift_unet(config, rngs)     -> shift_unet.ShiftUNet
  build_encoder(config, rngs)        -> semantic_encoder.SemanticEncoder
"""

from __future__ import annotations

import importlib

_BUILDERS = {
    "build_autoencoder": "autoencoder",
    "build_discriminator": "discriminator",
    "build_unet": "unet",
    "build_shift_unet": "shift_unet",
    "build_encoder": "semantic_encoder",
}


def __getattr__(name):  # lazy, so importing one network does not import all of them
  if name in _BUILDERS:
    return getattr(importlib.import_module(f"{__name__}.{_BUILDERS[name]}"), name)
  raise AttributeError(name)
