"""`python evaluate.py ...` from a checkout without installing: the same as `ldae-evaluate`
(ldae_jax/cli/evaluate.py)."""

from ldae_jax.cli.evaluate import run

if __name__ == "__main__":
  run()
