"""Paper-size LDAE (the reference's aekl.yaml / ldae_pretrain.yaml / ldae_repr_learn.yaml).

Full-size volumes 128x160x128 at 1.5 mm, latent 16x20x16x3, UNet base 256 [1,2,3] (486.9 M parameters),
ConvNeXt-Small encoder. Meant for GPUs/TPUs; `--config=configs/paper.py:bf16` selects bf16 compute.
Reference batches: LDM 128 global, representation 8 x 4 accumulation = 32.
"""

from ldae_jax.config import default_config


def get_config(variant: str = ""):
  c = default_config()
  c.name = "paper"
  if variant in ("bf16", "gpu", "tpu"):
    c.compute_dtype = "bfloat16"
  elif variant:
    raise ValueError(f"configs/paper.py: unknown variant {variant!r} (known: bf16, gpu, tpu)")
  return c
