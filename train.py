"""`python train.py ...` from a checkout without installing: the same as `ldae-train` (ldae_jax/cli/train.py)."""

from ldae_jax.cli.train import run

if __name__ == "__main__":
  run()
