"""Initialisers and dtype helpers shared by every network.

The reference networks use PyTorch's defaults (kaiming-uniform with a=sqrt(5): U(+-1/sqrt(fan_in)) for
weights *and* biases) and zero-initialise some output convolutions; Flax's defaults differ, so every layer
here passes these explicitly.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) where fan_in = prod(kernel.shape[:-1]) (Flax kernels are (..., in, out)).
torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
zeros_init = nnx.initializers.zeros_init()


def torch_bias_init(fan_in: int):
  """PyTorch's default bias init U(+-1/sqrt(fan_in)), fan_in of the layer's *kernel*."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dtype_from_name(name: str) -> jnp.dtype:
  """'float32' / 'bfloat16' / 'float16' -> jnp dtype (config.compute_dtype)."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ValueError(f"Unknown compute dtype {name!r}; use float32, bfloat16 or float16.") from None
